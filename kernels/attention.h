// Causal multi-head self-attention (SPEC section 3) between its two projections: the
// model computes qkv = x W_qkv^T and y = out W_o^T with linear.h; this op maps qkv to out.
//
// Shapes: batch B, sequence L, heads H, head width d, width D = H d, tokens T = B L
// (row t = b L + i is position i of sequence b). Each row of qkv [T, 3D] holds q, k and
// v, each as H heads of d features. Per sequence and head, with positions i, j < L:
//   q_i, k_i = rope(q_i, i), rope(k_i, i)           (unchanged with learned positions)
//   s_ij     = <q_i, k_j> / sqrt(d)
//   p_ij     = exp(s_ij) / sum_{j' <= i} exp(s_ij')  for j <= i, and 0 for j > i (causal)
//   o_i      = sum_j p_ij v_j;    out[t] = (o^1 ... o^H) (heads side by side)
// RoPE, rotate-half convention, pair c < d/2 at frequency f_c = theta^(-2c/d):
//   rope(x, i)_c       = x_c cos(i f_c) - x_{c+d/2} sin(i f_c)
//   rope(x, i)_{c+d/2} = x_{c+d/2} cos(i f_c) + x_c sin(i f_c)
// Backward, given dout (do_i per head):
//   dv_j  = sum_i p_ij do_i,          dp_ij = <do_i, v_j>
//   ds_ij = p_ij (dp_ij - sum_j' p_ij' dp_ij') / sqrt(d)
//   dq_i  = sum_j ds_ij k_j,          dk_j  = sum_i ds_ij q_i
//   then the transposed rotation (angle -i f_c) carries dq and dk back to qkv's rows.
//
// Storage: q, k, v, p, o and the gradients in fp32 or bf16 (the dtype of qkv); the scores
// s and dp and every sum in fp32. CUDA: strided batched cuBLASLt products over the B H
// (sequence, head) pairs and one warp per softmax row; CPU: loops that skip the masked
// half. Fixed reduction orders and no atomics, so results repeat bit for bit. Memory:
// p [B H, L, L] is kept per instance for the backward pass; the fp32 scores and the ds
// buffer live in an AttentionWorkspace that the attention layers of a model share.
#pragma once

#include <cstdint>

#include "core/tensor.h"

namespace flashmoe {

// cos(i f_c) and sin(i f_c) for positions i < max_seq_len and pairs c < head_dim / 2,
// [max_seq_len, head_dim / 2] fp32, computed in fp64 on the host so every backend
// rotates by the same bits.
struct RopeTable {
  Tensor cos, sin;
  bool defined() const { return cos.defined(); }
};
RopeTable make_rope_table(int64_t max_seq_len, int64_t head_dim, double theta, Device device);

// Transient buffers of one forward or backward call: s, then dp [B H, L, L] fp32, and
// ds [B H, L, L] in the storage dtype. Reused from call to call (and layer to layer).
struct AttentionWorkspace {
  Tensor scores, dscores;
};

class CausalSelfAttention {
 public:
  // An undefined `rope` (RopeTable{}) leaves q and k unrotated (learned positions).
  CausalSelfAttention(int64_t heads, int64_t head_dim, RopeTable rope);

  // out [B L, D] for qkv [B L, 3D] holding `batch` sequences.
  const Tensor& forward(const Tensor& qkv, int64_t batch, AttentionWorkspace& workspace);
  // dqkv [B L, 3D] for dout [B L, D], after forward.
  const Tensor& backward(const Tensor& dout, AttentionWorkspace& workspace);

 private:
  int64_t heads_, head_dim_;
  RopeTable rope_;
  int64_t batch_ = 0, seq_len_ = 0;
  // Saved by forward, per (sequence, head): [B H, L, d] and the probabilities [B H, L, L].
  Tensor q_, k_, v_, probs_, o_, out_;
  Tensor do_, dq_, dk_, dv_, dqkv_;
};

}  // namespace flashmoe
