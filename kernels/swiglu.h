// Fused SwiGLU activation of the shared branch. The gate and up projections come
// from one product with the stacked weight [W_gate; W_up], so each row of
// gate_up [M, 2I] holds the gate pre-activations then the up projections:
//   hidden[m][i] = act(gate_up[m][i]) * gate_up[m][I + i]
// Backward:
//   dgate_up[m][i]     = dhidden[m][i] * gate_up[m][I + i] * act'(gate_up[m][i])
//   dgate_up[m][I + i] = dhidden[m][i] * act(gate_up[m][i])
// fp32 or bf16 tensors (one dtype), fp32 arithmetic. CPU and CUDA side by side in swiglu.cu.
#pragma once

#include "core/tensor.h"
#include "kernels/activation.h"

namespace flashmoe {

void swiglu_forward(const Tensor& gate_up, Activation act, Tensor& hidden);
void swiglu_backward(const Tensor& gate_up, const Tensor& dhidden, Activation act,
                     Tensor& dgate_up);

}  // namespace flashmoe
