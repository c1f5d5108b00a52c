// Loads and stores of fp32 or bf16 elements as float, for element-wise kernels
// that serve both storage types with one body.
#pragma once

#include "core/bf16.h"
#include "core/stream.h"

namespace flashmoe {

FLASHMOE_HD float load_float(const float* p, int64_t i) { return p[i]; }
FLASHMOE_HD float load_float(const bf16* p, int64_t i) { return to_float(p[i]); }
FLASHMOE_HD void store_float(float* p, int64_t i, float v) { p[i] = v; }
FLASHMOE_HD void store_float(bf16* p, int64_t i, float v) { p[i] = to_bf16(v); }
// fp64 (statistics, metric sums) stays fp64 end to end.
FLASHMOE_HD double load_float(const double* p, int64_t i) { return p[i]; }
FLASHMOE_HD void store_float(double* p, int64_t i, double v) { p[i] = v; }

// W consecutive elements moved as one value: on the GPU in 16-byte accesses where
// W * sizeof(T) is a multiple of 16 (the caller guarantees the alignment), else one
// element at a time. Element k reads and writes with load_float(v, k), store_float.
template <int W, class T>
struct alignas(W * sizeof(T) % 16 == 0 ? 16 : alignof(T)) Lanes {
  T v[W];
};

#if defined(__CUDA_ARCH__)
template <int W, class T>
constexpr bool kVectorLanes = W * sizeof(T) % 16 == 0;
#else
template <int W, class T>
constexpr bool kVectorLanes = false;
#endif

template <int W, class T>
FLASHMOE_HD Lanes<W, T> load_lanes(const T* p, int64_t i) {
  Lanes<W, T> lanes;
  if constexpr (kVectorLanes<W, T>) {
    for (int k = 0; k < int(W * sizeof(T) / 16); ++k) {
      reinterpret_cast<uint4*>(lanes.v)[k] = reinterpret_cast<const uint4*>(p + i)[k];
    }
  } else {
    for (int k = 0; k < W; ++k) lanes.v[k] = p[i + k];
  }
  return lanes;
}

template <int W, class T>
FLASHMOE_HD void store_lanes(T* p, int64_t i, const Lanes<W, T>& lanes) {
  if constexpr (kVectorLanes<W, T>) {
    for (int k = 0; k < int(W * sizeof(T) / 16); ++k) {
      reinterpret_cast<uint4*>(p + i)[k] = reinterpret_cast<const uint4*>(lanes.v)[k];
    }
  } else {
    for (int k = 0; k < W; ++k) p[i + k] = lanes.v[k];
  }
}

// Blocks for a grid-stride loop over n elements.
inline unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

}  // namespace flashmoe
