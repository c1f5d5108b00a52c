// Butterfly reductions over the 32 lanes of a warp. Every lane ends with the same
// bits: each step combines the same pair of values in every lane, so the order of
// the additions is fixed and results repeat run to run.
#pragma once

namespace flashmoe {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

}  // namespace flashmoe
