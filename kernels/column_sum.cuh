// Deterministic column sums out[d] = sum over rows m < M of f(m, d), on the CPU
// or the GPU, in a fixed order: rows are cut into `chunks` contiguous pieces that
// depend only on M; each piece is summed by one column of threads, the pieces'
// partial sums are then added in chunk order. No atomics, so results repeat bit
// for bit. Acc is the accumulator type (double for batch statistics).
#pragma once

#include <vector>

#include "core/error.h"
#include "core/stream.h"
#include "core/tensor.h"

namespace flashmoe {

constexpr int kColumnSumRowsPerThread = 16;

inline int column_sum_chunks(int64_t M) {
  const int64_t chunks = (M + kColumnSumRowsPerThread * 8 - 1) / (kColumnSumRowsPerThread * 8);
  return static_cast<int>(chunks < 1 ? 1 : (chunks > 256 ? 256 : chunks));
}

template <class Acc, class F>
__global__ void column_partial_kernel(F f, int64_t M, int64_t D, int chunks, Acc* partial) {
  __shared__ Acc cell[8][33];
  const int64_t d = blockIdx.x * 32 + threadIdx.x;
  const int64_t rows_per_chunk = (M + chunks - 1) / chunks;
  const int64_t begin = blockIdx.y * rows_per_chunk;
  const int64_t end = begin + rows_per_chunk < M ? begin + rows_per_chunk : M;
  // Four independent sums keep four loads in flight; they are added in a fixed order.
  Acc lane_sum[4] = {0, 0, 0, 0};
  if (d < D) {
    int64_t m = begin + threadIdx.y;
    for (; m + 24 < end; m += 32) {
      for (int u = 0; u < 4; ++u) lane_sum[u] += f(m + 8 * u, d);
    }
    for (; m < end; m += 8) lane_sum[0] += f(m, d);
  }
  Acc sum = (lane_sum[0] + lane_sum[1]) + (lane_sum[2] + lane_sum[3]);
  cell[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && d < D) {
    for (int r = 1; r < 8; ++r) sum += cell[r][threadIdx.x];
    partial[blockIdx.y * D + d] = sum;
  }
}

template <class Acc, class Out>
__global__ void column_finish_kernel(const Acc* partial, int64_t D, int chunks, Out* out) {
  const int64_t d = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (d >= D) return;
  Acc sum = 0;
  for (int c = 0; c < chunks; ++c) sum += partial[c * D + d];
  out[d] = static_cast<Out>(sum);
}

// out: D elements of type Out on `device`; workspace grows as needed and is reused.
template <class Acc, class Out, class F>
void column_sum(Device device, F f, int64_t M, int64_t D, Out* out, Tensor& workspace) {
  if (device == Device::cpu) {
    std::vector<Acc> sum(D, Acc(0));
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t d = 0; d < D; ++d) sum[d] += f(m, d);
    }
    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<Out>(sum[d]);
    return;
  }
  const int chunks = column_sum_chunks(M);
  const int64_t bytes = int64_t(chunks) * D * sizeof(Acc);
  if (!workspace.defined() || int64_t(workspace.nbytes()) < bytes) {
    workspace = Tensor::empty({(bytes + 7) / 8}, DType::f64, Device::cuda);
  }
  Acc* partial = static_cast<Acc*>(workspace.raw());
  const dim3 grid(static_cast<unsigned>((D + 31) / 32), static_cast<unsigned>(chunks));
  column_partial_kernel<Acc><<<grid, dim3(32, 8), 0, current_stream()>>>(f, M, D, chunks, partial);
  CUDA_CHECK_LAUNCH("column_partial_kernel");
  column_finish_kernel<<<static_cast<unsigned>((D + 255) / 256), 256, 0, current_stream()>>>(
      partial, D, chunks, out);
  CUDA_CHECK_LAUNCH("column_finish_kernel");
}

}  // namespace flashmoe
