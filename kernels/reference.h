// CPU reference of the FlashMoE router and experts (SPEC section 1, steps 2-5),
// written to be read: plain loops over std::vector, templated on the real type
// (double for gradient checks, float for the fp32 CPU backend). This is the
// oracle every CUDA kernel is tested against; the math is in router.h and
// experts.h.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/activation.h"

namespace flashmoe::ref {

// Exact top-K of s(i*N + j) = l0[i] + l1[j] over all N^2 pairs, higher score first
// and smaller id first on ties, by the a*b <= K pruning of per-half ranks.
template <class Real>
void topk_product(const Real* l0, const Real* l1, int N, int K, int32_t* ids, Real* scores);

// Per-half ranking used by topk_product: indices of the best min(K, N) entries of
// v[0..N), by value descending, index ascending on ties.
template <class Real>
std::vector<int> top_indices(const Real* v, int N, int K);

// log_softmax of q[0..N) into l; returns the log-sum-exp.
template <class Real>
Real log_softmax(const Real* q, int N, Real* l);

struct RouterShape {
  int64_t tokens;  // T
  int heads;       // H
  int num_keys;    // N
  int top_k;       // K
};

// logits [T, H, 2, N] -> ids, gates [T, H, K], logsumexp [T, H, 2].
template <class Real>
void router_forward(const RouterShape& shape, const Real* logits, bool norm_topk_prob, int32_t* ids,
                    Real* gates, Real* logsumexp);

// Gates and logsumexp for expert ids chosen elsewhere (ids [T, H, K] given): the
// second half of router_forward, for comparing a layer whose selection is fixed.
template <class Real>
void router_gates(const RouterShape& shape, const Real* logits, const int32_t* ids,
                  bool norm_topk_prob, Real* gates, Real* logsumexp);

// dgates [T, H, K] -> dlogits [T, H, 2, N].
template <class Real>
void router_backward(const RouterShape& shape, const Real* logits, const int32_t* ids,
                     const Real* gates, const Real* logsumexp, const Real* dgates,
                     bool norm_topk_prob, Real* dlogits);

struct ExpertShape {
  int64_t tokens;       // T
  int64_t dim;          // D
  int64_t num_experts;  // E
  int64_t slots;        // S = H * K
};

// y [T, D] and pre-activations h [T, S]. An id < 0 is an empty slot: h = 0 (and
// dgates = 0 in the backward), and it adds nothing.
template <class Real>
void experts_forward(const ExpertShape& shape, Activation act, const Real* x,
                     const Real* down_embed, const Real* up_embed, const int32_t* ids,
                     const Real* gates, Real* y, Real* h);

// dx [T, D], dgates [T, S], d_down and d_up [E, D] (dense; overwritten): the two
// phases below, one after the other.
template <class Real>
void experts_backward(const ExpertShape& shape, Activation act, const Real* x,
                      const Real* down_embed, const Real* up_embed, const int32_t* ids,
                      const Real* gates, const Real* h, const Real* dy, Real* dx, Real* dgates,
                      Real* d_down, Real* d_up);

// Token by token: dx [T, D], dgates [T, S] and the slot coefficients dh and
// a = act(h) g [T, S] (0 for an empty slot).
template <class Real>
void experts_backward_rows(const ExpertShape& shape, Activation act, const Real* down_embed,
                           const Real* up_embed, const int32_t* ids, const Real* gates,
                           const Real* h, const Real* dy, Real* dx, Real* dgates, Real* dh,
                           Real* a);

// Expert by expert, from every token's coefficients: d_down and d_up [E, D] (dense;
// overwritten).
template <class Real>
void experts_backward_tables(const ExpertShape& shape, const Real* x, const int32_t* ids,
                             const Real* dh, const Real* a, const Real* dy, Real* d_down,
                             Real* d_up);

// The experts touched by `ids` (ids >= 0), ascending, each once.
std::vector<int32_t> touched_experts(const int32_t* ids, int64_t count);

}  // namespace flashmoe::ref
