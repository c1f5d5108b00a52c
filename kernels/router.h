// Fused product-key router (SPEC section 1, steps 2-4), one interface for the CPU
// reference and the CUDA kernel; the tensors' device picks the backend.
//
// Logits q[t][h][c][n], c in {0,1}, n < N (N = num_keys, E = N^2 experts):
//   l[t][h][c] = log_softmax(q[t][h][c])                   (over n)
//   s(e = i*N + j) = l[t][h][0][i] + l[t][h][1][j]
//   top-K over all N^2 experts: higher s first, equal s -> smaller e first.
//     Only the top-K of each half can take part, and a pair of per-half ranks
//     (a, b) (1-based) needs a*b <= K, because a*b - 1 pairs beat it; the
//     N^2 pairs are never enumerated.
//   g = exp(s); with norm_topk_prob, g /= sum of the head's K gates.
// Backward (ids are constants):
//   ds_k = g_k * dg_k                          (no normalisation)
//   ds_k = g_k * (dg_k - sum_m g_m * dg_m)     (norm_topk_prob, g normalised)
//   dl[h][0][i] = sum of ds_k over slots with row i; dl[h][1][j] likewise
//   dq = dl - softmax(q) * sum_n dl            (log_softmax backward)
#pragma once

#include "core/tensor.h"

namespace flashmoe {

struct RouterOutputs {
  Tensor expert_ids;  // [T, H, K] int32, best first
  Tensor gates;       // [T, H, K] fp32
  Tensor logsumexp;   // [T, H, 2] fp32, saved for backward: l = q - logsumexp
};

// Allocates `out` to the right shapes on the logits' device (once; reused when it fits).
void router_forward(const Tensor& logits, int top_k, bool norm_topk_prob, RouterOutputs& out);

// dgates [T, H, K] fp32 -> dlogits [T, H, 2, N] fp32 (allocated by the caller).
void router_backward(const Tensor& logits, const RouterOutputs& saved, const Tensor& dgates,
                     bool norm_topk_prob, Tensor& dlogits);

// num_keys N for E experts; a clear error when E is not a perfect square.
int num_keys_for(int64_t num_experts);

}  // namespace flashmoe
