// CPU reference of the whole FlashMoE layer (SPEC section 1), forward and backward,
// written to be read: plain loops over std::vector, templated on the real type
// (double for gradient checks, float as a slow CPU path). The router and the
// experts are the functions of reference.h; this file adds the query norm, the
// router projection, the shared SwiGLU branch and their composition.
//
// Shapes: tokens T, width D, shared width I (0: no shared branch), experts E = N^2,
// heads H, experts per token per head K, slots S = H*K. Matrices are row-major.
//
// Forward, per token x in R^D:
//   xn = norm(x)                                  query norm, see below
//   q  = W_r xn            W_r [H*2N, D]          router logits, viewed as [H, 2, N]
//   ids, g = router(q)                            reference.h: top-K per head, gates
//   y_routed = sum over the S slots of act(<x, down_embed[e]>) g up_embed[e]
//   y_shared = W_down (act(W_gate x) * (W_up x))  W_gate, W_up [I, D], W_down [D, I]
//   y  = y_shared + y_routed
// Backward: the ids are constants; x gets the sum of three paths (shared branch,
// experts, and router through the gates, W_r and the norm).
#pragma once

#include <cstdint>
#include <vector>

#include "core/config.h"  // RouterNorm, the config's enum, so configs pass straight through
#include "kernels/activation.h"

namespace flashmoe::ref {

// ---------------------------------------------------------------------------------------
// Linear map y = x W^T: x [rows, in], W [out, in], y [rows, out]. Used for the router
// projection (W_r) and the three SwiGLU matrices.
//   dx = dy W        [rows, in]
//   dW = dy^T x      [out, in]

template <class Real>
std::vector<Real> linear_forward(const std::vector<Real>& x, const std::vector<Real>& w,
                                 int64_t rows, int64_t in, int64_t out);

template <class Real>
struct LinearGrads {
  std::vector<Real> dx;  // [rows, in]
  std::vector<Real> dw;  // [out, in]
};

template <class Real>
LinearGrads<Real> linear_backward(const std::vector<Real>& x, const std::vector<Real>& w,
                                  const std::vector<Real>& dy, int64_t rows, int64_t in,
                                  int64_t out);

// ---------------------------------------------------------------------------------------
// Batchnorm statistics, per feature d over the `count` tokens of a batch, from fp64
// partial sums: the moments
//   sum[d] = sum_t x[t][d],   sum_squares[d] = sum_t x[t][d]^2
//   mean   = sum / count,     var = max(sum_squares / count - mean^2, 0)   (biased)
// and, for the backward pass, sum_t dxn and sum_t dxn * xn. A data-parallel version,
// whose batch is split across ranks, sums each rank's partials (count included;
// an all-reduce) and then uses these same formulas: its statistics are those of the
// global batch. One rank is the special case of a single part. The sums are fp64
// even for Real = float: sum_squares / count - mean^2 cancels, and fp64 keeps that
// harmless unless |mean| / std approaches 1e7.

struct MomentSums {
  int64_t count = 0;                // tokens
  std::vector<double> sum;          // [D]
  std::vector<double> sum_squares;  // [D]
};

struct BatchStats {
  int64_t count = 0;         // tokens
  std::vector<double> mean;  // [D]
  std::vector<double> var;   // [D], biased (divides by count)
};

// sum_t x[t][d] over x [rows, dim].
template <class Real>
std::vector<double> feature_sums(const Real* x, int64_t rows, int64_t dim);

// sum_t a[t][d] * b[t][d] over a, b [rows, dim].
template <class Real>
std::vector<double> feature_product_sums(const Real* a, const Real* b, int64_t rows, int64_t dim);

// The partials of one part x [rows, dim].
template <class Real>
MomentSums moment_sums(const Real* x, int64_t rows, int64_t dim);

// Statistics from partials already summed over every part of the batch.
BatchStats batch_stats(const MomentSums& sums);

// PyTorch's running statistics, with the UNBIASED batch variance (count >= 2):
//   running_mean = (1 - momentum) running_mean + momentum mean
//   running_var  = (1 - momentum) running_var  + momentum var count / (count - 1)
template <class Real>
void update_running_stats(const BatchStats& stats, double momentum, std::vector<Real>& running_mean,
                          std::vector<Real>& running_var);

// ---------------------------------------------------------------------------------------
// Query norms, no affine parameters. xn = (x - shift) * inv_scale:
//   batchnorm, training: per feature, batch mean and biased variance,
//                        inv_scale[d] = 1 / sqrt(var[d] + eps); running stats updated
//   batchnorm, eval:     per feature, running_mean and running_var
//   rmsnorm:             per token, no shift, inv_scale[t] = 1 / sqrt(mean_d x[t][d]^2 + eps)
//   none:                xn = x
// Backward, given dxn:
//   batchnorm, training: dx = inv_scale (dxn - mean_t(dxn) - xn mean_t(dxn * xn))
//                        (mean_t: the fp64 sums of every part / count, as above)
//   batchnorm, eval:     dx = inv_scale dxn
//   rmsnorm:             dx = inv_scale (dxn - xn mean_d(dxn * xn))
//   none:                dx = dxn

template <class Real>
struct NormCache {
  std::vector<Real> normalized;   // xn [T, D]
  std::vector<Real> inv_scale;    // [D] (batchnorm), [T] (rmsnorm), empty (none)
  bool batch_statistics = false;  // batchnorm in training: xn depends on every token
};

template <class Real>
NormCache<Real> batchnorm_forward(const std::vector<Real>& x, int64_t tokens, int64_t dim,
                                  bool training, double momentum, double eps,
                                  std::vector<Real>& running_mean, std::vector<Real>& running_var);

template <class Real>
std::vector<Real> batchnorm_backward(const NormCache<Real>& cache, const std::vector<Real>& dxn,
                                     int64_t tokens, int64_t dim);

template <class Real>
NormCache<Real> rmsnorm_forward(const std::vector<Real>& x, int64_t tokens, int64_t dim,
                                double eps);

template <class Real>
std::vector<Real> rmsnorm_backward(const NormCache<Real>& cache, const std::vector<Real>& dxn,
                                   int64_t tokens, int64_t dim);

// ---------------------------------------------------------------------------------------
// Shared SwiGLU branch, x [T, D]:
//   gate_pre = x W_gate^T, up = x W_up^T, hidden = act(gate_pre) * up     [T, I]
//   y        = hidden W_down^T                                            [T, D]
// Backward, given dy:
//   dhidden  = dy W_down,  dW_down = dy^T hidden
//   dup      = dhidden * act(gate_pre),  dgate_pre = dhidden * up * act'(gate_pre)
//   dx       = dgate_pre W_gate + dup W_up,  dW_gate = dgate_pre^T x,  dW_up = dup^T x
// I = 0 gives y = 0 and empty weight gradients.

template <class Real>
struct SwiGluCache {
  std::vector<Real> gate_pre;  // [T, I]
  std::vector<Real> up;        // [T, I]
  std::vector<Real> hidden;    // [T, I]
};

template <class Real>
struct SwiGluGrads {
  std::vector<Real> dx;      // [T, D]
  std::vector<Real> w_gate;  // [I, D]
  std::vector<Real> w_up;    // [I, D]
  std::vector<Real> w_down;  // [D, I]
};

template <class Real>
std::vector<Real> swiglu_forward(Activation act, const std::vector<Real>& x,
                                 const std::vector<Real>& w_gate, const std::vector<Real>& w_up,
                                 const std::vector<Real>& w_down, int64_t tokens, int64_t dim,
                                 int64_t intermediate, SwiGluCache<Real>& cache);

template <class Real>
SwiGluGrads<Real> swiglu_backward(Activation act, const std::vector<Real>& x,
                                  const std::vector<Real>& w_gate, const std::vector<Real>& w_up,
                                  const std::vector<Real>& w_down, const SwiGluCache<Real>& cache,
                                  const std::vector<Real>& dy, int64_t tokens, int64_t dim,
                                  int64_t intermediate);

// ---------------------------------------------------------------------------------------
// The layer.

struct LayerConfig {
  int64_t dim = 0;                  // D
  int64_t shared_intermediate = 0;  // I; 0: no shared branch
  int64_t num_experts = 0;          // E = N^2
  int heads = 1;                    // H
  int top_k = 1;                    // K, per head
  Activation act = Activation::silu;
  RouterNorm norm = RouterNorm::batchnorm;
  bool norm_topk_prob = false;  // divide each head's K gates by their sum
  double bn_momentum = 0.1;
  double bn_eps = 1e-5;  // epsilon of the query norm (batchnorm and rmsnorm)
  bool training = true;  // batchnorm: batch statistics (training) or running ones (eval)
};

template <class Real>
struct LayerParams {
  std::vector<Real> w_gate;        // [I, D]
  std::vector<Real> w_up;          // [I, D]
  std::vector<Real> w_down;        // [D, I]
  std::vector<Real> w_router;      // [H*2N, D]
  std::vector<Real> down_embed;    // [E, D]
  std::vector<Real> up_embed;      // [E, D]
  std::vector<Real> running_mean;  // [D] with batchnorm, else unused
  std::vector<Real> running_var;   // [D] with batchnorm, else unused
};

// Everything the backward pass needs, and the router's outputs for inspection.
template <class Real>
struct LayerCache {
  int64_t tokens = 0;               // T
  std::vector<Real> x;              // [T, D]
  NormCache<Real> norm;             // xn [T, D] and its scales
  std::vector<Real> logits;         // q [T, H, 2, N]
  std::vector<int32_t> expert_ids;  // [T, H, K] = [T, S], best first per head
  std::vector<Real> gates;          // [T, S]
  std::vector<Real> logsumexp;      // [T, H, 2]
  std::vector<Real> expert_pre;     // <x, down_embed[e]> per slot [T, S]
  SwiGluCache<Real> shared;
};

template <class Real>
struct LayerGrads {
  std::vector<Real> dx;          // [T, D]
  std::vector<Real> w_gate;      // [I, D]
  std::vector<Real> w_up;        // [I, D]
  std::vector<Real> w_down;      // [D, I]
  std::vector<Real> w_router;    // [H*2N, D]
  std::vector<Real> down_embed;  // [E, D], dense
  std::vector<Real> up_embed;    // [E, D], dense
};

// Throws flashmoe::Error, one line naming the problem, unless the configuration is
// usable: D, E, H, K >= 1, I >= 0, E = N^2, K <= N^2, eps > 0, 0 <= momentum <= 1.
void validate_layer_config(const LayerConfig& cfg);

// Validates cfg, the parameter sizes and x [tokens, D] (tokens >= 1; >= 2 for
// batchnorm in training, whose unbiased variance needs two tokens).
template <class Real>
void validate_layer_inputs(const LayerConfig& cfg, const LayerParams<Real>& params,
                           const std::vector<Real>& x, int64_t tokens);

// y [T, D]. Batchnorm in training updates params.running_mean/var (as PyTorch does);
// nothing else in params changes. With `fixed_ids` ([T, H, K]) the router keeps that
// selection instead of its own top-K (gates still follow the logits): how a bf16
// layer, whose rounding may reorder near-tied experts, is compared with this one.
template <class Real>
std::vector<Real> layer_forward(const LayerConfig& cfg, LayerParams<Real>& params,
                                const std::vector<Real>& x, int64_t tokens, LayerCache<Real>& cache,
                                const std::vector<int32_t>* fixed_ids = nullptr);

// Gradients of x and of every parameter, given dy [T, D] and the cache of the forward
// pass with the same cfg and params.
template <class Real>
LayerGrads<Real> layer_backward(const LayerConfig& cfg, const LayerParams<Real>& params,
                                const LayerCache<Real>& cache, const std::vector<Real>& dy);

}  // namespace flashmoe::ref
