// Shared by the CPU and GPU layer tests: runs the FlashMoELayer and the float64
// reference on the same parameters and inputs and compares every output.
#pragma once

#include <gtest/gtest.h>

#include "kernels/elementwise.h"
#include "kernels/flashmoe_layer.h"
#include "kernels/layer_reference.h"
#include "tests/test_util.h"

namespace flashmoe::test {

struct LayerCase {
  int64_t T, D, I, E;
  int H, K;
  Activation act;
  RouterNorm norm;
  bool norm_topk;
  double balance = 0;  // moe.balance_loss (the fp64 reference has none: layer-vs-layer only)
};

inline MoeConfig moe_config(const LayerCase& c) {
  MoeConfig m;
  m.num_experts = c.E;
  m.top_k = c.K;
  m.heads = c.H;
  m.shared_intermediate = c.I;
  m.act = c.act;
  m.router_norm = c.norm;
  m.norm_topk_prob = c.norm_topk;
  m.balance_loss = c.balance;
  return m;
}

inline ref::LayerConfig ref_config(const LayerCase& c) {
  ref::LayerConfig r;
  r.dim = c.D;
  r.shared_intermediate = c.I;
  r.num_experts = c.E;
  r.heads = c.H;
  r.top_k = c.K;
  r.act = c.act;
  r.norm = c.norm;
  r.norm_topk_prob = c.norm_topk;
  r.training = true;
  return r;
}

inline std::vector<double> rows_of(const Tensor& t, int64_t begin, int64_t end) {
  return t.rows(begin, end).to_doubles();
}

// The reference parameters are the layer's own values (bf16 values are exact in fp64).
inline ref::LayerParams<double> reference_params(FlashMoELayer& layer, const LayerCase& c) {
  std::vector<Parameter*> p = layer.parameters();
  ref::LayerParams<double> r;
  r.w_gate = rows_of(p[0]->value, 0, c.I);
  r.w_up = rows_of(p[0]->value, c.I, 2 * c.I);
  r.w_down = p[1]->value.to_doubles();
  r.w_router = p[2]->value.to_doubles();
  r.down_embed = p[3]->value.to_doubles();
  r.up_embed = p[4]->value.to_doubles();
  r.running_mean = layer.batchnorm().running_mean.to_doubles();
  r.running_var = layer.batchnorm().running_var.to_doubles();
  return r;
}

inline std::vector<double> concat(std::vector<double> a, const std::vector<double>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

inline Tensor random_input(Shape shape, DType dtype, Device device, uint64_t seed) {
  Tensor t = Tensor::empty(std::move(shape), dtype, device);
  init_uniform(t, seed, 9, 1.0f);
  return t;
}

// Runs one forward and backward of the layer and of the fp64 reference and compares
// every output. In fp32 the reference selects its own experts and the selections
// must agree; in bf16, rounding may reorder near-tied experts, so the reference is
// given the layer's selection and everything else is compared.
inline void compare_with_reference(const LayerCase& c, Device device, DType dtype, uint64_t seed,
                                   double tol) {
  FlashMoELayer layer(c.D, moe_config(c), device, dtype, seed, 100);
  ref::LayerConfig rc = ref_config(c);
  ref::LayerParams<double> rp = reference_params(layer, c);
  Tensor x = random_input({c.T, c.D}, dtype, device, seed + 1);
  Tensor dy = random_input({c.T, c.D}, dtype, device, seed + 2);

  const Tensor& y = layer.forward(x, /*training=*/true);
  const std::vector<int32_t> ids = layer.routing().expert_ids.to_vector<int32_t>();
  const bool own_routing = dtype == DType::f32;
  ref::LayerCache<double> cache;
  std::vector<double> y_ref =
      ref::layer_forward(rc, rp, x.to_doubles(), c.T, cache, own_routing ? nullptr : &ids);
  ASSERT_EQ(ids, cache.expert_ids) << "the layer selected other experts than the reference";

  EXPECT_LT(test::relative_error(y.to_doubles(), y_ref), tol) << "y";
  EXPECT_LT(test::relative_error(layer.router_logits().to_doubles(), cache.logits), tol)
      << "logits";
  EXPECT_LT(test::relative_error(layer.routing().gates.to_doubles(), cache.gates), tol) << "gates";
  if (c.norm == RouterNorm::batchnorm) {
    EXPECT_LT(test::relative_error(layer.batchnorm().running_var.to_doubles(), rp.running_var), tol)
        << "running_var";
  }
  const Tensor& dx = layer.backward(dy);
  layer.finish_backward();
  ref::LayerGrads<double> g = ref::layer_backward(rc, rp, cache, dy.to_doubles());
  std::vector<Parameter*> p = layer.parameters();
  EXPECT_LT(test::relative_error(dx.to_doubles(), g.dx), tol) << "dx";
  if (c.I > 0) {
    EXPECT_LT(test::relative_error(p[0]->grad.to_doubles(), concat(g.w_gate, g.w_up)), tol)
        << "w_gate_up grad";
    EXPECT_LT(test::relative_error(p[1]->grad.to_doubles(), g.w_down), tol) << "w_down grad";
  }
  EXPECT_LT(test::relative_error(p[2]->grad.to_doubles(), g.w_router), tol) << "w_router grad";
  EXPECT_LT(test::relative_error(p[3]->grad.to_doubles(), g.down_embed), tol) << "down grad";
  EXPECT_LT(test::relative_error(p[4]->grad.to_doubles(), g.up_embed), tol) << "up grad";
}

inline const LayerCase kLayerCases[] = {
    {64, 32, 48, 64, 1, 4, Activation::silu, RouterNorm::batchnorm, false},
    {37, 48, 64, 100, 3, 5, Activation::gelu, RouterNorm::rmsnorm, true},
    {50, 64, 0, 256, 2, 8, Activation::relu, RouterNorm::none, false},
    {33, 40, 24, 49, 4, 3, Activation::silu, RouterNorm::batchnorm, true},
    {129, 96, 80, 1024, 1, 16, Activation::gelu, RouterNorm::none, true},
};

}  // namespace flashmoe::test
