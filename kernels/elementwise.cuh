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

// Blocks for a grid-stride loop over n elements.
inline unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

}  // namespace flashmoe
