// The CUDA experts against the CPU backend (the same public functions on host
// copies of the tensors), on fresh random inputs over many shapes and id skews; bitwise
// repeatability; bad input. DISABLED_ExpertsGpuTiming prints timings of the
// benchmark shapes (run it with --gtest_also_run_disabled_tests).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "core/philox.h"
#include "core/stream.h"
#include "core/tensor.h"
#include "kernels/experts.h"
#include "tests/test_util.h"

namespace flashmoe {
namespace {

using test::bytes_of;
using test::error_of;
using test::poisoned;
using test::relative_error;

template <class T>
__global__ void fill_uniform_kernel(T* out, int64_t n, uint64_t seed, float lo, float hi) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float v = philox_uniform(seed, 0, uint64_t(i), lo, hi);
  if constexpr (std::is_same_v<T, float>) {
    out[i] = v;
  } else {
    out[i] = to_bf16(v);
  }
}

// A device tensor of uniform values in [lo, hi), drawn on the GPU (fast for the
// billion-element tables of the timing shapes).
Tensor random_tensor(const Shape& shape, DType dtype, uint64_t seed, float lo, float hi) {
  Tensor t = Tensor::empty(shape, dtype, Device::cuda);
  const int64_t n = t.numel();
  if (n == 0) return t;
  const unsigned blocks = static_cast<unsigned>((n + 255) / 256);
  if (dtype == DType::f32) {
    fill_uniform_kernel<<<blocks, 256, 0, current_stream()>>>(t.data<float>(), n, seed, lo, hi);
  } else {
    fill_uniform_kernel<<<blocks, 256, 0, current_stream()>>>(t.data<bf16>(), n, seed, lo, hi);
  }
  CUDA_CHECK_LAUNCH("fill_uniform_kernel");
  return t;
}

// A share `hot_share` of the ids drawn from `hot` distinct experts picked at random,
// the rest uniform over all experts; then a share `empty_share` of the slots emptied
// (id -1), as expert parallelism pads them.
struct IdPattern {
  const char* name;  // suffix of the test name
  int64_t hot;
  double hot_share;
  double empty_share = 0.0;
};
constexpr IdPattern rep{"", 8, 0.5};  // repeats within and across tokens
constexpr IdPattern skew{"_skewed", 3, 1.0};
constexpr IdPattern heavy{"_heavy", 4, 0.9};    // a few experts with thousands of pairs
constexpr IdPattern single{"_single", 1, 1.0};  // every pair on one expert
constexpr IdPattern uniform{"_uniform", 0, 0.0};
constexpr IdPattern padded{"_padded", 8, 0.5, 0.75};  // an owner's rows on one of 4 ranks
constexpr IdPattern empty{"_empty", 0, 0.0, 1.0};     // no filled slot at all

Tensor random_ids(int64_t tokens, int64_t slots, int64_t experts, IdPattern pattern,
                  uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> any(0, static_cast<int32_t>(experts - 1));
  std::vector<int32_t> hot;
  while (static_cast<int64_t>(hot.size()) < std::min(pattern.hot, experts)) {
    const int32_t e = any(rng);
    if (std::find(hot.begin(), hot.end(), e) == hot.end()) hot.push_back(e);
  }
  std::uniform_int_distribution<size_t> pick(0, hot.empty() ? 0 : hot.size() - 1);
  std::bernoulli_distribution is_hot(hot.empty() ? 0.0 : pattern.hot_share);
  std::vector<int32_t> ids(tokens * slots);
  std::bernoulli_distribution is_empty(pattern.empty_share);
  for (int32_t& id : ids) {
    id = is_hot(rng) ? hot[pick(rng)] : any(rng);
    if (is_empty(rng)) id = -1;
  }
  return Tensor::from_vector(ids, {tokens, slots}, Device::cuda);
}

ExpertInputs random_inputs(int64_t T, int64_t D, int64_t E, int64_t S, DType dtype, Activation act,
                           IdPattern pattern, uint64_t seed) {
  const float scale = std::sqrt(3.0f / static_cast<float>(D));  // keeps h of order 1
  ExpertInputs in;
  in.x = random_tensor({T, D}, dtype, seed + 1, -1.0f, 1.0f);
  in.down_embed = random_tensor({E, D}, dtype, seed + 2, -2 * scale, 2 * scale);
  in.up_embed = random_tensor({E, D}, dtype, seed + 3, -scale, scale);
  in.ids = random_ids(T, S, E, pattern, static_cast<uint32_t>(seed));
  in.gates = random_tensor({T, S}, DType::f32, seed + 4, 0.0f, 1.0f);
  in.act = act;
  return in;
}

ExpertInputs to_host(const ExpertInputs& in) {
  ExpertInputs host = in;
  host.x = in.x.to(Device::cpu);
  host.down_embed = in.down_embed.to(Device::cpu);
  host.up_embed = in.up_embed.to(Device::cpu);
  host.ids = in.ids.to(Device::cpu);
  host.gates = in.gates.to(Device::cpu);
  return host;
}

ExpertGrads poisoned_grads(const ExpertInputs& in, GradLayout layout) {
  const int64_t D = in.x.size(1), E = in.down_embed.size(0);
  const int64_t rows = layout == GradLayout::dense ? E : std::min(E, in.ids.numel());
  ExpertGrads g;
  g.dx = poisoned(in.x.shape(), in.x.dtype());
  g.dgates = poisoned(in.ids.shape(), DType::f32);
  g.d_down = poisoned({rows, D}, DType::f32);
  g.d_up = poisoned({rows, D}, DType::f32);
  g.slot_dh = poisoned(in.ids.shape(), DType::f32);
  g.slot_a = poisoned(in.ids.shape(), DType::f32);
  if (layout == GradLayout::row_sparse) g.rows = poisoned({rows}, DType::i32, 0x7F);
  return g;
}

struct Case {
  int64_t T, D, E, S;
  DType dtype;
  Activation act;
  IdPattern ids;
};

std::string case_name(const testing::TestParamInfo<Case>& info) {
  const Case& c = info.param;
  const char* acts[] = {"silu", "gelu", "relu"};
  return "T" + std::to_string(c.T) + "_D" + std::to_string(c.D) + "_E" + std::to_string(c.E) +
         "_S" + std::to_string(c.S) + "_" + dtype_name(c.dtype) + "_" +
         acts[static_cast<int>(c.act)] + c.ids.name;
}

class ExpertsGpuMatchesCpu : public testing::TestWithParam<Case> {};

// Every output of forward and backward (dense and row-sparse) against the CPU backend.
// Outputs rounded to bf16 get 1e-2; fp32 outputs (h, dgates, table gradients) 1e-5,
// since the CPU backend widens the same bf16 inputs to float.
TEST_P(ExpertsGpuMatchesCpu, EveryOutput) {
  FLASHMOE_REQUIRE_GPU();
  const Case c = GetParam();
  const ExpertInputs gpu =
      random_inputs(c.T, c.D, c.E, c.S, c.dtype, c.act, c.ids, 1000 * c.T + 7 * c.D + c.S);
  const ExpertInputs cpu = to_host(gpu);
  const double rounded_tol = c.dtype == DType::bf16 ? 1e-2 : 1e-5;
  const double fp32_tol = 1e-5;

  Tensor y = poisoned({c.T, c.D}, c.dtype), h = poisoned({c.T, c.S}, DType::f32);
  experts_forward(gpu, y, h);
  Tensor y_ref, h_ref;
  experts_forward(cpu, y_ref, h_ref);
  EXPECT_LT(relative_error(y, y_ref), rounded_tol);
  EXPECT_LT(relative_error(h, h_ref), fp32_tol);

  // Both backends get the GPU's h, so that they differ by the backward pass alone.
  const Tensor h_host = h.to(Device::cpu);
  const Tensor dy = random_tensor({c.T, c.D}, c.dtype, 99 + c.T, -1.0f, 1.0f);
  const Tensor dy_host = dy.to(Device::cpu);
  for (GradLayout layout : {GradLayout::dense, GradLayout::row_sparse}) {
    SCOPED_TRACE(layout == GradLayout::dense ? "dense" : "row_sparse");
    ExpertGrads grads = poisoned_grads(gpu, layout);
    experts_backward(gpu, h, dy, layout, grads);
    ExpertGrads ref;
    experts_backward(cpu, h_host, dy_host, layout, ref);
    EXPECT_LT(relative_error(grads.dx, ref.dx), rounded_tol);
    EXPECT_LT(relative_error(grads.dgates, ref.dgates), fp32_tol);
    EXPECT_LT(relative_error(grads.d_down, ref.d_down), fp32_tol);
    EXPECT_LT(relative_error(grads.d_up, ref.d_up), fp32_tol);
    if (layout == GradLayout::row_sparse) {
      EXPECT_EQ(grads.rows.to_vector<int32_t>(), ref.rows.to_vector<int32_t>());
    }
  }
}

constexpr DType f32 = DType::f32, bf = DType::bf16;
constexpr Activation silu = Activation::silu, gelu = Activation::gelu, relu = Activation::relu;

INSTANTIATE_TEST_SUITE_P(
    ExpertsGpu, ExpertsGpuMatchesCpu,
    testing::Values(
        Case{1, 64, 64, 1, f32, silu, rep}, Case{7, 64, 64, 8, f32, gelu, rep},
        Case{333, 768, 4096, 16, f32, silu, rep}, Case{1000, 1024, 16384, 64, f32, silu, rep},
        Case{7, 100, 4096, 512, f32, relu, rep},  // odd D: element-wise rows
        Case{333, 100, 102400, 8, f32, gelu, rep}, Case{1000, 64, 102400, 64, f32, silu, rep},
        Case{1, 1024, 64, 512, f32, silu, rep},  // S > E: repeats in a token
        Case{333, 1, 64, 16, f32, silu, rep}, Case{1000, 768, 16384, 1, f32, relu, rep},
        Case{1000, 1000, 4096, 8, f32, gelu, rep}, Case{1, 64, 64, 1, bf, silu, rep},
        Case{7, 768, 16384, 512, bf, gelu, rep}, Case{333, 1024, 16384, 64, bf, silu, rep},
        Case{1000, 1024, 4096, 16, bf, silu, rep}, Case{1000, 64, 102400, 64, bf, relu, rep},
        Case{333, 100, 4096, 8, bf, silu, rep}, Case{7, 1024, 4096, 512, bf, silu, rep},
        Case{1000, 1000, 64, 16, bf, gelu, rep}, Case{1000, 100, 16384, 64, bf, silu, rep},
        Case{1000, 1024, 16384, 64, bf, silu, skew}, Case{333, 64, 102400, 16, f32, silu, skew},
        Case{333, 768, 4096, 512, bf, relu, skew},
        // 90% of the pairs on 4 experts (thousands each, split into many segments), and
        // every pair on one expert; dense and row-sparse, against the CPU.
        Case{300, 64, 256, 16, f32, silu, heavy}, Case{1000, 768, 4096, 16, bf, silu, heavy},
        Case{1000, 100, 4096, 16, f32, gelu, heavy}, Case{1000, 64, 102400, 64, f32, relu, heavy},
        Case{1000, 64, 102400, 16, f32, silu, single}, Case{333, 1024, 16384, 64, bf, silu, single},
        Case{1000, 100, 64, 16, bf, gelu, single},
        // Empty slots (id -1): skipped by every kernel, in no output row.
        Case{333, 768, 4096, 16, f32, silu, padded}, Case{1000, 1024, 16384, 64, bf, silu, padded},
        Case{7, 100, 4096, 512, f32, relu, padded}, Case{1000, 64, 102400, 16, f32, gelu, padded},
        Case{300, 64, 256, 16, f32, silu, IdPattern{"_heavy_padded", 4, 0.9, 0.5}},
        Case{333, 64, 4096, 16, f32, silu, empty}, Case{7, 1024, 64, 8, bf, silu, empty},
        // Odd S on the narrow kernel (a warp a token), and an owner of 4's rows at the
        // smoke model's shape (three quarters of the slots empty).
        Case{333, 100, 4096, 5, bf, silu, padded}, Case{1001, 64, 4096, 31, f32, gelu, rep},
        Case{1001, 256, 16384, 16, bf, silu, padded}),
    case_name);

// Two runs on the same inputs give the same bytes in every output.
TEST(ExpertsGpu, BitwiseRepeatable) {
  FLASHMOE_REQUIRE_GPU();
  // S = 64: a block per (token, 16 slots); S = 32: a warp per token, S = 16: two tokens
  // a warp, row sums fused.
  for (const int64_t S : {64, 32, 16})
    for (IdPattern pattern : {rep, skew, heavy, single, padded}) {
      SCOPED_TRACE(std::string("S ") + std::to_string(S) + " ids" + pattern.name);
      const ExpertInputs in =
          random_inputs(1000, 1024, 4096, S, DType::bf16, Activation::silu, pattern, 42);
      const Tensor dy = random_tensor({1000, 1024}, DType::bf16, 43, -1.0f, 1.0f);
      std::vector<std::vector<uint8_t>> first;
      for (int run = 0; run < 2; ++run) {
        Tensor y = poisoned({1000, 1024}, DType::bf16), h = poisoned({1000, S}, DType::f32);
        experts_forward(in, y, h);
        ExpertGrads dense = poisoned_grads(in, GradLayout::dense);
        experts_backward(in, h, dy, GradLayout::dense, dense);
        ExpertGrads sparse = poisoned_grads(in, GradLayout::row_sparse);
        experts_backward(in, h, dy, GradLayout::row_sparse, sparse);
        const std::vector<const Tensor*> outputs = {
            &y,          &h,           &dense.dx,      &dense.dgates, &dense.d_down,
            &dense.d_up, &sparse.rows, &sparse.d_down, &sparse.d_up};
        for (size_t i = 0; i < outputs.size(); ++i) {
          if (run == 0) {
            first.push_back(bytes_of(*outputs[i]));
          } else {
            EXPECT_TRUE(bytes_of(*outputs[i]) == first[i]) << "output " << i << " changed";
          }
        }
      }
    }
}

// y, h and the rows phase's outputs of `in` (each poisoned first), for dy.
struct RowsPhaseOutputs {
  Tensor y, h;
  ExpertGrads grads;
  // The bytes of y, h, dx, dgates, slot_dh and slot_a.
  std::vector<std::vector<uint8_t>> bytes() const {
    std::vector<std::vector<uint8_t>> all;
    for (const Tensor* t : {&y, &h, &grads.dx, &grads.dgates, &grads.slot_dh, &grads.slot_a}) {
      all.push_back(bytes_of(*t));
    }
    return all;
  }
};

RowsPhaseOutputs forward_and_rows_phase(const ExpertInputs& in, const Tensor& dy) {
  const int64_t T = in.x.size(0), D = in.x.size(1), S = in.ids.size(1);
  RowsPhaseOutputs out{poisoned({T, D}, in.x.dtype()), poisoned({T, S}, DType::f32),
                       poisoned_grads(in, GradLayout::row_sparse)};
  experts_forward(in, out.y, out.h);
  experts_backward_rows(in, out.h, dy, out.grads);
  return out;
}

// Rows of at most 32 slots get their row sums (y, dx) in the dot kernel when both
// tables fit in half the L2, else from separate passes: the same bytes either way. The
// small tables here are the first rows of large ones, and the ids stay in them.
TEST(ExpertsGpu, FusedRowSumsMatchSeparatePasses) {
  FLASHMOE_REQUIRE_GPU();
  const int64_t T = 1001, D = 256, small_E = 1024, large_E = 262144;  // 256 MB a table
  for (const auto& [S, dtype] : {std::pair{int64_t{16}, DType::bf16},
                                 {int64_t{5}, DType::f32},
                                 {int64_t{32}, DType::bf16}}) {
    SCOPED_TRACE("S " + std::to_string(S));
    ExpertInputs large = random_inputs(T, D, large_E, S, dtype, Activation::silu, uniform, 91 + S);
    large.ids = random_ids(T, S, small_E, padded, 92);
    ExpertInputs small = large;
    small.down_embed = large.down_embed.rows(0, small_E);
    small.up_embed = large.up_embed.rows(0, small_E);
    const Tensor dy = random_tensor({T, D}, dtype, 93, -1.0f, 1.0f);
    const auto fused = forward_and_rows_phase(small, dy).bytes();
    const auto separate = forward_and_rows_phase(large, dy).bytes();
    for (size_t i = 0; i < fused.size(); ++i) {
      EXPECT_TRUE(fused[i] == separate[i]) << "output " << i << " differs";
    }
  }
}

// Rows of at most 32 slots (the narrow kernel: a warp a token, or two tokens a warp at
// S <= 16) and the same rows with empty slots after them up to 40 (the wide kernel, a
// block a token): the same bits in h, y, dgates and dx, since every kernel sums a dot's
// lanes in the same tree. The shapes cover 16-byte and element-wise chunks, rows shorter
// than a group of lanes and rows of several chunks a lane, and an odd T (a warp's second
// token missing).
TEST(ExpertsGpu, NarrowAndWideKernelsAgree) {
  FLASHMOE_REQUIRE_GPU();
  const int64_t T = 333, E = 4096, wide_S = 40;
  struct Shape3 {
    int64_t S, D;
    DType dtype;
  };
  for (const Shape3 c :
       {Shape3{32, 256, DType::bf16}, Shape3{16, 256, DType::bf16}, Shape3{13, 1000, DType::f32},
        Shape3{7, 100, DType::bf16}, Shape3{16, 24, DType::f32}, Shape3{1, 1024, DType::bf16}}) {
    SCOPED_TRACE("S " + std::to_string(c.S) + ", D " + std::to_string(c.D));
    const ExpertInputs narrow =
        random_inputs(T, c.D, E, c.S, c.dtype, Activation::gelu, padded, 95 + c.S);
    const std::vector<int32_t> narrow_ids = narrow.ids.to_vector<int32_t>();
    const std::vector<float> narrow_gates = narrow.gates.to_vector<float>();
    std::vector<int32_t> wide_ids(T * wide_S, -1);
    std::vector<float> wide_gates(T * wide_S, 0.0f);
    for (int64_t t = 0; t < T; ++t) {
      std::copy_n(narrow_ids.begin() + t * c.S, c.S, wide_ids.begin() + t * wide_S);
      std::copy_n(narrow_gates.begin() + t * c.S, c.S, wide_gates.begin() + t * wide_S);
    }
    ExpertInputs wide = narrow;
    wide.ids = Tensor::from_vector(wide_ids, {T, wide_S}, Device::cuda);
    wide.gates = Tensor::from_vector(wide_gates, {T, wide_S}, Device::cuda);
    const Tensor dy = random_tensor({T, c.D}, c.dtype, 96, -1.0f, 1.0f);
    // [T, S] fp32 -> its first c.S columns.
    const auto first_slots = [&](const Tensor& t) {
      const std::vector<float> all = t.to_vector<float>();
      const int64_t S = t.size(1);
      std::vector<float> first(T * c.S);
      for (int64_t row = 0; row < T; ++row) {
        std::copy_n(all.begin() + row * S, c.S, first.begin() + row * c.S);
      }
      return first;
    };
    std::vector<float> h_of[2], dgates_of[2];
    std::vector<uint8_t> y_of[2], dx_of[2];
    for (int run = 0; run < 2; ++run) {
      const RowsPhaseOutputs out = forward_and_rows_phase(run == 0 ? narrow : wide, dy);
      h_of[run] = first_slots(out.h);
      dgates_of[run] = first_slots(out.grads.dgates);
      y_of[run] = bytes_of(out.y);
      dx_of[run] = bytes_of(out.grads.dx);
    }
    EXPECT_EQ(0, std::memcmp(h_of[0].data(), h_of[1].data(), h_of[0].size() * sizeof(float)));
    EXPECT_EQ(0, std::memcmp(dgates_of[0].data(), dgates_of[1].data(),
                             dgates_of[0].size() * sizeof(float)));
    EXPECT_TRUE(y_of[0] == y_of[1]);
    EXPECT_TRUE(dx_of[0] == dx_of[1]);
  }
}

// The forward and the backward's rows phase over token ranges, as separate calls in any
// order (expert parallelism computes its own tokens first), then the tables phase, give
// the bytes of one call over every token.
TEST(ExpertsGpu, TokenRangesMatchOneCall) {
  FLASHMOE_REQUIRE_GPU();
  struct Shape4 {
    int64_t T, D, E, S;
    DType dtype;
  };
  for (const Shape4 c :
       {Shape4{1001, 768, 4096, 16, DType::bf16}, Shape4{333, 100, 16384, 64, DType::f32}}) {
    for (IdPattern pattern : {rep, heavy, padded}) {
      SCOPED_TRACE("T" + std::to_string(c.T) + " ids" + pattern.name);
      const ExpertInputs in =
          random_inputs(c.T, c.D, c.E, c.S, c.dtype, Activation::silu, pattern, 77 + c.T);
      const Tensor dy = random_tensor({c.T, c.D}, c.dtype, 78 + c.T, -1.0f, 1.0f);
      const std::pair<int64_t, int64_t> ranges[] = {
          {c.T / 3, 2 * c.T / 3 + 1}, {2 * c.T / 3 + 1, c.T}, {0, c.T / 3}};
      Tensor y = poisoned({c.T, c.D}, c.dtype), h = poisoned({c.T, c.S}, DType::f32);
      experts_forward(in, y, h);
      Tensor y_parts = poisoned({c.T, c.D}, c.dtype), h_parts = poisoned({c.T, c.S}, DType::f32);
      for (const auto& [begin, end] : ranges) {
        Tensor y_part = y_parts.rows(begin, end), h_part = h_parts.rows(begin, end);
        experts_forward(in.tokens(begin, end), y_part, h_part);
      }
      EXPECT_TRUE(bytes_of(y_parts) == bytes_of(y));
      EXPECT_TRUE(bytes_of(h_parts) == bytes_of(h));
      for (GradLayout layout : {GradLayout::dense, GradLayout::row_sparse}) {
        SCOPED_TRACE(layout == GradLayout::dense ? "dense" : "row_sparse");
        ExpertGrads whole = poisoned_grads(in, layout), parts = poisoned_grads(in, layout);
        experts_backward(in, h, dy, layout, whole);
        for (const auto& [begin, end] : ranges) {
          ExpertGrads part = parts.tokens(in, begin, end);
          experts_backward_rows(in.tokens(begin, end), h.rows(begin, end), dy.rows(begin, end),
                                part);
        }
        experts_backward_tables(in, dy, layout, parts);
        EXPECT_TRUE(bytes_of(parts.dx) == bytes_of(whole.dx));
        EXPECT_TRUE(bytes_of(parts.dgates) == bytes_of(whole.dgates));
        EXPECT_TRUE(bytes_of(parts.d_down) == bytes_of(whole.d_down));
        EXPECT_TRUE(bytes_of(parts.d_up) == bytes_of(whole.d_up));
        if (layout == GradLayout::row_sparse) {
          EXPECT_TRUE(bytes_of(parts.rows) == bytes_of(whole.rows));
        }
      }
    }
  }
}

// The tables phase of two inputs on two streams at once (the layer runs it beside its
// later work) gives the bytes of one call at a time: each stream has its own scratch.
TEST(ExpertsGpu, TablesOnTwoStreamsMatchOneAtATime) {
  FLASHMOE_REQUIRE_GPU();
  struct Input {
    ExpertInputs in;
    Tensor h, dy;
  };
  std::vector<Input> inputs;
  for (const auto& [T, D, E, seed] :
       {std::tuple{4096, 256, 16384, 91}, std::tuple{1001, 768, 4096, 92}}) {
    Input input{random_inputs(T, D, E, 16, DType::bf16, Activation::silu, heavy, seed)};
    input.dy = random_tensor({T, D}, DType::bf16, seed + 10, -1.0f, 1.0f);
    Tensor y = poisoned({T, D}, DType::bf16);
    input.h = poisoned({T, 16}, DType::f32);
    experts_forward(input.in, y, input.h);
    inputs.push_back(input);
  }
  for (GradLayout layout : {GradLayout::dense, GradLayout::row_sparse}) {
    SCOPED_TRACE(layout == GradLayout::dense ? "dense" : "row_sparse");
    std::vector<ExpertGrads> alone, together;
    for (const Input& input : inputs) {
      alone.push_back(poisoned_grads(input.in, layout));
      experts_backward(input.in, input.h, input.dy, layout, alone.back());
      together.push_back(poisoned_grads(input.in, layout));
      experts_backward_rows(input.in, input.h, input.dy, together.back());
    }
    SideStream side;
    for (int round = 0; round < 3; ++round) {  // the first round sizes the side's scratch
      run_beside(&side,
                 [&] { experts_backward_tables(inputs[0].in, inputs[0].dy, layout, together[0]); });
      experts_backward_tables(inputs[1].in, inputs[1].dy, layout, together[1]);
      side.join();
      for (size_t i = 0; i < inputs.size(); ++i) {
        EXPECT_TRUE(bytes_of(together[i].d_down) == bytes_of(alone[i].d_down)) << "input " << i;
        EXPECT_TRUE(bytes_of(together[i].d_up) == bytes_of(alone[i].d_up)) << "input " << i;
        if (layout == GradLayout::row_sparse) {
          EXPECT_TRUE(bytes_of(together[i].rows) == bytes_of(alone[i].rows)) << "input " << i;
        }
      }
    }
  }
}

TEST(ExpertsGpu, OutOfRangeIdIsAClearError) {
  FLASHMOE_REQUIRE_GPU();
  ExpertInputs in = random_inputs(50, 64, 4096, 8, DType::f32, Activation::silu, rep, 5);
  const Tensor dy = random_tensor({50, 64}, DType::f32, 6, -1.0f, 1.0f);
  for (int32_t bad : {4096, 4097, 1 << 30}) {
    std::vector<int32_t> ids = in.ids.to_vector<int32_t>();
    ids[123] = bad;  // token 15, slot 3
    ids[300] = bad;  // later: the first one is reported
    in.ids = Tensor::from_vector(ids, {50, 8}, Device::cuda);
    Tensor y, h;
    const std::string forward = error_of([&] { experts_forward(in, y, h); });
    EXPECT_NE(
        forward.find("expert id " + std::to_string(bad) + " at position 123 (token 15, slot 3)"),
        std::string::npos)
        << forward;
    EXPECT_NE(forward.find("E = 4096"), std::string::npos) << forward;
    h = random_tensor({50, 8}, DType::f32, 7, -1.0f, 1.0f);
    ExpertGrads grads;
    const std::string backward =
        error_of([&] { experts_backward(in, h, dy, GradLayout::row_sparse, grads); });
    EXPECT_NE(backward.find("expert id " + std::to_string(bad)), std::string::npos) << backward;
  }
  // The device is still usable after the errors.
  in.ids = random_ids(50, 8, 4096, rep, 8);
  Tensor y, h;
  experts_forward(in, y, h);
  EXPECT_EQ(y.device(), Device::cuda);
}

TEST(ExpertsGpu, WrongDtypeOrDeviceIsAnErrorBeforeLaunch) {
  FLASHMOE_REQUIRE_GPU();
  const ExpertInputs good = random_inputs(10, 64, 64, 4, DType::bf16, Activation::silu, rep, 9);
  Tensor y, h;
  ExpertInputs bf16_gates = good;
  bf16_gates.gates = good.gates.to(DType::bf16);
  EXPECT_NE(error_of([&] { experts_forward(bf16_gates, y, h); }).find("gates has dtype bf16"),
            std::string::npos);
  ExpertInputs mixed_tables = good;
  mixed_tables.up_embed = good.up_embed.to(DType::f32);
  EXPECT_NE(error_of([&] { experts_forward(mixed_tables, y, h); }).find("up_embed has dtype fp32"),
            std::string::npos);
  ExpertInputs host_ids = good;
  host_ids.ids = good.ids.to(Device::cpu);
  EXPECT_NE(error_of([&] { experts_forward(host_ids, y, h); }).find("expert ids is on cpu"),
            std::string::npos);
  experts_forward(good, y, h);
  ExpertGrads grads;
  const Tensor host_dy = random_tensor({10, 64}, DType::bf16, 10, -1.0f, 1.0f).to(Device::cpu);
  EXPECT_NE(error_of([&] {
              experts_backward(good, h, host_dy, GradLayout::dense, grads);
            }).find("dy is on cpu"),
            std::string::npos);
}

// ---------------------------------------------------------------------------------
// Timings of the benchmark shapes (bf16), uniform and skewed ids; prints, asserts nothing.

struct TimingShape {
  const char* name;
  int64_t T, D, E, S;
  IdPattern ids;
};

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Median milliseconds of `op(set)` over `reps` runs after 3 warm-ups, rotating the
// input set each run so that caches don't carry a set from one run to the next.
template <class Op>
float time_ms(int sets, int reps, Op op) {
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<float> ms;
  for (int run = 0; run < 3 + reps; ++run) {
    CUDA_CHECK(cudaEventRecord(start, current_stream()));
    op(run % sets);
    CUDA_CHECK(cudaEventRecord(stop, current_stream()));
    CUDA_CHECK(cudaEventSynchronize(stop));
    float elapsed = 0;
    CUDA_CHECK(cudaEventElapsedTime(&elapsed, start, stop));
    if (run >= 3) ms.push_back(elapsed);
  }
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  return median(ms);
}

TEST(ExpertsGpuTiming, DISABLED_BenchmarkShapes) {
  FLASHMOE_REQUIRE_GPU();
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  {
    const size_t bytes = size_t(1) << 30;
    Tensor a = Tensor::empty({int64_t(bytes / 4)}, DType::f32, Device::cuda);
    Tensor b = Tensor::empty({int64_t(bytes / 4)}, DType::f32, Device::cuda);
    a.fill_bytes(1);
    const float ms = time_ms(1, 20, [&](int) { b.copy_from(a); });
    std::printf("%s, %d SMs, L2 %d MB; device-to-device copy %.0f GB/s (read + write)\n", prop.name,
                prop.multiProcessorCount, prop.l2CacheSize >> 20, 2 * bytes / ms / 1e6);
  }
  // Uniform ids, as a router that spreads tokens over many experts gives; smoke (the
  // experts of configs/smoke.yaml, 16384 tokens x 16 slots) also with 70% of the pairs
  // on 3% of the experts, as a router whose expert usage has collapsed gives.
  for (const TimingShape& shape :
       {TimingShape{"quickstart", 4096, 1024, 16384, 64, uniform},
        TimingShape{"peer-1m", 4096, 1024, 1 << 20, 128, uniform},
        TimingShape{"smoke", 16384, 256, 16384, 16, uniform},
        TimingShape{"smoke", 16384, 256, 16384, 16, IdPattern{"_skewed", 16384 * 3 / 100, 0.7}}}) {
    const int sets = 3, reps = 25;
    const int64_t T = shape.T, D = shape.D, E = shape.E, S = shape.S;
    std::vector<ExpertInputs> in;
    std::vector<Tensor> dy;
    int64_t used = 0, most = 0;  // experts touched, most pairs on one expert (set 0)
    for (int i = 0; i < sets; ++i) {
      ExpertInputs set =
          random_inputs(T, D, E, S, DType::bf16, Activation::silu, shape.ids, 100 * i);
      if (i == 0) {
        std::vector<int64_t> per_expert(E);
        for (int32_t id : set.ids.to_vector<int32_t>()) ++per_expert[id];
        used = std::count_if(per_expert.begin(), per_expert.end(), [](int64_t n) { return n > 0; });
        most = *std::max_element(per_expert.begin(), per_expert.end());
      }
      set.validate_ids = false;
      in.push_back(set);
      dy.push_back(random_tensor({T, D}, DType::bf16, 100 * i + 50, -1.0f, 1.0f));
    }
    Tensor y, h;
    ExpertGrads dense, sparse;
    const float fwd = time_ms(sets, reps, [&](int i) { experts_forward(in[i], y, h); });
    const float bwd_sparse = time_ms(sets, reps, [&](int i) {
      experts_backward(in[i], h, dy[i], GradLayout::row_sparse, sparse);
    });
    const float both_sparse = time_ms(sets, reps, [&](int i) {
      experts_forward(in[i], y, h);
      experts_backward(in[i], h, dy[i], GradLayout::row_sparse, sparse);
    });
    const float bwd_dense = time_ms(
        sets, reps, [&](int i) { experts_backward(in[i], h, dy[i], GradLayout::dense, dense); });
    const float both_dense = time_ms(sets, reps, [&](int i) {
      experts_forward(in[i], y, h);
      experts_backward(in[i], h, dy[i], GradLayout::dense, dense);
    });
    // Gathered rows: 2 per pair forward (down, up), 4 backward (up, down, x, dy);
    // gradient rows written: 2 * rows * D fp32.
    const double row = double(D) * 2, pairs = double(T * S);
    const double fwd_gb = 2 * pairs * row / 1e9;
    const double bwd_gb = 4 * pairs * row / 1e9;
    const double sparse_out_gb = 2.0 * std::min(E, T * S) * D * 4 / 1e9;
    const double dense_out_gb = 2.0 * E * D * 4 / 1e9;
    std::printf(
        "%s%s T=%lld D=%lld E=%lld S=%lld bf16; %.1f%% of experts used, at most %lld pairs\n"
        "  forward              %7.3f ms  (%.2f GB gathered: %.0f GB/s)\n"
        "  backward row-sparse  %7.3f ms  (%.2f GB gathered + %.2f GB written: %.0f GB/s)\n"
        "  backward dense       %7.3f ms  (%.2f GB gathered + %.2f GB written: %.0f GB/s)\n"
        "  fwd+bwd row-sparse   %7.3f ms\n"
        "  fwd+bwd dense        %7.3f ms\n",
        shape.name, shape.ids.name, (long long)T, (long long)D, (long long)E, (long long)S,
        100.0 * used / E, (long long)most, fwd, fwd_gb, fwd_gb / fwd * 1e3, bwd_sparse, bwd_gb,
        sparse_out_gb, (bwd_gb + sparse_out_gb) / bwd_sparse * 1e3, bwd_dense, bwd_gb, dense_out_gb,
        (bwd_gb + dense_out_gb) / bwd_dense * 1e3, both_sparse, both_dense);
  }
}

}  // namespace
}  // namespace flashmoe
