#include "core/stream.h"

#include "core/error.h"

namespace flashmoe {

cudaStream_t current_stream() {
  static cudaStream_t stream = [] {
    cudaStream_t s = nullptr;
    CUDA_CHECK(cudaStreamCreate(&s));
    return s;
  }();
  return stream;
}

void synchronize_stream() { CUDA_CHECK(cudaStreamSynchronize(current_stream())); }

}  // namespace flashmoe
