// The router's load-balancing loss (kernels/router_balance.h) on the CPU: the counts on
// hand-made routing, its value at the two ends of its range, and its gradient against
// finite differences of an fp64 evaluation of the loss.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "kernels/router_balance.h"
#include "tests/test_util.h"

namespace flashmoe {
namespace {

// fp64: scale * sum over the rows of [T, H, 2, N] logits of sum_i f_i softmax(q)_i.
double loss_fp64(const std::vector<double>& q, const std::vector<double>& f, int64_t H, int64_t N,
                 double scale) {
  double loss = 0;
  for (int64_t r = 0; r < int64_t(q.size()) / N; ++r) {
    double max = -INFINITY, sum = 0, dot = 0;
    for (int64_t j = 0; j < N; ++j) max = std::max(max, q[r * N + j]);
    for (int64_t j = 0; j < N; ++j) sum += std::exp(q[r * N + j] - max);
    for (int64_t j = 0; j < N; ++j) dot += f[r % (2 * H) * N + j] * std::exp(q[r * N + j] - max);
    loss += scale * dot / sum;
  }
  return loss;
}

TEST(RouterBalance, CountsEachSelectionsKeysPerHeadAndHalf) {
  // T 2, H 2, K 2 over N = 3 keys (9 experts, e = 3 i + j); rows are (token, head).
  const std::vector<int32_t> ids = {0, 5, 8, 1, 3, 4, 8, 2};
  Tensor scratch, counts;
  count_key_selections(Tensor::from_vector(ids, {2, 2, 2}, Device::cpu), 3, scratch, counts);
  // Head 0 selects e = 0, 5, 3, 4: i = 0, 1, 1, 1 and j = 0, 2, 0, 1.
  // Head 1 selects e = 8, 1, 8, 2: i = 2, 0, 2, 0 and j = 2, 1, 2, 2.
  EXPECT_EQ(counts.to_vector<double>(), (std::vector<double>{1, 3, 0, 2, 1, 1, 2, 0, 2, 0, 1, 3}));
  key_fractions(counts);
  EXPECT_EQ(counts.to_vector<double>(),
            (std::vector<double>{0.25, 0.75, 0, 0.5, 0.25, 0.25, 0.5, 0, 0.5, 0, 0.25, 0.75}));
  test::expect_one_line_error(
      [] {
        Tensor s, c;
        count_key_selections(Tensor::from_vector(std::vector<int32_t>{9}, {1, 1, 1}, Device::cpu),
                             3, s, c);
      },
      "expert id");
}

// scale = alpha N / (2 H T): alpha when every key is as likely and as used, alpha N when
// one key has all the probability and all the selections.
TEST(RouterBalance, LossSpansAlphaToAlphaN) {
  const int64_t T = 6, H = 2, N = 5;
  const double alpha = 0.01, scale = alpha * N / (2.0 * H * T);
  for (bool collapsed : {false, true}) {
    std::vector<float> q(T * H * 2 * N, 0.0f);
    std::vector<double> f(H * 2 * N, 1.0 / N);
    if (collapsed) {
      for (int64_t r = 0; r < T * H * 2; ++r) q[r * N] = 60.0f;
      for (int64_t row = 0; row < H * 2; ++row) {
        for (int64_t i = 0; i < N; ++i) f[row * N + i] = i == 0 ? 1.0 : 0.0;
      }
    }
    Tensor dlogits = Tensor::zeros({T, H, 2, N}, DType::f32, Device::cpu), loss;
    BalanceLossBuffers buffers;
    balance_loss_backward(Tensor::from_vector(q, {T, H, 2, N}, Device::cpu),
                          Tensor::from_vector(f, {H, 2, N}, Device::cpu), scale, buffers, dlogits,
                          loss);
    EXPECT_NEAR(loss.to_doubles()[0], collapsed ? alpha * N : alpha, 1e-6 * alpha * N);
    // At the uniform point the gradient vanishes: p_j (f_j - sum f p) = 0.
    if (!collapsed) {
      for (double g : dlogits.to_doubles()) EXPECT_LT(std::abs(g), 1e-7 * scale);
    }
  }
}

TEST(RouterBalance, GradientMatchesFiniteDifferencesAndAddsToDlogits) {
  for (auto [T, H, N] : {std::tuple<int64_t, int64_t, int64_t>{5, 1, 7}, {3, 3, 16}, {2, 2, 33}}) {
    SCOPED_TRACE(testing::Message() << "T " << T << " H " << H << " N " << N);
    const int64_t n = T * H * 2 * N;
    const std::vector<float> q = test::uniforms(n, 1 + N, 3, -3.0f, 3.0f);
    const std::vector<float> before = test::uniforms(n, 2 + N, 3, -1.0f, 1.0f);
    std::vector<double> f(H * 2 * N);
    const std::vector<float> raw = test::uniforms(H * 2 * N, 3 + N, 3, 0.0f, 1.0f);
    for (int64_t row = 0; row < H * 2; ++row) {
      double sum = 0;
      for (int64_t i = 0; i < N; ++i) sum += raw[row * N + i];
      for (int64_t i = 0; i < N; ++i) f[row * N + i] = raw[row * N + i] / sum;
    }
    const double scale = 0.7;
    Tensor dlogits = Tensor::from_vector(before, {T, H, 2, N}, Device::cpu), loss;
    BalanceLossBuffers buffers;
    balance_loss_backward(Tensor::from_vector(q, {T, H, 2, N}, Device::cpu),
                          Tensor::from_vector(f, {H, 2, N}, Device::cpu), scale, buffers, dlogits,
                          loss);
    std::vector<double> q64(q.begin(), q.end()), fd(n), got(n);
    const std::vector<double> out = dlogits.to_doubles();
    const double h = 1e-5;
    for (int64_t i = 0; i < n; ++i) {
      const double keep = q64[i];
      q64[i] = keep + h;
      const double up = loss_fp64(q64, f, H, N, scale);
      q64[i] = keep - h;
      const double down = loss_fp64(q64, f, H, N, scale);
      q64[i] = keep;
      fd[i] = (up - down) / (2 * h);
      got[i] = out[i] - before[i];
    }
    EXPECT_LT(test::relative_error(got, fd), 1e-4);
    const double want = loss_fp64(q64, f, H, N, scale);
    EXPECT_NEAR(loss.to_doubles()[0], want, 1e-6 * std::abs(want));
  }
}

}  // namespace
}  // namespace flashmoe
