// bfloat16 storage type usable on host and device: 1 sign, 8 exponent, 7 mantissa
// bits, the upper half of an IEEE float. float -> bf16 rounds to nearest even
// (NaN stays NaN), the same rule as __float2bfloat16_rn, so host and device
// conversions agree bit for bit.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#define FLASHMOE_HD __host__ __device__ __forceinline__
#else
#define FLASHMOE_HD inline
#endif

namespace flashmoe {

struct bf16 {
  uint16_t bits = 0;
};

FLASHMOE_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

FLASHMOE_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

FLASHMOE_HD float to_float(bf16 h) { return bits_float(static_cast<uint32_t>(h.bits) << 16); }

FLASHMOE_HD bf16 to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}

// Two floats as the bf16 pair in one 32-bit word, `lo` in the low half (the lower
// address), each rounded as to_bf16 rounds it. On the device one cvt.rn.bf16x2.f32
// rounds both, to nearest even like to_bf16 for every value but NaN; a NaN takes
// to_bf16's path, so that it keeps the same bits as on the host.
FLASHMOE_HD uint32_t to_bf16x2(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if (!isnan(lo) && !isnan(hi)) {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
    return uint32_t(__bfloat16_as_ushort(pair.x)) | (uint32_t(__bfloat16_as_ushort(pair.y)) << 16);
  }
#endif
  return uint32_t(to_bf16(lo).bits) | (uint32_t(to_bf16(hi).bits) << 16);
}

// Rounds a float to the nearest bf16 value and back: what storing it in bf16 keeps.
FLASHMOE_HD float round_bf16(float f) { return to_float(to_bf16(f)); }

}  // namespace flashmoe
