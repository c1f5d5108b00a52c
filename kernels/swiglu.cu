#include "kernels/op_utils.cuh"
#include "kernels/swiglu.h"

namespace flashmoe {

namespace {
// Row m of gate_up holds [gate(I) | up(I)]; one (m, i) per call, on either backend.
template <class T>
struct SwigluForward {
  const T* gate_up;
  T* hidden;
  int64_t I;
  Activation act;
  FLASHMOE_HD void operator()(int64_t m, int64_t i) const {
    const float gate = load_float(gate_up, m * 2 * I + i),
                up = load_float(gate_up, m * 2 * I + I + i);
    store_float(hidden, m * I + i, activate(act, gate) * up);
  }
};

template <class T>
struct SwigluBackward {
  const T* gate_up;
  const T* dhidden;
  T* dgate_up;
  int64_t I;
  Activation act;
  FLASHMOE_HD void operator()(int64_t m, int64_t i) const {
    const float gate = load_float(gate_up, m * 2 * I + i),
                up = load_float(gate_up, m * 2 * I + I + i);
    const float dh = load_float(dhidden, m * I + i);
    store_float(dgate_up, m * 2 * I + i, dh * up * activate_grad(act, gate));
    store_float(dgate_up, m * 2 * I + I + i, dh * activate(act, gate));
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
    for_each_element(gate_up.device(), M, I,
                     SwigluForward<T>{gate_up.data<T>(), hidden.data<T>(), I, act},
                     "swiglu_forward");
  });
}

void swiglu_backward(const Tensor& gate_up, const Tensor& dhidden, Activation act,
                     Tensor& dgate_up) {
  check_gate_up(gate_up);
  const int64_t M = gate_up.size(0), I = gate_up.size(1) / 2;
  expect_shape(dhidden, {M, I}, "dhidden");
  expect_dtype(dhidden, gate_up.dtype(), "dhidden");
  expect_device(dhidden, gate_up.device(), "dhidden");
  ensure(dgate_up, gate_up.shape(), gate_up.dtype(), gate_up.device());
  with_storage_type(gate_up.dtype(), [&]<class T>() {
    for_each_element(
        gate_up.device(), M, I,
        SwigluBackward<T>{gate_up.data<T>(), dhidden.data<T>(), dgate_up.data<T>(), I, act},
        "swiglu_backward");
  });
}

}  // namespace flashmoe
