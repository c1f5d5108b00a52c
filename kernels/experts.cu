// CUDA backend of the single-neuron experts (math in kernels/experts.h, kernels in
// kernels/experts_kernels.cuh). P = T*S (token, slot) pairs, pair p = t*S + s.
// A pair whose id is < 0 is an empty slot (expert parallelism pads with them): the
// dot kernels read no table row for it and write zeros, the sum kernels skip it, and
// the sort puts it after every expert, outside every output row.
//
// Forward: two gather passes over the pairs; gathered rows are never materialised.
//   1. slot_dot_kernel(x, down_embed): h[p] = <x[t], down[e]>, coef[p] = act(h) g.
//   2. slot_sum_kernel(up_embed, coef): y[t] = sum_s coef[t][s] up[e], s ascending.
//   Where S <= 32, slot_dot_narrow_kernel serves step 1 (here and in the backward):
//   a warp per token (two tokens a warp, 16 lanes each, where S <= 16) over its
//   filled slots only, the same dots bit for bit.
//   Each pass reads one table only, so at the quickstart shape (E = 16384, D = 1024,
//   bf16: 32 MB a table) the table a pass gathers from stays in the 50 MB L2. Where
//   S <= 32 and both tables fit in half the L2, the narrow kernel makes step 2 too
//   (and step 2 of the backward), from the coefficients its lanes hold, in the same
//   order: the same bits, without a second kernel that stages every token's slots
//   again (an owner's rows under expert parallelism are mostly empty slots).
// Backward: the rows phase makes the same two passes token-centric (any token range
// on its own), then the tables phase makes the expert gradients expert-centric over
// every token, without floating-point atomics:
//   1. slot_dot_kernel(dy, up_embed): z[p] = <dy[t], up[e]>; dgates = act(h) z;
//      slot_dh = z g act'(h) and slot_a = act(h) g, kept for the tables phase.
//   2. slot_sum_kernel(down_embed, dh): dx[t] = sum_s dh[t][s] down[e], s ascending.
//   3. Group the pairs by expert: a stable LSD radix sort (CUB) of the ids as keys,
//      over the bit_width(E) low bits (enough to sort the empty slots' 0xFFFFFFFF
//      after E - 1), with the pair indices as values. Stable, so the pairs of an expert
//      stay in ascending pair order, whatever the timing.
//   4. The output rows and their pair ranges row_begin[r] .. row_begin[r + 1]:
//      dense: row r = expert r, row_begin[e] = lower bound of e in the sorted ids;
//      row-sparse: run starts of the sorted ids (empty slots start none), an exclusive
//      scan (CUB) numbers the runs, run r is row r (rows[r] = its expert, ascending);
//      rows past the last run get -1 and an empty range. Sizes depend on the shapes
//      only: no host sync.
//   5. Segments: each row's range is cut into segments of at most kSegmentPairs (64)
//      pairs; an empty row is one empty segment. segment_counts_kernel counts each
//      row's segments and an exclusive scan (CUB) gives every row its first segment,
//      first partial row and split-row number, and segment_rows_kernel lists the row
//      of every segment and of every split row. Boundaries depend on the ids alone.
//   6. segment_grad_kernel, one block per segment (grid sized by the worst case,
//      out_rows + pairs / 64; blocks past the last segment leave), sums its pairs in
//      ascending order: d_down = sum dh x[t], d_up = sum a dy[t] (fp32). A row of one
//      segment (most rows, and every empty one, written zero) is written directly;
//      the segments of a split row write fp32 partial rows to scratch.
//   7. sum_partials_kernel adds each split row's partial rows in a tree fixed by
//      their count (8 contiguous ascending ranges, then the 8 sums in order). So a
//      hot expert with thousands of pairs costs many short blocks instead of one
//      long serial one; under uniform ids there are almost no split rows.
// Every sum has a fixed order (warp_sum's butterfly for the dots, ascending slot or
// pair index, the fixed tree of step 7): results are bitwise repeatable, no atomics.
//
// Rows are read in 16-byte chunks when D * sizeof(T) is a multiple of 16 and every
// row base is 16-byte aligned, else one element at a time (any D).
// Limits: T*S < 2^31 (pair indices are int32), S <= 16 * 65535 (grid y), D and E < 2^31,
// out_rows + T*S / 64 < 2^31 (segments).
// Ids are checked on the device when ExpertInputs::validate_ids is set (one host
// sync); otherwise an id >= E is the caller's error (out-of-bounds reads).
//
// Scratch (per-pair coefficients, sort buffers, segment offsets, partial rows, CUB
// temporary storage; sized by the worst case: fewer than 2 T*S / 64 partial rows,
// since a split row has more than 64 pairs) comes from
// one device buffer per host thread, device and stream, grown to the largest request
// and never shrunk: repeated calls with the same shapes allocate nothing, so a
// warmed-up step can be captured in a CUDA graph. Calls on one stream run in order, so
// each may reuse the buffer of the one before; calls on another stream (the layer's
// table gradients run beside its later work) get a buffer of their own.
#include <algorithm>
#include <bit>
#include <climits>
#include <cstdint>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>
#include <map>
#include <utility>

#include "core/stream.h"
#include "kernels/backends.h"
#include "kernels/experts_kernels.cuh"

namespace flashmoe::detail {

namespace {

using namespace experts_gpu;

// Lays out sub-buffers of one scratch allocation, each 256-byte aligned.
class ScratchPlan {
 public:
  template <class U>
  size_t add(int64_t count) {
    const size_t at = bytes_;
    bytes_ += (static_cast<size_t>(count) * sizeof(U) + 255) / 256 * 256;
    return at;
  }
  size_t bytes() const { return bytes_; }

 private:
  size_t bytes_ = 0;
};

// The scratch buffer of this host thread for the current device and stream, at least
// `bytes` long.
uint8_t* scratch_buffer(size_t bytes) {
  thread_local std::map<std::pair<int, cudaStream_t>, Tensor> buffers;
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  Tensor& buffer = buffers[{device, current_stream()}];
  if (!buffer.defined() || buffer.nbytes() < bytes) {
    // Work queued by earlier calls may still use the old buffer: let it finish first.
    CUDA_CHECK(cudaStreamSynchronize(current_stream()));
    buffer = Tensor();
    buffer = Tensor::empty({static_cast<int64_t>((bytes + 7) / 8)}, DType::i64, Device::cuda);
  }
  return static_cast<uint8_t*>(buffer.raw());
}

template <class U>
U* carve(uint8_t* base, size_t at) {
  return reinterpret_cast<U*>(base + at);
}

struct Sizes {
  int64_t tokens, dim, experts, slots, pairs;
};

Sizes sizes_of(const ExpertInputs& in) {
  const Sizes s{in.x.size(0), in.x.size(1), in.down_embed.size(0), in.ids.size(1), in.ids.numel()};
  FLASHMOE_CHECK(s.pairs < INT32_MAX,
                 "T*S = " << s.pairs << " (token, slot) pairs, expected < 2^31");
  FLASHMOE_CHECK(
      s.slots <= int64_t(kDotSlotsPerBlock) * 65535,
      "S = " << s.slots << " slots per token, expected <= " << kDotSlotsPerBlock * 65535);
  FLASHMOE_CHECK(s.dim < INT32_MAX, "D = " << s.dim << ", expected < 2^31");
  FLASHMOE_CHECK(s.experts < INT32_MAX, "E = " << s.experts << ", expected < 2^31 (int32 ids)");
  return s;
}

unsigned blocks_for(int64_t n, int threads) {
  return static_cast<unsigned>((n + threads - 1) / threads);
}

// Threads of the row-sum kernels: one chunk each, a whole number of warps, 32 to 256.
int row_threads(int64_t chunks) {
  return static_cast<int>(std::clamp<int64_t>((chunks + kWarp - 1) / kWarp * kWarp, kWarp, 256));
}

// True when every row of these tensors (row length `dim` elements of `elem_bytes`)
// starts on a 16-byte boundary, so rows can be read in 16-byte chunks.
bool rows_aligned_16(int64_t dim, size_t elem_bytes, std::initializer_list<const Tensor*> tensors) {
  if (dim * static_cast<int64_t>(elem_bytes) % 16 != 0) return false;
  return std::all_of(tensors.begin(), tensors.end(), [](const Tensor* t) {
    return reinterpret_cast<uintptr_t>(t->raw()) % 16 == 0;
  });
}

// Calls fn.template operator()<T, kVec>() for the storage type and the chunk width.
template <class Fn>
void dispatch(DType dtype, bool vectorized, Fn&& fn) {
  if (dtype == DType::f32) {
    vectorized ? fn.template operator()<float, 4>() : fn.template operator()<float, 1>();
  } else {
    vectorized ? fn.template operator()<bf16, 8>() : fn.template operator()<bf16, 1>();
  }
}

// Throws naming the first id >= E. `first_bad` is 8 bytes of scratch.
void check_ids_on_device(const ExpertInputs& in, const Sizes& s, unsigned long long* first_bad) {
  if (s.pairs == 0) return;
  cudaStream_t stream = current_stream();
  CUDA_CHECK(cudaMemsetAsync(first_bad, 0xFF, sizeof *first_bad, stream));
  find_bad_id_kernel<<<blocks_for(s.pairs, 256), 256, 0, stream>>>(in.ids.data<int32_t>(), s.pairs,
                                                                   s.experts, first_bad);
  CUDA_CHECK_LAUNCH("find_bad_id_kernel");
  unsigned long long position = 0;
  CUDA_CHECK(
      cudaMemcpyAsync(&position, first_bad, sizeof position, cudaMemcpyDeviceToHost, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
  if (position == ULLONG_MAX) return;
  int32_t id = 0;
  CUDA_CHECK(cudaMemcpy(&id, in.ids.data<int32_t>() + position, sizeof id, cudaMemcpyDeviceToHost));
  const int64_t p = static_cast<int64_t>(position);
  FLASHMOE_FAIL("expert id " << id << " at position " << p << " (token " << p / s.slots << ", slot "
                             << p % s.slots << "), expected 0 <= id < E = " << s.experts
                             << " (or id < 0: an empty slot)");
}

// Launches slot_dot_narrow_kernel with kTokens tokens a warp (S <= kWarp / kTokens);
// with a RowSum, the variant that also sums the rows.
template <class T, int kVec, class Epilogue, int kTokens>
void launch_narrow_dots(const T* token_rows, const T* table, const int32_t* ids, const Sizes& s,
                        Epilogue epilogue, RowSum<T> sum) {
  const auto kernel = sum.table != nullptr
                          ? slot_dot_narrow_kernel<T, kVec, Epilogue, true, kTokens>
                          : slot_dot_narrow_kernel<T, kVec, Epilogue, false, kTokens>;
  kernel<<<blocks_for(s.tokens, kDotWarps * kTokens), kDotWarps * kWarp, 0, current_stream()>>>(
      token_rows, table, ids, s.tokens, s.slots, s.dim, epilogue, sum);
  CUDA_CHECK_LAUNCH("slot_dot_narrow_kernel");
}

// Launches the dot kernel over all pairs (a no-op when there are none): the narrow one
// where S <= kWarp, two tokens a warp where S <= kWarp / 2; with a RowSum (fuse_row_sums
// said yes), the narrow kernel that also sums the rows.
template <class T, int kVec, class Epilogue>
void launch_slot_dots(const T* token_rows, const T* table, const int32_t* ids, const Sizes& s,
                      Epilogue epilogue, RowSum<T> sum = {}) {
  if (s.pairs == 0) return;
  if (s.slots <= kWarp / 2) {
    launch_narrow_dots<T, kVec, Epilogue, 2>(token_rows, table, ids, s, epilogue, sum);
    return;
  }
  if (s.slots <= kWarp) {
    launch_narrow_dots<T, kVec, Epilogue, 1>(token_rows, table, ids, s, epilogue, sum);
    return;
  }
  FLASHMOE_CHECK(sum.table == nullptr,
                 "a fused row sum needs S <= " << kWarp << ", got S = " << s.slots);
  const dim3 grid(static_cast<unsigned>(s.tokens), blocks_for(s.slots, kDotSlotsPerBlock));
  slot_dot_kernel<T, kVec><<<grid, kDotWarps * kWarp, 0, current_stream()>>>(
      token_rows, table, ids, s.slots, s.dim, epilogue);
  CUDA_CHECK_LAUNCH("slot_dot_kernel");
}

// Whether the row sums run in the dot kernel: rows of at most kWarp slots, whose warp
// holds every coefficient, and two tables that fit in half the L2 together (each
// separate pass gathers from one table, so that a larger table stays in L2 for it).
bool fuse_row_sums(const Sizes& s, DType dtype) {
  if (s.slots > kWarp) return false;
  const double tables_bytes = 2.0 * s.experts * s.dim * dtype_size(dtype);
  return tables_bytes <= 0.5 * current_device_attribute(cudaDevAttrL2CacheSize);
}

// Launches slot_sum_kernel: out[t] = sum_s coef[t][s] table[ids[t][s]].
template <class T, int kVec>
void launch_slot_sums(const T* table, const int32_t* ids, const float* coef, const Sizes& s,
                      T* out) {
  if (s.tokens == 0) return;
  slot_sum_kernel<T, kVec>
      <<<static_cast<unsigned>(s.tokens), row_threads(s.dim / kVec), 0, current_stream()>>>(
          table, ids, coef, s.slots, s.dim, out);
  CUDA_CHECK_LAUNCH("slot_sum_kernel");
}

// Both passes: the dots (with the epilogue) from dot_table, then out = the row sums of
// sum_table with the coefficients the epilogue returns, in the dot kernel when fused,
// else from `coef`, where the epilogue has written them.
template <class T, int kVec, class Epilogue>
void launch_slot_passes(const T* token_rows, const T* dot_table, const T* sum_table,
                        const int32_t* ids, const float* coef, const Sizes& s, bool fused,
                        Epilogue epilogue, T* out) {
  if (fused) {
    launch_slot_dots<T, kVec>(token_rows, dot_table, ids, s, epilogue, RowSum<T>{sum_table, out});
    return;
  }
  launch_slot_dots<T, kVec>(token_rows, dot_table, ids, s, epilogue);
  launch_slot_sums<T, kVec>(sum_table, ids, coef, s, out);
}

}  // namespace

void experts_forward_cuda(const ExpertInputs& in, Tensor& y, Tensor& h) {
  const Sizes s = sizes_of(in);
  const bool fused = fuse_row_sums(s, in.x.dtype());
  ScratchPlan plan;
  const size_t first_bad_at = plan.add<unsigned long long>(1);
  const size_t coef_at = plan.add<float>(fused ? 0 : s.pairs);
  uint8_t* scratch = scratch_buffer(plan.bytes());
  if (in.validate_ids) check_ids_on_device(in, s, carve<unsigned long long>(scratch, first_bad_at));

  float* coef = fused ? nullptr : carve<float>(scratch, coef_at);
  const bool vectorized =
      rows_aligned_16(s.dim, dtype_size(in.x.dtype()), {&in.x, &in.down_embed, &in.up_embed, &y});
  dispatch(in.x.dtype(), vectorized, [&]<class T, int kVec>() {
    launch_slot_passes<T, kVec>(
        in.x.data<T>(), in.down_embed.data<T>(), in.up_embed.data<T>(), in.ids.data<int32_t>(),
        coef, s, fused, ForwardDotEpilogue{in.gates.data<float>(), h.data<float>(), coef, in.act},
        y.data<T>());
  });
}

void experts_backward_rows_cuda(const ExpertInputs& in, const Tensor& h, const Tensor& dy,
                                ExpertGrads& grads) {
  const Sizes s = sizes_of(in);
  ScratchPlan plan;
  const size_t first_bad_at = plan.add<unsigned long long>(1);
  uint8_t* scratch = scratch_buffer(plan.bytes());
  if (in.validate_ids) check_ids_on_device(in, s, carve<unsigned long long>(scratch, first_bad_at));
  const bool vectorized = rows_aligned_16(s.dim, dtype_size(in.x.dtype()),
                                          {&in.x, &in.down_embed, &in.up_embed, &dy, &grads.dx});
  const bool fused = fuse_row_sums(s, in.x.dtype());
  dispatch(in.x.dtype(), vectorized, [&]<class T, int kVec>() {
    launch_slot_passes<T, kVec>(
        dy.data<T>(), in.up_embed.data<T>(), in.down_embed.data<T>(), in.ids.data<int32_t>(),
        grads.slot_dh.data<float>(), s, fused,
        BackwardDotEpilogue{in.gates.data<float>(), h.data<float>(), grads.dgates.data<float>(),
                            grads.slot_dh.data<float>(), grads.slot_a.data<float>(), in.act},
        grads.dx.data<T>());
  });
}

void experts_backward_tables_cuda(const ExpertInputs& in, const Tensor& dy, GradLayout layout,
                                  ExpertGrads& grads) {
  const Sizes s = sizes_of(in);
  const bool dense = layout == GradLayout::dense;
  const int64_t out_rows = grads.d_down.size(0);  // E (dense) or R = min(E, T*S)
  const int32_t pairs = static_cast<int32_t>(s.pairs);
  // 2^key_bits > E: an empty slot's key sorts after expert E - 1 on these bits too.
  const int key_bits = static_cast<int>(std::bit_width(static_cast<uint64_t>(s.experts)));
  // Worst cases: every row contributes at most one segment beyond floor(pairs / 64);
  // a split row has more than 64 pairs, so fewer than 2 pairs / 64 partial rows and
  // at most pairs / 65 split rows.
  const int64_t max_segments = out_rows + s.pairs / kSegmentPairs;
  const int64_t max_partials = 2 * s.pairs / kSegmentPairs;
  const int64_t max_split_rows = std::min(out_rows, s.pairs / (kSegmentPairs + 1));
  FLASHMOE_CHECK(max_segments < INT32_MAX, "output rows + T*S / " << kSegmentPairs << " = "
                                                                  << max_segments
                                                                  << " segments, expected < 2^31");
  cudaStream_t stream = current_stream();

  // CUB's temporary storage, sized by calls that do no work.
  size_t sort_bytes = 0, scan_bytes = 0, segment_scan_bytes = 0;
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, sort_bytes, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), pairs, 0, key_bits,
      stream));
  if (!dense) {
    CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes,
                                             static_cast<const int32_t*>(nullptr),
                                             static_cast<int32_t*>(nullptr), pairs + 1, stream));
  }
  CUDA_CHECK(cub::DeviceScan::ExclusiveScan(
      nullptr, segment_scan_bytes, static_cast<const SegmentCounts*>(nullptr),
      static_cast<SegmentCounts*>(nullptr), AddSegmentCounts{}, SegmentCounts{0, 0, 0},
      out_rows + 1, stream));
  ScratchPlan plan;
  const size_t pair_index_at = plan.add<int32_t>(s.pairs);
  const size_t sorted_pairs_at = plan.add<int32_t>(s.pairs);
  const size_t sorted_experts_at = plan.add<uint32_t>(s.pairs);
  const size_t row_begin_at = plan.add<int32_t>(out_rows + 1);
  const size_t is_run_start_at = plan.add<int32_t>(dense ? 0 : s.pairs + 1);
  const size_t run_index_at = plan.add<int32_t>(dense ? 0 : s.pairs + 1);
  const size_t segment_counts_at = plan.add<SegmentCounts>(out_rows + 1);
  const size_t segment_offsets_at = plan.add<SegmentCounts>(out_rows + 1);
  const size_t segment_row_at = plan.add<int32_t>(max_segments);
  const size_t split_row_at = plan.add<int32_t>(max_split_rows);
  const size_t partial_down_at = plan.add<float>(max_partials * s.dim);
  const size_t partial_up_at = plan.add<float>(max_partials * s.dim);
  const size_t cub_at = plan.add<uint8_t>(
      static_cast<int64_t>(std::max({sort_bytes, scan_bytes, segment_scan_bytes})));
  uint8_t* scratch = scratch_buffer(plan.bytes());

  int32_t* pair_index = carve<int32_t>(scratch, pair_index_at);
  int32_t* sorted_pairs = carve<int32_t>(scratch, sorted_pairs_at);
  uint32_t* sorted_experts = carve<uint32_t>(scratch, sorted_experts_at);
  int32_t* row_begin = carve<int32_t>(scratch, row_begin_at);
  void* cub_storage = scratch + cub_at;

  const bool vectorized =
      rows_aligned_16(s.dim, dtype_size(in.x.dtype()), {&in.x, &dy, &grads.d_down, &grads.d_up});
  dispatch(in.x.dtype(), vectorized, [&]<class T, int kVec>() {
    const int32_t* ids = in.ids.data<int32_t>();
    // Step 3: pairs grouped by expert, ascending pair order within an expert.
    if (pairs > 0) {
      iota_kernel<<<blocks_for(pairs, 256), 256, 0, stream>>>(pair_index, pairs);
      CUDA_CHECK_LAUNCH("iota_kernel");
      size_t cub_bytes = sort_bytes;
      CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
          cub_storage, cub_bytes, reinterpret_cast<const uint32_t*>(ids), sorted_experts,
          pair_index, sorted_pairs, pairs, 0, key_bits, stream));
    }

    // Step 4: output rows and their pair ranges.
    if (dense) {
      dense_row_begin_kernel<<<blocks_for(out_rows + 1, 256), 256, 0, stream>>>(
          sorted_experts, pairs, out_rows, row_begin);
      CUDA_CHECK_LAUNCH("dense_row_begin_kernel");
    } else if (out_rows > 0) {
      int32_t* is_run_start = carve<int32_t>(scratch, is_run_start_at);
      int32_t* run_index = carve<int32_t>(scratch, run_index_at);
      mark_run_starts_kernel<<<blocks_for(pairs + 1, 256), 256, 0, stream>>>(
          sorted_experts, pairs, s.experts, is_run_start);
      CUDA_CHECK_LAUNCH("mark_run_starts_kernel");
      size_t cub_bytes = scan_bytes;
      CUDA_CHECK(cub::DeviceScan::ExclusiveSum(cub_storage, cub_bytes, is_run_start, run_index,
                                               pairs + 1, stream));
      sparse_rows_kernel<<<blocks_for(std::max<int64_t>(pairs, out_rows + 1), 256), 256, 0,
                           stream>>>(sorted_experts, is_run_start, run_index, pairs, s.experts,
                                     out_rows, grads.rows.data<int32_t>(), row_begin);
      CUDA_CHECK_LAUNCH("sparse_rows_kernel");
    }

    if (out_rows == 0) return;
    // Step 5: segments of the rows.
    auto* segment_counts = carve<SegmentCounts>(scratch, segment_counts_at);
    auto* segment_offsets = carve<SegmentCounts>(scratch, segment_offsets_at);
    segment_counts_kernel<<<blocks_for(out_rows + 1, 256), 256, 0, stream>>>(row_begin, out_rows,
                                                                             segment_counts);
    CUDA_CHECK_LAUNCH("segment_counts_kernel");
    size_t cub_bytes = segment_scan_bytes;
    CUDA_CHECK(cub::DeviceScan::ExclusiveScan(cub_storage, cub_bytes, segment_counts,
                                              segment_offsets, AddSegmentCounts{},
                                              SegmentCounts{0, 0, 0}, out_rows + 1, stream));
    int32_t* segment_row = carve<int32_t>(scratch, segment_row_at);
    int32_t* split_row = carve<int32_t>(scratch, split_row_at);
    segment_rows_kernel<<<blocks_for(out_rows, 256), 256, 0, stream>>>(segment_offsets, out_rows,
                                                                       segment_row, split_row);
    CUDA_CHECK_LAUNCH("segment_rows_kernel");

    // Step 6: one block per segment.
    float* partial_down = carve<float>(scratch, partial_down_at);
    float* partial_up = carve<float>(scratch, partial_up_at);
    segment_grad_kernel<T, kVec>
        <<<static_cast<unsigned>(max_segments), row_threads(s.dim / kVec), 0, stream>>>(
            row_begin, segment_offsets, segment_row, out_rows, sorted_pairs,
            grads.slot_dh.data<float>(), grads.slot_a.data<float>(), in.x.data<T>(), dy.data<T>(),
            s.slots, s.dim, grads.d_down.data<float>(), grads.d_up.data<float>(), partial_down,
            partial_up);
    CUDA_CHECK_LAUNCH("segment_grad_kernel");

    // Step 7: split rows from their partial rows; the grid strides over (split row,
    // column tile) items, at most a few resident blocks per multiprocessor.
    const int64_t max_items = max_split_rows * ((s.dim + kWarp - 1) / kWarp);
    if (max_items > 0) {
      const int64_t multiprocessors = current_device_attribute(cudaDevAttrMultiProcessorCount);
      const int64_t blocks = std::min<int64_t>(max_items, multiprocessors * 8);
      sum_partials_kernel<<<static_cast<unsigned>(blocks), dim3(kWarp, kSumSplits), 0, stream>>>(
          segment_offsets, split_row, out_rows, partial_down, partial_up, s.dim,
          grads.d_down.data<float>(), grads.d_up.data<float>());
      CUDA_CHECK_LAUNCH("sum_partials_kernel");
    }
  });
}

}  // namespace flashmoe::detail
