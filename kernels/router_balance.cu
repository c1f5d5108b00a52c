#include <cmath>

#include "kernels/column_sum.cuh"
#include "kernels/op_utils.cuh"
#include "kernels/router_balance.h"

namespace flashmoe {

namespace {

// Integer counts: the atomics add in any order and give the same result.
struct CountKeys {
  const int32_t* ids;
  int64_t H, K, N;
  unsigned long long* counts;  // [H, 2, N]
  FLASHMOE_HD void operator()(int64_t i) const {
    const int32_t e = ids[i];
    if (e < 0 || e >= N * N) return;  // see count_key_selections
    const int64_t h = i / K % H;
    unsigned long long* head = counts + h * 2 * N;
#ifdef __CUDA_ARCH__
    atomicAdd(head + e / N, 1ull);
    atomicAdd(head + N + e % N, 1ull);
#else
    ++head[e / N];
    ++head[N + e % N];
#endif
  }
};

struct ToDouble {
  const unsigned long long* counts;
  double* out;
  FLASHMOE_HD void operator()(int64_t i) const { out[i] = static_cast<double>(counts[i]); }
};

// One (h, c) row of N counts over its sum, in index order.
struct NormaliseRow {
  double* counts;
  int64_t N;
  FLASHMOE_HD void operator()(int64_t row) const {
    double* c = counts + row * N;
    double sum = 0;
    for (int64_t i = 0; i < N; ++i) sum += c[i];
    if (sum == 0) return;
    for (int64_t i = 0; i < N; ++i) c[i] /= sum;
  }
};

// One (t, h, c) row of the gradient: dq_j += scale p_j (f_j - d) with d = sum_i f_i p_i,
// which is the row's term of the loss.
FLASHMOE_HD float balance_grad(float scale, float p, float f, float d) {
  return scale * p * (f - d);
}

void backward_cpu(const float* logits, const double* fractions, int64_t rows, int64_t heads2,
                  int64_t N, float scale, float* dlogits, float* row_terms) {
  std::vector<float> p(N);
  for (int64_t r = 0; r < rows; ++r) {
    const float* q = logits + r * N;
    const double* f = fractions + r % heads2 * N;
    float max = -INFINITY, sum = 0, weighted = 0;
    for (int64_t j = 0; j < N; ++j) max = std::fmax(max, q[j]);
    for (int64_t j = 0; j < N; ++j) {
      p[j] = std::exp(q[j] - max);
      sum += p[j];
      weighted += static_cast<float>(f[j]) * p[j];
    }
    const float d = weighted / sum;
    for (int64_t j = 0; j < N; ++j) {
      dlogits[r * N + j] += balance_grad(scale, p[j] / sum, static_cast<float>(f[j]), d);
    }
    row_terms[r] = d;
  }
}

// A warp per (t, h, c) row; lanes stride over the N keys. Two passes over the row (the
// max; the sums of e = exp(q - max) and of f e, so d = sum f e / sum e), which the L1
// keeps, then the gradient.
constexpr int kRowsPerBlock = 8;

__global__ void balance_backward_kernel(const float* logits, const double* fractions, int64_t rows,
                                        int64_t heads2, int64_t N, float scale, float* dlogits,
                                        float* row_terms) {
  const int64_t r = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const float* q = logits + r * N;
  const double* f = fractions + r % heads2 * N;
  float max = -INFINITY;
  for (int64_t j = lane; j < N; j += 32) max = fmaxf(max, q[j]);
  max = warp_max(max);
  float sum = 0, weighted = 0;
  for (int64_t j = lane; j < N; j += 32) {
    const float e = expf(q[j] - max);
    sum += e;
    weighted += static_cast<float>(f[j]) * e;
  }
  const float inv_sum = 1.0f / warp_sum(sum);
  const float d = warp_sum(weighted) * inv_sum;
  for (int64_t j = lane; j < N; j += 32) {
    const float p = expf(q[j] - max) * inv_sum;
    dlogits[r * N + j] += balance_grad(scale, p, static_cast<float>(f[j]), d);
  }
  if (lane == 0) row_terms[r] = d;
}

struct ScaledTerm {
  const float* terms;
  double scale;
  FLASHMOE_HD double operator()(int64_t r, int64_t) const { return scale * terms[r]; }
};

}  // namespace

void count_key_selections(const Tensor& ids, int64_t num_keys, Tensor& scratch, Tensor& counts) {
  FLASHMOE_CHECK(ids.defined() && ids.rank() == 3,
                 "expert ids have shape " << shape_string(ids.shape()) << ", expected [T, H, K]");
  expect_dtype(ids, DType::i32, "expert ids");
  FLASHMOE_CHECK(num_keys >= 1, "num_keys is " << num_keys << ", expected >= 1");
  const Device device = ids.device();
  const int64_t H = ids.size(1), K = ids.size(2);
  if (device == Device::cpu) check_ids_in_range(ids, num_keys * num_keys, "expert id");
  ensure(scratch, {H, 2, num_keys}, DType::i64, device);
  ensure(counts, {H, 2, num_keys}, DType::f64, device);
  scratch.fill_bytes(0);
  auto* integer = static_cast<unsigned long long*>(scratch.raw());
  for_each_index(device, ids.numel(), CountKeys{ids.data<int32_t>(), H, K, num_keys, integer},
                 "count_key_selections");
  for_each_index(device, counts.numel(), ToDouble{integer, counts.data<double>()},
                 "key_counts_to_double");
}

void key_fractions(Tensor& counts) {
  FLASHMOE_CHECK(
      counts.defined() && counts.rank() == 3 && counts.size(1) == 2,
      "key counts have shape " << shape_string(counts.shape()) << ", expected [H, 2, N]");
  expect_dtype(counts, DType::f64, "key counts");
  for_each_index(counts.device(), counts.size(0) * 2,
                 NormaliseRow{counts.data<double>(), counts.size(2)}, "key_fractions");
}

void balance_loss_backward(const Tensor& logits, const Tensor& fractions, double scale,
                           BalanceLossBuffers& buffers, Tensor& dlogits, Tensor& loss) {
  FLASHMOE_CHECK(
      logits.defined() && logits.rank() == 4 && logits.size(2) == 2,
      "router logits have shape " << shape_string(logits.shape()) << ", expected [T, H, 2, N]");
  expect_dtype(logits, DType::f32, "router logits");
  const Device device = logits.device();
  const int64_t H = logits.size(1), N = logits.size(3), rows = logits.numel() / N;
  expect_tensor(fractions, {H, 2, N}, DType::f64, device, "key fractions");
  expect_tensor(dlogits, logits.shape(), DType::f32, device, "router dlogits");
  FLASHMOE_CHECK(std::isfinite(scale) && scale >= 0,
                 "balance loss scale is " << scale << ", expected a finite value >= 0");
  ensure(buffers.row_terms, {rows}, DType::f32, device);
  ensure(loss, {}, DType::f32, device);
  const float s = static_cast<float>(scale);
  if (device == Device::cpu) {
    backward_cpu(logits.data<float>(), fractions.data<double>(), rows, 2 * H, N, s,
                 dlogits.data<float>(), buffers.row_terms.data<float>());
  } else if (rows > 0) {
    const auto blocks = static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
    balance_backward_kernel<<<blocks, 32 * kRowsPerBlock, 0, current_stream()>>>(
        logits.data<float>(), fractions.data<double>(), rows, 2 * H, N, s, dlogits.data<float>(),
        buffers.row_terms.data<float>());
    CUDA_CHECK_LAUNCH("balance_backward_kernel");
  }
  column_sum<double>(device, ScaledTerm{buffers.row_terms.data<float>(), scale}, rows, 1,
                     loss.data<float>(), buffers.workspace);
}

}  // namespace flashmoe
