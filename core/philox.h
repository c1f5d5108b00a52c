// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC'11): a counter-based generator. The 128-bit output for (key, counter) is a
// pure function of its inputs, so the stream can be split across threads, ranks
// and backends and still give the same numbers everywhere.
//
// Parameter initialisation draws uniform floats from it; the float conversion
// below uses only exact integer->float steps and one explicitly rounded fma, so
// the CPU and the GPU produce bitwise equal values.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/bf16.h"

namespace flashmoe {

struct Philox4 {
  uint32_t v[4];
};

FLASHMOE_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// The 10-round bijection of the 128-bit counter under the 64-bit key.
FLASHMOE_HD Philox4 philox4x32(uint64_t key, uint64_t counter_hi, uint64_t counter_lo) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  uint32_t c0 = static_cast<uint32_t>(counter_lo), c1 = static_cast<uint32_t>(counter_lo >> 32);
  uint32_t c2 = static_cast<uint32_t>(counter_hi), c3 = static_cast<uint32_t>(counter_hi >> 32);
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kMul0, c0, hi0, lo0);
    philox_mulhilo(kMul1, c2, hi1, lo1);
    uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
    c0 = n0, c1 = n1, c2 = n2, c3 = n3;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Element `index` of the stream `stream` under `seed`: four elements share one
// Philox block, so a tensor of n elements costs n/4 evaluations.
FLASHMOE_HD uint32_t philox_u32(uint64_t seed, uint64_t stream, uint64_t index) {
  Philox4 block = philox4x32(seed, stream, index >> 2);
  return block.v[index & 3];
}

// Uniform in [0, 1) with 24 random bits: exact in float.
FLASHMOE_HD float philox_uniform(uint64_t seed, uint64_t stream, uint64_t index) {
  return static_cast<float>(philox_u32(seed, stream, index) >> 8) * 0x1p-24f;
}

// Uniform in [lo, hi): one rounding, the same on host and device.
FLASHMOE_HD float philox_uniform(uint64_t seed, uint64_t stream, uint64_t index, float lo,
                                 float hi) {
  float u = philox_uniform(seed, stream, index);
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(u, hi - lo, lo);
#else
  return std::fma(u, hi - lo, lo);
#endif
}

}  // namespace flashmoe
