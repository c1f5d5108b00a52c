#include <cmath>

#include "core/stream.h"
#include "kernels/column_sum.cuh"
#include "kernels/norm.h"
#include "kernels/op_utils.cuh"

namespace flashmoe {

namespace {

// ---- RMSNorm: one warp per row on the GPU, a loop per row on the CPU. ----

// Per-row sum of f(d) over d < D: strided over the warp's lanes on the GPU.
template <class F>
__device__ float warp_row_sum(F f, int64_t D) {
  float sum = 0;
  for (int64_t d = threadIdx.x & 31; d < D; d += 32) sum += f(d);
  return warp_sum(sum);
}

FLASHMOE_HD float gain_at(const float* gain, int64_t d) { return gain ? gain[d] : 1.0f; }

template <class T>
__global__ void rmsnorm_forward_kernel(const T* x, const float* gain, float eps, int64_t M,
                                       int64_t D, T* y, float* rstd) {
  const int64_t m = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  if (m >= M) return;
  const T* row = x + m * D;
  const float ss =
      warp_row_sum([&](int64_t d) { return load_float(row, d) * load_float(row, d); }, D);
  const float r = rsqrtf(ss / D + eps);
  for (int64_t d = threadIdx.x & 31; d < D; d += 32) {
    store_float(y, m * D + d, load_float(row, d) * r * gain_at(gain, d));
  }
  if ((threadIdx.x & 31) == 0) rstd[m] = r;
}

template <class T>
__global__ void rmsnorm_backward_kernel(const T* x, const float* gain, const float* rstd,
                                        const T* dy, int64_t M, int64_t D, T* dx) {
  const int64_t m = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  if (m >= M) return;
  const T* xr = x + m * D;
  const T* dyr = dy + m * D;
  const float dot = warp_row_sum(
      [&](int64_t d) { return gain_at(gain, d) * load_float(dyr, d) * load_float(xr, d); }, D);
  const float r = rstd[m], correction = r * r * dot / D;
  for (int64_t d = threadIdx.x & 31; d < D; d += 32) {
    store_float(dx, m * D + d,
                r * (gain_at(gain, d) * load_float(dyr, d) - load_float(xr, d) * correction));
  }
}

template <class T>
void rmsnorm_forward_cpu(const T* x, const float* gain, float eps, int64_t M, int64_t D, T* y,
                         float* rstd) {
  for (int64_t m = 0; m < M; ++m) {
    float ss = 0;
    for (int64_t d = 0; d < D; ++d) ss += load_float(x, m * D + d) * load_float(x, m * D + d);
    rstd[m] = 1.0f / std::sqrt(ss / D + eps);
    for (int64_t d = 0; d < D; ++d) {
      store_float(y, m * D + d, load_float(x, m * D + d) * rstd[m] * gain_at(gain, d));
    }
  }
}

template <class T>
void rmsnorm_backward_cpu(const T* x, const float* gain, const float* rstd, const T* dy, int64_t M,
                          int64_t D, T* dx) {
  for (int64_t m = 0; m < M; ++m) {
    float dot = 0;
    for (int64_t d = 0; d < D; ++d) {
      dot += gain_at(gain, d) * load_float(dy, m * D + d) * load_float(x, m * D + d);
    }
    const float r = rstd[m], correction = r * r * dot / D;
    for (int64_t d = 0; d < D; ++d) {
      store_float(dx, m * D + d,
                  r * (gain_at(gain, d) * load_float(dy, m * D + d) -
                       load_float(x, m * D + d) * correction));
    }
  }
}

// dgain[d] = sum_m dy x r: a column sum.
template <class T>
struct GainGradTerm {
  const T* x;
  const T* dy;
  const float* rstd;
  int64_t D;
  FLASHMOE_HD float operator()(int64_t m, int64_t d) const {
    return load_float(dy, m * D + d) * load_float(x, m * D + d) * rstd[m];
  }
};

constexpr int kRowsPerBlock = 8;  // warps per block in the row kernels

template <class T>
void rmsnorm_forward_typed(const Tensor& x, const Tensor& gain, float eps, Tensor& y,
                           Tensor& rstd) {
  const int64_t M = x.size(0), D = x.size(1);
  const float* g = gain.defined() ? gain.data<float>() : nullptr;
  if (x.device() == Device::cpu) {
    rmsnorm_forward_cpu(x.data<T>(), g, eps, M, D, y.data<T>(), rstd.data<float>());
    return;
  }
  if (M == 0) return;
  rmsnorm_forward_kernel<<<static_cast<unsigned>((M + kRowsPerBlock - 1) / kRowsPerBlock),
                           32 * kRowsPerBlock, 0, current_stream()>>>(
      x.data<T>(), g, eps, M, D, y.data<T>(), rstd.data<float>());
  CUDA_CHECK_LAUNCH("rmsnorm_forward_kernel");
}

template <class T>
void rmsnorm_backward_typed(const Tensor& x, const Tensor& gain, const Tensor& rstd,
                            const Tensor& dy, Tensor& dx, Tensor& dgain) {
  const int64_t M = x.size(0), D = x.size(1);
  const float* g = gain.defined() ? gain.data<float>() : nullptr;
  if (x.device() == Device::cpu) {
    rmsnorm_backward_cpu(x.data<T>(), g, rstd.data<float>(), dy.data<T>(), M, D, dx.data<T>());
  } else if (M > 0) {
    rmsnorm_backward_kernel<<<static_cast<unsigned>((M + kRowsPerBlock - 1) / kRowsPerBlock),
                              32 * kRowsPerBlock, 0, current_stream()>>>(
        x.data<T>(), g, rstd.data<float>(), dy.data<T>(), M, D, dx.data<T>());
    CUDA_CHECK_LAUNCH("rmsnorm_backward_kernel");
  }
  if (gain.defined()) {
    static thread_local Tensor workspace;
    column_sum<float>(x.device(), GainGradTerm<T>{x.data<T>(), dy.data<T>(), rstd.data<float>(), D},
                      M, D, dgain.data<float>(), workspace);
  }
}

void check_rows(const Tensor& x, const char* name) {
  FLASHMOE_CHECK(x.defined() && x.rank() == 2,
                 name << " has shape " << shape_string(x.shape()) << ", expected [M, D]");
  FLASHMOE_CHECK(x.size(1) >= 1,
                 name << " has shape " << shape_string(x.shape()) << ", expected D >= 1");
  expect_float(x, name);
}

void check_like(const Tensor& t, const Tensor& x, const char* name) {
  expect_shape(t, x.shape(), name);
  expect_dtype(t, x.dtype(), name);
  expect_device(t, x.device(), name);
}

void check_gain(const Tensor& gain, const Tensor& x) {
  if (!gain.defined()) return;
  expect_shape(gain, {x.size(1)}, "rmsnorm gain");
  expect_dtype(gain, DType::f32, "rmsnorm gain");
  expect_device(gain, x.device(), "rmsnorm gain");
}

}  // namespace

void rmsnorm_forward(const Tensor& x, const Tensor& gain, float eps, Tensor& y, Tensor& rstd) {
  check_rows(x, "rmsnorm input");
  check_gain(gain, x);
  ensure(y, x.shape(), x.dtype(), x.device());
  ensure(rstd, {x.size(0)}, DType::f32, x.device());
  if (x.dtype() == DType::f32) {
    rmsnorm_forward_typed<float>(x, gain, eps, y, rstd);
  } else {
    rmsnorm_forward_typed<bf16>(x, gain, eps, y, rstd);
  }
}

void rmsnorm_backward(const Tensor& x, const Tensor& gain, const Tensor& rstd, const Tensor& dy,
                      Tensor& dx, Tensor& dgain) {
  check_rows(x, "rmsnorm input");
  check_gain(gain, x);
  check_like(dy, x, "rmsnorm dy");
  expect_shape(rstd, {x.size(0)}, "rmsnorm rstd");
  ensure(dx, x.shape(), x.dtype(), x.device());
  if (gain.defined()) ensure(dgain, {x.size(1)}, DType::f32, x.device());
  if (x.dtype() == DType::f32) {
    rmsnorm_backward_typed<float>(x, gain, rstd, dy, dx, dgain);
  } else {
    rmsnorm_backward_typed<bf16>(x, gain, rstd, dy, dx, dgain);
  }
}

// ---- BatchNorm ----

namespace {

template <class T>
struct Value {
  const T* x;
  int64_t D;
  FLASHMOE_HD double operator()(int64_t m, int64_t d) const { return load_float(x, m * D + d); }
};

template <class T>
struct Square {
  const T* x;
  int64_t D;
  FLASHMOE_HD double operator()(int64_t m, int64_t d) const {
    const double v = load_float(x, m * D + d);
    return v * v;
  }
};

template <class T>
struct DyTimesXhat {
  const T* x;
  const T* dy;
  const float* mean;
  const float* invstd;
  int64_t D;
  FLASHMOE_HD double operator()(int64_t m, int64_t d) const {
    return double(load_float(dy, m * D + d)) * ((load_float(x, m * D + d) - mean[d]) * invstd[d]);
  }
};

// Statistics from the global sums; the running statistics move in training only.
struct BatchnormFinalize {
  const double* sums;
  int64_t D;
  bool training;
  float momentum, eps;
  float *running_mean, *running_var, *mean, *invstd;
  FLASHMOE_HD void operator()(int64_t d) const {
    double mu = running_mean[d], var = running_var[d];
    if (training) {
      const double n = sums[2 * D];
      mu = sums[d] / n;
      var = sums[D + d] / n - mu * mu;
      var = var > 0 ? var : 0;
      const double unbiased = n > 1 ? var * n / (n - 1) : var;
      running_mean[d] = static_cast<float>(running_mean[d] + momentum * (mu - running_mean[d]));
      running_var[d] = static_cast<float>(running_var[d] + momentum * (unbiased - running_var[d]));
    }
    mean[d] = static_cast<float>(mu);
    invstd[d] = static_cast<float>(1.0 / sqrt(var + eps));
  }
};

template <class T>
struct BatchnormApply {
  const T* x;
  const float *mean, *invstd;
  int64_t D;
  T* y;
  FLASHMOE_HD void operator()(int64_t idx) const {
    const int64_t d = idx % D;
    store_float(y, idx, (load_float(x, idx) - mean[d]) * invstd[d]);
  }
};

template <class T>
struct BatchnormBackward {
  const T *x, *dy;
  const float *mean, *invstd;
  const double* sums;
  bool training;
  int64_t D;
  T* dx;
  FLASHMOE_HD void operator()(int64_t idx) const {
    const int64_t d = idx % D;
    float g = load_float(dy, idx);
    if (training) {
      const double n = sums[2 * D];
      const float xhat = (load_float(x, idx) - mean[d]) * invstd[d];
      g -= static_cast<float>(sums[d] / n) + xhat * static_cast<float>(sums[D + d] / n);
    }
    store_float(dx, idx, g * invstd[d]);
  }
};

// Columns [0, D) are a, [D, 2D) are b and column 2D is 1, so that one pass over the
// rows gives sum a, sum b and the row count M (exact in fp64).
template <class A, class B>
struct StatisticColumns {
  A a;
  B b;
  int64_t D;
  FLASHMOE_HD double operator()(int64_t m, int64_t c) const {
    return c < D ? a(m, c) : (c < 2 * D ? b(m, c - D) : 1.0);
  }
};

// bn.sums = [sum a (D), sum b (D), M] over this rank's rows; then the hook sums ranks.
template <class A, class B>
void partial_sums(BatchNorm& bn, Device device, A a, B b, int64_t M, int64_t D) {
  ensure(bn.sums, {2 * D + 1}, DType::f64, device);
  column_sum<double>(device, StatisticColumns<A, B>{a, b, D}, M, 2 * D + 1, bn.sums.data<double>(),
                     bn.workspace);
  if (bn.sync) bn.sync(bn.sums);
}

template <class T>
void batchnorm_forward_typed(BatchNorm& bn, const Tensor& x, bool training, Tensor& y,
                             BatchNormSaved& saved) {
  const int64_t M = x.size(0), D = x.size(1);
  const Device device = x.device();
  if (training) partial_sums(bn, device, Value<T>{x.data<T>(), D}, Square<T>{x.data<T>(), D}, M, D);
  const double* sums = training ? bn.sums.data<double>() : nullptr;
  float *mean = saved.mean.data<float>(), *invstd = saved.invstd.data<float>();
  for_each_index(
      device, D,
      BatchnormFinalize{sums, D, training, bn.momentum, bn.eps, bn.running_mean.data<float>(),
                        bn.running_var.data<float>(), mean, invstd},
      "batchnorm_finalize");
  for_each_index(device, M * D, BatchnormApply<T>{x.data<T>(), mean, invstd, D, y.data<T>()},
                 "batchnorm_apply");
}

template <class T>
void batchnorm_backward_typed(BatchNorm& bn, const Tensor& x, const BatchNormSaved& saved,
                              const Tensor& dy, Tensor& dx) {
  const int64_t M = x.size(0), D = x.size(1);
  const Device device = x.device();
  const float *mean = saved.mean.data<float>(), *invstd = saved.invstd.data<float>();
  if (saved.training) {
    partial_sums(bn, device, Value<T>{dy.data<T>(), D},
                 DyTimesXhat<T>{x.data<T>(), dy.data<T>(), mean, invstd, D}, M, D);
  }
  const double* sums = saved.training ? bn.sums.data<double>() : nullptr;
  for_each_index(device, M * D,
                 BatchnormBackward<T>{x.data<T>(), dy.data<T>(), mean, invstd, sums, saved.training,
                                      D, dx.data<T>()},
                 "batchnorm_backward");
}

void check_running(const BatchNorm& bn, const Tensor& x) {
  expect_shape(bn.running_mean, {x.size(1)}, "batchnorm running_mean");
  expect_shape(bn.running_var, {x.size(1)}, "batchnorm running_var");
  expect_dtype(bn.running_mean, DType::f32, "batchnorm running_mean");
  expect_dtype(bn.running_var, DType::f32, "batchnorm running_var");
  expect_device(bn.running_mean, x.device(), "batchnorm running_mean");
  expect_device(bn.running_var, x.device(), "batchnorm running_var");
}

}  // namespace

void batchnorm_forward(BatchNorm& bn, const Tensor& x, bool training, Tensor& y,
                       BatchNormSaved& saved) {
  check_rows(x, "batchnorm input");
  check_running(bn, x);
  ensure(y, x.shape(), x.dtype(), x.device());
  ensure(saved.mean, {x.size(1)}, DType::f32, x.device());
  ensure(saved.invstd, {x.size(1)}, DType::f32, x.device());
  saved.training = training;
  if (x.dtype() == DType::f32) {
    batchnorm_forward_typed<float>(bn, x, training, y, saved);
  } else {
    batchnorm_forward_typed<bf16>(bn, x, training, y, saved);
  }
}

void batchnorm_backward(BatchNorm& bn, const Tensor& x, const BatchNormSaved& saved,
                        const Tensor& dy, Tensor& dx) {
  check_rows(x, "batchnorm input");
  check_like(dy, x, "batchnorm dy");
  expect_shape(saved.mean, {x.size(1)}, "batchnorm saved mean");
  ensure(dx, x.shape(), x.dtype(), x.device());
  if (x.dtype() == DType::f32) {
    batchnorm_backward_typed<float>(bn, x, saved, dy, dx);
  } else {
    batchnorm_backward_typed<bf16>(bn, x, saved, dy, dx);
  }
}

}  // namespace flashmoe
