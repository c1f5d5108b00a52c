// The device side of the expert-parallel dispatch (parallel/expert_parallel.h).
#include "core/stream.h"
#include "parallel/expert_parallel.h"

namespace flashmoe::detail {

namespace {

// Pair i = t S + s of `pairs`: for every owner p, entry p pairs + i gets the local id
// and gate where p owns the expert, else -1 and 0 (also for ids outside [0, P L)).
__global__ void split_slots_by_owner_kernel(const int32_t* __restrict__ ids,
                                            const float* __restrict__ gates, int64_t pairs,
                                            int64_t local_experts, int owners,
                                            int32_t* __restrict__ owner_ids,
                                            float* __restrict__ owner_gates) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= pairs) return;
  const int32_t id = ids[i];
  const float gate = gates[i];
  const int64_t owner = id >= 0 ? id / local_experts : -1;
  for (int p = 0; p < owners; ++p) {
    const bool mine = owner == p;
    owner_ids[p * pairs + i] = mine ? int32_t(id - p * local_experts) : -1;
    owner_gates[p * pairs + i] = mine ? gate : 0.0f;
  }
}

}  // namespace

void split_slots_by_owner_cuda(const Tensor& ids, const Tensor& gates, int64_t local_experts,
                               int owners, Tensor& owner_ids, Tensor& owner_gates) {
  const int64_t pairs = ids.numel();
  if (pairs == 0) return;
  const auto blocks = static_cast<unsigned>((pairs + 255) / 256);
  split_slots_by_owner_kernel<<<blocks, 256, 0, current_stream()>>>(
      ids.data<int32_t>(), gates.data<float>(), pairs, local_experts, owners,
      owner_ids.data<int32_t>(), owner_gates.data<float>());
  CUDA_CHECK_LAUNCH("split_slots_by_owner_kernel");
}

}  // namespace flashmoe::detail
