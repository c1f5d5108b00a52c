#include "core/stream.h"
#include "kernels/elementwise.cuh"
#include "kernels/swiglu.h"

namespace flashmoe {

namespace {
// One element (m, i) of the forward or backward; shared by the CPU loop and the kernel.
template <class T>
FLASHMOE_HD void swiglu_forward_element(const T* gate_up, T* hidden, int64_t I, int64_t idx,
                                        Activation act) {
  const int64_t m = idx / I, i = idx % I;
  const float gate = load_float(gate_up, m * 2 * I + i),
              up = load_float(gate_up, m * 2 * I + I + i);
  store_float(hidden, idx, activate(act, gate) * up);
}

template <class T>
FLASHMOE_HD void swiglu_backward_element(const T* gate_up, const T* dhidden, T* dgate_up, int64_t I,
                                         int64_t idx, Activation act) {
  const int64_t m = idx / I, i = idx % I;
  const float gate = load_float(gate_up, m * 2 * I + i),
              up = load_float(gate_up, m * 2 * I + I + i);
  const float dh = load_float(dhidden, idx);
  store_float(dgate_up, m * 2 * I + i, dh * up * activate_grad(act, gate));
  store_float(dgate_up, m * 2 * I + I + i, dh * activate(act, gate));
}

template <class T>
__global__ void swiglu_forward_kernel(const T* gate_up, T* hidden, int64_t I, int64_t n,
                                      Activation act) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * blockDim.x) {
    swiglu_forward_element(gate_up, hidden, I, idx, act);
  }
}

template <class T>
__global__ void swiglu_backward_kernel(const T* gate_up, const T* dhidden, T* dgate_up, int64_t I,
                                       int64_t n, Activation act) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * blockDim.x) {
    swiglu_backward_element(gate_up, dhidden, dgate_up, I, idx, act);
  }
}

template <class T>
void forward_typed(const Tensor& gate_up, Activation act, Tensor& hidden) {
  const int64_t I = hidden.size(1), n = hidden.numel();
  if (gate_up.device() == Device::cpu) {
    for (int64_t idx = 0; idx < n; ++idx) {
      swiglu_forward_element(gate_up.data<T>(), hidden.data<T>(), I, idx, act);
    }
    return;
  }
  swiglu_forward_kernel<<<grid_for(n, 256), 256, 0, current_stream()>>>(
      gate_up.data<T>(), hidden.data<T>(), I, n, act);
  CUDA_CHECK_LAUNCH("swiglu_forward_kernel");
}

template <class T>
void backward_typed(const Tensor& gate_up, const Tensor& dhidden, Activation act,
                    Tensor& dgate_up) {
  const int64_t I = dhidden.size(1), n = dhidden.numel();
  if (gate_up.device() == Device::cpu) {
    for (int64_t idx = 0; idx < n; ++idx) {
      swiglu_backward_element(gate_up.data<T>(), dhidden.data<T>(), dgate_up.data<T>(), I, idx,
                              act);
    }
    return;
  }
  swiglu_backward_kernel<<<grid_for(n, 256), 256, 0, current_stream()>>>(
      gate_up.data<T>(), dhidden.data<T>(), dgate_up.data<T>(), I, n, act);
  CUDA_CHECK_LAUNCH("swiglu_backward_kernel");
}

void check_gate_up(const Tensor& gate_up) {
  FLASHMOE_CHECK(gate_up.defined() && gate_up.rank() == 2 && gate_up.size(1) % 2 == 0,
                 "gate_up has shape " << shape_string(gate_up.shape()) << ", expected [M, 2I]");
  expect_float(gate_up, "gate_up");
}
}  // namespace

void swiglu_forward(const Tensor& gate_up, Activation act, Tensor& hidden) {
  check_gate_up(gate_up);
  ensure(hidden, {gate_up.size(0), gate_up.size(1) / 2}, gate_up.dtype(), gate_up.device());
  if (gate_up.dtype() == DType::f32) {
    forward_typed<float>(gate_up, act, hidden);
  } else {
    forward_typed<bf16>(gate_up, act, hidden);
  }
}

void swiglu_backward(const Tensor& gate_up, const Tensor& dhidden, Activation act,
                     Tensor& dgate_up) {
  check_gate_up(gate_up);
  expect_shape(dhidden, {gate_up.size(0), gate_up.size(1) / 2}, "dhidden");
  expect_dtype(dhidden, gate_up.dtype(), "dhidden");
  expect_device(dhidden, gate_up.device(), "dhidden");
  ensure(dgate_up, gate_up.shape(), gate_up.dtype(), gate_up.device());
  if (gate_up.dtype() == DType::f32) {
    backward_typed<float>(gate_up, dhidden, act, dgate_up);
  } else {
    backward_typed<bf16>(gate_up, dhidden, act, dgate_up);
  }
}

}  // namespace flashmoe
