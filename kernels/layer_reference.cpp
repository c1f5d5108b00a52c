#include "kernels/layer_reference.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "kernels/reference.h"
#include "kernels/router.h"

namespace flashmoe::ref {

template <class Real>
std::vector<Real> linear_forward(const std::vector<Real>& x, const std::vector<Real>& w,
                                 int64_t rows, int64_t in, int64_t out) {
  std::vector<Real> y(rows * out, Real(0));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t o = 0; o < out; ++o) {
      Real dot = 0;
      for (int64_t i = 0; i < in; ++i) dot += w[o * in + i] * x[r * in + i];
      y[r * out + o] = dot;
    }
  }
  return y;
}

template <class Real>
LinearGrads<Real> linear_backward(const std::vector<Real>& x, const std::vector<Real>& w,
                                  const std::vector<Real>& dy, int64_t rows, int64_t in,
                                  int64_t out) {
  LinearGrads<Real> grads{std::vector<Real>(rows * in, Real(0)),
                          std::vector<Real>(out * in, Real(0))};
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t o = 0; o < out; ++o) {
      const Real g = dy[r * out + o];
      for (int64_t i = 0; i < in; ++i) {
        grads.dx[r * in + i] += g * w[o * in + i];
        grads.dw[o * in + i] += g * x[r * in + i];
      }
    }
  }
  return grads;
}

template <class Real>
std::vector<double> feature_sums(const Real* x, int64_t rows, int64_t dim) {
  std::vector<double> sums(dim, 0.0);
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t d = 0; d < dim; ++d) sums[d] += x[t * dim + d];
  }
  return sums;
}

template <class Real>
std::vector<double> feature_product_sums(const Real* a, const Real* b, int64_t rows, int64_t dim) {
  std::vector<double> sums(dim, 0.0);
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t d = 0; d < dim; ++d) sums[d] += double(a[t * dim + d]) * b[t * dim + d];
  }
  return sums;
}

template <class Real>
MomentSums moment_sums(const Real* x, int64_t rows, int64_t dim) {
  return {rows, feature_sums(x, rows, dim), feature_product_sums(x, x, rows, dim)};
}

BatchStats batch_stats(const MomentSums& sums) {
  const auto dim = sums.sum.size();
  BatchStats stats{sums.count, std::vector<double>(dim), std::vector<double>(dim)};
  for (size_t d = 0; d < dim; ++d) {
    stats.mean[d] = sums.sum[d] / double(sums.count);
    const double mean_square = sums.sum_squares[d] / double(sums.count);
    stats.var[d] = std::max(mean_square - stats.mean[d] * stats.mean[d], 0.0);
  }
  return stats;
}

template <class Real>
void update_running_stats(const BatchStats& stats, double momentum, std::vector<Real>& running_mean,
                          std::vector<Real>& running_var) {
  FLASHMOE_CHECK(stats.count >= 2, "batchnorm running variance over "
                                       << stats.count
                                       << " token(s), expected >= 2 (unbiased variance)");
  const double unbias = double(stats.count) / double(stats.count - 1);
  for (size_t d = 0; d < stats.mean.size(); ++d) {
    running_mean[d] = Real((1 - momentum) * running_mean[d] + momentum * stats.mean[d]);
    running_var[d] = Real((1 - momentum) * running_var[d] + momentum * stats.var[d] * unbias);
  }
}

namespace {
// xn[t][d] = (x[t][d] - mean[d]) * inv_scale[d], inv_scale = 1 / sqrt(var + eps).
template <class Real>
NormCache<Real> normalize_features(const std::vector<Real>& x, int64_t tokens, int64_t dim,
                                   const std::vector<double>& mean, const std::vector<double>& var,
                                   double eps, bool batch_statistics) {
  NormCache<Real> cache{std::vector<Real>(tokens * dim), std::vector<Real>(dim), batch_statistics};
  for (int64_t d = 0; d < dim; ++d) cache.inv_scale[d] = Real(1 / std::sqrt(var[d] + eps));
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t d = 0; d < dim; ++d) {
      cache.normalized[t * dim + d] = (x[t * dim + d] - Real(mean[d])) * cache.inv_scale[d];
    }
  }
  return cache;
}

template <class Real>
void add_into(std::vector<Real>& sum, const std::vector<Real>& term) {
  for (size_t i = 0; i < sum.size(); ++i) sum[i] += term[i];
}

template <class Real>
std::vector<double> widen(const std::vector<Real>& v) {
  return std::vector<double>(v.begin(), v.end());
}
}  // namespace

template <class Real>
NormCache<Real> batchnorm_forward(const std::vector<Real>& x, int64_t tokens, int64_t dim,
                                  bool training, double momentum, double eps,
                                  std::vector<Real>& running_mean, std::vector<Real>& running_var) {
  if (!training) {
    return normalize_features(x, tokens, dim, widen(running_mean), widen(running_var), eps, false);
  }
  const BatchStats stats = batch_stats(moment_sums(x.data(), tokens, dim));
  update_running_stats(stats, momentum, running_mean, running_var);
  return normalize_features(x, tokens, dim, stats.mean, stats.var, eps, true);
}

template <class Real>
std::vector<Real> batchnorm_backward(const NormCache<Real>& cache, const std::vector<Real>& dxn,
                                     int64_t tokens, int64_t dim) {
  const std::vector<Real>& xn = cache.normalized;
  std::vector<double> sum_dxn(dim, 0.0), sum_dxn_xn(dim, 0.0);
  if (cache.batch_statistics) {
    sum_dxn = feature_sums(dxn.data(), tokens, dim);
    sum_dxn_xn = feature_product_sums(dxn.data(), xn.data(), tokens, dim);
  }
  std::vector<Real> dx(tokens * dim);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t d = 0; d < dim; ++d) {
      const int64_t i = t * dim + d;
      const double centered = dxn[i] - sum_dxn[d] / tokens - xn[i] * sum_dxn_xn[d] / tokens;
      dx[i] = Real(cache.inv_scale[d] * centered);
    }
  }
  return dx;
}

template <class Real>
NormCache<Real> rmsnorm_forward(const std::vector<Real>& x, int64_t tokens, int64_t dim,
                                double eps) {
  NormCache<Real> cache{std::vector<Real>(tokens * dim), std::vector<Real>(tokens), false};
  for (int64_t t = 0; t < tokens; ++t) {
    Real square_sum = 0;
    for (int64_t d = 0; d < dim; ++d) square_sum += x[t * dim + d] * x[t * dim + d];
    cache.inv_scale[t] = 1 / std::sqrt(square_sum / Real(dim) + Real(eps));
    for (int64_t d = 0; d < dim; ++d) {
      cache.normalized[t * dim + d] = x[t * dim + d] * cache.inv_scale[t];
    }
  }
  return cache;
}

template <class Real>
std::vector<Real> rmsnorm_backward(const NormCache<Real>& cache, const std::vector<Real>& dxn,
                                   int64_t tokens, int64_t dim) {
  const std::vector<Real>& xn = cache.normalized;
  std::vector<Real> dx(tokens * dim);
  for (int64_t t = 0; t < tokens; ++t) {
    Real dot = 0;
    for (int64_t d = 0; d < dim; ++d) dot += dxn[t * dim + d] * xn[t * dim + d];
    const Real mean_dxn_xn = dot / Real(dim);
    for (int64_t d = 0; d < dim; ++d) {
      const int64_t i = t * dim + d;
      dx[i] = cache.inv_scale[t] * (dxn[i] - xn[i] * mean_dxn_xn);
    }
  }
  return dx;
}

template <class Real>
std::vector<Real> swiglu_forward(Activation act, const std::vector<Real>& x,
                                 const std::vector<Real>& w_gate, const std::vector<Real>& w_up,
                                 const std::vector<Real>& w_down, int64_t tokens, int64_t dim,
                                 int64_t intermediate, SwiGluCache<Real>& cache) {
  cache.gate_pre = linear_forward(x, w_gate, tokens, dim, intermediate);
  cache.up = linear_forward(x, w_up, tokens, dim, intermediate);
  cache.hidden.resize(cache.up.size());
  for (size_t i = 0; i < cache.hidden.size(); ++i) {
    cache.hidden[i] = activate(act, cache.gate_pre[i]) * cache.up[i];
  }
  return linear_forward(cache.hidden, w_down, tokens, intermediate, dim);
}

template <class Real>
SwiGluGrads<Real> swiglu_backward(Activation act, const std::vector<Real>& x,
                                  const std::vector<Real>& w_gate, const std::vector<Real>& w_up,
                                  const std::vector<Real>& w_down, const SwiGluCache<Real>& cache,
                                  const std::vector<Real>& dy, int64_t tokens, int64_t dim,
                                  int64_t intermediate) {
  LinearGrads<Real> down = linear_backward(cache.hidden, w_down, dy, tokens, intermediate, dim);
  const std::vector<Real>& dhidden = down.dx;
  std::vector<Real> dgate_pre(dhidden.size()), dup(dhidden.size());
  for (size_t i = 0; i < dhidden.size(); ++i) {
    dup[i] = dhidden[i] * activate(act, cache.gate_pre[i]);
    dgate_pre[i] = dhidden[i] * cache.up[i] * activate_grad(act, cache.gate_pre[i]);
  }
  LinearGrads<Real> gate = linear_backward(x, w_gate, dgate_pre, tokens, dim, intermediate);
  LinearGrads<Real> up = linear_backward(x, w_up, dup, tokens, dim, intermediate);
  add_into(gate.dx, up.dx);
  return {std::move(gate.dx), std::move(gate.dw), std::move(up.dw), std::move(down.dw)};
}

void validate_layer_config(const LayerConfig& cfg) {
  FLASHMOE_CHECK(cfg.dim >= 1, "layer dim D is " << cfg.dim << ", expected >= 1");
  FLASHMOE_CHECK(cfg.shared_intermediate >= 0, "shared_intermediate I is "
                                                   << cfg.shared_intermediate
                                                   << ", expected >= 0 (0: no shared branch)");
  FLASHMOE_CHECK(cfg.heads >= 1, "router heads H is " << cfg.heads << ", expected >= 1");
  const int64_t N = num_keys_for(cfg.num_experts);
  FLASHMOE_CHECK(cfg.top_k >= 1 && cfg.top_k <= N * N,
                 "top_k is " << cfg.top_k << ", expected 1 <= top_k <= N^2 = " << N * N);
  FLASHMOE_CHECK(cfg.bn_eps > 0, "norm eps is " << cfg.bn_eps << ", expected > 0");
  FLASHMOE_CHECK(cfg.bn_momentum >= 0 && cfg.bn_momentum <= 1,
                 "bn_momentum is " << cfg.bn_momentum << ", expected 0 <= momentum <= 1");
}

namespace {
template <class Real>
void expect_size(const std::vector<Real>& v, int64_t size, const char* name, const char* shape) {
  FLASHMOE_CHECK(static_cast<int64_t>(v.size()) == size,
                 name << " has " << v.size() << " elements, expected " << shape << " = " << size);
}
}  // namespace

template <class Real>
void validate_layer_inputs(const LayerConfig& cfg, const LayerParams<Real>& params,
                           const std::vector<Real>& x, int64_t tokens) {
  validate_layer_config(cfg);
  const int64_t D = cfg.dim, I = cfg.shared_intermediate, E = cfg.num_experts;
  const int64_t N = num_keys_for(E);
  expect_size(params.w_gate, I * D, "w_gate", "[I, D]");
  expect_size(params.w_up, I * D, "w_up", "[I, D]");
  expect_size(params.w_down, D * I, "w_down", "[D, I]");
  expect_size(params.w_router, cfg.heads * 2 * N * D, "w_router", "[H*2N, D]");
  expect_size(params.down_embed, E * D, "down_embed", "[E, D]");
  expect_size(params.up_embed, E * D, "up_embed", "[E, D]");
  if (cfg.norm == RouterNorm::batchnorm) {
    expect_size(params.running_mean, D, "running_mean", "[D]");
    expect_size(params.running_var, D, "running_var", "[D]");
  }
  const int64_t min_tokens = cfg.norm == RouterNorm::batchnorm && cfg.training ? 2 : 1;
  FLASHMOE_CHECK(tokens >= min_tokens, "tokens T is "
                                           << tokens << ", expected >= " << min_tokens
                                           << (min_tokens == 2 ? " (batchnorm in training)" : ""));
  expect_size(x, tokens * D, "x", "[T, D]");
}

namespace {
template <class Real>
NormCache<Real> query_norm_forward(const LayerConfig& cfg, LayerParams<Real>& params,
                                   const std::vector<Real>& x, int64_t tokens) {
  switch (cfg.norm) {
    case RouterNorm::batchnorm:
      return batchnorm_forward(x, tokens, cfg.dim, cfg.training, cfg.bn_momentum, cfg.bn_eps,
                               params.running_mean, params.running_var);
    case RouterNorm::rmsnorm: return rmsnorm_forward(x, tokens, cfg.dim, cfg.bn_eps);
    case RouterNorm::none: break;
  }
  return {x, {}, false};
}

template <class Real>
std::vector<Real> query_norm_backward(const LayerConfig& cfg, const NormCache<Real>& cache,
                                      const std::vector<Real>& dxn, int64_t tokens) {
  switch (cfg.norm) {
    case RouterNorm::batchnorm: return batchnorm_backward(cache, dxn, tokens, cfg.dim);
    case RouterNorm::rmsnorm: return rmsnorm_backward(cache, dxn, tokens, cfg.dim);
    case RouterNorm::none: break;
  }
  return dxn;
}

RouterShape router_shape(const LayerConfig& cfg, int64_t tokens) {
  return {tokens, cfg.heads, num_keys_for(cfg.num_experts), cfg.top_k};
}

ExpertShape expert_shape(const LayerConfig& cfg, int64_t tokens) {
  return {tokens, cfg.dim, cfg.num_experts, int64_t{cfg.heads} * cfg.top_k};
}
}  // namespace

template <class Real>
std::vector<Real> layer_forward(const LayerConfig& cfg, LayerParams<Real>& params,
                                const std::vector<Real>& x, int64_t tokens, LayerCache<Real>& cache,
                                const std::vector<int32_t>* fixed_ids) {
  validate_layer_inputs(cfg, params, x, tokens);
  const RouterShape router = router_shape(cfg, tokens);
  const ExpertShape experts = expert_shape(cfg, tokens);
  const int64_t slots = tokens * experts.slots;
  cache.tokens = tokens;
  cache.x = x;
  cache.norm = query_norm_forward(cfg, params, x, tokens);
  cache.logits = linear_forward(cache.norm.normalized, params.w_router, tokens, cfg.dim,
                                int64_t{cfg.heads} * 2 * router.num_keys);
  cache.expert_ids.resize(slots);
  cache.gates.resize(slots);
  cache.logsumexp.resize(tokens * cfg.heads * 2);
  if (fixed_ids) {
    FLASHMOE_CHECK(static_cast<int64_t>(fixed_ids->size()) == slots,
                   "fixed_ids has " << fixed_ids->size() << " ids, expected [T, H, K] = " << slots);
    cache.expert_ids = *fixed_ids;
    router_gates(router, cache.logits.data(), cache.expert_ids.data(), cfg.norm_topk_prob,
                 cache.gates.data(), cache.logsumexp.data());
  } else {
    router_forward(router, cache.logits.data(), cfg.norm_topk_prob, cache.expert_ids.data(),
                   cache.gates.data(), cache.logsumexp.data());
  }

  std::vector<Real> y = swiglu_forward(cfg.act, x, params.w_gate, params.w_up, params.w_down,
                                       tokens, cfg.dim, cfg.shared_intermediate, cache.shared);
  std::vector<Real> y_routed(tokens * cfg.dim);
  cache.expert_pre.resize(slots);
  experts_forward(experts, cfg.act, x.data(), params.down_embed.data(), params.up_embed.data(),
                  cache.expert_ids.data(), cache.gates.data(), y_routed.data(),
                  cache.expert_pre.data());
  add_into(y, y_routed);
  return y;
}

template <class Real>
LayerGrads<Real> layer_backward(const LayerConfig& cfg, const LayerParams<Real>& params,
                                const LayerCache<Real>& cache, const std::vector<Real>& dy) {
  const int64_t tokens = cache.tokens, D = cfg.dim, E = cfg.num_experts;
  expect_size(dy, tokens * D, "dy", "[T, D]");
  const RouterShape router = router_shape(cfg, tokens);
  const ExpertShape experts = expert_shape(cfg, tokens);

  SwiGluGrads<Real> shared =
      swiglu_backward(cfg.act, cache.x, params.w_gate, params.w_up, params.w_down, cache.shared, dy,
                      tokens, D, cfg.shared_intermediate);

  LayerGrads<Real> grads;
  std::vector<Real> dx_routed(tokens * D), dgates(cache.gates.size());
  grads.down_embed.resize(E * D);
  grads.up_embed.resize(E * D);
  experts_backward(experts, cfg.act, cache.x.data(), params.down_embed.data(),
                   params.up_embed.data(), cache.expert_ids.data(), cache.gates.data(),
                   cache.expert_pre.data(), dy.data(), dx_routed.data(), dgates.data(),
                   grads.down_embed.data(), grads.up_embed.data());

  std::vector<Real> dlogits(cache.logits.size());
  router_backward(router, cache.logits.data(), cache.expert_ids.data(), cache.gates.data(),
                  cache.logsumexp.data(), dgates.data(), cfg.norm_topk_prob, dlogits.data());
  LinearGrads<Real> projection =
      linear_backward(cache.norm.normalized, params.w_router, dlogits, tokens, D,
                      int64_t{cfg.heads} * 2 * router.num_keys);

  grads.dx = std::move(shared.dx);
  add_into(grads.dx, dx_routed);
  add_into(grads.dx, query_norm_backward(cfg, cache.norm, projection.dx, tokens));
  grads.w_gate = std::move(shared.w_gate);
  grads.w_up = std::move(shared.w_up);
  grads.w_down = std::move(shared.w_down);
  grads.w_router = std::move(projection.dw);
  return grads;
}

#define FLASHMOE_INSTANTIATE_LAYER_REFERENCE(Real)                                                 \
  template std::vector<Real> linear_forward(const std::vector<Real>&, const std::vector<Real>&,    \
                                            int64_t, int64_t, int64_t);                            \
  template LinearGrads<Real> linear_backward(const std::vector<Real>&, const std::vector<Real>&,   \
                                             const std::vector<Real>&, int64_t, int64_t, int64_t); \
  template std::vector<double> feature_sums(const Real*, int64_t, int64_t);                        \
  template std::vector<double> feature_product_sums(const Real*, const Real*, int64_t, int64_t);   \
  template MomentSums moment_sums(const Real*, int64_t, int64_t);                                  \
  template void update_running_stats(const BatchStats&, double, std::vector<Real>&,                \
                                     std::vector<Real>&);                                          \
  template NormCache<Real> batchnorm_forward(const std::vector<Real>&, int64_t, int64_t, bool,     \
                                             double, double, std::vector<Real>&,                   \
                                             std::vector<Real>&);                                  \
  template std::vector<Real> batchnorm_backward(const NormCache<Real>&, const std::vector<Real>&,  \
                                                int64_t, int64_t);                                 \
  template NormCache<Real> rmsnorm_forward(const std::vector<Real>&, int64_t, int64_t, double);    \
  template std::vector<Real> rmsnorm_backward(const NormCache<Real>&, const std::vector<Real>&,    \
                                              int64_t, int64_t);                                   \
  template std::vector<Real> swiglu_forward(                                                       \
      Activation, const std::vector<Real>&, const std::vector<Real>&, const std::vector<Real>&,    \
      const std::vector<Real>&, int64_t, int64_t, int64_t, SwiGluCache<Real>&);                    \
  template SwiGluGrads<Real> swiglu_backward(Activation, const std::vector<Real>&,                 \
                                             const std::vector<Real>&, const std::vector<Real>&,   \
                                             const std::vector<Real>&, const SwiGluCache<Real>&,   \
                                             const std::vector<Real>&, int64_t, int64_t, int64_t); \
  template void validate_layer_inputs(const LayerConfig&, const LayerParams<Real>&,                \
                                      const std::vector<Real>&, int64_t);                          \
  template std::vector<Real> layer_forward(const LayerConfig&, LayerParams<Real>&,                 \
                                           const std::vector<Real>&, int64_t, LayerCache<Real>&,   \
                                           const std::vector<int32_t>*);                           \
  template LayerGrads<Real> layer_backward(const LayerConfig&, const LayerParams<Real>&,           \
                                           const LayerCache<Real>&, const std::vector<Real>&);

FLASHMOE_INSTANTIATE_LAYER_REFERENCE(float)
FLASHMOE_INSTANTIATE_LAYER_REFERENCE(double)

}  // namespace flashmoe::ref
