// Token and position embeddings of the language model (SPEC section 3). The token table
// E [V, D] is also the output head (tied); the model adds the head's gradient
// dlogits^T h with linear.h and this file adds the lookup's.
//
//   split_next_token:   tokens [B, L+1] int32 -> inputs [B L] = tokens[:, :L] and
//                       targets [B L] = tokens[:, 1:] (row t = b L + i)
//   embedding_forward:  x[t] = E[ids[t]]  (+ P[t mod L] with learned positions P [>= L, D])
//   embedding_backward: dE[v] += sum over t with ids[t] = v of dx[t]
//   position_backward:  dP[l] = sum_b dx[b L + l] for l < L, and 0 for rows l >= L
// Determinism without atomics: the backward groups positions by id with a stable sort
// (counting sort on the CPU, CUB radix sort on the GPU), sums each id's rows in fp32
// in a fixed order (the CPU in increasing t; the GPU in 8 interleaved runs, each in
// increasing t, then the runs' sums in order) and adds the sum to dE[v] once;
// positions use the fixed-order column sum. x and dx are fp32 or bf16, E and P the same
// dtype, dE and dP fp32.
//
// Ids outside [0, V): a one-line error on the CPU. The GPU cannot check without a host
// sync, so it keeps the arithmetic finite and makes the loss NaN instead:
// split_next_token writes -1 for a bad input and for the target of every row whose
// input or target is bad (so cross_entropy.h gives that row a NaN loss), the lookup of
// a bad id contributes a zero row, and the backward skips it.
#pragma once

#include "core/tensor.h"

namespace flashmoe {

void split_next_token(const Tensor& tokens, int64_t vocab, Tensor& inputs, Tensor& targets);

// `positions` undefined: token embedding only (RoPE models). ids [T] with T a multiple of L.
void embedding_forward(const Tensor& ids, const Tensor& table, const Tensor& positions,
                       int64_t seq_len, Tensor& x);

// Reused buffers of the backward passes: the GPU sort (untouched on the CPU) and the
// column sums of the positions.
struct EmbeddingGradWorkspace {
  Tensor keys, sorted_keys, order, sorted_order, row_begin, sort_storage, column_sums;
  Tensor chunk_counts, chunk_starts, chunk_sums;  // the GPU's chunked sums of long runs
};

void embedding_backward(const Tensor& ids, const Tensor& dx, EmbeddingGradWorkspace& workspace,
                        Tensor& dtable);

// dpositions [P_rows, D] fp32 (overwritten) from dx [B L, D].
void position_backward(const Tensor& dx, int64_t seq_len, EmbeddingGradWorkspace& workspace,
                       Tensor& dpositions);

}  // namespace flashmoe
