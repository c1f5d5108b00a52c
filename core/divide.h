// Integer division for index math on host and device: a / b and a % b for a >= 0 and
// b > 0, in 32 bits when both fit. The GPU has no divider; a 64-bit division costs
// several times the instructions of a 32-bit one, and element-wise layouts that make a
// few divisions an element are bound by them.
#pragma once

#include <cstdint>

#include "core/bf16.h"  // FLASHMOE_HD

namespace flashmoe {

struct QuotientRemainder {
  int64_t quotient, remainder;
};

FLASHMOE_HD QuotientRemainder divide(int64_t a, int64_t b) {
  if (static_cast<uint64_t>(a) <= UINT32_MAX && static_cast<uint64_t>(b) <= UINT32_MAX) {
    const uint32_t q = static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
    return {q, static_cast<uint32_t>(a) - q * static_cast<uint32_t>(b)};
  }
  return {a / b, a % b};
}

}  // namespace flashmoe
