// Helpers shared by the test suites.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/philox.h"
#include "core/tensor.h"

namespace flashmoe::test {

// GPU suites call this first: without a device the test is skipped, visibly.
#define FLASHMOE_REQUIRE_GPU()                                                             \
  do {                                                                                     \
    if (!::flashmoe::cuda_available()) GTEST_SKIP() << "no CUDA device: GPU test skipped"; \
  } while (0)

// n Philox uniforms in [lo, hi) of (seed, stream): element i is draw i.
inline std::vector<float> uniforms(int64_t n, uint64_t seed, uint64_t stream, float lo, float hi) {
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = philox_uniform(seed, stream, uint64_t(i), lo, hi);
  return v;
}

// n expert ids in [-1, experts]: empty slots (-1) and ids past the table (experts)
// among ids in [0, experts).
inline std::vector<int32_t> ids_with_empties(int64_t n, int64_t experts, uint64_t seed) {
  std::vector<int32_t> ids(n);
  for (int64_t i = 0; i < n; ++i)
    ids[i] = int32_t(philox_u32(seed, 3, uint64_t(i)) % (experts + 2)) - 1;
  return ids;
}

// A device output with every byte set to `byte`: unwritten elements stay NaN (0xFF in
// fp32 and bf16) or an impossible index (0x7F in int32 rows).
inline Tensor poisoned(const Shape& shape, DType dtype, uint8_t byte = 0xFF) {
  Tensor t = Tensor::empty(shape, dtype, Device::cuda);
  t.fill_bytes(byte);
  return t;
}

// A tensor's bytes, wherever it lives: for bitwise comparisons (NaN payloads included).
inline std::vector<uint8_t> bytes_of(const Tensor& t) {
  const Tensor host = t.to(Device::cpu);
  const auto* p = static_cast<const uint8_t*>(host.raw());
  return std::vector<uint8_t>(p, p + host.nbytes());
}

// ||a - b|| / ||b|| in fp64; infinite when either holds a NaN or b is zero while a is not.
inline double relative_error(const std::vector<double>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) return INFINITY;
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  if (den == 0) return num == 0 ? 0 : INFINITY;
  return std::sqrt(num / den);
}

inline double relative_error(const Tensor& a, const Tensor& b) {
  return relative_error(a.to_doubles(), b.to_doubles());
}

// The message of the flashmoe::Error that `action` throws, or "(no error)".
inline std::string error_of(const std::function<void()>& action) {
  try {
    action();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// `action` throws a one-line flashmoe::Error that holds every fragment.
inline void expect_one_line_error(const std::function<void()>& action,
                                  std::initializer_list<std::string> fragments) {
  const std::string message = error_of(action);
  EXPECT_EQ(message.find('\n'), std::string::npos) << "not one line: " << message;
  for (const std::string& fragment : fragments) {
    EXPECT_NE(message.find(fragment), std::string::npos)
        << "expected \"" << fragment << "\" in: " << message;
  }
}

inline void expect_one_line_error(const std::function<void()>& action,
                                  const std::string& fragment) {
  expect_one_line_error(action, {fragment});
}

}  // namespace flashmoe::test
