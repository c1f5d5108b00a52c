// Device kernels of the single-neuron experts. The math is in kernels/experts.h;
// the algorithm, the launches and the scratch memory are in kernels/experts.cu.
//
// Rows are read in chunks of kVec elements: kVec = 16 / sizeof(T) (one 16-byte
// load) when every row starts on a 16-byte boundary, else kVec = 1 (any D).
// Every sum runs in an order fixed by the shapes alone, never by timing.
// An id < 0 is an empty slot: its rows are never read, and it adds nothing anywhere.
#pragma once

#include <cstdint>
#include <type_traits>

#include "core/bf16.h"
#include "kernels/activation.h"
#include "kernels/warp.cuh"

namespace flashmoe::detail::experts_gpu {

constexpr int kWarp = 32;

// How a row load is cached: a token's own row is re-read by the warps of its block
// and stays in L1; rows gathered from the tables or by token go through L2 only.
enum class Cache { l1, l2_only };

// kVec elements of a row (fp32 or bf16) as loaded: one 16-byte load, or one element.
// They stay packed until used (a bf16 chunk holds 4 registers, not 8) and are widened
// to float by operator[], so a kernel can keep many chunks in flight.
template <class T, int kVec>
struct Chunk {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, bf16>);
  static_assert(sizeof(T) * kVec == 16 || kVec == 1,
                "rows are read in 16-byte chunks or one element at a time");
  static constexpr int kWords = sizeof(T) * kVec == 16 ? 4 : 1;
  uint32_t words[kWords] = {};  // zero: every element 0.0f

  __device__ __forceinline__ float operator[](int i) const {
    if constexpr (std::is_same_v<T, float>) {
      return __uint_as_float(words[i]);
    } else {  // two bf16 per word, the lower address in the low half
      return __uint_as_float(i % 2 == 0 ? words[i / 2] << 16 : words[i / 2] & 0xffff0000u);
    }
  }
};

template <class T, int kVec, Cache kCache>
__device__ __forceinline__ Chunk<T, kVec> load_chunk(const T* src) {
  Chunk<T, kVec> chunk;
  if constexpr (Chunk<T, kVec>::kWords == 4) {
    const uint4* p = reinterpret_cast<const uint4*>(src);
    const uint4 raw = kCache == Cache::l2_only ? __ldcg(p) : __ldg(p);
    chunk.words[0] = raw.x;
    chunk.words[1] = raw.y;
    chunk.words[2] = raw.z;
    chunk.words[3] = raw.w;
  } else if constexpr (std::is_same_v<T, float>) {
    chunk.words[0] = __float_as_uint(kCache == Cache::l2_only ? __ldcg(src) : __ldg(src));
  } else {
    const auto* p = reinterpret_cast<const unsigned short*>(src);
    chunk.words[0] = kCache == Cache::l2_only ? __ldcg(p) : __ldg(p);
  }
  return chunk;
}

// kVec elements of a row, widened to float.
template <class T, int kVec, Cache kCache>
__device__ __forceinline__ void load_floats(const T* src, float (&out)[kVec]) {
  const Chunk<T, kVec> chunk = load_chunk<T, kVec, kCache>(src);
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = chunk[i];
}

// Row `id` of a table of rows of `dim` elements.
template <class T>
__device__ __forceinline__ const T* table_row(const T* table, int32_t id, int64_t dim) {
  return table + int64_t(id) * dim;
}

// kVec floats stored as T (bf16 rounds to nearest even, like the CPU backend).
template <class T, int kVec>
__device__ __forceinline__ void store_floats(T* dst, const float (&v)[kVec]) {
  if constexpr (sizeof(T) * kVec == 16) {
    uint32_t words[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (std::is_same_v<T, float>) {
        words[i] = __float_as_uint(v[i]);
      } else {
        words[i] = to_bf16x2(v[2 * i], v[2 * i + 1]);
      }
    }
    *reinterpret_cast<uint4*>(dst) = make_uint4(words[0], words[1], words[2], words[3]);
  } else {
    static_assert(kVec == 1, "rows are written in 16-byte chunks or one element at a time");
    if constexpr (std::is_same_v<T, float>) {
      dst[0] = v[0];
    } else {
      dst[0] = to_bf16(v[0]);
    }
  }
}

// kVec fp32 values. Gradients are written once and not read back soon: streaming
// stores keep them from evicting the rows that are still being gathered from L2.
// Partial sums, which the next kernel reads, take plain stores.
template <int kVec>
__device__ __forceinline__ void store_fp32(float* dst, const float (&v)[kVec], bool streaming) {
  if constexpr (kVec % 4 == 0) {
#pragma unroll
    for (int i = 0; i < kVec; i += 4) {
      const float4 quad = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
      auto* at = reinterpret_cast<float4*>(dst + i);
      if (streaming) {
        __stcs(at, quad);
      } else {
        *at = quad;
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      if (streaming) {
        __stcs(dst + i, v[i]);
      } else {
        dst[i] = v[i];
      }
    }
  }
}

// ---------------------------------------------------------------------------------
// Per (token, slot) dot products: dot[t][s] = <token_rows[t], table[ids[t][s]]>.

constexpr int kDotWarps = 4;
constexpr int kDotRowsPerWarp = 4;
static_assert(kDotRowsPerWarp == 4, "both dot kernels sum the rows with warp_sum_quarters");
constexpr int kDotSlotsPerBlock = kDotWarps * kDotRowsPerWarp;

// An epilogue reads its per-pair inputs with load(pair) before the dot is computed
// (the loads overlap the row gathers instead of following them), then finishes the
// pair with operator()(pair, dot, filled, inputs), which returns the pair's coefficient
// in the row sum that follows the dots.

// Forward: h = dot, and the coefficient of up_embed[e] in y[t], act(h) * g (both 0
// for an empty slot), which it returns and writes to `coef` unless that is null (the
// kernel sums the rows itself).
struct ForwardDotEpilogue {
  const float* gates;
  float* h;
  float* coef;
  Activation act;
  struct Inputs {
    float gate;
  };
  __device__ Inputs load(int64_t pair) const { return {gates[pair]}; }
  __device__ float operator()(int64_t pair, float dot, bool filled, Inputs in) const {
    const float c = filled ? activate(act, dot) * in.gate : 0.0f;
    h[pair] = filled ? dot : 0.0f;
    if (coef != nullptr) coef[pair] = c;
    return c;
  }
};

// Backward: z = dot = <dy[t], up[e]>; dgates = act(h) z; dh = z g act'(h) (the
// coefficient of down_embed[e] in dx[t] and of x[t] in d_down[e], returned); a = act(h) g
// (the coefficient of dy[t] in d_up[e]); all three 0 for an empty slot.
struct BackwardDotEpilogue {
  const float* gates;
  const float* h;
  float* dgates;
  float* pair_dh;
  float* pair_a;
  Activation act;
  struct Inputs {
    float pre, gate;
  };
  __device__ Inputs load(int64_t pair) const { return {h[pair], gates[pair]}; }
  __device__ float operator()(int64_t pair, float z, bool filled, Inputs in) const {
    const float pre = in.pre, g = in.gate, activated = activate(act, pre);
    const float dh = filled ? z * g * activate_grad(act, pre) : 0.0f;
    dgates[pair] = filled ? activated * z : 0.0f;
    pair_dh[pair] = dh;
    pair_a[pair] = filled ? activated * g : 0.0f;
    return dh;
  }
};

// Lane partial sums of the dots of token_row with rows[r], for the filled r (the others
// stay 0), by a group of kWarp / kStreams lanes. The row's chunks are dealt as over a
// whole warp, chunk c to "stream lane" c % kWarp, and lane j of the group plays stream
// lanes j + s * kWarp / kStreams in partial[s], s < kStreams: each lane has kStreams
// token chunks and kStreams * R table chunks in flight. Each stream lane's fmaf chain
// runs over its chunks in ascending order, and add_streams then warp_sum_quarters over
// the group add the stream lanes in warp_sum's tree: a dot has the same bits whichever
// kernel and group width computes it.
template <class T, int kVec, int R, int kStreams>
__device__ __forceinline__ void lane_partial_dots(const T* token_row, const T* const (&rows)[R],
                                                  const bool (&filled)[R], int chunks,
                                                  int group_lane, float (&partial)[kStreams][R]) {
  constexpr int kGroup = kWarp / kStreams;
  for (int first = 0; first < chunks; first += kWarp) {
    bool active[kStreams];
    Chunk<T, kVec> token_chunk[kStreams];
    Chunk<T, kVec> row_chunk[kStreams][R];
#pragma unroll
    for (int s = 0; s < kStreams; ++s) {
      const int c = first + s * kGroup + group_lane;
      active[s] = c < chunks;
      const int64_t at = int64_t(active[s] ? c : 0) * kVec;
      token_chunk[s] = load_chunk<T, kVec, Cache::l1>(token_row + at);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (filled[r] && active[s]) {
          row_chunk[s][r] = load_chunk<T, kVec, Cache::l2_only>(rows[r] + at);
        }
      }
    }
#pragma unroll
    for (int s = 0; s < kStreams; ++s) {
      if (!active[s]) continue;  // a stream lane past the row adds nothing, not even +0
#pragma unroll
      for (int r = 0; r < R; ++r) {
        // An empty slot's dot is never used. With one token a warp the skip is uniform;
        // with two it splits the warp (the owner-of-4 forward ran 10% slower).
        if (kStreams == 1 && !filled[r]) continue;
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          partial[s][r] = fmaf(token_chunk[s][i], row_chunk[s][r][i], partial[s][r]);
        }
      }
    }
  }
}

// The first levels of warp_sum's tree over the stream lanes a lane plays (stream lanes
// kWarp / 2 apart first, then kWarp / 4, ...): sum[r] = the lane's share of row r,
// which warp_sum_quarters<kWarp / kStreams> then sums over the group.
template <int R, int kStreams>
__device__ __forceinline__ void add_streams(float (&partial)[kStreams][R], float (&sum)[R]) {
#pragma unroll
  for (int half = kStreams / 2; half >= 1; half /= 2) {
#pragma unroll
    for (int s = 0; s < half; ++s) {
#pragma unroll
      for (int r = 0; r < R; ++r) partial[s][r] += partial[s + half][r];
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) sum[r] = partial[0][r];
}

// Block (token t = blockIdx.x, slots [16 * blockIdx.y, +16)); warp w takes 4
// consecutive slots. Lane partial sums are combined by warp_sum_quarters, then lane 8r
// hands slot r's dot to the epilogue. The rows of empty slots are not read (the branch
// is uniform over the warp) and their dots are 0.
template <class T, int kVec, class Epilogue>
__global__ void __launch_bounds__(kDotWarps* kWarp)
    slot_dot_kernel(const T* __restrict__ token_rows, const T* __restrict__ table,
                    const int32_t* __restrict__ ids, int64_t slots, int64_t dim,
                    Epilogue epilogue) {
  const int lane = threadIdx.x % kWarp;
  const int64_t first_slot =
      int64_t(blockIdx.y) * kDotSlotsPerBlock + (threadIdx.x / kWarp) * kDotRowsPerWarp;
  if (first_slot >= slots) return;  // whole warps leave; the kernel has no block barrier
  const int64_t token = blockIdx.x;
  const T* rows[kDotRowsPerWarp];
  bool filled[kDotRowsPerWarp];
  bool any_filled = false;
  const int my_row = lane / (kWarp / kDotRowsPerWarp);
  bool my_filled = false;
#pragma unroll
  for (int r = 0; r < kDotRowsPerWarp; ++r) {
    // Past the last slot the warp re-reads the last row and drops its dot.
    const int64_t slot = min(first_slot + r, slots - 1);
    const int32_t id = ids[token * slots + slot];
    filled[r] = id >= 0;
    any_filled = any_filled || filled[r];
    if (r == my_row) my_filled = filled[r];
    rows[r] = table_row(table, filled[r] ? id : 0, dim);
  }
  // Lane 8r finishes slot r: its epilogue inputs are loaded now, beside the gathers.
  const bool finishes = lane % (kWarp / kDotRowsPerWarp) == 0;
  const int64_t my_pair = token * slots + min(first_slot + my_row, slots - 1);
  const typename Epilogue::Inputs my_inputs =
      finishes ? epilogue.load(my_pair) : typename Epilogue::Inputs{};
  float partial[1][kDotRowsPerWarp] = {};
  if (any_filled) {
    lane_partial_dots<T, kVec>(token_rows + token * dim, rows, filled, int(dim / kVec), lane,
                               partial);
  }
  const float dot = warp_sum_quarters(partial[0]);
  if (finishes && first_slot + my_row < slots) epilogue(my_pair, dot, my_filled, my_inputs);
}

// The row sum that a narrow dot kernel can finish with (table == nullptr: none):
// out[t] = sum over t's filled slots s, ascending, of coef[t][s] * table[ids[t][s]],
// with the coefficients the epilogue returns.
template <class T>
struct RowSum {
  const T* table = nullptr;
  T* out = nullptr;
};

constexpr int kSumRowsPerWarp = 4;

// The next kRows slots of the ballot `left`, ascending, taken out of it: slot[r] and
// has[r] true, or 0 and false past its last slot.
template <int kRows>
__device__ __forceinline__ void take_filled_slots(unsigned& left, bool (&has)[kRows],
                                                  int (&slot)[kRows]) {
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    has[r] = left != 0;
    slot[r] = has[r] ? __ffs(left) - 1 : 0;
    left &= left - 1;
  }
}

// out_row = sum over the slots in `filled` (the group's ballot; lane group_first + s
// holds slot s's id and coefficient), ascending, of coef * table[id]: the fmaf chain of
// accumulate_rows, so the bits of slot_sum_kernel. The group's lanes take the row's
// chunks as lane_partial_dots deals them. out_row is null where the group has no token.
template <class T, int kVec, int kStreams>
__device__ __forceinline__ void group_row_sum(const T* table, int32_t my_id, float my_coef,
                                              unsigned filled, int64_t dim, int group_lane,
                                              int group_first, T* out_row) {
  constexpr int kGroup = kWarp / kStreams;
  const int64_t chunks = dim / kVec;
  for (int64_t first_chunk = 0; first_chunk < chunks; first_chunk += kWarp) {
    bool active[kStreams];  // every lane shuffles, active or not
    int64_t at[kStreams];
#pragma unroll
    for (int s = 0; s < kStreams; ++s) {
      const int64_t chunk = first_chunk + s * kGroup + group_lane;
      active[s] = chunk < chunks;
      at[s] = chunk * kVec;
    }
    float acc[kStreams][kVec] = {};
    for (unsigned left = filled; __any_sync(0xffffffffu, left != 0);) {
      bool has[kSumRowsPerWarp];
      int slot[kSumRowsPerWarp];
      take_filled_slots(left, has, slot);
      float coef[kSumRowsPerWarp];
      Chunk<T, kVec> row[kSumRowsPerWarp][kStreams];
#pragma unroll
      for (int r = 0; r < kSumRowsPerWarp; ++r) {
        const int32_t id = __shfl_sync(0xffffffffu, my_id, group_first + slot[r]);
        coef[r] = __shfl_sync(0xffffffffu, my_coef, group_first + slot[r]);
#pragma unroll
        for (int s = 0; s < kStreams; ++s) {
          if (has[r] && active[s]) {
            row[r][s] = load_chunk<T, kVec, Cache::l2_only>(table_row(table, id, dim) + at[s]);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kSumRowsPerWarp; ++r) {
        if (!has[r]) continue;
#pragma unroll
        for (int s = 0; s < kStreams; ++s) {
#pragma unroll
          for (int k = 0; k < kVec; ++k) acc[s][k] = fmaf(coef[r], row[r][s][k], acc[s][k]);
        }
      }
    }
#pragma unroll
    for (int s = 0; s < kStreams; ++s) {
      if (active[s] && out_row != nullptr) store_floats<T, kVec>(out_row + at[s], acc[s]);
    }
  }
}

// Blocks an SM the narrow kernel is compiled for. Two tokens a warp keep twice the
// chunks in flight a lane: left alone the compiler takes 93 registers (5 blocks an SM);
// capped at 6 blocks (80) it spills nothing and the owner-of-4 forward runs 6-8% faster
// (flashmoe-bench on an H100).
template <int kTokens>
constexpr int kNarrowMinBlocks = kTokens == 2 ? 6 : 1;

// Rows of at most kWarp / kTokens slots: kTokens tokens a warp, a group of
// kWarp / kTokens lanes a token, lane s of a group holding slot s. The filled slots (a
// ballot) are gathered kDotRowsPerWarp at a time in ascending slot order, so a row whose
// slots are mostly empty (an owner's rows under expert parallelism) costs only its
// filled ones; with two tokens a warp (S <= 16) they also share the warp's fixed work
// (the ballot, the loop, the shuffles), and every lane has a slot's epilogue. The dots
// are those slot_dot_kernel computes, bit for bit. kSumRows: the group then makes the
// row sum of the same slots (slot_sum_kernel's outputs, bit for bit), which saves that
// kernel's staging of every token's slots.
template <class T, int kVec, class Epilogue, bool kSumRows, int kTokens>
__global__ void __launch_bounds__(kDotWarps* kWarp, kNarrowMinBlocks<kTokens>)
    slot_dot_narrow_kernel(const T* __restrict__ token_rows, const T* __restrict__ table,
                           const int32_t* __restrict__ ids, int64_t tokens, int64_t slots,
                           int64_t dim, Epilogue epilogue, RowSum<T> sum) {
  constexpr int kGroup = kWarp / kTokens;
  const int lane = threadIdx.x % kWarp;
  const int group_lane = lane % kGroup, group_first = lane - group_lane;
  const int64_t first_token = (int64_t(blockIdx.x) * kDotWarps + threadIdx.x / kWarp) * kTokens;
  if (first_token >= tokens) return;  // whole warps leave; the kernel has no block barrier
  const int64_t token = first_token + lane / kGroup;
  const bool has_token = token < tokens;
  const bool in_row = has_token && group_lane < slots;
  const int64_t my_pair = in_row ? token * slots + group_lane : 0;
  const int32_t my_id = in_row ? ids[my_pair] : -1;
  const typename Epilogue::Inputs my_inputs =
      in_row ? epilogue.load(my_pair) : typename Epilogue::Inputs{};
  const T* token_row = token_rows + (has_token ? token : first_token) * dim;
  const unsigned ballot = __ballot_sync(0xffffffffu, my_id >= 0);
  const unsigned filled_slots = (ballot >> group_first) & (~0u >> (kWarp - kGroup));
  float my_dot = 0.0f;
  for (unsigned left = filled_slots; __any_sync(0xffffffffu, left != 0);) {
    bool filled[kDotRowsPerWarp];
    int slot[kDotRowsPerWarp];
    take_filled_slots(left, filled, slot);
    const T* rows[kDotRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kDotRowsPerWarp; ++r) {
      const int32_t id = __shfl_sync(0xffffffffu, my_id, group_first + slot[r]);
      rows[r] = table_row(table, filled[r] ? id : 0, dim);
    }
    float partial[kTokens][kDotRowsPerWarp] = {};
    lane_partial_dots<T, kVec>(token_row, rows, filled, int(dim / kVec), group_lane, partial);
    float lane_sum[kDotRowsPerWarp];
    add_streams(partial, lane_sum);
    // The group's r-th quarter of lanes holds row r's dot; the lane of its slot takes it.
    const float dot = warp_sum_quarters<kGroup>(lane_sum);
    int from = group_first;
    bool takes = false;
#pragma unroll
    for (int r = 0; r < kDotRowsPerWarp; ++r) {
      if (filled[r] && group_lane == slot[r]) {
        from = group_first + r * (kGroup / kDotRowsPerWarp);
        takes = true;
      }
    }
    const float taken = __shfl_sync(0xffffffffu, dot, from);
    if (takes) my_dot = taken;
  }
  const float my_coef = in_row ? epilogue(my_pair, my_dot, my_id >= 0, my_inputs) : 0.0f;
  if constexpr (kSumRows) {
    group_row_sum<T, kVec, kTokens>(sum.table, my_id, my_coef, filled_slots, dim, group_lane,
                                    group_first, has_token ? sum.out + token * dim : nullptr);
  }
}

// ---------------------------------------------------------------------------------
// Weighted row sums: out = sum_i coef[i] * rows[offset[i]], i ascending.

constexpr int kRowsInFlight = 8;

// Adds coef[i] * column[offset[i] + 0..kVec) for i in [0, n), in ascending i, with
// kRowsInFlight loads issued before their sums.
template <class T, int kVec>
__device__ __forceinline__ void accumulate_rows(const T* column, const int64_t* offset,
                                                const float* coef, int n, float (&acc)[kVec]) {
  int i = 0;
  for (; i + kRowsInFlight <= n; i += kRowsInFlight) {
    float rows[kRowsInFlight][kVec];
#pragma unroll
    for (int r = 0; r < kRowsInFlight; ++r) {
      load_floats<T, kVec, Cache::l2_only>(column + offset[i + r], rows[r]);
    }
#pragma unroll
    for (int r = 0; r < kRowsInFlight; ++r) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) acc[k] = fmaf(coef[i + r], rows[r][k], acc[k]);
    }
  }
  for (; i < n; ++i) {
    float row[kVec];
    load_floats<T, kVec, Cache::l2_only>(column + offset[i], row);
#pragma unroll
    for (int k = 0; k < kVec; ++k) acc[k] = fmaf(coef[i], row[k], acc[k]);
  }
}

constexpr int kSlotTile = 256;

// out[t] = sum_s coef[t][s] * table[ids[t][s]] for token t = blockIdx.x, s ascending
// over the filled slots (y in the forward pass, dx in the backward pass). Thread j
// owns chunks j, j + blockDim, ... of the row; the first warp stages the row offsets
// and coefficients of the tile's filled slots (ascending, by ballot) in shared memory,
// kSlotTile slots at a time, so empty slots cost no gather.
template <class T, int kVec>
__global__ void slot_sum_kernel(const T* __restrict__ table, const int32_t* __restrict__ ids,
                                const float* __restrict__ coef, int64_t slots, int64_t dim,
                                T* __restrict__ out) {
  __shared__ int64_t tile_offset[kSlotTile];
  __shared__ float tile_coef[kSlotTile];
  __shared__ int tile_filled;
  const int64_t token = blockIdx.x;
  const int64_t chunks = dim / kVec;
  for (int64_t first_chunk = 0; first_chunk < chunks; first_chunk += blockDim.x) {
    const int64_t at = (first_chunk + threadIdx.x) * kVec;
    const bool active = first_chunk + threadIdx.x < chunks;
    float acc[kVec] = {};
    for (int64_t first_slot = 0; first_slot < slots; first_slot += kSlotTile) {
      const int n = int(min(int64_t(kSlotTile), slots - first_slot));
      __syncthreads();            // the previous tile is consumed
      if (threadIdx.x < kWarp) {  // blockDim.x is a whole number of warps
        const int lane = int(threadIdx.x);
        int count = 0;
        for (int base = 0; base < n; base += kWarp) {
          const int64_t pair = token * slots + first_slot + base + lane;
          const int32_t id = base + lane < n ? ids[pair] : -1;
          const unsigned filled = __ballot_sync(0xffffffffu, id >= 0);
          if (id >= 0) {
            const int at_tile = count + __popc(filled & ((1u << lane) - 1u));
            tile_offset[at_tile] = int64_t(id) * dim;
            tile_coef[at_tile] = coef[pair];
          }
          count += __popc(filled);
        }
        if (lane == 0) tile_filled = count;
      }
      __syncthreads();
      if (active) accumulate_rows<T, kVec>(table + at, tile_offset, tile_coef, tile_filled, acc);
    }
    if (active) store_floats<T, kVec>(out + token * dim + at, acc);
  }
}

// ---------------------------------------------------------------------------------
// Expert gradients. Output row r (an expert) owns the (token, slot) pairs
// sorted_pairs[row_begin[r] .. row_begin[r + 1]) in ascending pair order:
//   d_down[r] = sum dh[pair] * x[token],  d_up[r] = sum a[pair] * dy[token].
// Each row's range is cut into segments of at most kSegmentPairs pairs, so that a
// row with many pairs is summed by many blocks; a row without pairs is one empty
// segment (written zero). The segments of all rows are numbered in row order.

constexpr int kSegmentPairs = 64;

// One row's split, and (after an exclusive scan in row order) the totals over the
// rows before it: the first segment, partial row and split row of row r.
struct SegmentCounts {
  int32_t segments;    // max(1, ceil(pairs / kSegmentPairs))
  int32_t partials;    // partial rows written to scratch: segments if > 1, else 0
  int32_t split_rows;  // 1 if the row has more than one segment
};

struct AddSegmentCounts {
  __host__ __device__ SegmentCounts operator()(const SegmentCounts& a,
                                               const SegmentCounts& b) const {
    return {a.segments + b.segments, a.partials + b.partials, a.split_rows + b.split_rows};
  }
};

// counts[r] for r < out_rows; counts[out_rows] = 0, so that the exclusive scan over
// out_rows + 1 entries ends with the totals.
__global__ void segment_counts_kernel(const int32_t* __restrict__ row_begin, int64_t out_rows,
                                      SegmentCounts* __restrict__ counts) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row > out_rows) return;
  SegmentCounts c{0, 0, 0};
  if (row < out_rows) {
    const int32_t n = row_begin[row + 1] - row_begin[row];
    c.segments = max(1, n / kSegmentPairs + (n % kSegmentPairs != 0));
    c.split_rows = c.segments > 1;
    c.partials = c.split_rows ? c.segments : 0;
  }
  counts[row] = c;
}

// The rows of the segments and of the split rows, from the scanned counts: row r
// numbers segments [offsets[r].segments, offsets[r + 1].segments) and, if split, split
// row offsets[r].split_rows. Read once by the kernels below instead of a search.
__global__ void segment_rows_kernel(const SegmentCounts* __restrict__ offsets, int64_t out_rows,
                                    int32_t* __restrict__ segment_row,
                                    int32_t* __restrict__ split_row) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= out_rows) return;
  const SegmentCounts first = offsets[row], next = offsets[row + 1];
  for (int32_t k = first.segments; k < next.segments; ++k) segment_row[k] = int32_t(row);
  if (next.split_rows != first.split_rows) split_row[first.split_rows] = int32_t(row);
}

// Phase 1: block b sums segment b (the grid is sized for the most segments the shapes
// allow; blocks past the last segment leave). A row of one segment gets its gradient
// written directly; segment k of a split row writes partial row
// offsets[r].partials + k of partial_down / partial_up. Thread j owns column chunks j,
// j + blockDim, ...; the segment's token offsets and coefficients are staged in
// shared memory once.
template <class T, int kVec>
__global__ void segment_grad_kernel(
    const int32_t* __restrict__ row_begin, const SegmentCounts* __restrict__ offsets,
    const int32_t* __restrict__ segment_row, int64_t out_rows,
    const int32_t* __restrict__ sorted_pairs, const float* __restrict__ pair_dh,
    const float* __restrict__ pair_a, const T* __restrict__ x, const T* __restrict__ dy,
    int64_t slots, int64_t dim, float* __restrict__ d_down, float* __restrict__ d_up,
    float* __restrict__ partial_down, float* __restrict__ partial_up) {
  __shared__ int64_t tile_offset[kSegmentPairs];
  __shared__ float tile_dh[kSegmentPairs];
  __shared__ float tile_a[kSegmentPairs];
  const int32_t segment = int32_t(blockIdx.x);
  const int32_t segments = offsets[out_rows].segments;
  if (segment >= segments) return;  // the whole block leaves
  const int64_t row = segment_row[segment];
  const int32_t index = segment - offsets[row].segments;
  const int32_t first = row_begin[row] + index * kSegmentPairs;
  const int n = min(kSegmentPairs, row_begin[row + 1] - first);  // 0 for an empty row
  const bool split = offsets[row + 1].split_rows != offsets[row].split_rows;
  const int64_t out_row = split ? int64_t(offsets[row].partials) + index : row;
  float* out_down = (split ? partial_down : d_down) + out_row * dim;
  float* out_up = (split ? partial_up : d_up) + out_row * dim;

  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int32_t pair = sorted_pairs[first + i];
    tile_offset[i] = int64_t(pair / slots) * dim;
    tile_dh[i] = pair_dh[pair];
    tile_a[i] = pair_a[pair];
  }
  __syncthreads();
  const int64_t chunks = dim / kVec;
  for (int64_t chunk = threadIdx.x; chunk < chunks; chunk += blockDim.x) {
    const int64_t at = chunk * kVec;
    float acc_down[kVec] = {};
    float acc_up[kVec] = {};
    accumulate_rows<T, kVec>(x + at, tile_offset, tile_dh, n, acc_down);
    accumulate_rows<T, kVec>(dy + at, tile_offset, tile_a, n, acc_up);
    store_fp32<kVec>(out_down + at, acc_down, !split);
    store_fp32<kVec>(out_up + at, acc_up, !split);
  }
}

// Sum of column[k * dim] for k in [lo, hi), ascending, kRowsInFlight loads issued
// before their sums.
__device__ __forceinline__ float sum_column(const float* column, int64_t dim, int32_t lo,
                                            int32_t hi) {
  float sum = 0.0f;
  int32_t k = lo;
  for (; k + kRowsInFlight <= hi; k += kRowsInFlight) {
    float v[kRowsInFlight];
#pragma unroll
    for (int r = 0; r < kRowsInFlight; ++r) v[r] = __ldcg(column + int64_t(k + r) * dim);
#pragma unroll
    for (int r = 0; r < kRowsInFlight; ++r) sum += v[r];
  }
  for (; k < hi; ++k) sum += __ldcg(column + int64_t(k) * dim);
  return sum;
}

constexpr int kSumSplits = 8;

// Phase 2: the gradient rows of the split rows from their partial rows. Block
// (kWarp, kSumSplits) threads, grid-stride over items (m-th split row, tile of kWarp
// columns). The row's P partial rows are cut into kSumSplits contiguous ranges
// [P j / kSumSplits, P (j + 1) / kSumSplits); thread (c, j) sums range j of column c
// in ascending order, then thread (c, 0) adds the kSumSplits sums in ascending j.
// The order depends on P alone.
__global__ void __launch_bounds__(kWarp* kSumSplits)
    sum_partials_kernel(const SegmentCounts* __restrict__ offsets,
                        const int32_t* __restrict__ split_row, int64_t out_rows,
                        const float* __restrict__ partial_down,
                        const float* __restrict__ partial_up, int64_t dim,
                        float* __restrict__ d_down, float* __restrict__ d_up) {
  __shared__ float split_down[kSumSplits][kWarp];
  __shared__ float split_up[kSumSplits][kWarp];
  const int64_t tiles = (dim + kWarp - 1) / kWarp;
  const int64_t items = int64_t(offsets[out_rows].split_rows) * tiles;
  const int lane = threadIdx.x, split = threadIdx.y;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int32_t m = int32_t(item / tiles);
    const int64_t column = item % tiles * kWarp + lane;
    const int64_t row = split_row[m];
    const int32_t first = offsets[row].partials;
    const int64_t count = offsets[row + 1].partials - first;
    const int32_t lo = first + int32_t(count * split / kSumSplits);
    const int32_t hi = first + int32_t(count * (split + 1) / kSumSplits);
    const bool active = column < dim;
    split_down[split][lane] = active ? sum_column(partial_down + column, dim, lo, hi) : 0.0f;
    split_up[split][lane] = active ? sum_column(partial_up + column, dim, lo, hi) : 0.0f;
    __syncthreads();
    if (split == 0 && active) {
      float down = split_down[0][lane], up = split_up[0][lane];
#pragma unroll
      for (int j = 1; j < kSumSplits; ++j) {
        down += split_down[j][lane];
        up += split_up[j][lane];
      }
      __stcs(d_down + row * dim + column, down);
      __stcs(d_up + row * dim + column, up);
    }
    __syncthreads();  // the sums are consumed before the next item overwrites them
  }
}

// ---------------------------------------------------------------------------------
// Small kernels: id validation, grouping of pairs by expert.

// first_bad = the smallest position whose id is >= experts (ids < 0 are empty slots;
// integer atomicMin: the result does not depend on the order).
__global__ void find_bad_id_kernel(const int32_t* __restrict__ ids, int64_t count, int64_t experts,
                                   unsigned long long* first_bad) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count && ids[i] >= experts) atomicMin(first_bad, (unsigned long long)i);
}

__global__ void iota_kernel(int32_t* __restrict__ values, int32_t count) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) values[i] = int32_t(i);
}

// The sorted pair experts: the keys of the radix sort, the ids as uint32. An empty
// slot's key (0xFFFFFFFF) sorts after every expert, since the sort covers enough low
// bits to tell E - 1 from 2^bits - 1.

// The first position whose sorted expert is >= expert (lower bound).
__device__ __forceinline__ int32_t first_position(const uint32_t* __restrict__ sorted_experts,
                                                  int32_t pairs, int64_t expert) {
  int32_t lo = 0, hi = pairs;
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo) / 2;
    if (int64_t(sorted_experts[mid]) < expert) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Dense layout: row_begin[e] = first position of expert e among the sorted pair
// experts, for e in [0, experts]; rows of untouched experts are empty, and the empty
// slots (after row_begin[experts]) belong to no row.
__global__ void dense_row_begin_kernel(const uint32_t* __restrict__ sorted_experts, int32_t pairs,
                                       int64_t experts, int32_t* __restrict__ row_begin) {
  const int64_t expert = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (expert > experts) return;
  row_begin[expert] = first_position(sorted_experts, pairs, expert);
}

// Row-sparse layout, step 1: is_run_start[i] = 1 where a new expert starts in the
// sorted order, for i < pairs (empty slots start no run); is_run_start[pairs] = 0, so
// that the exclusive scan over pairs + 1 entries ends with the number of runs.
__global__ void mark_run_starts_kernel(const uint32_t* __restrict__ sorted_experts, int32_t pairs,
                                       int64_t experts, int32_t* __restrict__ is_run_start) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i > pairs) return;
  is_run_start[i] = i < pairs && int64_t(sorted_experts[i]) < experts &&
                    (i == 0 || sorted_experts[i] != sorted_experts[i - 1]);
}

// Row-sparse layout, step 2 (after run_index = exclusive scan of is_run_start): run r
// becomes output row r, rows[r] = its expert and row_begin[r] = its first position;
// rows past the last run get rows = -1 and an empty range at the end of the filled
// slots (row_begin = first position of an empty slot, or pairs).
// Thread i handles position i (i < pairs) and output row i (i <= out_rows).
__global__ void sparse_rows_kernel(const uint32_t* __restrict__ sorted_experts,
                                   const int32_t* __restrict__ is_run_start,
                                   const int32_t* __restrict__ run_index, int32_t pairs,
                                   int64_t experts, int64_t out_rows, int32_t* __restrict__ rows,
                                   int32_t* __restrict__ row_begin) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < pairs && is_run_start[i]) {
    rows[run_index[i]] = int32_t(sorted_experts[i]);
    row_begin[run_index[i]] = int32_t(i);
  }
  if (i <= out_rows && i >= run_index[pairs]) {
    row_begin[i] = first_position(sorted_experts, pairs, experts);
    if (i < out_rows) rows[i] = -1;
  }
}

}  // namespace flashmoe::detail::experts_gpu
