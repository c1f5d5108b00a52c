// The router's load-balancing loss (SPEC section 1: the router logits feed optional
// auxiliary losses): Switch Transformer's loss on each half of the product keys. For
// head h, half c in {0, 1} and key i < N, over the tokens t of a batch (every rank's,
// under expert parallelism):
//   p_t[h][c]  = softmax(q_t[h][c])             the router's probabilities of the keys
//   n[h][c][i] = the selections (t, k) of head h whose half-c key is i (expert
//                e = i N + j has key i in half 0 and key j in half 1)
//   f[h][c][i] = n[h][c][i] / sum_i' n[h][c][i']
//   L = scale * sum_t sum_{h,c} sum_i f[h][c][i] p_t[h][c][i]
// With scale = alpha N / (2 H T), L = alpha N / (2H) sum_{h,c} sum_i f[h][c][i] P[h][c][i]
// with P the batch's mean probabilities: alpha when the keys are used uniformly, up to
// alpha N when one key takes every selection. Minimising it spreads the selections over
// the keys, and so over the experts and over the ranks that own them. f is a constant of
// the gradient (selections have none):
//   dL/dq_t[h][c][j] = scale * p_j (f_j - sum_i f_i p_i),   p = p_t[h][c].
// Selections are counted in integers and every sum runs in a fixed order, so results
// repeat bit for bit.
#pragma once

#include "core/tensor.h"

namespace flashmoe {

// ids [T, H, K] int32 -> counts [H, 2, N] fp64, the n above (fp64 so that ranks can add
// theirs with all_reduce_sum; exact up to 2^53). An id outside [0, N²) is an error on
// the CPU and skipped on the GPU, which does not synchronise to check. `scratch` holds
// the integer counts.
void count_key_selections(const Tensor& ids, int64_t num_keys, Tensor& scratch, Tensor& counts);

// counts [H, 2, N] fp64 -> f, in place: each (h, c) row over its sum (a row that
// counts nothing stays zero).
void key_fractions(Tensor& counts);

struct BalanceLossBuffers {
  Tensor row_terms, workspace;
};

// logits [T, H, 2, N] fp32 and fractions f [H, 2, N] fp64: dlogits [T, H, 2, N] fp32
// += dL/dq, and loss [] fp32 = L.
void balance_loss_backward(const Tensor& logits, const Tensor& fractions, double scale,
                           BalanceLossBuffers& buffers, Tensor& dlogits, Tensor& loss);

}  // namespace flashmoe
