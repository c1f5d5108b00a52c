// The decoder-only language model of SPEC section 3, one object with the same interface
// on the CPU and the GPU. For tokens [B, L+1] (inputs tok = tokens[:, :L], targets
// y = tokens[:, 1:], rows t = b L + i):
//   x_0     = E[tok_t] (+ P[i] with learned positions)
//   block l = 0 .. n_layers-1:
//     m_l     = x_l + Attn(RMSNorm(x_l; g_attn)) W_o^T,  Attn on q k v = RMSNorm(..) W_qkv^T
//               (kernels/attention.h: causal, n_heads heads, RoPE on q, k with rope positions)
//     x_{l+1} = m_l + FFN_l(RMSNorm(m_l; g_ffn))
//   logits  = RMSNorm(x_L; g_final) E^T      (the token table is tied with the output head)
//   loss    = loss_scale * sum_t nll_t        (cross_entropy.h)
//             + the FlashMoE layers' balance losses (moe.balance_loss > 0, at loss_scale)
// RMSNorm: y = x / sqrt(mean(x^2) + model.norm_eps) * g. FFN_l: the FlashMoE layer when l is
// in model.moe_layers, else a dense SwiGLU W_down (silu(W_gate x) * W_up x) with
// W_gate_up = [W_gate; W_up] [2F, D], W_down [D, F], F = moe.shared_intermediate if > 0,
// else 4 D.
//
// Parameters (name, shape, initialisation; U(b) = uniform(-b, b) from Philox under the
// model seed and the stream in brackets, so every backend starts from the same bits):
//   embed                          [V, D]        U(1/sqrt(D)) [0]
//   pos_embed (learned positions)  [seq_len, D]  U(1/sqrt(D)) [1]
//   blocks.l.attn_norm.gain        [D]           1
//   blocks.l.attn.w_qkv            [3D, D]       U(1/sqrt(D)) [16 + 16 l]
//   blocks.l.attn.w_o              [D, D]        U(1/sqrt(D)) [16 + 16 l + 1]
//   blocks.l.ffn_norm.gain         [D]           1
//   blocks.l.mlp.w_gate_up         [2F, D]       U(1/sqrt(D)) [16 + 16 l + 2]   dense blocks
//   blocks.l.mlp.w_down            [D, F]        U(1/sqrt(F)) [16 + 16 l + 3]   dense blocks
//   blocks.l.moe.<name>            the FlashMoELayer's parameters, its streams from 16 + 16 l + 8
//   final_norm.gain                [D]           1
// Values are in the storage dtype (fp32 or bf16) except the gains, which RMSNorm takes in
// fp32; every gradient is fp32. Gains have weight_decay = false; the matrices, embed and
// pos_embed included (embed is also the output head, as in GPT-2), keep weight decay.
//
// Activations are in the storage dtype, with fp32 accumulation. Buffers are allocated on
// the first call (and when B or L change) and reused; forward_backward and evaluate never
// synchronise with the host, so a step can be captured in a CUDA graph.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "core/config.h"
#include "core/parameter.h"
#include "kernels/attention.h"
#include "kernels/cross_entropy.h"
#include "kernels/embedding.h"
#include "kernels/flashmoe_layer.h"

namespace flashmoe {

class Model {
 public:
  // `comm`: the ranks the FlashMoE layers shard their experts over (nullptr: one rank).
  Model(const ModelConfig& model, const MoeConfig& moe, Device device, DType dtype, uint64_t seed,
        Communicator* comm = nullptr);
  ~Model();

  // tokens [B, L+1] int32 on the model's device, 1 <= L <= model.seq_len. Runs the forward
  // and backward passes and returns the loss loss_scale * sum_t nll_t as a device fp32
  // scalar (not synchronised). loss_scale = 1 / (B L) gives the mean over this batch;
  // under data parallelism pass 1 / (targets over all ranks and micro-batches). Every
  // parameter gradient is overwritten, or, with `accumulate`, added to (gradient
  // accumulation over micro-batches: pass false for the first, true for the others).
  // A token outside [0, vocab) is an error on the CPU and makes the loss NaN on the GPU
  // (embedding.h), which the caller's NaN check reports. `ready(g)` is called as soon as
  // the work that finishes group g of gradient_groups() is queued, g ascending, so the
  // caller can start summing those gradients across ranks during the rest of the pass.
  using GradientsReady = std::function<void(size_t group)>;
  const Tensor& forward_backward(const Tensor& tokens, double loss_scale, bool accumulate = false,
                                 const GradientsReady& ready = {});

  // Evaluation (batchnorm with running statistics, no gradients) of the targets where
  // target_mask [B, L] int32 is 1 (target_mask[b][i] belongs to target tokens[b][i + 1]):
  // a device fp64 [3] tensor (not synchronised) {sum of nll, argmax-correct count, count}.
  const Tensor& evaluate(const Tensor& tokens, const Tensor& target_mask);

  // Every trainable parameter, in the order of the table above.
  std::vector<Parameter*> parameters();
  // The same parameters grouped in the order the backward finishes their gradients:
  // the last block's with final_norm.gain, each block down to block 0, then embed (and
  // pos_embed), which the token lookup's gradient completes at the very end.
  std::vector<std::vector<Parameter*>> gradient_groups();
  // The FlashMoE layers, in block order (batchnorm sync hooks, router statistics).
  std::vector<FlashMoELayer*> moe_layers();

  const ModelConfig& config() const { return config_; }
  Device device() const { return device_; }
  DType dtype() const { return dtype_; }

 private:
  struct Block;

  const Tensor& forward_logits(const Tensor& tokens, bool training);

  ModelConfig config_;
  Device device_;
  DType dtype_;
  Parameter embed_, pos_embed_, final_gain_;
  std::vector<std::unique_ptr<Block>> blocks_;

  // Saved by the forward pass, and reused buffers.
  int64_t batch_ = 0, seq_len_ = 0;
  Tensor inputs_, targets_, embedded_, final_input_, final_rstd_, hidden_, logits_;
  Tensor loss_, eval_sums_, dlogits_, dhidden_, dfinal_, gain_scratch_, pos_scratch_;
  AttentionWorkspace attention_workspace_;
  CrossEntropyBuffers cross_entropy_;
  EmbeddingGradWorkspace embedding_workspace_;
};

// 1 / (B L) for tokens [B, L+1]: the loss scale of the mean over one batch.
double mean_loss_scale(const Tensor& tokens);

}  // namespace flashmoe
