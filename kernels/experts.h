// Single-neuron experts (SPEC section 1, step 5), one interface for the CPU
// reference and the CUDA kernels; the tensors' device picks the backend.
//
// For token t and slot s < S (S = H*K selected experts), e = ids[t][s]:
//   h[t][s] = <x[t], down_embed[e]>
//   a[t][s] = act(h[t][s]) * g[t][s]
//   y[t]    = sum_s a[t][s] * up_embed[e]
// Backward, given dy, in two phases. Rows, token by token:
//   z[t][s]      = <dy[t], up_embed[e]>
//   dgates[t][s] = act(h) * z
//   dh[t][s]     = z * g * act'(h)
//   dx[t]        = sum_s dh[t][s] * down_embed[e]
// Tables, expert by expert, from every token's dh and a:
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

  // Tokens [begin, end): views of x, ids and gates; the same tables.
  ExpertInputs tokens(int64_t begin, int64_t end) const;
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
  // [T, S] fp32: the rows phase's dh and a = act(h) g, which the tables phase reads.
  Tensor slot_dh, slot_a;

  // Tokens [begin, end): views of dx, dgates, slot_dh and slot_a (allocated for `in`
  // first), for experts_backward_rows over part of the tokens.
  ExpertGrads tokens(const ExpertInputs& in, int64_t begin, int64_t end);
};

enum class GradLayout { dense, row_sparse };

// Both phases.
void experts_backward(const ExpertInputs& in, const Tensor& h, const Tensor& dy, GradLayout layout,
                      ExpertGrads& grads);

// The rows phase: dx, dgates, slot_dh and slot_a. Token ranges may run as separate
// calls, in any order (expert parallelism computes the rows of its own tokens while the
// other ranks' dy is on its way): the results are the same bit for bit.
void experts_backward_rows(const ExpertInputs& in, const Tensor& h, const Tensor& dy,
                           ExpertGrads& grads);
// The tables phase, over every token of `in`, after their rows phase: d_down, d_up and
// (row-sparse) rows.
void experts_backward_tables(const ExpertInputs& in, const Tensor& dy, GradLayout layout,
                             ExpertGrads& grads);

}  // namespace flashmoe
