// CUDA backend of the fused product-key router (math in kernels/router.h, the kernels
// and their algorithm in kernels/router_kernels.cuh): argument checks, launch shapes
// and dispatch. One warp per (token, head) row; a block holds up to 8 warps, fewer
// when a warp's shared memory (sort buffer and kept lists, sized by K) would push
// the block past 48 KB.
//
// Forward kernels by N: logits in registers, V = ceil(N / 32) rounded up to a power
// of two per lane and half, for N <= 1024; streamed from global memory (re-read on
// each pass, through L1/L2) beyond.
// Limits: K <= 512 (shared memory per warp), N <= 46340 (ids i * N + j fit in int32).
#include <algorithm>
#include <climits>

#include "core/stream.h"
#include "kernels/backends.h"
#include "kernels/router_kernels.cuh"

namespace flashmoe::detail {

namespace {

using namespace router_gpu;

constexpr int kMaxTopK = 512;
constexpr int kMaxNumKeys = 46340;
constexpr int kMaxWarpsPerBlock = 8;
constexpr size_t kMaxSharedBytesPerBlock = 48 * 1024;

int next_pow2(int n) { return 1 << ceil_log2(n); }

// Rank pairs (a, b), 1-based, a, b <= keep, a * b <= K: what write_candidates writes.
int candidate_count(int top_k, int keep) {
  int count = 0;
  for (int a = 1; a <= keep; ++a) count += std::min(top_k / a, keep);
  return count;
}

int floor_sqrt(int n) {
  int root = 0;
  while ((root + 1) * (root + 1) <= n) ++root;
  return root;
}

struct LaunchShape {
  unsigned blocks;
  int threads;
  size_t shared_bytes;
};

LaunchShape launch_shape(int64_t rows, size_t bytes_per_warp) {
  FLASHMOE_CHECK(bytes_per_warp <= kMaxSharedBytesPerBlock,
                 "router kernel needs " << bytes_per_warp << " bytes of shared memory a warp, "
                                        << "expected at most " << kMaxSharedBytesPerBlock);
  const int warps = static_cast<int>(
      std::clamp<size_t>(kMaxSharedBytesPerBlock / bytes_per_warp, 1, kMaxWarpsPerBlock));
  const int64_t blocks = (rows + warps - 1) / warps;
  FLASHMOE_CHECK(blocks <= INT_MAX, "router has " << rows
                                                  << " (token, head) rows, expected at most "
                                                  << int64_t{INT_MAX} * warps);
  return {static_cast<unsigned>(blocks), warps * kWarp,
          static_cast<size_t>(warps) * bytes_per_warp};
}

void check_limits(int64_t num_keys, int64_t top_k) {
  FLASHMOE_CHECK(num_keys <= kMaxNumKeys,
                 "router has N = " << num_keys << " keys, expected N <= " << kMaxNumKeys
                                   << " so that N^2 ids fit in int32");
  FLASHMOE_CHECK(top_k >= 1 && top_k <= kMaxTopK && top_k <= num_keys * num_keys,
                 "top_k is " << top_k << ", the CUDA router expects 1 <= top_k <= min(" << kMaxTopK
                             << ", N^2 = " << num_keys * num_keys << ")");
}

template <int V, class T>
void launch_forward(const Tensor& logits, const ForwardShape& shape, RouterOutputs& out) {
  const LaunchShape launch =
      launch_shape(shape.rows, forward_scratch_bytes(shape.sort_capacity, shape.keep));
  router_forward_kernel<V, T>
      <<<launch.blocks, launch.threads, launch.shared_bytes, current_stream()>>>(
          logits.data<T>(), shape, out.expert_ids.data<int32_t>(), out.gates.data<float>(),
          out.logsumexp.data<float>());
  CUDA_CHECK_LAUNCH("router_forward_kernel");
}

// The register variant whose V * 32 logits a lane covers N, else the streamed one.
template <class T>
void dispatch_forward(const Tensor& logits, const ForwardShape& shape, RouterOutputs& out) {
  const int N = shape.num_keys;
  if (N <= 1 * kWarp) return launch_forward<1, T>(logits, shape, out);
  if (N <= 2 * kWarp) return launch_forward<2, T>(logits, shape, out);
  if (N <= 4 * kWarp) return launch_forward<4, T>(logits, shape, out);
  if (N <= 8 * kWarp) return launch_forward<8, T>(logits, shape, out);
  if (N <= 16 * kWarp) return launch_forward<16, T>(logits, shape, out);
  if (N <= 32 * kWarp) return launch_forward<32, T>(logits, shape, out);
  launch_forward<0, T>(logits, shape, out);
}

template <class T>
void launch_backward(const Tensor& logits, const RouterOutputs& saved, const Tensor& dgates,
                     const BackwardShape& shape, Tensor& dlogits) {
  const LaunchShape launch =
      launch_shape(shape.rows, backward_scratch_bytes(shape.sort_capacity, shape.top_k));
  router_backward_kernel<T>
      <<<launch.blocks, launch.threads, launch.shared_bytes, current_stream()>>>(
          logits.data<T>(), saved.expert_ids.data<int32_t>(), saved.gates.data<float>(),
          saved.logsumexp.data<float>(), dgates.data<float>(), shape, dlogits.data<float>());
  CUDA_CHECK_LAUNCH("router_backward_kernel");
}

}  // namespace

void router_forward_cuda(const Tensor& logits, int top_k, bool norm_topk_prob, RouterOutputs& out) {
  expect_device(logits, Device::cuda, "router logits");
  expect_float(logits, "router logits");
  const int64_t T = logits.size(0), H = logits.size(1), N = logits.size(3);
  check_limits(N, top_k);
  expect_shape(out.expert_ids, {T, H, top_k}, "expert_ids");
  expect_shape(out.gates, {T, H, top_k}, "gates");
  expect_shape(out.logsumexp, {T, H, 2}, "logsumexp");
  expect_dtype(out.expert_ids, DType::i32, "expert_ids");
  expect_dtype(out.gates, DType::f32, "gates");
  expect_dtype(out.logsumexp, DType::f32, "logsumexp");
  for (const Tensor* t : {&out.expert_ids, &out.gates, &out.logsumexp}) {
    expect_device(*t, Device::cuda, "router output");
  }

  ForwardShape shape;
  shape.rows = T * H;
  shape.num_keys = static_cast<int>(N);
  shape.top_k = top_k;
  shape.keep = std::min(top_k, shape.num_keys);
  shape.stair_side = floor_sqrt(top_k);
  shape.norm_topk_prob = norm_topk_prob;
  // Holds the candidates padded to whole chunks of next_pow2(K), a half's kept
  // entries padded to next_pow2(keep), and the lane-maxima threshold's entries.
  const int final_chunk = next_pow2(top_k);
  const int candidates = candidate_count(top_k, shape.keep);
  shape.sort_capacity = std::max({(candidates + final_chunk - 1) / final_chunk * final_chunk,
                                  next_pow2(shape.keep), kLaneMaximaCapacity});
  if (logits.dtype() == DType::f32) {
    dispatch_forward<float>(logits, shape, out);
  } else {
    dispatch_forward<bf16>(logits, shape, out);
  }
}

void router_backward_cuda(const Tensor& logits, const RouterOutputs& saved, const Tensor& dgates,
                          bool norm_topk_prob, Tensor& dlogits) {
  expect_float(logits, "router logits");
  const int64_t T = logits.size(0), H = logits.size(1), N = logits.size(3);
  const int64_t K = saved.gates.size(2);
  check_limits(N, K);
  expect_dtype(saved.expert_ids, DType::i32, "expert_ids");
  expect_dtype(saved.gates, DType::f32, "gates");
  expect_dtype(saved.logsumexp, DType::f32, "logsumexp");
  expect_dtype(dgates, DType::f32, "dgates");
  expect_dtype(dlogits, DType::f32, "dlogits");
  expect_shape(saved.expert_ids, {T, H, K}, "expert_ids");
  expect_shape(saved.logsumexp, {T, H, 2}, "logsumexp");
  expect_shape(dgates, {T, H, K}, "dgates");
  expect_shape(dlogits, logits.shape(), "dlogits");
  for (const Tensor* t : {&logits, &saved.expert_ids, &saved.gates, &saved.logsumexp, &dgates,
                          static_cast<const Tensor*>(&dlogits)}) {
    expect_device(*t, Device::cuda, "router_backward argument");
  }

  BackwardShape shape;
  shape.rows = T * H;
  shape.num_keys = static_cast<int>(N);
  shape.top_k = static_cast<int>(K);
  shape.sort_capacity = std::max(kWarp, next_pow2(2 * shape.top_k));  // a lane each at least
  shape.norm_topk_prob = norm_topk_prob;
  if (logits.dtype() == DType::f32) {
    launch_backward<float>(logits, saved, dgates, shape, dlogits);
  } else {
    launch_backward<bf16>(logits, saved, dgates, shape, dlogits);
  }
}

}  // namespace flashmoe::detail
