#include <cmath>
#include <vector>

#include "kernels/column_sum.cuh"
#include "kernels/cross_entropy.h"
#include "kernels/op_utils.cuh"

namespace flashmoe {

namespace {

// Running max, sum of exp(z - max) and first argmax over a part of a row; a plain
// aggregate so that it can live in shared memory. Start from empty_row_stats().
struct RowStats {
  float max, sum;
  int64_t argmax;  // -1: no element yet

  // Elements must come in increasing v, so ties keep the smaller id.
  FLASHMOE_HD void add(float z, int64_t v) {
    if (z > max) {
      sum = sum * expf(max - z) + 1.0f;
      max = z;
      argmax = v;
    } else {
      sum += expf(z - max);
    }
  }

  // Merges the statistics of another part of the row.
  FLASHMOE_HD void merge(const RowStats& o) {
    if (o.argmax < 0) return;
    if (argmax < 0) {
      *this = o;
      return;
    }
    const float m = fmaxf(max, o.max);
    sum = sum * expf(max - m) + o.sum * expf(o.max - m);
    if (o.max > max || (o.max == max && o.argmax < argmax)) argmax = o.argmax;
    max = m;
  }

  FLASHMOE_HD float lse() const { return max + logf(sum); }
};

FLASHMOE_HD RowStats empty_row_stats() { return RowStats{-INFINITY, 0.0f, -1}; }

constexpr int kRowThreads = 256;

// The statistics of row z [V], reduced over the block in a fixed tree.
template <class T>
__device__ RowStats block_row_stats(const T* z, int64_t V) {
  __shared__ RowStats part[kRowThreads];
  RowStats s = empty_row_stats();
  for (int64_t v = threadIdx.x; v < V; v += kRowThreads) s.add(load_float(z, v), v);
  part[threadIdx.x] = s;
  __syncthreads();
  for (int stride = kRowThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) part[threadIdx.x].merge(part[threadIdx.x + stride]);
    __syncthreads();
  }
  return part[0];
}

FLASHMOE_HD bool in_range(int32_t y, int64_t V) { return y >= 0 && y < V; }

template <class T>
FLASHMOE_HD float target_nll(const T* z, int32_t y, int64_t V, float lse) {
  return in_range(y, V) ? lse - load_float(z, y) : NAN;
}

template <class T>
__global__ void forward_backward_kernel(const T* logits, const int32_t* targets, int64_t V,
                                        float scale, float* nll, T* dlogits) {
  const int64_t t = blockIdx.x;
  const T* z = logits + t * V;
  const int32_t y = targets[t];
  const float lse = block_row_stats(z, V).lse();
  if (threadIdx.x == 0) nll[t] = target_nll(z, y, V, lse);
  for (int64_t v = threadIdx.x; v < V; v += kRowThreads) {
    const float target = v == y ? 1.0f : 0.0f;
    store_float(dlogits, t * V + v, scale * (expf(load_float(z, v) - lse) - target));
  }
}

template <class T>
__global__ void evaluate_kernel(const T* logits, const int32_t* targets, int64_t V, float* nll,
                                float* correct) {
  const int64_t t = blockIdx.x;
  const T* z = logits + t * V;
  const RowStats s = block_row_stats(z, V);
  if (threadIdx.x == 0) {
    nll[t] = target_nll(z, targets[t], V, s.lse());
    correct[t] = s.argmax == targets[t] ? 1.0f : 0.0f;
  }
}

// CPU rows: a max pass, then exp(z - max) once per element into `exps`.
template <class T>
RowStats cpu_row_stats(const T* z, int64_t V, std::vector<float>& exps) {
  RowStats s = empty_row_stats();
  for (int64_t v = 0; v < V; ++v) {
    if (load_float(z, v) > s.max) s.max = load_float(z, v), s.argmax = v;
  }
  exps.resize(V);
  for (int64_t v = 0; v < V; ++v) s.sum += exps[v] = std::exp(load_float(z, v) - s.max);
  return s;
}

template <class T>
void forward_backward_cpu(const T* logits, const int32_t* targets, int64_t rows, int64_t V,
                          float scale, float* nll, T* dlogits) {
  std::vector<float> exps;
  for (int64_t t = 0; t < rows; ++t) {
    const T* z = logits + t * V;
    const RowStats s = cpu_row_stats(z, V, exps);
    nll[t] = target_nll(z, targets[t], V, s.lse());
    const float inv_sum = 1.0f / s.sum;
    for (int64_t v = 0; v < V; ++v) {
      const float target = v == targets[t] ? 1.0f : 0.0f;
      store_float(dlogits, t * V + v, scale * (exps[v] * inv_sum - target));
    }
  }
}

template <class T>
void evaluate_cpu(const T* logits, const int32_t* targets, int64_t rows, int64_t V, float* nll,
                  float* correct) {
  std::vector<float> exps;
  for (int64_t t = 0; t < rows; ++t) {
    const RowStats s = cpu_row_stats(logits + t * V, V, exps);
    nll[t] = target_nll(logits + t * V, targets[t], V, s.lse());
    correct[t] = s.argmax == targets[t] ? 1.0f : 0.0f;
  }
}

struct ScaledNll {
  const float* nll;
  double scale;
  FLASHMOE_HD double operator()(int64_t t, int64_t) const { return scale * nll[t]; }
};

// Column 0: mask * nll, 1: mask * correct, 2: mask.
struct MaskedTerms {
  const float* nll;
  const float* correct;
  const int32_t* mask;
  FLASHMOE_HD double operator()(int64_t t, int64_t column) const {
    if (mask[t] == 0) return 0.0;
    return column == 0 ? double(nll[t]) : column == 1 ? double(correct[t]) : 1.0;
  }
};

void check_inputs(const Tensor& logits, const Tensor& targets) {
  FLASHMOE_CHECK(logits.defined() && logits.rank() == 2 && logits.size(1) >= 1,
                 "logits have shape " << shape_string(logits.shape()) << ", expected [T, V]");
  expect_float(logits, "logits");
  expect_shape(targets, {logits.size(0)}, "targets");
  expect_dtype(targets, DType::i32, "targets");
  expect_device(targets, logits.device(), "targets");
  if (targets.device() == Device::cpu) check_ids_in_range(targets, logits.size(1), "target id");
}

}  // namespace

void cross_entropy_forward_backward(const Tensor& logits, const Tensor& targets, double loss_scale,
                                    CrossEntropyBuffers& buffers, Tensor& loss, Tensor& dlogits) {
  check_inputs(logits, targets);
  const int64_t T = logits.size(0), V = logits.size(1);
  const Device device = logits.device();
  ensure(buffers.row_nll, {T}, DType::f32, device);
  ensure(loss, {}, DType::f32, device);
  ensure(dlogits, logits.shape(), logits.dtype(), device);
  const float scale = static_cast<float>(loss_scale);
  with_storage_type(logits.dtype(), [&]<class Storage>() {
    if (device == Device::cpu) {
      forward_backward_cpu(logits.data<Storage>(), targets.data<int32_t>(), T, V, scale,
                           buffers.row_nll.data<float>(), dlogits.data<Storage>());
    } else if (T > 0) {
      forward_backward_kernel<<<static_cast<unsigned>(T), kRowThreads, 0, current_stream()>>>(
          logits.data<Storage>(), targets.data<int32_t>(), V, scale, buffers.row_nll.data<float>(),
          dlogits.data<Storage>());
      CUDA_CHECK_LAUNCH("forward_backward_kernel");
    }
  });
  column_sum<double>(device, ScaledNll{buffers.row_nll.data<float>(), loss_scale}, T, 1,
                     loss.data<float>(), buffers.sum_workspace);
}

void cross_entropy_evaluate(const Tensor& logits, const Tensor& targets, const Tensor& mask,
                            CrossEntropyBuffers& buffers, Tensor& sums) {
  check_inputs(logits, targets);
  expect_shape(mask, targets.shape(), "evaluation mask");
  expect_dtype(mask, DType::i32, "evaluation mask");
  expect_device(mask, logits.device(), "evaluation mask");
  const int64_t T = logits.size(0), V = logits.size(1);
  const Device device = logits.device();
  ensure(buffers.row_nll, {T}, DType::f32, device);
  ensure(buffers.row_correct, {T}, DType::f32, device);
  ensure(sums, {3}, DType::f64, device);
  with_storage_type(logits.dtype(), [&]<class Storage>() {
    if (device == Device::cpu) {
      evaluate_cpu(logits.data<Storage>(), targets.data<int32_t>(), T, V,
                   buffers.row_nll.data<float>(), buffers.row_correct.data<float>());
    } else if (T > 0) {
      evaluate_kernel<<<static_cast<unsigned>(T), kRowThreads, 0, current_stream()>>>(
          logits.data<Storage>(), targets.data<int32_t>(), V, buffers.row_nll.data<float>(),
          buffers.row_correct.data<float>());
      CUDA_CHECK_LAUNCH("evaluate_kernel");
    }
  });
  column_sum<double>(device,
                     MaskedTerms{buffers.row_nll.data<float>(), buffers.row_correct.data<float>(),
                                 mask.data<int32_t>()},
                     T, 3, sums.data<double>(), buffers.sum_workspace);
}

}  // namespace flashmoe
