#include <gtest/gtest.h>

#include <set>

#include "core/divide.h"
#include "core/philox.h"
#include "core/tensor.h"
#include "tests/test_util.h"

namespace flashmoe {
namespace {

// Known-answer vectors from the Random123 distribution (kat_vectors, philox4x32_10).
TEST(Philox, MatchesRandom123KnownAnswers) {
  Philox4 zero = philox4x32(0, 0, 0);
  EXPECT_EQ(zero.v[0], 0x6627e8d5u);
  EXPECT_EQ(zero.v[1], 0xe169c58du);
  EXPECT_EQ(zero.v[2], 0xbc57ac4cu);
  EXPECT_EQ(zero.v[3], 0x9b00dbd8u);
  Philox4 ones = philox4x32(0xffffffffffffffffull, 0xffffffffffffffffull, 0xffffffffffffffffull);
  EXPECT_EQ(ones.v[0], 0x408f276du);
  EXPECT_EQ(ones.v[1], 0x41c83b0eu);
  EXPECT_EQ(ones.v[2], 0xa20bc7c6u);
  EXPECT_EQ(ones.v[3], 0x6d5451fdu);
}

TEST(Philox, RepeatableAndDistinctStreams) {
  std::vector<uint32_t> first, second;
  for (uint64_t i = 0; i < 1000; ++i) first.push_back(philox_u32(42, 7, i));
  for (uint64_t i = 0; i < 1000; ++i) second.push_back(philox_u32(42, 7, i));
  EXPECT_EQ(first, second);
  std::set<uint32_t> distinct(first.begin(), first.end());
  EXPECT_GT(distinct.size(), 990u);
  EXPECT_NE(philox_u32(42, 7, 0), philox_u32(42, 8, 0));
  EXPECT_NE(philox_u32(42, 7, 0), philox_u32(43, 7, 0));
}

TEST(Philox, UniformMomentsAndRange) {
  const int n = 200000;
  double sum = 0, sum_sq = 0;
  for (int i = 0; i < n; ++i) {
    float u = philox_uniform(1, 2, i, -1.0f, 1.0f);
    ASSERT_GE(u, -1.0f);
    ASSERT_LT(u, 1.0f);
    sum += u;
    sum_sq += double(u) * u;
  }
  EXPECT_NEAR(sum / n, 0.0, 0.01);
  EXPECT_NEAR(sum_sq / n, 1.0 / 3.0, 0.01);
}

TEST(Bf16, RoundsToNearestEven) {
  EXPECT_EQ(to_bf16(1.0f).bits, 0x3f80);
  EXPECT_EQ(to_float(to_bf16(1.0f + 0x1p-8f)), 1.0f);                // tie -> even
  EXPECT_EQ(to_float(to_bf16(1.0f + 3 * 0x1p-8f)), 1.0f + 0x1p-6f);  // tie -> even (up)
  EXPECT_TRUE(std::isnan(to_float(to_bf16(NAN))));
  EXPECT_EQ(to_float(to_bf16(-2.5f)), -2.5f);
}

// Both paths of divide() (32-bit where a and b fit, else 64-bit) against / and %, at
// the edges of the 32-bit range.
TEST(Divide, MatchesIntegerDivision) {
  const int64_t edge = int64_t{UINT32_MAX};
  const int64_t dividends[] = {0, 1, 63, 64, 65, edge - 1, edge, edge + 1, edge * 3 + 7, INT64_MAX};
  const int64_t divisors[] = {1, 3, 64, 1000003, edge - 1, edge, edge + 1, INT64_MAX};
  for (int64_t a : dividends) {
    for (int64_t b : divisors) {
      const QuotientRemainder qr = divide(a, b);
      EXPECT_EQ(qr.quotient, a / b) << a << " / " << b;
      EXPECT_EQ(qr.remainder, a % b) << a << " % " << b;
    }
  }
}

TEST(Tensor, ViewsShareStorage) {
  Tensor t = Tensor::from_floats({1, 2, 3, 4, 5, 6}, {3, 2}, DType::f32, Device::cpu);
  Tensor r = t.rows(1, 3);
  EXPECT_EQ(r.shape(), (Shape{2, 2}));
  r.data<float>()[0] = 30;
  EXPECT_EQ(t.to_floats()[2], 30);
  EXPECT_EQ(t.view({6}).numel(), 6);
  EXPECT_THROW(t.view({4}), Error);
  EXPECT_THROW(t.rows(2, 4), Error);
  EXPECT_THROW(t.data<int32_t>(), Error);
}

TEST(Tensor, Bf16Conversion) {
  Tensor t = Tensor::from_floats({1.0f, 0.1f, -3.0f}, {3}, DType::bf16, Device::cpu);
  std::vector<float> back = t.to_floats();
  EXPECT_EQ(back[0], 1.0f);
  EXPECT_NEAR(back[1], 0.1f, 1e-3);
  EXPECT_EQ(t.to(DType::f32).to_floats(), back);
}

TEST(Tensor, ErrorsNameTheProblem) {
  Tensor t = Tensor::zeros({2, 3}, DType::f32, Device::cpu);
  try {
    expect_shape(t, {3, 2}, "x");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("x has shape [2, 3], expected [3, 2]"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(expect_dtype(t, DType::bf16, "x"), Error);
  EXPECT_THROW(Tensor::empty({-1}, DType::f32, Device::cpu), Error);
}

}  // namespace
}  // namespace flashmoe
