// Single-neuron experts (SPEC section 1, step 5), one interface for the CPU
// reference and the CUDA kernels; the tensors' device picks the backend.
//
// For token t and slot s < S (S = H*K selected experts), e = ids[t][s]:
//   h[t][s] = <x[t], down_embed[e]>
//   a[t][s] = act(h[t][s]) * g[t][s]
//   y[t]    = sum_s a[t][s] * up_embed[e]
// Backward, given dy:
//   z[t][s]      = <dy[t], up_embed[e]>
//   dgates[t][s] = act(h) * z
//   dh[t][s]     = z * g * act'(h)
//   dx[t]        = sum_s dh[t][s] * down_embed[e]
//   d_up[e]      = sum over (t, s) with ids[t][s] == e of a[t][s] * dy[t]
//   d_down[e]    = sum over (t, s) with ids[t][s] == e of dh[t][s] * x[t]
// An id < 0 is an empty slot: it reads no table row and adds nothing to y, dx or the
// table gradients; its h and dgates are 0, and it is no touched row.
// Every sum runs in a fixed order (no floating-point atomics), so results are
// bitwise repeatable. x, y, dy and the tables are fp32 or bf16 (all the same);
// accumulation is fp32; gradients of the tables are fp32.
#pragma once

#include "core/tensor.h"
#include "kernels/activation.h"

namespace flashmoe {

struct ExpertInputs {
  Tensor x;           // [T, D]
  Tensor down_embed;  // [E, D]
  Tensor up_embed;    // [E, D]
  Tensor ids;         // [T, S] int32 in [0, E), or < 0: an empty slot
  Tensor gates;       // [T, S] fp32
  Activation act = Activation::silu;
  // Check every id against E before computing (costs a device->host sync on the
  // GPU). The layer turns it off: its ids come from its own router.
  bool validate_ids = true;
};

// y [T, D] (dtype of x) and h [T, S] fp32 (pre-activations, saved for backward).
void experts_forward(const ExpertInputs& in, Tensor& y, Tensor& h);

struct ExpertGrads {
  Tensor dx;      // [T, D], dtype of x
  Tensor dgates;  // [T, S] fp32
  // Dense mode: [E, D] fp32, rows no token touched are zero; `rows` unused.
  // Row-sparse mode, for tables far larger than a batch touches: R = min(E, T*S)
  // slots; rows [R] int32 holds the touched experts ascending, then -1; d_down and
  // d_up [R, D] fp32 hold their gradients (zero in the -1 tail). The size is fixed
  // by the shapes, so no host synchronisation is needed.
  Tensor d_down;
  Tensor d_up;
  Tensor rows;
};

enum class GradLayout { dense, row_sparse };

void experts_backward(const ExpertInputs& in, const Tensor& h, const Tensor& dy, GradLayout layout,
                      ExpertGrads& grads);

}  // namespace flashmoe
