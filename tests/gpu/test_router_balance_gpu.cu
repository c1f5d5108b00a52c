// The router's balance loss (kernels/router_balance.h) on the GPU against the CPU, on
// fresh random routing and logits over shapes with odd T, N below, at and above one
// warp (non-powers of two, up to 2100 keys, whose 4200 bins take two blocks' shares),
// several heads, and the smoke model's 16384 tokens (many blocks a head). Counts are
// integers and must match exactly; the loss and gradient to fp32 rounding. The scratch,
// the counts, the row terms and the loss start poisoned; dlogits is checked from zero
// (the gradient) and from random values (it is added to them); a second run repeats
// the first bit for bit.
#include <gtest/gtest.h>

#include <algorithm>

#include "core/philox.h"
#include "kernels/router_balance.h"
#include "tests/test_util.h"

namespace flashmoe {
namespace {

using test::poisoned;
using test::relative_error;

struct BalanceCase {
  int64_t T, H, K, N;
};
const BalanceCase kCases[] = {{1, 1, 1, 2},        {7, 1, 4, 7},      {333, 2, 16, 128},
                              {97, 3, 8, 100},     {4097, 1, 16, 33}, {65, 8, 16, 1024},
                              {16384, 1, 16, 128}, {51, 2, 5, 2100}};

TEST(RouterBalanceGpu, MatchesCpuAndRepeats) {
  FLASHMOE_REQUIRE_GPU();
  for (const BalanceCase& c : kCases) {
    SCOPED_TRACE(testing::Message() << "T " << c.T << " H " << c.H << " K " << c.K << " N " << c.N);
    const int64_t E = c.N * c.N, n = c.T * c.H * 2 * c.N;
    // Skewed ids (a square of a uniform), so some keys are hot and some unused.
    std::vector<int32_t> ids(c.T * c.H * c.K);
    for (size_t i = 0; i < ids.size(); ++i) {
      const float u = philox_uniform(c.N, 12, i, 0.0f, 1.0f);
      ids[i] = std::min<int32_t>(static_cast<int32_t>(u * u * E), E - 1);
    }
    const Tensor ids_cpu = Tensor::from_vector(ids, {c.T, c.H, c.K}, Device::cpu);
    const Tensor logits = Tensor::from_vector(test::uniforms(n, c.T, 11, -4.0f, 4.0f),
                                              {c.T, c.H, 2, c.N}, Device::cpu);
    const Tensor start = Tensor::from_vector(test::uniforms(n, c.T + 1, 11, -1.0f, 1.0f),
                                             {c.T, c.H, 2, c.N}, Device::cpu);
    const double scale = 0.01 * c.N / (2.0 * c.H * c.T);

    Tensor scratch, fractions;
    count_key_selections(ids_cpu, c.N, scratch, fractions);
    key_fractions(fractions);
    // dlogits from zero (the gradient alone) and from a random start (added to it).
    Tensor grad = Tensor::zeros({c.T, c.H, 2, c.N}, DType::f32, Device::cpu),
           added = start.to(Device::cpu), loss;
    BalanceLossBuffers buffers;
    balance_loss_backward(logits, fractions, scale, buffers, grad, loss);
    balance_loss_backward(logits, fractions, scale, buffers, added, loss);

    const Tensor ids_gpu = ids_cpu.to(Device::cuda), logits_gpu = logits.to(Device::cuda);
    std::vector<float> first_grad, first_loss;
    for (int run = 0; run < 2; ++run) {
      Tensor scratch_gpu = poisoned({c.H, 2, c.N}, DType::i64),
             fractions_gpu = poisoned({c.H, 2, c.N}, DType::f64),
             grad_gpu = Tensor::zeros({c.T, c.H, 2, c.N}, DType::f32, Device::cuda),
             added_gpu = start.to(Device::cuda), loss_gpu = poisoned({}, DType::f32);
      BalanceLossBuffers buffers_gpu;
      buffers_gpu.row_terms = poisoned({n / c.N}, DType::f32);
      count_key_selections(ids_gpu, c.N, scratch_gpu, fractions_gpu);
      key_fractions(fractions_gpu);
      EXPECT_EQ(fractions_gpu.to_vector<double>(), fractions.to_vector<double>());
      balance_loss_backward(logits_gpu, fractions_gpu, scale, buffers_gpu, grad_gpu, loss_gpu);
      EXPECT_LT(relative_error(grad_gpu, grad), 1e-5);
      EXPECT_LT(relative_error(loss_gpu, loss), 1e-5);
      balance_loss_backward(logits_gpu, fractions_gpu, scale, buffers_gpu, added_gpu, loss_gpu);
      EXPECT_LT(relative_error(added_gpu, added), 1e-6);
      if (run == 0) {
        first_grad = grad_gpu.to_vector<float>();
        first_loss = loss_gpu.to_vector<float>();
      } else {
        EXPECT_EQ(grad_gpu.to_vector<float>(), first_grad);
        EXPECT_EQ(loss_gpu.to_vector<float>(), first_loss);
      }
    }
  }
}

// The GPU does not synchronise to check ids: one outside [0, N²) is skipped.
TEST(RouterBalanceGpu, SkipsIdsOutOfRange) {
  FLASHMOE_REQUIRE_GPU();
  const std::vector<int32_t> ids = {0, -1, 8, 9, 4, 100};  // N = 3: 0, 8 and 4 count
  Tensor scratch, fractions;
  count_key_selections(Tensor::from_vector(ids, {3, 1, 2}, Device::cuda), 3, scratch, fractions);
  key_fractions(fractions);
  const double third = 1.0 / 3.0;
  EXPECT_EQ(fractions.to_vector<double>(), std::vector<double>(6, third));
}

}  // namespace
}  // namespace flashmoe
