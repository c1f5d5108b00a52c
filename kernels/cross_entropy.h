// Next-token cross-entropy of the language model (SPEC section 3), fused per row:
// logits z [T, V] (fp32 or bf16; fp32 math) and targets y [T] int32.
//   lse_t = m_t + log sum_v exp(z_tv - m_t),  m_t = max_v z_tv;   nll_t = lse_t - z_t,y_t
// cross_entropy_forward_backward, with the loss scale s (1 / T for the mean over this
// batch, 1 / (global target count) under data parallelism):
//   loss   = s sum_t nll_t                      fp32 scalar, summed in fp64
//   dz_tv  = s (exp(z_tv - lse_t) - [v = y_t])  dtype of the logits
// cross_entropy_evaluate, with a mask [T] int32 of 0 or 1:
//   sums = (sum_t mask_t nll_t, sum_t mask_t [argmax_v z_tv = y_t], sum_t mask_t)  fp64 [3]
//   (argmax ties go to the smaller id)
// One thread block per row on the GPU (a fixed reduction tree), a loop per row on the
// CPU; sums over rows in a fixed order (column_sum.cuh): bitwise repeatable. Targets
// outside [0, V): a one-line error on the CPU; on the GPU (no host sync to check) their
// nll is NaN, so the loss is NaN, and their gradient row lacks the target term.
#pragma once

#include "core/tensor.h"

namespace flashmoe {

struct CrossEntropyBuffers {
  Tensor row_nll, row_correct;  // [T] fp32
  Tensor sum_workspace;
};

void cross_entropy_forward_backward(const Tensor& logits, const Tensor& targets, double loss_scale,
                                    CrossEntropyBuffers& buffers, Tensor& loss, Tensor& dlogits);

void cross_entropy_evaluate(const Tensor& logits, const Tensor& targets, const Tensor& mask,
                            CrossEntropyBuffers& buffers, Tensor& sums);

}  // namespace flashmoe
