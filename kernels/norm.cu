#include <algorithm>
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
  expect_tensor(t, x.shape(), x.dtype(), x.device(), name);
}

void check_gain(const Tensor& gain, const Tensor& x) {
  if (!gain.defined()) return;
  expect_tensor(gain, {x.size(1)}, DType::f32, x.device(), "rmsnorm gain");
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

// Per-row terms of the statistics for W features from d0: a[k], b[k] of feature d0 + k.
// Forward: a = x, b = x^2. Backward: a = dy, b = dy * xhat.
template <class T>
struct ForwardTerms {
  const T* x;
  int64_t D;
  template <int W>
  FLASHMOE_HD void operator()(int64_t m, int64_t d0, double (&a)[W], double (&b)[W]) const {
    const Lanes<W, T> xs = load_lanes<W>(x, m * D + d0);
    for (int k = 0; k < W; ++k) {
      a[k] = load_float(xs.v, k);
      b[k] = a[k] * a[k];
    }
  }
};

template <class T>
struct BackwardTerms {
  const T *x, *dy;
  const float *mean, *invstd;
  int64_t D;
  template <int W>
  FLASHMOE_HD void operator()(int64_t m, int64_t d0, double (&a)[W], double (&b)[W]) const {
    const Lanes<W, T> xs = load_lanes<W>(x, m * D + d0), dys = load_lanes<W>(dy, m * D + d0);
    const Lanes<W, float> mu = load_lanes<W>(mean, d0), is = load_lanes<W>(invstd, d0);
    for (int k = 0; k < W; ++k) {
      a[k] = load_float(dys.v, k);
      b[k] = a[k] * ((load_float(xs.v, k) - mu.v[k]) * is.v[k]);
    }
  }
};

// GPU partial sums: a block covers kStatPacks packs of W features and one chunk of rows,
// read by kStatRowLanes row lanes; the lanes' sums are added in lane order and the
// chunks' by column_finish_kernel, in chunk order. Row [2D] of each chunk counts its rows.
constexpr int kStatPacks = 32, kStatRowLanes = 8, kStatRowsPerThread = 8;

inline int statistic_chunks(int64_t M) {
  const int64_t rows = int64_t(kStatRowLanes) * kStatRowsPerThread;
  return static_cast<int>(std::clamp<int64_t>((M + rows - 1) / rows, 1, 256));
}

template <int W, class Terms>
__global__ void __launch_bounds__(kStatPacks* kStatRowLanes)
    batchnorm_partial_kernel(Terms terms, int64_t M, int64_t D, int chunks, double* partial) {
  __shared__ double cell[kStatRowLanes][2][kStatPacks * W];
  const int64_t d0 = (blockIdx.x * int64_t(kStatPacks) + threadIdx.x) * W;
  const int64_t rows_per_chunk = (M + chunks - 1) / chunks;
  const int64_t begin = blockIdx.y * rows_per_chunk, end = std::min(begin + rows_per_chunk, M);
  double a_sum[W] = {}, b_sum[W] = {};
  if (d0 < D) {
#pragma unroll 4
    for (int64_t m = begin + threadIdx.y; m < end; m += kStatRowLanes) {
      double a[W], b[W];
      terms.template operator()<W>(m, d0, a, b);
      for (int k = 0; k < W; ++k) {
        a_sum[k] += a[k];
        b_sum[k] += b[k];
      }
    }
  }
  for (int k = 0; k < W; ++k) {
    cell[threadIdx.y][0][threadIdx.x * W + k] = a_sum[k];
    cell[threadIdx.y][1][threadIdx.x * W + k] = b_sum[k];
  }
  __syncthreads();
  double* out = partial + blockIdx.y * (2 * D + 1);
  for (int c = threadIdx.y * kStatPacks + threadIdx.x; c < 2 * kStatPacks * W;
       c += kStatPacks * kStatRowLanes) {
    const int which = c / (kStatPacks * W), column = c % (kStatPacks * W);
    const int64_t d = blockIdx.x * int64_t(kStatPacks) * W + column;
    if (d >= D) continue;
    double sum = 0;
    for (int lane = 0; lane < kStatRowLanes; ++lane) sum += cell[lane][which][column];
    out[which * D + d] = sum;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0 && threadIdx.y == 0) out[2 * D] = double(end - begin);
}

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

// Each call handles W elements from idx on, all in one row (D is a multiple of W).
template <class T>
struct BatchnormApply {
  const T* x;
  const float *mean, *invstd;
  int64_t D;
  T* y;
  template <int W>
  FLASHMOE_HD void operator()(int64_t idx) const {
    const int64_t d = idx % D;
    const Lanes<W, T> in = load_lanes<W>(x, idx);
    const Lanes<W, float> mu = load_lanes<W>(mean, d), is = load_lanes<W>(invstd, d);
    Lanes<W, T> out;
    for (int k = 0; k < W; ++k) store_float(out.v, k, (load_float(in.v, k) - mu.v[k]) * is.v[k]);
    store_lanes(y, idx, out);
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
  template <int W>
  FLASHMOE_HD void operator()(int64_t idx) const {
    const int64_t d = idx % D;
    const Lanes<W, T> xs = load_lanes<W>(x, idx), dys = load_lanes<W>(dy, idx);
    const Lanes<W, float> mu = load_lanes<W>(mean, d), is = load_lanes<W>(invstd, d);
    Lanes<W, double> sum_dy{}, sum_dy_xhat{};
    double inv_n = 0;
    if (training) {
      // The row count is on the device; one division per pack costs less than a launch
      // that would precompute it, in a kernel bound by memory.
      inv_n = 1.0 / sums[2 * D];
      sum_dy = load_lanes<W>(sums, d);
      sum_dy_xhat = load_lanes<W>(sums, D + d);
    }
    Lanes<W, T> out;
    for (int k = 0; k < W; ++k) {
      float g = load_float(dys.v, k);
      if (training) {
        const float xhat = (load_float(xs.v, k) - mu.v[k]) * is.v[k];
        g -= static_cast<float>(sum_dy.v[k] * inv_n) +
             xhat * static_cast<float>(sum_dy_xhat.v[k] * inv_n);
      }
      store_float(out.v, k, g * is.v[k]);
    }
    store_lanes(dx, idx, out);
  }
};

// bn.sums = [sum a (D), sum b (D), M] over this rank's rows; then the hook sums ranks.
template <class Terms>
void partial_sums(BatchNorm& bn, Device device, Terms terms, int64_t M, int64_t D,
                  std::initializer_list<const void*> pointers) {
  ensure(bn.sums, {2 * D + 1}, DType::f64, device);
  double* sums = bn.sums.data<double>();
  if (device == Device::cpu) {
    std::fill(sums, sums + 2 * D + 1, 0.0);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t d = 0; d < D; ++d) {
        double a[1], b[1];
        terms.template operator()<1>(m, d, a, b);
        sums[d] += a[0];
        sums[D + d] += b[0];
      }
    }
    sums[2 * D] = static_cast<double>(M);
  } else {
    const int chunks = statistic_chunks(M);
    const int64_t bytes = int64_t(chunks) * (2 * D + 1) * sizeof(double);
    if (!bn.workspace.defined() || int64_t(bn.workspace.nbytes()) < bytes) {
      bn.workspace = Tensor::empty({bytes / 8}, DType::f64, Device::cuda);
    }
    double* partial = bn.workspace.data<double>();
    const bool packed = packable({D}, pointers);
    const int W = packed ? kPack : 1;
    const dim3 grid(static_cast<unsigned>((D / W + kStatPacks - 1) / kStatPacks),
                    static_cast<unsigned>(chunks));
    const dim3 block(kStatPacks, kStatRowLanes);
    if (packed) {
      batchnorm_partial_kernel<kPack>
          <<<grid, block, 0, current_stream()>>>(terms, M, D, chunks, partial);
    } else {
      batchnorm_partial_kernel<1>
          <<<grid, block, 0, current_stream()>>>(terms, M, D, chunks, partial);
    }
    CUDA_CHECK_LAUNCH("batchnorm_partial_kernel");
    column_finish_kernel<<<static_cast<unsigned>((2 * D + 1 + 255) / 256), 256, 0,
                           current_stream()>>>(partial, 2 * D + 1, chunks, sums);
    CUDA_CHECK_LAUNCH("column_finish_kernel");
  }
  if (bn.sync) bn.sync(bn.sums);
}

template <class T>
void batchnorm_forward_typed(BatchNorm& bn, const Tensor& x, bool training, Tensor& y,
                             BatchNormSaved& saved) {
  const int64_t M = x.size(0), D = x.size(1);
  const Device device = x.device();
  if (training) partial_sums(bn, device, ForwardTerms<T>{x.data<T>(), D}, M, D, {x.raw()});
  const double* sums = training ? bn.sums.data<double>() : nullptr;
  float *mean = saved.mean.data<float>(), *invstd = saved.invstd.data<float>();
  for_each_index(
      device, D,
      BatchnormFinalize{sums, D, training, bn.momentum, bn.eps, bn.running_mean.data<float>(),
                        bn.running_var.data<float>(), mean, invstd},
      "batchnorm_finalize");
  for_each_pack(device, M * D, D, BatchnormApply<T>{x.data<T>(), mean, invstd, D, y.data<T>()},
                "batchnorm_apply", {x.raw(), y.raw(), mean, invstd});
}

template <class T>
void batchnorm_backward_typed(BatchNorm& bn, const Tensor& x, const BatchNormSaved& saved,
                              const Tensor& dy, Tensor& dx) {
  const int64_t M = x.size(0), D = x.size(1);
  const Device device = x.device();
  const float *mean = saved.mean.data<float>(), *invstd = saved.invstd.data<float>();
  if (saved.training) {
    partial_sums(bn, device, BackwardTerms<T>{x.data<T>(), dy.data<T>(), mean, invstd, D}, M, D,
                 {x.raw(), dy.raw(), mean, invstd});
  }
  const double* sums = saved.training ? bn.sums.data<double>() : nullptr;
  for_each_pack(device, M * D, D,
                BatchnormBackward<T>{x.data<T>(), dy.data<T>(), mean, invstd, sums, saved.training,
                                     D, dx.data<T>()},
                "batchnorm_backward", {x.raw(), dy.raw(), dx.raw(), mean, invstd, sums});
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
