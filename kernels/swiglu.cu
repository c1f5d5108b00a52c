#include "kernels/op_utils.cuh"
#include "kernels/swiglu.h"

namespace flashmoe {

namespace {
// Row m of gate_up holds [gate(I) | up(I)]. Each call handles the W elements of hidden
// from e = m * I + i on (I is a multiple of W, so they stay in row m): their gates
// start at gate_at = m 2I + i in gate_up, their ups I further.
template <int W, class T>
struct GateUp {
  int64_t gate_at;
  Lanes<W, T> gate, up;
};

template <int W, class T>
FLASHMOE_HD GateUp<W, T> load_gate_up(const T* gate_up, int64_t I, int64_t e) {
  const int64_t at = e / I * 2 * I + e % I;
  return {at, load_lanes<W>(gate_up, at), load_lanes<W>(gate_up, at + I)};
}

template <class T>
struct SwigluForward {
  const T* gate_up;
  T* hidden;
  int64_t I;
  Activation act;
  template <int W>
  FLASHMOE_HD void operator()(int64_t e) const {
    const GateUp<W, T> in = load_gate_up<W>(gate_up, I, e);
    Lanes<W, T> h;
    for (int k = 0; k < W; ++k) {
      store_float(h.v, k, activate(act, load_float(in.gate.v, k)) * load_float(in.up.v, k));
    }
    store_lanes(hidden, e, h);
  }
};

template <class T>
struct SwigluBackward {
  const T* gate_up;
  const T* dhidden;
  T* dgate_up;
  int64_t I;
  Activation act;
  template <int W>
  FLASHMOE_HD void operator()(int64_t e) const {
    const GateUp<W, T> in = load_gate_up<W>(gate_up, I, e);
    const Lanes<W, T> dh = load_lanes<W>(dhidden, e);
    Lanes<W, T> dgate, dup;
    for (int k = 0; k < W; ++k) {
      const float g = load_float(in.gate.v, k), d = load_float(dh.v, k);
      store_float(dgate.v, k, d * load_float(in.up.v, k) * activate_grad(act, g));
      store_float(dup.v, k, d * activate(act, g));
    }
    store_lanes(dgate_up, in.gate_at, dgate);
    store_lanes(dgate_up, in.gate_at + I, dup);
  }
};

void check_gate_up(const Tensor& gate_up) {
  FLASHMOE_CHECK(gate_up.defined() && gate_up.rank() == 2 && gate_up.size(1) % 2 == 0,
                 "gate_up has shape " << shape_string(gate_up.shape()) << ", expected [M, 2I]");
  expect_float(gate_up, "gate_up");
}
}  // namespace

void swiglu_forward(const Tensor& gate_up, Activation act, Tensor& hidden) {
  check_gate_up(gate_up);
  const int64_t M = gate_up.size(0), I = gate_up.size(1) / 2;
  ensure(hidden, {M, I}, gate_up.dtype(), gate_up.device());
  with_storage_type(gate_up.dtype(), [&]<class T>() {
    for_each_pack(gate_up.device(), M * I, I,
                  SwigluForward<T>{gate_up.data<T>(), hidden.data<T>(), I, act}, "swiglu_forward",
                  {gate_up.raw(), hidden.raw()});
  });
}

void swiglu_backward(const Tensor& gate_up, const Tensor& dhidden, Activation act,
                     Tensor& dgate_up) {
  check_gate_up(gate_up);
  const int64_t M = gate_up.size(0), I = gate_up.size(1) / 2;
  expect_tensor(dhidden, {M, I}, gate_up.dtype(), gate_up.device(), "dhidden");
  ensure(dgate_up, gate_up.shape(), gate_up.dtype(), gate_up.device());
  with_storage_type(gate_up.dtype(), [&]<class T>() {
    for_each_pack(
        gate_up.device(), M * I, I,
        SwigluBackward<T>{gate_up.data<T>(), dhidden.data<T>(), dgate_up.data<T>(), I, act},
        "swiglu_backward", {gate_up.raw(), dhidden.raw(), dgate_up.raw()});
  });
}

}  // namespace flashmoe
