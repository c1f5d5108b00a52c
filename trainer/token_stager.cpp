#include "trainer/token_stager.h"

#include <cstring>

#include "core/stream.h"

namespace flashmoe {

TokenStager::~TokenStager() {
  for (Slot& s : slots_) {
    if (s.copied) cudaEventDestroy(s.copied);
    if (s.pinned) cudaFreeHost(s.pinned);
  }
}

const Tensor& TokenStager::stage(const std::vector<int32_t>& values, int64_t rows, int64_t cols) {
  FLASHMOE_CHECK(static_cast<int64_t>(values.size()) == rows * cols,
                 values.size() << " token ids for a [" << rows << ", " << cols << "] batch");
  Slot& s = slots_[next_];
  next_ ^= 1;
  if (device_ == Device::cpu) {
    s.device = Tensor::from_vector(values, {rows, cols}, Device::cpu);
    return s.device;
  }
  if (s.copied) CUDA_CHECK(cudaEventSynchronize(s.copied));  // its copy of two batches ago
  if (s.capacity < values.size()) {
    if (s.pinned) CUDA_CHECK(cudaFreeHost(s.pinned));
    CUDA_CHECK(cudaMallocHost(&s.pinned, values.size() * sizeof(int32_t)));
    s.capacity = values.size();
  }
  if (!s.copied) CUDA_CHECK(cudaEventCreateWithFlags(&s.copied, cudaEventDisableTiming));
  ensure(s.device, {rows, cols}, DType::i32, Device::cuda);
  std::memcpy(s.pinned, values.data(), values.size() * sizeof(int32_t));
  CUDA_CHECK(cudaMemcpyAsync(s.device.raw(), s.pinned, values.size() * sizeof(int32_t),
                             cudaMemcpyHostToDevice, current_stream()));
  CUDA_CHECK(cudaEventRecord(s.copied, current_stream()));
  return s.device;
}

}  // namespace flashmoe
