// The FlashMoELayer on the CPU backend (fp32) against the float64 reference, and the
// dense ops it is built from.
#include <gtest/gtest.h>

#include <cmath>

#include "kernels/elementwise.h"
#include "kernels/linear.h"
#include "kernels/norm.h"
#include "tests/layer_compare.h"

namespace flashmoe {
namespace {

TEST(LayerCpu, Fp32MatchesReference) {
  for (const test::LayerCase& c : test::kLayerCases) {
    SCOPED_TRACE(testing::Message()
                 << "T=" << c.T << " D=" << c.D << " E=" << c.E << " H=" << c.H << " K=" << c.K);
    test::compare_with_reference(c, Device::cpu, DType::f32, 11, 1e-5);
  }
}

// With moe.balance_loss the router's gradients gain exactly the balance loss's: with no
// router norm, dW_r += dq^T x and dx += dq W_r for the dq of kernels/router_balance.h on
// the layer's own logits and selections, at the default scale alpha N / (2 H T).
TEST(LayerCpu, BalanceLossAddsItsGradientThroughTheRouter) {
  test::LayerCase c{13, 8, 4, 100, 2, 3, Activation::silu, RouterNorm::none, false};
  const double alpha = 0.5;
  const Tensor x = test::random_input({c.T, c.D}, DType::f32, Device::cpu, 21);
  const Tensor dy = test::random_input({c.T, c.D}, DType::f32, Device::cpu, 22);
  FlashMoELayer plain(c.D, test::moe_config(c), Device::cpu, DType::f32, 3, 0);
  c.balance = alpha;
  FlashMoELayer balanced(c.D, test::moe_config(c), Device::cpu, DType::f32, 3, 0);
  plain.forward(x, true);
  const std::vector<double> dx_plain = plain.backward(dy).to_doubles();
  balanced.forward(x, true);
  const std::vector<double> dx_balanced = balanced.backward(dy).to_doubles();
  EXPECT_FALSE(plain.balance_loss().defined());

  const int64_t N = balanced.num_keys(), R = c.H * 2 * N;
  Tensor scratch, fractions, loss, dq = Tensor::zeros({c.T, c.H, 2, N}, DType::f32, Device::cpu);
  BalanceLossBuffers buffers;
  count_key_selections(balanced.routing().expert_ids, N, scratch, fractions);
  key_fractions(fractions);
  balance_loss_backward(balanced.router_logits(), fractions, alpha * N / (2.0 * c.H * c.T), buffers,
                        dq, loss);
  EXPECT_EQ(balanced.balance_loss().to_vector<float>(), loss.to_vector<float>());
  const std::vector<double> q = dq.to_doubles(), xs = x.to_doubles(),
                            w = balanced.parameters()[2]->value.to_doubles();
  std::vector<double> dw(R * c.D, 0.0), dx(c.T * c.D, 0.0);
  for (int64_t t = 0; t < c.T; ++t) {
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t d = 0; d < c.D; ++d) {
        dw[r * c.D + d] += q[t * R + r] * xs[t * c.D + d];
        dx[t * c.D + d] += q[t * R + r] * w[r * c.D + d];
      }
    }
  }
  const std::vector<double> dw_plain = plain.parameters()[2]->grad.to_doubles(),
                            dw_balanced = balanced.parameters()[2]->grad.to_doubles();
  std::vector<double> dw_added(dw.size()), dx_added(dx.size());
  for (size_t i = 0; i < dw.size(); ++i) dw_added[i] = dw_balanced[i] - dw_plain[i];
  for (size_t i = 0; i < dx.size(); ++i) dx_added[i] = dx_balanced[i] - dx_plain[i];
  EXPECT_LT(test::relative_error(dw_added, dw), 1e-4);
  EXPECT_LT(test::relative_error(dx_added, dx), 1e-4);
}

TEST(LayerCpu, RouterStatsCountUsedExpertsAndEntropy) {
  // Two tokens, one head, K = 2 over E = 4: experts {0, 1} and {1, 3}.
  Tensor ids = Tensor::from_vector<int32_t>({0, 1, 1, 3}, {2, 1, 2}, Device::cpu);
  Tensor gates = Tensor::from_floats({0.5f, 0.5f, 0.2f, 0.6f}, {2, 1, 2}, DType::f32, Device::cpu);
  Tensor workspace;
  RouterStats s = router_stats(ids, gates, 4, workspace);
  EXPECT_DOUBLE_EQ(s.fraction_used, 0.75);
  const double uniform = std::log(2.0), skewed = -(0.25 * std::log(0.25) + 0.75 * std::log(0.75));
  EXPECT_NEAR(s.gate_entropy, (uniform + skewed) / 2, 1e-7);
}

TEST(DenseOpsCpu, LinearMatchesReference) {
  const int64_t M = 7, K = 5, N = 3;
  Tensor x = test::random_input({M, K}, DType::f32, Device::cpu, 1);
  Tensor w = test::random_input({N, K}, DType::f32, Device::cpu, 2);
  Tensor dy = test::random_input({M, N}, DType::f32, Device::cpu, 3);
  Tensor y, dx, dw;
  linear_forward(x, w, y);
  linear_backward_input(dy, w, dx);
  linear_backward_weight(dy, x, dw, false);
  const std::vector<double> xd = x.to_doubles(), wd = w.to_doubles();
  EXPECT_LT(test::relative_error(y.to_doubles(), ref::linear_forward(xd, wd, M, K, N)), 1e-6);
  ref::LinearGrads<double> g = ref::linear_backward(xd, wd, dy.to_doubles(), M, K, N);
  EXPECT_LT(test::relative_error(dx.to_doubles(), g.dx), 1e-6);
  EXPECT_LT(test::relative_error(dw.to_doubles(), g.dw), 1e-6);
  linear_backward_weight(dy, x, dw, /*accumulate=*/true);
  for (double& v : g.dw) v *= 2;
  EXPECT_LT(test::relative_error(dw.to_doubles(), g.dw), 1e-6);
}

TEST(DenseOpsCpu, RmsNormWithGainMatchesFiniteDifferences) {
  const int64_t M = 4, D = 6;
  Tensor x = test::random_input({M, D}, DType::f32, Device::cpu, 1);
  Tensor gain = test::random_input({D}, DType::f32, Device::cpu, 2);
  Tensor dy = test::random_input({M, D}, DType::f32, Device::cpu, 3);
  Tensor y, rstd, dx, dgain;
  rmsnorm_forward(x, gain, 1e-5f, y, rstd);
  rmsnorm_backward(x, gain, rstd, dy, dx, dgain);
  // L = sum(y * dy) in double, differentiated numerically.
  auto loss = [&](const std::vector<double>& xv, const std::vector<double>& gv) {
    double total = 0;
    const std::vector<double> dyv = dy.to_doubles();
    for (int64_t m = 0; m < M; ++m) {
      double ss = 0;
      for (int64_t d = 0; d < D; ++d) ss += xv[m * D + d] * xv[m * D + d];
      const double r = 1 / std::sqrt(ss / D + 1e-5);
      for (int64_t d = 0; d < D; ++d) total += xv[m * D + d] * r * gv[d] * dyv[m * D + d];
    }
    return total;
  };
  auto numeric = [&](std::vector<double> xv, std::vector<double> gv, bool wrt_x) {
    std::vector<double>& v = wrt_x ? xv : gv;
    std::vector<double> grad(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      const double keep = v[i], h = 1e-6;
      v[i] = keep + h;
      const double up = loss(xv, gv);
      v[i] = keep - h;
      grad[i] = (up - loss(xv, gv)) / (2 * h);
      v[i] = keep;
    }
    return grad;
  };
  EXPECT_LT(test::relative_error(dx.to_doubles(), numeric(x.to_doubles(), gain.to_doubles(), true)),
            1e-5);
  EXPECT_LT(
      test::relative_error(dgain.to_doubles(), numeric(x.to_doubles(), gain.to_doubles(), false)),
      1e-5);
}

TEST(DenseOpsCpu, InitUniformIsOffsetConsistent) {
  // A shard initialised at its offset holds exactly the rows of the whole tensor.
  Tensor whole = Tensor::empty({10, 3}, DType::f32, Device::cpu);
  Tensor shard = Tensor::empty({4, 3}, DType::f32, Device::cpu);
  init_uniform(whole, 7, 1, 0.5f);
  init_uniform(shard, 7, 1, 0.5f, /*offset=*/6 * 3);
  EXPECT_EQ(shard.to_floats(), whole.rows(6, 10).to_floats());
  for (float v : whole.to_floats()) EXPECT_TRUE(v >= -0.5f && v < 0.5f);
}

TEST(DenseOpsCpu, BadInputsNameTheProblem) {
  Tensor x = Tensor::zeros({4, 5}, DType::f32, Device::cpu);
  Tensor w = Tensor::zeros({3, 6}, DType::f32, Device::cpu);
  Tensor y;
  try {
    linear_forward(x, w, y);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("weight has shape [3, 6], expected [3, 5]"),
              std::string::npos)
        << e.what();
  }
  MoeConfig moe;
  moe.num_experts = 50;
  EXPECT_THROW(FlashMoELayer(8, moe, Device::cpu, DType::f32, 1, 0), Error);
}

}  // namespace
}  // namespace flashmoe
