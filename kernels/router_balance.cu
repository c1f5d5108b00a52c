#include <algorithm>
#include <cmath>

#include "kernels/column_sum.cuh"
#include "kernels/op_utils.cuh"
#include "kernels/router_balance.h"

namespace flashmoe {

namespace {

// The key counts n, on the CPU in selection order.
void count_keys_cpu(const int32_t* ids, int64_t selections, int64_t H, int64_t K, int64_t N,
                    unsigned long long* counts) {
  for (int64_t i = 0; i < selections; ++i) {
    unsigned long long* head = counts + i / K % H * 2 * N;
    ++head[ids[i] / N];
    ++head[N + ids[i] % N];
  }
}

// On the GPU a block counts one head's selections of a run of tokens into a histogram
// in shared memory, then adds its nonzero bins to the global counts: two shared atomics
// a selection and at most one global atomic a bin and block, where a global atomic a
// selection serialised on the few hot counters. A block holds kBinsPerBlock of the 2N
// bins (blockIdx.z picks which), so any N fits. Integer counts add in any order to the
// same result.
constexpr int kCountThreads = 256;
constexpr int kBinsPerBlock = 4096;
constexpr int64_t kSelectionsPerBlock = 8192;  // below 2^32: the shared bins cannot overflow

__global__ void count_keys_kernel(const int32_t* ids, int64_t T, int H, int K, int N,
                                  int64_t tokens_per_block, unsigned long long* counts) {
  __shared__ unsigned int bins[kBinsPerBlock];
  const int h = blockIdx.y, first_bin = blockIdx.z * kBinsPerBlock;
  const int width = min(kBinsPerBlock, 2 * N - first_bin);
  for (int b = threadIdx.x; b < width; b += kCountThreads) bins[b] = 0;
  __syncthreads();
  const int64_t first_token = blockIdx.x * tokens_per_block;
  const int selections = static_cast<int>(min(tokens_per_block, T - first_token) * K);
  const int32_t* block_ids = ids + (first_token * H + h) * K;
  for (int j = threadIdx.x; j < selections; j += kCountThreads) {
    const int32_t e = block_ids[int64_t(j / K) * H * K + j % K];
    if (e < 0 || e / N >= N) continue;  // see count_key_selections
    const unsigned half0 = e / N - first_bin, half1 = N + e % N - first_bin;
    if (half0 < unsigned(width)) atomicAdd(&bins[half0], 1u);
    if (half1 < unsigned(width)) atomicAdd(&bins[half1], 1u);
  }
  __syncthreads();
  unsigned long long* head = counts + int64_t(h) * 2 * N + first_bin;
  for (int b = threadIdx.x; b < width; b += kCountThreads) {
    if (bins[b] != 0) atomicAdd(head + b, static_cast<unsigned long long>(bins[b]));
  }
}

void count_keys_cuda(const int32_t* ids, int64_t T, int64_t H, int64_t K, int64_t N,
                     unsigned long long* counts) {
  FLASHMOE_CHECK(H <= 65535 && 2 * N <= 65535ll * kBinsPerBlock,
                 "key counts over " << H << " heads of " << N
                                    << " keys, expected at most 65535 heads and 2^27 keys");
  const int64_t tokens_per_block = std::max<int64_t>(1, kSelectionsPerBlock / K);
  const dim3 grid(static_cast<unsigned>((T + tokens_per_block - 1) / tokens_per_block),
                  static_cast<unsigned>(H),
                  static_cast<unsigned>((2 * N + kBinsPerBlock - 1) / kBinsPerBlock));
  count_keys_kernel<<<grid, kCountThreads, 0, current_stream()>>>(
      ids, T, static_cast<int>(H), static_cast<int>(K), static_cast<int>(N), tokens_per_block,
      counts);
  CUDA_CHECK_LAUNCH("count_keys_kernel");
}

struct ToDouble {
  const unsigned long long* counts;
  double* out;
  FLASHMOE_HD void operator()(int64_t i) const { out[i] = static_cast<double>(counts[i]); }
};

// Each (h, c) row of N counts over its sum. The counts are integers below 2^53, so the
// sum is exact in any order: the CPU's loop and the GPU's warp give the same bits.
void normalise_rows_cpu(double* counts, int64_t rows, int64_t N) {
  for (double* c = counts; c < counts + rows * N; c += N) {
    double sum = 0;
    for (int64_t i = 0; i < N; ++i) sum += c[i];
    if (sum == 0) continue;
    for (int64_t i = 0; i < N; ++i) c[i] /= sum;
  }
}

constexpr int kRowsPerBlock = 8;  // a warp a row

__global__ void normalise_rows_kernel(double* counts, int64_t rows, int64_t N) {
  const int64_t r = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  double* c = counts + r * N;
  double sum = 0;
  for (int64_t i = lane; i < N; i += 32) sum += c[i];
  sum = warp_sum(sum);
  if (sum == 0) return;
  for (int64_t i = lane; i < N; i += 32) c[i] /= sum;
}

unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
}

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
  const int64_t T = ids.size(0), H = ids.size(1), K = ids.size(2);
  if (device == Device::cpu) check_ids_in_range(ids, num_keys * num_keys, "expert id");
  ensure(scratch, {H, 2, num_keys}, DType::i64, device);
  ensure(counts, {H, 2, num_keys}, DType::f64, device);
  scratch.fill_bytes(0);
  auto* integer = static_cast<unsigned long long*>(scratch.raw());
  if (device == Device::cpu) {
    count_keys_cpu(ids.data<int32_t>(), ids.numel(), H, K, num_keys, integer);
  } else if (ids.numel() > 0) {
    count_keys_cuda(ids.data<int32_t>(), T, H, K, num_keys, integer);
  }
  for_each_index(device, counts.numel(), ToDouble{integer, counts.data<double>()},
                 "key_counts_to_double");
}

void key_fractions(Tensor& counts) {
  FLASHMOE_CHECK(
      counts.defined() && counts.rank() == 3 && counts.size(1) == 2,
      "key counts have shape " << shape_string(counts.shape()) << ", expected [H, 2, N]");
  expect_dtype(counts, DType::f64, "key counts");
  const int64_t rows = counts.size(0) * 2, N = counts.size(2);
  if (counts.device() == Device::cpu) {
    normalise_rows_cpu(counts.data<double>(), rows, N);
  } else if (rows > 0) {
    normalise_rows_kernel<<<row_blocks(rows), 32 * kRowsPerBlock, 0, current_stream()>>>(
        counts.data<double>(), rows, N);
    CUDA_CHECK_LAUNCH("normalise_rows_kernel");
  }
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
    balance_backward_kernel<<<row_blocks(rows), 32 * kRowsPerBlock, 0, current_stream()>>>(
        logits.data<float>(), fractions.data<double>(), rows, 2 * H, N, s, dlogits.data<float>(),
        buffers.row_terms.data<float>());
    CUDA_CHECK_LAUNCH("balance_backward_kernel");
  }
  column_sum<double>(device, ScaledTerm{buffers.row_terms.data<float>(), scale}, rows, 1,
                     loss.data<float>(), buffers.workspace);
}

}  // namespace flashmoe
