#include <algorithm>
#include <bit>
#include <cmath>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>
#include <vector>

#include "kernels/column_sum.cuh"
#include "kernels/embedding.h"
#include "kernels/op_utils.cuh"

namespace flashmoe {

namespace {

FLASHMOE_HD bool valid_id(int32_t id, int64_t V) { return id >= 0 && id < V; }

struct SplitNextToken {
  const int32_t* tokens;
  int32_t* inputs;
  int32_t* targets;
  int64_t L, V;
  FLASHMOE_HD void operator()(int64_t t) const {
    const int64_t src = (t / L) * (L + 1) + t % L;
    const int32_t input = tokens[src], target = tokens[src + 1];
    inputs[t] = valid_id(input, V) ? input : -1;
    targets[t] = valid_id(input, V) && valid_id(target, V) ? target : -1;
  }
};

template <class T>
struct EmbedElement {
  const int32_t* ids;
  const T* table;
  const T* positions;  // null: no position term
  int64_t V, D, L;
  T* x;
  FLASHMOE_HD void operator()(int64_t t, int64_t c) const {
    const int32_t id = ids[t];
    float v = valid_id(id, V) ? load_float(table, int64_t(id) * D + c) : 0.0f;
    if (positions != nullptr) v += load_float(positions, (t % L) * D + c);
    store_float(x, t * D + c, v);
  }
};

// dE[v][c] += sum over the rows r in [begin, end) of the sorted order of dx[order[r]][c].
template <class T>
void add_segment(const T* dx, const int32_t* order, int64_t begin, int64_t end, int64_t D,
                 int64_t v, int64_t c, float* dtable) {
  float sum = 0;
  for (int64_t r = begin; r < end; ++r) sum += load_float(dx, int64_t(order[r]) * D + c);
  dtable[v * D + c] += sum;
}

// ---- GPU backward: sort (id, position) pairs, find each id's run, sum the runs.

// Sort keys: the id, or V for an out-of-range id (sorted last, then skipped).
__global__ void sort_keys_kernel(const int32_t* ids, int64_t T, int64_t V, uint32_t* keys,
                                 int32_t* order) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < T;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int32_t id = ids[t];
    keys[t] = valid_id(id, V) ? uint32_t(id) : uint32_t(V);
    order[t] = static_cast<int32_t>(t);
  }
}

// row_begin[v] = the first sorted index whose key is >= v, for v in [0, V]: index r
// writes the ids in (key[r - 1], key[r]] (the end r = T writes (key[T - 1], V]).
__global__ void row_begin_kernel(const uint32_t* sorted_keys, int64_t T, int64_t V,
                                 int32_t* row_begin) {
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r <= T;
       r += int64_t(gridDim.x) * blockDim.x) {
    const int64_t first = r == 0 ? 0 : int64_t(sorted_keys[r - 1]) + 1;
    const int64_t last = r == T ? V : int64_t(sorted_keys[r]);
    for (int64_t v = first; v <= last; ++v) row_begin[v] = static_cast<int32_t>(r);
  }
}

// A frequent id has thousands of rows in a batch of text, a rare one a few, so every id's
// run of rows is cut into chunks of at most kChunkRows, one block each: the longest run
// then costs no more time than a short one. Within a chunk the block's warps split the
// rows (warp w sums rows w, w + kSumWarps, ...) and the lanes the columns, and the warps'
// sums are added in warp order; a run of one chunk adds that sum to dE, a longer run
// stores each chunk's sum, and a second kernel adds them in chunk order. The order is
// fixed, so results repeat bit for bit.
constexpr int kSumWarps = 8, kColumnsPerLane = 8, kTileColumns = 32 * kColumnsPerLane;
constexpr int kChunkRows = 32;

// A run's chunks and, where it has more than one, its stored chunk sums, packed as
// chunks << 32 | stored, so that one exclusive scan gives every run's first chunk (high
// half) and first stored sum (low half).
FLASHMOE_HD uint64_t chunk_counts(int32_t rows) {
  const uint64_t chunks = (uint64_t(rows) + kChunkRows - 1) / kChunkRows;
  return chunks << 32 | (chunks > 1 ? chunks : 0);
}
FLASHMOE_HD int64_t first_chunk(uint64_t start) { return int64_t(start >> 32); }
FLASHMOE_HD int64_t first_stored(uint64_t start) { return int64_t(start & 0xffffffffu); }

// counts[v] for v < V, and counts[V] = 0 (so that the scan's last entry is the totals).
__global__ void chunk_counts_kernel(const int32_t* row_begin, int64_t V, uint64_t* counts) {
  for (int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; v <= V;
       v += int64_t(gridDim.x) * blockDim.x) {
    counts[v] = v < V ? chunk_counts(row_begin[v + 1] - row_begin[v]) : 0;
  }
}

// The id whose run holds chunk b: the last v with first_chunk(starts[v]) <= b (ids with
// an empty run share their start with the next id, so the last one has rows).
__device__ int64_t run_of_chunk(const uint64_t* starts, int64_t V, int64_t b) {
  int64_t lo = 0, hi = V;  // first_chunk(starts[V]) > b
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (first_chunk(starts[mid]) <= b) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

template <class T>
__global__ void __launch_bounds__(kSumWarps * 32)
    chunk_sum_kernel(const T* __restrict__ dx, const int32_t* __restrict__ order,
                     const int32_t* __restrict__ row_begin, const uint64_t* __restrict__ starts,
                     int64_t V, int64_t D, float* __restrict__ dtable, float* __restrict__ stored) {
  __shared__ float warp_sums[kSumWarps][kTileColumns];
  const int64_t b = blockIdx.x;
  if (b >= first_chunk(starts[V])) return;
  const int64_t v = run_of_chunk(starts, V, b), chunk = b - first_chunk(starts[v]);
  const bool alone = first_chunk(starts[v + 1]) - first_chunk(starts[v]) == 1;
  float* out = alone ? dtable + v * D : stored + (first_stored(starts[v]) + chunk) * D;
  const int begin = row_begin[v] + static_cast<int>(chunk) * kChunkRows;
  const int end = min(begin + kChunkRows, row_begin[v + 1]);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  for (int64_t tile = 0; tile < D; tile += kTileColumns) {
    float sum[kColumnsPerLane] = {};
    for (int r = begin + warp; r < end; r += kSumWarps) {
      const T* row = dx + int64_t(order[r]) * D + tile;
#pragma unroll
      for (int k = 0; k < kColumnsPerLane; ++k) {
        if (tile + lane + 32 * k < D) sum[k] += load_float(row, lane + 32 * k);
      }
    }
#pragma unroll
    for (int k = 0; k < kColumnsPerLane; ++k) warp_sums[warp][lane + 32 * k] = sum[k];
    __syncthreads();
    for (int c = static_cast<int>(threadIdx.x); c < kTileColumns && tile + c < D; c += blockDim.x) {
      float total = 0;
      for (int w = 0; w < kSumWarps; ++w) total += warp_sums[w][c];
      if (alone) {
        out[tile + c] += total;
      } else {
        out[tile + c] = total;
      }
    }
    __syncthreads();
  }
}

// dE[v] += the stored sums of v's chunks, in chunk order, for the runs of several chunks.
__global__ void add_chunk_sums_kernel(const uint64_t* __restrict__ starts, int64_t V, int64_t D,
                                      const float* __restrict__ stored,
                                      float* __restrict__ dtable) {
  const int64_t v = blockIdx.x;
  const int64_t first = first_stored(starts[v]), count = first_stored(starts[v + 1]) - first;
  if (count == 0) return;
  for (int64_t c = threadIdx.x; c < D; c += blockDim.x) {
    float total = 0;
    for (int64_t j = 0; j < count; ++j) total += stored[(first + j) * D + c];
    dtable[v * D + c] += total;
  }
}

void embedding_backward_cuda(const Tensor& ids, const Tensor& dx, EmbeddingGradWorkspace& ws,
                             Tensor& dtable) {
  const int64_t T = ids.numel(), V = dtable.size(0), D = dtable.size(1);
  const int key_bits = std::max(1, static_cast<int>(std::bit_width(static_cast<uint64_t>(V))));
  cudaStream_t stream = current_stream();
  ensure(ws.keys, {T}, DType::i32, Device::cuda);
  ensure(ws.sorted_keys, {T}, DType::i32, Device::cuda);
  ensure(ws.order, {T}, DType::i32, Device::cuda);
  ensure(ws.sorted_order, {T}, DType::i32, Device::cuda);
  ensure(ws.row_begin, {V + 1}, DType::i32, Device::cuda);
  uint32_t* keys = reinterpret_cast<uint32_t*>(ws.keys.data<int32_t>());
  uint32_t* sorted_keys = reinterpret_cast<uint32_t*>(ws.sorted_keys.data<int32_t>());
  FLASHMOE_CHECK(T <= INT32_MAX, T << " embedding ids, expected at most 2^31 - 1");
  const int items = static_cast<int>(T);
  ensure(ws.chunk_counts, {V + 1}, DType::i64, Device::cuda);
  ensure(ws.chunk_starts, {V + 1}, DType::i64, Device::cuda);
  // Runs of more than one chunk hold chunks < 2 rows / kChunkRows each.
  ensure(ws.chunk_sums, {2 * T / kChunkRows + 1, D}, DType::f32, Device::cuda);
  uint64_t* counts = reinterpret_cast<uint64_t*>(ws.chunk_counts.data<int64_t>());
  uint64_t* starts = reinterpret_cast<uint64_t*>(ws.chunk_starts.data<int64_t>());
  // CUB's temporary storage, sized by calls that do no work, shared by the sort and the scan.
  size_t sort_bytes = 0, scan_bytes = 0;
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, sort_bytes, keys, sorted_keys, ws.order.data<int32_t>(),
      ws.sorted_order.data<int32_t>(), items, 0, key_bits, stream));
  CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, counts, starts, V + 1, stream));
  const int64_t storage_words = static_cast<int64_t>(std::max(sort_bytes, scan_bytes) / 4 + 1);
  if (!ws.sort_storage.defined() || ws.sort_storage.numel() < storage_words) {
    ws.sort_storage = Tensor::empty({storage_words}, DType::i32, Device::cuda);
  }

  sort_keys_kernel<<<grid_for(T, 256), 256, 0, stream>>>(ids.data<int32_t>(), T, V, keys,
                                                         ws.order.data<int32_t>());
  CUDA_CHECK_LAUNCH("sort_keys_kernel");
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      ws.sort_storage.raw(), sort_bytes, keys, sorted_keys, ws.order.data<int32_t>(),
      ws.sorted_order.data<int32_t>(), items, 0, key_bits, stream));
  row_begin_kernel<<<grid_for(T + 1, 256), 256, 0, stream>>>(sorted_keys, T, V,
                                                             ws.row_begin.data<int32_t>());
  CUDA_CHECK_LAUNCH("row_begin_kernel");
  chunk_counts_kernel<<<grid_for(V + 1, 256), 256, 0, stream>>>(ws.row_begin.data<int32_t>(), V,
                                                                counts);
  CUDA_CHECK_LAUNCH("chunk_counts_kernel");
  CUDA_CHECK(cub::DeviceScan::ExclusiveSum(ws.sort_storage.raw(), scan_bytes, counts, starts, V + 1,
                                           stream));
  // At most one partial chunk a run with rows, beside the full ones.
  const int64_t most_chunks = T / kChunkRows + std::min(T, V);
  with_storage_type(dx.dtype(), [&]<class Storage>() {
    chunk_sum_kernel<<<static_cast<unsigned>(std::max<int64_t>(most_chunks, 1)), kSumWarps * 32, 0,
                       stream>>>(dx.data<Storage>(), ws.sorted_order.data<int32_t>(),
                                 ws.row_begin.data<int32_t>(), starts, V, D, dtable.data<float>(),
                                 ws.chunk_sums.data<float>());
  });
  CUDA_CHECK_LAUNCH("chunk_sum_kernel");
  add_chunk_sums_kernel<<<static_cast<unsigned>(V), 256, 0, stream>>>(
      starts, V, D, ws.chunk_sums.data<float>(), dtable.data<float>());
  CUDA_CHECK_LAUNCH("add_chunk_sums_kernel");
}

// ---- CPU backward: a stable counting sort of the positions by id.

void embedding_backward_cpu(const Tensor& ids, const Tensor& dx, Tensor& dtable) {
  const int64_t T = ids.numel(), V = dtable.size(0), D = dtable.size(1);
  const int32_t* id = ids.data<int32_t>();
  std::vector<int32_t> row_begin(V + 1, 0), order(T);
  for (int64_t t = 0; t < T; ++t) ++row_begin[id[t] + 1];
  for (int64_t v = 0; v < V; ++v) row_begin[v + 1] += row_begin[v];
  std::vector<int32_t> next(row_begin.begin(), row_begin.end() - 1);
  for (int64_t t = 0; t < T; ++t) order[next[id[t]]++] = static_cast<int32_t>(t);
  with_storage_type(dx.dtype(), [&]<class Storage>() {
    for (int64_t v = 0; v < V; ++v) {
      if (row_begin[v] == row_begin[v + 1]) continue;
      for (int64_t c = 0; c < D; ++c) {
        add_segment(dx.data<Storage>(), order.data(), row_begin[v], row_begin[v + 1], D, v, c,
                    dtable.data<float>());
      }
    }
  });
}

template <class T>
struct RowTerm {  // dx viewed as [B, L D]
  const T* dx;
  int64_t width;
  FLASHMOE_HD float operator()(int64_t b, int64_t col) const {
    return load_float(dx, b * width + col);
  }
};

void check_ids(const Tensor& ids, const char* name) {
  FLASHMOE_CHECK(ids.defined() && ids.rank() == 1,
                 name << " has shape " << shape_string(ids.shape()) << ", expected [T]");
  expect_dtype(ids, DType::i32, name);
}

}  // namespace

void split_next_token(const Tensor& tokens, int64_t vocab, Tensor& inputs, Tensor& targets) {
  FLASHMOE_CHECK(tokens.defined() && tokens.rank() == 2 && tokens.size(1) >= 2,
                 "tokens have shape " << shape_string(tokens.shape()) << ", expected [B, L + 1]"
                                      << " with L >= 1");
  expect_dtype(tokens, DType::i32, "tokens");
  if (tokens.device() == Device::cpu) check_ids_in_range(tokens, vocab, "token");
  const int64_t B = tokens.size(0), L = tokens.size(1) - 1;
  ensure(inputs, {B * L}, DType::i32, tokens.device());
  ensure(targets, {B * L}, DType::i32, tokens.device());
  for_each_index(tokens.device(), B * L,
                 SplitNextToken{tokens.data<int32_t>(), inputs.data<int32_t>(),
                                targets.data<int32_t>(), L, vocab},
                 "split_next_token");
}

void embedding_forward(const Tensor& ids, const Tensor& table, const Tensor& positions,
                       int64_t seq_len, Tensor& x) {
  check_ids(ids, "embedding ids");
  FLASHMOE_CHECK(table.defined() && table.rank() == 2, "embedding table has shape "
                                                           << shape_string(table.shape())
                                                           << ", expected [V, D]");
  expect_float(table, "embedding table");
  expect_device(ids, table.device(), "embedding ids");
  const int64_t T = ids.numel(), V = table.size(0), D = table.size(1);
  FLASHMOE_CHECK(seq_len >= 1 && T % seq_len == 0,
                 T << " embedding ids are not whole sequences of " << seq_len);
  if (positions.defined()) {
    FLASHMOE_CHECK(positions.rank() == 2 && positions.size(0) >= seq_len && positions.size(1) == D,
                   "position table has shape " << shape_string(positions.shape()) << ", expected ["
                                               << ">= " << seq_len << ", " << D << "]");
    expect_dtype(positions, table.dtype(), "position table");
    expect_device(positions, table.device(), "position table");
  }
  if (ids.device() == Device::cpu) check_ids_in_range(ids, V, "token id");
  ensure(x, {T, D}, table.dtype(), table.device());
  with_storage_type(table.dtype(), [&]<class Storage>() {
    const Storage* p = positions.defined() ? positions.data<Storage>() : nullptr;
    for_each_element(table.device(), T, D,
                     EmbedElement<Storage>{ids.data<int32_t>(), table.data<Storage>(), p, V, D,
                                           seq_len, x.data<Storage>()},
                     "embedding_forward");
  });
}

void embedding_backward(const Tensor& ids, const Tensor& dx, EmbeddingGradWorkspace& workspace,
                        Tensor& dtable) {
  check_ids(ids, "embedding ids");
  FLASHMOE_CHECK(dtable.defined() && dtable.rank() == 2, "embedding gradient has shape "
                                                             << shape_string(dtable.shape())
                                                             << ", expected [V, D]");
  expect_dtype(dtable, DType::f32, "embedding gradient");
  expect_shape(dx, {ids.numel(), dtable.size(1)}, "embedding dx");
  expect_float(dx, "embedding dx");
  expect_device(dx, dtable.device(), "embedding dx");
  expect_device(ids, dtable.device(), "embedding ids");
  if (ids.numel() == 0) return;
  if (ids.device() == Device::cpu) {
    check_ids_in_range(ids, dtable.size(0), "token id");
    embedding_backward_cpu(ids, dx, dtable);
  } else {
    embedding_backward_cuda(ids, dx, workspace, dtable);
  }
}

void position_backward(const Tensor& dx, int64_t seq_len, EmbeddingGradWorkspace& workspace,
                       Tensor& dpositions) {
  FLASHMOE_CHECK(dx.defined() && dx.rank() == 2 && seq_len >= 1 && dx.size(0) % seq_len == 0,
                 "position dx has shape " << shape_string(dx.shape())
                                          << ", expected whole sequences of " << seq_len);
  expect_float(dx, "position dx");
  FLASHMOE_CHECK(dpositions.defined() && dpositions.rank() == 2 && dpositions.size(0) >= seq_len &&
                     dpositions.size(1) == dx.size(1),
                 "position gradient has shape " << shape_string(dpositions.shape())
                                                << ", expected [>= " << seq_len << ", "
                                                << dx.size(1) << "]");
  expect_dtype(dpositions, DType::f32, "position gradient");
  expect_device(dpositions, dx.device(), "position gradient");
  const int64_t width = seq_len * dx.size(1), B = dx.size(0) / seq_len;
  with_storage_type(dx.dtype(), [&]<class T>() {
    column_sum<float>(dx.device(), RowTerm<T>{dx.data<T>(), width}, B, width,
                      dpositions.data<float>(), workspace.column_sums);
  });
  dpositions.rows(seq_len, dpositions.size(0)).fill_bytes(0);
}

}  // namespace flashmoe
