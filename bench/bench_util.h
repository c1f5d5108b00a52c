// Timing and input helpers shared by flashmoe-bench and flashmoe-bench-ep.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "core/config.h"
#include "core/error.h"
#include "core/philox.h"
#include "core/stream.h"
#include "core/tensor.h"

namespace flashmoe {

// Median of `reps` event-timed runs of fn(rep) on the current stream, after `warmup`
// untimed ones; before(), where given, runs untimed ahead of each timed run.
inline double time_median_ms(const std::function<void(int)>& fn, int reps, int warmup = 5,
                             const std::function<void()>& before = {}) {
  for (int i = 0; i < warmup; ++i) fn(i);
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<float> times(reps);
  for (int i = 0; i < reps; ++i) {
    if (before) before();
    CUDA_CHECK(cudaEventRecord(start, current_stream()));
    fn(i);
    CUDA_CHECK(cudaEventRecord(stop, current_stream()));
    CUDA_CHECK(cudaEventSynchronize(stop));
    CUDA_CHECK(cudaEventElapsedTime(&times[i], start, stop));
  }
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  std::nth_element(times.begin(), times.begin() + reps / 2, times.end());
  return times[reps / 2];
}

// A device tensor of Philox uniforms in [-scale, scale).
inline Tensor random_tensor(Shape shape, DType dtype, uint64_t seed, float scale) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::vector<float> values(n);
  for (int64_t i = 0; i < n; ++i) values[i] = philox_uniform(seed, 0, i, -scale, scale);
  return Tensor::from_floats(values, std::move(shape), dtype, Device::cuda);
}

// A layer shape: T tokens of width D, shared intermediate I, E experts, top-K of H heads.
struct LayerCase {
  const char* name;
  int64_t T, D, I, E;
  int K, H;
};

// The moe.* section of a layer case (the rest at its defaults).
inline MoeConfig moe_config(const LayerCase& c) {
  MoeConfig moe;
  moe.num_experts = c.E;
  moe.top_k = c.K;
  moe.heads = c.H;
  moe.shared_intermediate = c.I;
  return moe;
}

}  // namespace flashmoe
