// Device side of the fused product-key router (math in kernels/router.h; launch,
// dispatch and limits in kernels/router.cu). One warp per (token, head) row, in both
// directions; warps never wait for each other, so a block only groups warps.
//
// Ordering keys. A log-probability l becomes the 32-bit key order_key(l): unsigned
// order of keys = float order of values (-0 is made +0 first; keys are >= 1, so 0
// pads below every real entry). An entry (value, id) packs into 64 bits as
// key << 32 | ~id: a larger packed entry is a higher value, or an equal value with
// a smaller id, which is exactly the tie rule; every selection below is a plain
// comparison of packed entries.
//
// Forward, per row:
//   1. Each half: lane `lane` holds the logits n = v * 32 + lane (v < V, registers;
//      V = 0 streams the row from global memory instead, for N > 1024), warp
//      butterflies give max and sum(exp(q - max)), lse = max + log(sum), and
//      l = q - lse in fp32 as the CPU reference computes it.
//   2. Each half keeps its `keep` = min(K, N) best entries, sorted:
//      - keep <= 32: the keep-th largest of the 32 lane maxima is a threshold that
//        the keep best reach (keep distinct entries reach it). When at most 64 keys
//        pass it, each lane writes its passing entries (offsets from a warp scan).
//      - otherwise (keep > 32, or more than 64 keys pass: ties): the exact keep-th
//        largest key, found bit by bit with warp counts below the bits that the
//        smallest and largest key share; the entries above it plus, in index order
//        (ballots), the entries equal to it up to the quota completing `keep`.
//      - the gathered entries are sorted: warp_top in registers for keep <= 64,
//        sort_top in shared memory beyond.
//   3. Candidates: rank pairs (a, b), 1-based, with a*b <= K, a, b <= keep, scores
//      l0[row a] + l1[col b], written line by line: rows a <= s = floor(sqrt K),
//      then columns b <= s for a > s (a > s forces b <= s, so the lines cover the
//      staircase once). About K ln K of them (119 for K = 32, 280 for K = 64),
//      never N^2.
//   4. The K best candidates, best first: warp_top for K <= 64, sort_top beyond;
//      gates exp(score), normalised by their warp sum.
//   warp_top: columns of 32 or 64 entries (one or two a lane) are bitonic-sorted
//   across the lanes with shuffles, each merged into the best so far by a max
//   against it reversed (a bitonic column holding the best of both) and a bitonic
//   merge. sort_top: the same in shared memory, for any size: bitonic sort of
//   chunks of next_pow2(keep or K) entries, then a tournament of chunk pairs.
// Backward, per row: ds_k = g_k (dg_k - sum_m g_m dg_m) (the sum only when
// normalised). The 2K (half, row, slot) triples are sorted, so the slots of each
// touched logit form a run in ascending slot order; the run's first lane sums its
// ds in that order (fixed order, no atomics). Then dq = -softmax(q) * S for every
// logit (S = the half's sum of run totals), and, after a warp barrier, the touched
// logits are rewritten as run total - softmax(q) * S.
// Every reduction has a fixed order, so results repeat bit for bit.
#pragma once

#include <climits>
#include <cstdint>

#include "core/bf16.h"
#include "kernels/warp.cuh"

namespace flashmoe::router_gpu {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// The lane-maxima threshold serves rows keeping at most this many entries a half...
constexpr int kLaneMaximaMaxKeep = 32;
// ...when at most this many keys pass it; else the exact threshold is used.
constexpr int kLaneMaximaCapacity = 64;

// Per-launch constants of the forward kernel.
struct ForwardShape {
  int64_t rows;       // T * H
  int num_keys;       // N
  int top_k;          // K
  int keep;           // min(K, N): entries kept per half
  int stair_side;     // floor(sqrt(K))
  int sort_capacity;  // entries of each warp's sort buffer
  bool norm_topk_prob;
};

// Per-launch constants of the backward kernel.
struct BackwardShape {
  int64_t rows;
  int num_keys;
  int top_k;
  int sort_capacity;  // max(32, next_pow2(2K))
  bool norm_topk_prob;
};

__host__ __device__ constexpr int ceil_log2(int n) {
  int log2 = 0;
  while ((1 << log2) < n) ++log2;
  return log2;
}

__device__ __forceinline__ float load_logit(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_logit(const bf16* p) {
  return to_float(bf16{__ldg(reinterpret_cast<const unsigned short*>(p))});
}

// l = q - lse as the CPU reference computes it, with -0 made +0 (float order treats
// them as equal; the keys must too).
__device__ __forceinline__ float log_prob(float q, float lse) { return (q - lse) + 0.0f; }

__device__ __forceinline__ uint32_t order_key(float value) {
  const uint32_t bits = __float_as_uint(value);
  return max((bits & 0x80000000u) ? ~bits : (bits | 0x80000000u), 1u);
}

__device__ __forceinline__ float key_value(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

__device__ __forceinline__ uint64_t pack_entry(uint32_t key, uint32_t id) {
  return (static_cast<uint64_t>(key) << 32) | static_cast<uint32_t>(~id);
}
__device__ __forceinline__ uint32_t entry_key(uint64_t entry) {
  return static_cast<uint32_t>(entry >> 32);
}
__device__ __forceinline__ int32_t entry_id(uint64_t entry) {
  return static_cast<int32_t>(~static_cast<uint32_t>(entry));
}

// The k-th largest (1-based) of the 32 lanes' values: a bitonic sort across lanes.
__device__ __forceinline__ uint32_t warp_kth_largest(uint32_t value, int k, int lane) {
#pragma unroll
  for (int size = 2; size <= kWarp; size *= 2) {
#pragma unroll
    for (int stride = size / 2; stride > 0; stride /= 2) {
      const uint32_t other = __shfl_xor_sync(kFullMask, value, stride);
      const bool lower = (lane & stride) == 0;
      const bool descending = (lane & size) == 0;  // always at size 32
      value = lower == descending ? max(value, other) : min(value, other);
    }
  }
  return __shfl_sync(kFullMask, value, k - 1);
}

// One compare-exchange step across lanes: keep the larger or the smaller of the pair.
__device__ __forceinline__ uint64_t exchange_with_lane(uint64_t entry, int stride,
                                                       bool keep_larger) {
  const uint64_t other = __shfl_xor_sync(kFullMask, entry, stride);
  return (other > entry) == keep_larger ? other : entry;
}

// A column of 32 W entries spread over the warp: entry w * 32 + lane sits in e[w] of
// lane `lane`. One bitonic step: pairs at distance `stride`, in blocks of `size`
// that alternate direction unless `all_descending` (the final merge).
template <int W>
__device__ __forceinline__ void bitonic_step(uint64_t (&e)[W], int size, int stride,
                                             bool all_descending, int lane) {
#pragma unroll
  for (int w = 0; w < W; ++w) {
    const int element = w * kWarp + lane;
    const bool descending = all_descending || (element & size) == 0;
    if (stride >= kWarp) {  // both entries in this lane
      const int partner = w ^ (stride / kWarp);
      if (w < partner) {
        const uint64_t a = e[w], b = e[partner];
        const bool swap = (a < b) == descending;
        e[w] = swap ? b : a;
        e[partner] = swap ? a : b;
      }
    } else {
      e[w] = exchange_with_lane(e[w], stride, ((element & stride) == 0) == descending);
    }
  }
}

template <int W>
__device__ __forceinline__ void column_sort_descending(uint64_t (&e)[W], int lane) {
#pragma unroll
  for (int size = 2; size <= W * kWarp; size *= 2) {
#pragma unroll
    for (int stride = size / 2; stride > 0; stride /= 2) {
      bitonic_step(e, size, stride, size == W * kWarp, lane);
    }
  }
}

// Sorts a bitonic column descending.
template <int W>
__device__ __forceinline__ void column_merge_descending(uint64_t (&e)[W], int lane) {
#pragma unroll
  for (int stride = W * kWarp / 2; stride > 0; stride /= 2) {
    bitonic_step(e, W * kWarp, stride, true, lane);
  }
}

template <int W>
__device__ __forceinline__ void load_column(const uint64_t* buffer, int base, int count, int lane,
                                            uint64_t (&e)[W]) {
#pragma unroll
  for (int w = 0; w < W; ++w) {
    const int slot = base + w * kWarp + lane;
    e[w] = slot < count ? buffer[slot] : 0;
  }
}

// The 32 W largest of buffer[0, count) (1 <= count <= 32 W R), descending across
// the warp: rank w * 32 + lane ends in best[w] of lane `lane`, 0 past count. Column
// after column is sorted in registers and merged into the best so far by a max
// against it reversed (a bitonic column holding the 32 W largest of both) and a
// bitonic merge.
template <int W, int R>
__device__ __forceinline__ void warp_top(const uint64_t* buffer, int count, int lane,
                                         uint64_t (&best)[W]) {
  load_column(buffer, 0, count, lane, best);
  column_sort_descending(best, lane);
#pragma unroll
  for (int r = 1; r < R; ++r) {
    const int base = r * W * kWarp;
    if (base >= count) break;
    uint64_t column[W];
    load_column(buffer, base, count, lane, column);
    column_sort_descending(column, lane);
#pragma unroll
    for (int w = 0; w < W; ++w) {
      best[w] = max(best[w], __shfl_xor_sync(kFullMask, column[W - 1 - w], kWarp - 1));
    }
    column_merge_descending(best, lane);
  }
}

// The keys of one half held in registers: key[v] belongs to logit v * 32 + lane
// (0 past N).
template <int V>
struct RegisterKeys {
  uint32_t key[V];

  template <class Visit>
  __device__ __forceinline__ void visit(int lane, Visit&& f) const {
#pragma unroll
    for (int v = 0; v < V; ++v) f(key[v], v * kWarp + lane);
  }
};

// The keys of one half recomputed from global memory on every visit (any N).
template <class T>
struct StreamedKeys {
  const T* logits;  // the half's N logits
  int num_keys;
  float lse;

  template <class Visit>
  __device__ void visit(int lane, Visit&& f) const {
    for (int base = 0; base < num_keys; base += kWarp) {
      const int n = base + lane;
      f(n < num_keys ? order_key(log_prob(load_logit(logits + n), lse)) : 0u, n);
    }
  }
};

// The largest t with at least k keys >= t, i.e. the k-th largest key, bit by bit
// below the bits that the smallest and the largest key share.
template <class Keys>
__device__ uint32_t kth_largest_key(const Keys& keys, int k, int lane) {
  uint32_t lane_high = 0, lane_low = UINT_MAX;
  keys.visit(lane, [&](uint32_t key, int) {
    if (key != 0) {
      lane_high = max(lane_high, key);
      lane_low = min(lane_low, key);
    }
  });
  const uint32_t high = warp_max(lane_high), low = warp_min(lane_low);
  int bit = 31 - __clz(high ^ low);  // -1 when every key is equal
  uint32_t threshold = bit < 0 ? high : high & ~((2u << bit) - 1);
  for (; bit >= 0; --bit) {
    const uint32_t trial = threshold | (1u << bit);
    int at_least = 0;
    keys.visit(lane, [&](uint32_t key, int) { at_least += key >= trial; });
    if (warp_sum(at_least) >= k) threshold = trial;
  }
  return threshold;
}

// Writes to buffer[0, keep) every entry with key > threshold and, in index order,
// the first `equal_quota` entries with key == threshold (ballots keep the order).
template <class Keys>
__device__ void compact_in_index_order(const Keys& keys, uint32_t threshold, int equal_quota,
                                       uint64_t* buffer, int lane) {
  const unsigned lower_lanes = (1u << lane) - 1;
  int written = 0, equal_seen = 0;
  keys.visit(lane, [&](uint32_t key, int n) {
    const unsigned equal = __ballot_sync(kFullMask, key == threshold);
    const bool take = key > threshold ||
                      (key == threshold && equal_seen + __popc(equal & lower_lanes) < equal_quota);
    const unsigned taken = __ballot_sync(kFullMask, take);
    if (take) buffer[written + __popc(taken & lower_lanes)] = pack_entry(key, n);
    written += __popc(taken);
    equal_seen += __popc(equal);
  });
}

// Sum of the lower lanes' values.
__device__ __forceinline__ int warp_exclusive_sum(int value, int lane) {
  int sum = value;
#pragma unroll
  for (int offset = 1; offset < kWarp; offset *= 2) {
    const int lower = __shfl_up_sync(kFullMask, sum, offset);
    if (lane >= offset) sum += lower;
  }
  return sum - value;
}

// Writes a superset of the half's `keep` best entries to buffer[0, count) and returns
// count: with the lane-maxima threshold when keep <= 32 and at most 64 keys pass it
// (lane by lane, in any order), else exactly the `keep` best (exact threshold).
template <class Keys>
__device__ int gather_best_of_half(const Keys& keys, int keep, uint64_t* buffer, int lane) {
  if (keep <= kLaneMaximaMaxKeep) {
    uint32_t lane_max = 0;
    keys.visit(lane, [&](uint32_t key, int) { lane_max = max(lane_max, key); });
    const uint32_t threshold = warp_kth_largest(lane_max, keep, lane);
    int passing = 0;
    keys.visit(lane, [&](uint32_t key, int) { passing += key >= threshold; });
    const int count = warp_sum(passing);
    if (count <= kLaneMaximaCapacity) {
      int at = warp_exclusive_sum(passing, lane);
      keys.visit(lane, [&](uint32_t key, int n) {
        if (key >= threshold) buffer[at++] = pack_entry(key, n);
      });
      return count;
    }
  }
  const uint32_t threshold = kth_largest_key(keys, keep, lane);
  int above = 0;
  keys.visit(lane, [&](uint32_t key, int) { above += key > threshold; });
  compact_in_index_order(keys, threshold, keep - warp_sum(above), buffer, lane);
  return keep;
}

// Orders buffer[low], buffer[high] (an equal pair may swap: it changes nothing).
__device__ __forceinline__ void compare_exchange(uint64_t* buffer, int low, int high,
                                                 bool descending) {
  const uint64_t a = buffer[low], b = buffer[high];
  if ((a < b) == descending) {
    buffer[low] = b;
    buffer[high] = a;
  }
}

// Leaves the 2^log2_chunk largest of buffer[0, count) in buffer[0, 2^log2_chunk),
// descending. The tail up to a whole number of chunks is padded with 0 (the buffer
// must hold it). Ends with a warp barrier.
__device__ void sort_top(uint64_t* buffer, int count, int log2_chunk, int lane) {
  const int chunk = 1 << log2_chunk;
  const int chunks = max(1, (count + chunk - 1) >> log2_chunk);
  const int padded = chunks << log2_chunk;
  for (int i = count + lane; i < padded; i += kWarp) buffer[i] = 0;
  __syncwarp();
  // Every chunk sorted descending (bitonic; the last merge of a chunk is descending).
  for (int size = 2; size <= chunk; size *= 2) {
    for (int stride = size / 2; stride > 0; stride /= 2) {
      for (int pair = lane; pair < padded / 2; pair += kWarp) {
        const int low = pair + (pair & ~(stride - 1));
        compare_exchange(buffer, low, low + stride, size == chunk || (low & size) == 0);
      }
      __syncwarp();
    }
  }
  // Tournament: chunk c absorbs chunk c + gap for c = 0, 2 gap, 4 gap, ...
  for (int gap = 1; gap < chunks; gap *= 2) {
    const int merges = (chunks + gap - 1) / (2 * gap);
    for (int e = lane; e < merges << log2_chunk; e += kWarp) {
      const int first = (e >> log2_chunk) * 2 * gap, i = e & (chunk - 1);
      uint64_t& mine = buffer[(first << log2_chunk) + i];
      // Max against the partner reversed: a bitonic sequence of the best `chunk`.
      mine = max(mine, buffer[((first + gap) << log2_chunk) + chunk - 1 - i]);
    }
    __syncwarp();
    for (int stride = chunk / 2; stride > 0; stride /= 2) {
      for (int e = lane; e < merges << (log2_chunk - 1); e += kWarp) {
        const int first = (e >> (log2_chunk - 1)) * 2 * gap, pair = e & (chunk / 2 - 1);
        const int low = (first << log2_chunk) + pair + (pair & ~(stride - 1));
        compare_exchange(buffer, low, low + stride, true);
      }
      __syncwarp();
    }
  }
}

// The `keep` <= 32 W best of buffer[0, count), sorted in registers, into index[]
// and value[].
template <int W, int R>
__device__ __forceinline__ void keep_sorted(const uint64_t* buffer, int count, int keep,
                                            int32_t* index, float* value, int lane) {
  uint64_t best[W];
  warp_top<W, R>(buffer, count, lane, best);
#pragma unroll
  for (int w = 0; w < W; ++w) {
    const int rank = w * kWarp + lane;
    if (rank < keep) {
      index[rank] = entry_id(best[w]);
      value[rank] = key_value(entry_key(best[w]));
    }
  }
}

// The `keep` best entries of one half, best first, into index[] and value[] (l).
template <class Keys>
__device__ void keep_best_of_half(const Keys& keys, int keep, uint64_t* buffer, int32_t* index,
                                  float* value, int lane) {
  const int count = gather_best_of_half(keys, keep, buffer, lane);
  __syncwarp();
  static_assert(kLaneMaximaMaxKeep <= kWarp && kLaneMaximaCapacity <= 2 * kWarp,
                "keep_sorted<1, 2> takes the lane-maxima path's entries");
  if (keep <= kLaneMaximaMaxKeep) {  // count <= 64
    keep_sorted<1, 2>(buffer, count, keep, index, value, lane);
  } else if (keep <= 2 * kWarp) {  // count = keep
    keep_sorted<2, 1>(buffer, count, keep, index, value, lane);
  } else {
    sort_top(buffer, count, ceil_log2(keep), lane);
    for (int r = lane; r < keep; r += kWarp) {
      index[r] = entry_id(buffer[r]);
      value[r] = key_value(entry_key(buffer[r]));
    }
  }
  __syncwarp();
}

// Shared memory per warp, rounded to 16 bytes so every warp's part stays aligned.
__host__ __device__ constexpr size_t round_up_16(size_t bytes) { return (bytes + 15) / 16 * 16; }

// One warp's shared memory in the forward kernel.
struct ForwardScratch {
  uint64_t* sort;       // sort_capacity entries
  int32_t* kept_index;  // [2][keep]: per half, the kept logits, best first
  float* kept_value;    // [2][keep]: and their log-probabilities
  int keep;

  __device__ int32_t* index(int half) const { return kept_index + half * keep; }
  __device__ float* value(int half) const { return kept_value + half * keep; }
};

__host__ __device__ constexpr size_t forward_scratch_bytes(int sort_capacity, int keep) {
  return round_up_16(static_cast<size_t>(sort_capacity) * sizeof(uint64_t) +
                     2 * static_cast<size_t>(keep) * (sizeof(int32_t) + sizeof(float)));
}

__device__ __forceinline__ ForwardScratch forward_scratch(uint64_t* shared, int warp,
                                                          const ForwardShape& shape) {
  auto* base = reinterpret_cast<uint8_t*>(shared) +
               static_cast<size_t>(warp) * forward_scratch_bytes(shape.sort_capacity, shape.keep);
  ForwardScratch s;
  s.sort = reinterpret_cast<uint64_t*>(base);
  s.kept_index = reinterpret_cast<int32_t*>(s.sort + shape.sort_capacity);
  s.kept_value = reinterpret_cast<float*>(s.kept_index + 2 * shape.keep);
  s.keep = shape.keep;
  return s;
}

// Candidates (a, b) (0-based ranks here) into buffer; returns their count. Line j
// (row a = j, then column b = j) has min(K / (j + 1), keep) entries before the
// columns drop their first `side`; lane j computes that length once.
__device__ int write_candidates(const ForwardScratch& s, const ForwardShape& shape, int lane) {
  const int K = shape.top_k, keep = shape.keep, side = shape.stair_side;
  const int lines = min(side, keep);  // side <= 22 < 32 lanes (K <= 512)
  const int line_length = lane < lines ? min(K / (lane + 1), keep) : 0;
  auto candidate = [&](int a, int b) {
    const float score = s.value(0)[a] + s.value(1)[b];
    const uint32_t id = static_cast<uint32_t>(s.index(0)[a]) * shape.num_keys + s.index(1)[b];
    return pack_entry(order_key(score), id);
  };
  int written = 0;
  for (int a = 0; a < lines; ++a) {  // rows: b < min(K / (a + 1), keep)
    const int length = __shfl_sync(kFullMask, line_length, a);
    for (int b = lane; b < length; b += kWarp) s.sort[written + b] = candidate(a, b);
    written += length;
  }
  for (int b = 0; b < lines; ++b) {  // columns: side <= a < min(K / (b + 1), keep)
    const int length = __shfl_sync(kFullMask, line_length, b) - side;
    for (int a = lane; a < length; a += kWarp) s.sort[written + a] = candidate(side + a, b);
    written += max(length, 0);
  }
  return written;
}

template <int V, class T>
__device__ __forceinline__ void load_half(const T* half, int N, int lane, float (&x)[V]) {
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const int n = v * kWarp + lane;
    x[v] = n < N ? load_logit(half + n) : -INFINITY;
  }
}

template <int V, class T>
__device__ __forceinline__ void keep_best_in_registers(const T* logits, const ForwardShape& shape,
                                                       const ForwardScratch& s, float* lse,
                                                       int lane) {
  const int N = shape.num_keys;
  // Up to V = 8 both halves' loads are in flight at once; beyond, one half at a time
  // keeps the registers in budget.
  constexpr bool kBothHalves = V <= 8;
  float x[kBothHalves ? 2 : 1][V];
  if constexpr (kBothHalves) {
    load_half(logits, N, lane, x[0]);
    load_half(logits + N, N, lane, x[1]);
  }
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    float(&half)[V] = x[kBothHalves ? c : 0];
    if constexpr (!kBothHalves) load_half(logits + c * N, N, lane, half);
    float lane_max = -INFINITY;
#pragma unroll
    for (int v = 0; v < V; ++v) lane_max = fmaxf(lane_max, half[v]);
    const float half_max = warp_max(lane_max);
    float sum = 0;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      if (v * kWarp + lane < N) sum += expf(half[v] - half_max);
    }
    lse[c] = half_max + logf(warp_sum(sum));
    RegisterKeys<V> keys;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      keys.key[v] = v * kWarp + lane < N ? order_key(log_prob(half[v], lse[c])) : 0u;
    }
    keep_best_of_half(keys, shape.keep, s.sort, s.index(c), s.value(c), lane);
  }
}

template <class T>
__device__ void keep_best_streamed(const T* logits, const ForwardShape& shape,
                                   const ForwardScratch& s, float* lse, int lane) {
  const int N = shape.num_keys;
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const T* half = logits + c * N;
    float lane_max = -INFINITY;
    for (int n = lane; n < N; n += kWarp) lane_max = fmaxf(lane_max, load_logit(half + n));
    const float half_max = warp_max(lane_max);
    float sum = 0;
    for (int n = lane; n < N; n += kWarp) sum += expf(load_logit(half + n) - half_max);
    lse[c] = half_max + logf(warp_sum(sum));
    keep_best_of_half(StreamedKeys<T>{half, N, lse[c]}, shape.keep, s.sort, s.index(c), s.value(c),
                      lane);
  }
}

// K <= 32 W: the candidates (at most 32 W R) sorted in registers, 32 W at a time;
// lane `lane` writes the slots w * 32 + lane.
template <int W, int R>
__device__ __forceinline__ void write_top_k_sorted_in_registers(const ForwardScratch& s,
                                                                int candidates,
                                                                const ForwardShape& shape,
                                                                int32_t* row_ids, float* row_gates,
                                                                int lane) {
  uint64_t best[W];
  warp_top<W, R>(s.sort, candidates, lane, best);
  const int K = shape.top_k;
  float gate[W], sum = 0;
#pragma unroll
  for (int w = 0; w < W; ++w) {
    gate[w] = expf(key_value(entry_key(best[w])));
    if (w * kWarp + lane < K) sum += gate[w];
  }
  const float norm = shape.norm_topk_prob ? warp_sum(sum) : 1.0f;
#pragma unroll
  for (int w = 0; w < W; ++w) {
    const int k = w * kWarp + lane;
    if (k < K) {
      row_ids[k] = entry_id(best[w]);
      row_gates[k] = shape.norm_topk_prob ? gate[w] / norm : gate[w];
    }
  }
}

// Any K: the candidates sorted in shared memory.
__device__ void write_top_k(const ForwardScratch& s, int candidates, const ForwardShape& shape,
                            int32_t* row_ids, float* row_gates, int lane) {
  const int K = shape.top_k;
  sort_top(s.sort, candidates, ceil_log2(K), lane);
  float norm = 1.0f;
  if (shape.norm_topk_prob) {
    float sum = 0;
    for (int k = lane; k < K; k += kWarp) sum += expf(key_value(entry_key(s.sort[k])));
    norm = warp_sum(sum);
  }
  for (int k = lane; k < K; k += kWarp) {
    const uint64_t entry = s.sort[k];
    const float gate = expf(key_value(entry_key(entry)));
    row_ids[k] = entry_id(entry);
    row_gates[k] = shape.norm_topk_prob ? gate / norm : gate;
  }
}

// Blocks of 256 threads an SM must fit (sets the register budget of the forward
// kernel on sm_80 and later): 48 registers for V <= 4, 64 for V = 8 and streamed,
// 128 for V >= 16, all without spills. Older targets hold fewer threads an SM.
constexpr int forward_min_blocks(int V) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  return 1;
#else
  return V >= 16 ? 2 : V == 8 || V == 0 ? 4 : 5;
#endif
}

// V > 0: logits in registers, V per lane a half (N <= 32 V); V = 0: streamed.
template <int V, class T>
__global__ void __launch_bounds__(256, forward_min_blocks(V))
    router_forward_kernel(const T* __restrict__ logits, ForwardShape shape,
                          int32_t* __restrict__ ids, float* __restrict__ gates,
                          float* __restrict__ logsumexp) {
  extern __shared__ uint64_t shared[];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + warp;
  if (row >= shape.rows) return;
  const ForwardScratch s = forward_scratch(shared, warp, shape);
  const T* row_logits = logits + row * 2 * shape.num_keys;
  float lse[2];
  if constexpr (V > 0) {
    keep_best_in_registers<V>(row_logits, shape, s, lse, lane);
  } else {
    keep_best_streamed(row_logits, shape, s, lse, lane);
  }
  if (lane == 0) {
    logsumexp[2 * row] = lse[0];
    logsumexp[2 * row + 1] = lse[1];
  }
  const int candidates = write_candidates(s, shape, lane);
  __syncwarp();
  int32_t* row_ids = ids + row * shape.top_k;
  float* row_gates = gates + row * shape.top_k;
  if (shape.top_k <= kWarp) {
    write_top_k_sorted_in_registers<1, 4>(s, candidates, shape, row_ids, row_gates, lane);
  } else if (shape.top_k <= 2 * kWarp) {
    write_top_k_sorted_in_registers<2, 5>(s, candidates, shape, row_ids, row_gates, lane);
  } else {
    write_top_k(s, candidates, shape, row_ids, row_gates, lane);
  }
}

// Sorts buffer[0, count) (count <= 32 W) descending in registers and writes the
// column back, padded with 0 to 32 W entries. Ends with a warp barrier.
template <int W>
__device__ __forceinline__ void sort_in_registers(uint64_t* buffer, int count, int lane) {
  uint64_t column[W];
  load_column(buffer, 0, count, lane, column);
  column_sort_descending(column, lane);
  __syncwarp();
#pragma unroll
  for (int w = 0; w < W; ++w) buffer[w * kWarp + lane] = column[w];
  __syncwarp();
}

// One warp's shared memory in the backward kernel.
struct BackwardScratch {
  uint64_t* order;   // sort_capacity entries: ~(half << 63 | logit << 32 | slot)
  float* slot_grad;  // K: ds of each slot
  float* run_total;  // sort_capacity: at a run's first position, the run's sum of ds
};

__host__ __device__ constexpr size_t backward_scratch_bytes(int sort_capacity, int top_k) {
  return round_up_16(static_cast<size_t>(sort_capacity) * (sizeof(uint64_t) + sizeof(float)) +
                     static_cast<size_t>(top_k) * sizeof(float));
}

__device__ __forceinline__ BackwardScratch backward_scratch(uint64_t* shared, int warp,
                                                            const BackwardShape& shape) {
  auto* base = reinterpret_cast<uint8_t*>(shared) +
               static_cast<size_t>(warp) * backward_scratch_bytes(shape.sort_capacity, shape.top_k);
  BackwardScratch s;
  s.order = reinterpret_cast<uint64_t*>(base);
  s.run_total = reinterpret_cast<float*>(s.order + shape.sort_capacity);
  s.slot_grad = s.run_total + shape.sort_capacity;
  return s;
}

// The (half, logit) of an order entry; all ones for the empty entry 0.
__device__ __forceinline__ uint32_t order_run(uint64_t entry) {
  return static_cast<uint32_t>(~entry >> 32);
}

__device__ __forceinline__ bool starts_run(const uint64_t* order, int position) {
  return order[position] != 0 &&
         (position == 0 || order_run(order[position - 1]) != order_run(order[position]));
}

template <class T>
__global__ void __launch_bounds__(256)
    router_backward_kernel(const T* __restrict__ logits, const int32_t* __restrict__ ids,
                           const float* __restrict__ gates, const float* __restrict__ logsumexp,
                           const float* __restrict__ dgates, BackwardShape shape,
                           float* __restrict__ dlogits) {
  extern __shared__ uint64_t shared[];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + warp;
  if (row >= shape.rows) return;
  const BackwardScratch s = backward_scratch(shared, warp, shape);
  const int N = shape.num_keys, K = shape.top_k;
  const int64_t experts = static_cast<int64_t>(N) * N;
  const float* g = gates + row * K;
  const float* dg = dgates + row * K;
  const int32_t* id = ids + row * K;

  float weighted = 0;  // sum_m g_m dg_m, the normalisation's share
  if (shape.norm_topk_prob) {
    for (int k = lane; k < K; k += kWarp) weighted += g[k] * dg[k];
    weighted = warp_sum(weighted);
  }
  // An id outside [0, N^2) (not from router_forward) contributes nothing.
  for (int k = lane; k < K; k += kWarp) {
    s.slot_grad[k] = g[k] * (dg[k] - weighted);
    const int32_t e = id[k];
    const bool valid = e >= 0 && e < experts;
    const auto slot = static_cast<uint64_t>(k);
    s.order[k] = valid ? ~(static_cast<uint64_t>(e / N) << 32 | slot) : 0;
    s.order[K + k] = valid ? ~(uint64_t{1} << 63 | static_cast<uint64_t>(e % N) << 32 | slot) : 0;
  }
  __syncwarp();
  if (2 * K <= kWarp) {
    sort_in_registers<1>(s.order, 2 * K, lane);
  } else if (2 * K <= 2 * kWarp) {
    sort_in_registers<2>(s.order, 2 * K, lane);
  } else {
    sort_top(s.order, 2 * K, ceil_log2(shape.sort_capacity), lane);
  }

  float half_total[2] = {0, 0};  // per half: sum of dl over its logits
  for (int p = lane; p < 2 * K; p += kWarp) {
    if (!starts_run(s.order, p)) continue;
    const uint32_t run = order_run(s.order[p]);
    float total = 0;
    for (int r = p; r < 2 * K && order_run(s.order[r]) == run; ++r) {
      total += s.slot_grad[static_cast<uint32_t>(~s.order[r])];
    }
    s.run_total[p] = total;
    (run >> 31 ? half_total[1] : half_total[0]) += total;
  }
  const float sum_dl[2] = {warp_sum(half_total[0]), warp_sum(half_total[1])};

  const T* q = logits + row * 2 * N;
  const float* lse = logsumexp + 2 * row;
  float* dq = dlogits + row * 2 * N;
  for (int c = 0; c < 2; ++c) {
    for (int n = lane; n < N; n += kWarp) {
      dq[c * N + n] = 0.0f - expf(load_logit(q + c * N + n) - lse[c]) * sum_dl[c];
    }
  }
  __syncwarp();  // the touched logits are rewritten below, by other lanes
  for (int p = lane; p < 2 * K; p += kWarp) {
    if (!starts_run(s.order, p)) continue;
    const uint32_t run = order_run(s.order[p]);
    const int c = run >> 31, n = run & 0x7fffffff;
    dq[c * N + n] = s.run_total[p] - expf(load_logit(q + c * N + n) - lse[c]) * sum_dl[c];
  }
}

}  // namespace flashmoe::router_gpu
