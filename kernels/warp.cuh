// Butterfly reductions over the 32 lanes of a warp. Every lane ends with the same
// bits: each step combines the same pair of values in every lane, so the order of
// the additions is fixed and results repeat run to run.
#pragma once

#include <cstdint>

namespace flashmoe {

// `combine` must be associative and commutative.
template <class T, class Combine>
__device__ __forceinline__ T warp_butterfly(T v, Combine combine) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = combine(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  return warp_butterfly(v, [](float a, float b) { return a + b; });
}

__device__ __forceinline__ double warp_sum(double v) {
  return warp_butterfly(v, [](double a, double b) { return a + b; });
}

__device__ __forceinline__ float warp_max(float v) {
  return warp_butterfly(v, [](float a, float b) { return fmaxf(a, b); });
}

// Integers: one redux.sync instruction from sm_80 on.
__device__ __forceinline__ int warp_sum(int v) {
#if __CUDA_ARCH__ >= 800
  return __reduce_add_sync(0xffffffffu, v);
#else
  return warp_butterfly(v, [](int a, int b) { return a + b; });
#endif
}

__device__ __forceinline__ uint32_t warp_max(uint32_t v) {
#if __CUDA_ARCH__ >= 800
  return __reduce_max_sync(0xffffffffu, v);
#else
  return warp_butterfly(v, [](uint32_t a, uint32_t b) { return max(a, b); });
#endif
}

__device__ __forceinline__ uint32_t warp_min(uint32_t v) {
#if __CUDA_ARCH__ >= 800
  return __reduce_min_sync(0xffffffffu, v);
#else
  return warp_butterfly(v, [](uint32_t a, uint32_t b) { return min(a, b); });
#endif
}

}  // namespace flashmoe
