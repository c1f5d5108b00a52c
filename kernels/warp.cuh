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

// Four sums over each aligned group of kGroup lanes at once (the whole warp by
// default): lane l ends with the sum over its group of v[(l % kGroup) / (kGroup / 4)],
// so the group's r-th quarter of lanes holds the sum of v[r]. Two exchanges halve the
// values a lane holds (it keeps half and sends its partner the other half), then a
// butterfly runs over the kGroup / 4 lanes of a quarter: 6 shuffles for a warp instead
// of four butterflies' 20. Each sum adds the same pairs in the same tree as warp_sum
// restricted to the group (offsets kGroup / 2, kGroup / 4, ..., 1), so over a warp it
// has warp_sum's bits; only the rows a lane would drop are never added.
template <int kGroup = 32>
__device__ __forceinline__ float warp_sum_quarters(const float (&v)[4]) {
  static_assert(kGroup >= 4 && kGroup <= 32 && (kGroup & (kGroup - 1)) == 0,
                "groups are 4, 8, 16 or 32 aligned lanes");
  const int lane = static_cast<int>(threadIdx.x % 32);
  const bool high_half = lane & (kGroup / 2), high_quarter = lane & (kGroup / 4);
  const float keep0 = high_half ? v[2] : v[0], send0 = high_half ? v[0] : v[2];
  const float keep1 = high_half ? v[3] : v[1], send1 = high_half ? v[1] : v[3];
  const float pair0 = keep0 + __shfl_xor_sync(0xffffffffu, send0, kGroup / 2);
  const float pair1 = keep1 + __shfl_xor_sync(0xffffffffu, send1, kGroup / 2);
  float sum = (high_quarter ? pair1 : pair0) +
              __shfl_xor_sync(0xffffffffu, high_quarter ? pair0 : pair1, kGroup / 4);
#pragma unroll
  for (int offset = kGroup / 8; offset > 0; offset >>= 1) {
    sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  }
  return sum;
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
