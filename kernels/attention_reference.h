// Float64 reference of causal multi-head self-attention with optional RoPE, written to
// be read: the math of attention.h, one (sequence, head) pair at a time, in plain loops.
// The oracle for the CPU and CUDA op and the subject of the finite-difference checks.
#pragma once

#include <cstdint>
#include <vector>

namespace flashmoe::ref {

struct AttentionConfig {
  int64_t batch = 1, seq_len = 1, heads = 1, head_dim = 2;
  double rope_theta = 0;  // 0: no rotation (learned positions)
};

// out [B L, H d] for qkv [B L, 3 H d].
std::vector<double> attention_forward(const AttentionConfig& cfg, const std::vector<double>& qkv);

// dqkv [B L, 3 H d] for qkv and dout [B L, H d].
std::vector<double> attention_backward(const AttentionConfig& cfg, const std::vector<double>& qkv,
                                       const std::vector<double>& dout);

}  // namespace flashmoe::ref
