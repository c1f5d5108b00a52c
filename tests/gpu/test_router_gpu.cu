// The CUDA router against the CPU backend (the same public functions on host copies
// of the logits), on fresh random inputs over many shapes, both kernel variants
// (register and streamed logits) and both selection paths (lane-maxima and exact
// threshold); exact tie handling; bitwise repeatability; bad input. Outputs are
// poisoned (0xFF bytes: NaN floats, id -1) before every run, so an element the
// kernels leave unwritten fails.
//
// Ids: the GPU and the CPU compute the log-softmax sums in different orders, so a
// score may differ in the last bits and two nearly tied candidates may swap. A row
// whose ids differ must still hold K distinct valid ids whose scores (recomputed in
// fp64) match the CPU's rank by rank within 1e-5 relative, and the ids only one
// side selected must sit at the boundary within that tolerance. Inputs whose ties
// are all exact (quantised logits) must match id for id.
//
// RouterGpuTiming.DISABLED_* print the timings of the benchmark shapes (run them with
// --gtest_also_run_disabled_tests); they assert nothing.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "core/stream.h"
#include "core/tensor.h"
#include "kernels/backends.h"
#include "kernels/router.h"
#include "tests/test_util.h"

namespace flashmoe {
namespace {

using test::relative_error;

struct RouterCase {
  int64_t T;
  int64_t H, N;
  int K;
  DType dtype;
  bool norm;
};

std::string describe(const RouterCase& c) {
  std::ostringstream os;
  os << "T=" << c.T << " H=" << c.H << " N=" << c.N << " K=" << c.K << " " << dtype_name(c.dtype)
     << (c.norm ? " normalised" : "");
  return os.str();
}

Shape logit_shape(const RouterCase& c) { return {c.T, c.H, 2, c.N}; }

// Uniform values in [-scale, scale).
std::vector<float> random_values(int64_t count, uint32_t seed, float scale) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<float> values(count);
  for (float& v : values) v = dist(gen);
  return values;
}

// Half 0 from {0, 1, 2, 3}, half 1 from {0, .25, .5, .75}: two scores are equal
// only when both halves' logits are, so every tie is exact on both backends, and
// unequal scores differ by at least .25.
std::vector<float> quantised_logits(const RouterCase& c, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> level(0, 3);
  std::vector<float> values(c.T * c.H * 2 * c.N);
  for (size_t i = 0; i < values.size(); ++i) {
    const bool second_half = (i / c.N) % 2 == 1;
    values[i] = second_half ? 0.25f * level(gen) : float(level(gen));
  }
  return values;
}

RouterOutputs poisoned_outputs(const RouterCase& c) {
  RouterOutputs out;
  out.expert_ids = Tensor::empty({c.T, c.H, c.K}, DType::i32, Device::cuda);
  out.gates = Tensor::empty({c.T, c.H, c.K}, DType::f32, Device::cuda);
  out.logsumexp = Tensor::empty({c.T, c.H, 2}, DType::f32, Device::cuda);
  for (Tensor* t : {&out.expert_ids, &out.gates, &out.logsumexp}) t->fill_bytes(0xFF);
  return out;
}

RouterOutputs forward_gpu(const RouterCase& c, const Tensor& host_logits) {
  RouterOutputs out = poisoned_outputs(c);
  router_forward(host_logits.to(Device::cuda), c.K, c.norm, out);
  return out;
}

RouterOutputs forward_cpu(const RouterCase& c, const Tensor& host_logits) {
  RouterOutputs out;
  router_forward(host_logits, c.K, c.norm, out);
  return out;
}

// log_softmax of one half in fp64.
std::vector<double> log_probs(const float* q, int64_t N) {
  const double max = *std::max_element(q, q + N);
  double sum = 0;
  for (int64_t n = 0; n < N; ++n) sum += std::exp(q[n] - max);
  std::vector<double> l(N);
  for (int64_t n = 0; n < N; ++n) l[n] = q[n] - max - std::log(sum);
  return l;
}

// Compares the GPU's ids with the CPU's (see the file comment); `exact_ties`
// demands identical ids.
void expect_same_selection(const RouterCase& c, const Tensor& host_logits, const RouterOutputs& gpu,
                           const RouterOutputs& cpu, bool exact_ties) {
  const std::vector<int32_t> got = gpu.expert_ids.to_vector<int32_t>();
  const std::vector<int32_t> want = cpu.expert_ids.to_vector<int32_t>();
  const std::vector<float> q = host_logits.to_floats();
  const int64_t N = c.N, K = c.K, experts = N * N;
  int64_t differing_rows = 0;
  for (int64_t row = 0; row < c.T * c.H; ++row) {
    const int32_t* g = got.data() + row * K;
    const int32_t* w = want.data() + row * K;
    if (std::equal(g, g + K, w)) continue;
    ++differing_rows;
    ASSERT_FALSE(exact_ties) << describe(c) << ": row " << row << " differs from the CPU";
    for (int64_t k = 0; k < K; ++k) {
      ASSERT_TRUE(g[k] >= 0 && g[k] < experts)
          << describe(c) << ": row " << row << " slot " << k << " id " << g[k];
    }
    const std::set<int32_t> got_set(g, g + K), want_set(w, w + K);
    ASSERT_EQ(static_cast<int64_t>(got_set.size()), K)
        << describe(c) << ": repeated id, row " << row;
    const std::vector<double> l0 = log_probs(&q[row * 2 * N], N);
    const std::vector<double> l1 = log_probs(&q[row * 2 * N + N], N);
    auto score = [&](int32_t e) { return l0[e / N] + l1[e % N]; };
    auto tolerance = [](double s) { return 1e-5 * std::max(1.0, std::abs(s)); };
    for (int64_t k = 0; k < K; ++k) {
      ASSERT_NEAR(score(g[k]), score(w[k]), tolerance(score(w[k])))
          << describe(c) << ": row " << row << " rank " << k << " ids " << g[k] << " vs " << w[k];
    }
    for (int32_t e : got_set) {
      if (want_set.count(e)) continue;
      EXPECT_GE(score(e), score(w[K - 1]) - tolerance(score(e))) << describe(c) << " row " << row;
    }
    for (int32_t e : want_set) {
      if (got_set.count(e)) continue;
      EXPECT_LE(score(e), score(g[K - 1]) + tolerance(score(e))) << describe(c) << " row " << row;
    }
  }
  if (differing_rows > 0) {
    std::printf("  %s: %lld of %lld rows swap near-tied candidates\n", describe(c).c_str(),
                static_cast<long long>(differing_rows), static_cast<long long>(c.T * c.H));
  }
}

void expect_forward_matches(const RouterCase& c, const Tensor& host_logits, bool exact_ties) {
  const RouterOutputs gpu = forward_gpu(c, host_logits);
  const RouterOutputs cpu = forward_cpu(c, host_logits);
  expect_same_selection(c, host_logits, gpu, cpu, exact_ties);
  EXPECT_LT(relative_error(gpu.gates, cpu.gates), 1e-5) << describe(c);
  EXPECT_LT(relative_error(gpu.logsumexp, cpu.logsumexp), 1e-5) << describe(c);
}

// GPU backward on the GPU's forward outputs vs the CPU backward on host copies of them.
void expect_backward_matches(const RouterCase& c, const Tensor& host_logits,
                             const RouterOutputs& gpu_saved, uint32_t seed) {
  const Shape gate_shape = {c.T, c.H, c.K};
  const Tensor host_dgates = Tensor::from_floats(random_values(c.T * c.H * c.K, seed, 1.0f),
                                                 gate_shape, DType::f32, Device::cpu);
  Tensor dlogits = Tensor::empty(logit_shape(c), DType::f32, Device::cuda);
  dlogits.fill_bytes(0xFF);
  router_backward(host_logits.to(Device::cuda), gpu_saved, host_dgates.to(Device::cuda), c.norm,
                  dlogits);
  RouterOutputs cpu_saved;
  cpu_saved.expert_ids = gpu_saved.expert_ids.to(Device::cpu);
  cpu_saved.gates = gpu_saved.gates.to(Device::cpu);
  cpu_saved.logsumexp = gpu_saved.logsumexp.to(Device::cpu);
  Tensor want = Tensor::empty(logit_shape(c), DType::f32, Device::cpu);
  router_backward(host_logits, cpu_saved, host_dgates, c.norm, want);
  EXPECT_LT(relative_error(dlogits, want), 1e-5) << describe(c) << " backward";
}

Tensor random_logits(const RouterCase& c, uint32_t seed, float scale) {
  return Tensor::from_floats(random_values(c.T * c.H * 2 * c.N, seed, scale), logit_shape(c),
                             c.dtype, Device::cpu);
}

constexpr DType f32 = DType::f32, bf16 = DType::bf16;

// N: 8 and 1 (V = 1), 33 and 40 and 64 (V = 2), 100 and 128 (V = 4), 320 (V = 16),
// 1024 (V = 32), 2000 (streamed). K: 1 to 512, with K <= 32 on the lane-maxima path.
const RouterCase kForwardCases[] = {
    {1, 1, 8, 1, f32, false},      {7, 4, 8, 16, bf16, true},       {333, 1, 8, 64, f32, true},
    {1000, 1, 64, 8, bf16, false}, {333, 4, 64, 16, f32, true},     {7, 1, 64, 64, bf16, true},
    {7, 4, 64, 512, f32, false},   {1000, 1, 100, 16, bf16, true},  {333, 4, 100, 64, f32, false},
    {1, 1, 100, 1, bf16, false},   {1000, 1, 128, 16, bf16, true},  {333, 4, 128, 8, f32, true},
    {333, 1, 128, 64, bf16, true}, {7, 1, 128, 512, bf16, true},    {333, 1, 320, 16, f32, false},
    {7, 4, 320, 64, bf16, true},   {1000, 1, 1024, 16, bf16, true}, {7, 4, 1024, 8, f32, false},
    {7, 1, 1024, 512, f32, true},  {333, 1, 1024, 64, bf16, false}, {7, 1, 2000, 16, f32, true},
    {7, 1, 2000, 64, bf16, true},  {1, 1, 1, 1, f32, true},         {7, 1, 33, 32, bf16, false},
    {7, 1, 40, 33, f32, true},     {333, 4, 1024, 32, f32, true},
};

TEST(RouterGpu, SmallShapesForwardBackward) {
  FLASHMOE_REQUIRE_GPU();
  const RouterCase cases[] = {{7, 1, 8, 16, f32, true},    {5, 2, 100, 64, bf16, false},
                              {3, 1, 1500, 16, f32, true}, {3, 1, 64, 512, bf16, true},
                              {9, 1, 128, 8, bf16, false}, {3, 1, 1100, 40, f32, false}};
  uint32_t seed = 1;
  for (const RouterCase& c : cases) {
    const Tensor logits = random_logits(c, seed++, 4.0f);
    expect_forward_matches(c, logits, false);
    expect_backward_matches(c, logits, forward_gpu(c, logits), seed++);
    const Tensor tied =
        Tensor::from_floats(quantised_logits(c, seed++), logit_shape(c), c.dtype, Device::cpu);
    expect_forward_matches(c, tied, true);
  }
}

TEST(RouterGpu, ForwardMatchesCpu) {
  FLASHMOE_REQUIRE_GPU();
  uint32_t seed = 100;
  for (const RouterCase& c : kForwardCases) {
    // Wide logits (peaked softmax) and narrow ones (flat, many near ties).
    for (float scale : {4.0f, 0.05f})
      expect_forward_matches(c, random_logits(c, seed++, scale), false);
  }
}

TEST(RouterGpu, ExactTiesFollowTieRule) {
  FLASHMOE_REQUIRE_GPU();
  const RouterCase cases[] = {{333, 1, 128, 16, bf16, true}, {7, 4, 1024, 64, f32, false},
                              {33, 1, 64, 512, f32, true},   {7, 1, 2000, 16, bf16, false},
                              {100, 1, 8, 64, bf16, true},   {50, 4, 100, 8, f32, false},
                              {20, 1, 320, 33, bf16, true},  {40, 2, 1024, 16, f32, true}};
  uint32_t seed = 200;
  for (const RouterCase& c : cases) {
    const Tensor tied =
        Tensor::from_floats(quantised_logits(c, seed++), logit_shape(c), c.dtype, Device::cpu);
    expect_forward_matches(c, tied, true);
    // Every score equal: the K smallest candidate ids, in order.
    const Tensor flat = Tensor::from_floats(std::vector<float>(c.T * c.H * 2 * c.N, 0.75f),
                                            logit_shape(c), c.dtype, Device::cpu);
    expect_forward_matches(c, flat, true);
  }
}

TEST(RouterGpu, BackwardMatchesCpu) {
  FLASHMOE_REQUIRE_GPU();
  const RouterCase cases[] = {
      {333, 1, 8, 16, f32, true},    {1000, 1, 64, 8, bf16, false},   {7, 4, 64, 512, f32, true},
      {333, 4, 100, 64, bf16, true}, {1000, 1, 128, 16, bf16, false}, {333, 1, 128, 64, f32, true},
      {7, 4, 320, 64, bf16, false},  {333, 1, 1024, 16, bf16, true},  {7, 1, 1024, 512, f32, false},
      {7, 1, 2000, 64, bf16, true},  {1, 1, 1, 1, f32, true},
  };
  uint32_t seed = 300;
  for (const RouterCase& c : cases) {
    const Tensor logits = random_logits(c, seed++, 4.0f);
    expect_backward_matches(c, logits, forward_gpu(c, logits), seed++);
  }
}

// Backward on ids not from the forward: repeated experts and shared rows/columns.
TEST(RouterGpu, BackwardWithRepeatedIds) {
  FLASHMOE_REQUIRE_GPU();
  for (const RouterCase& c :
       {RouterCase{77, 2, 16, 24, f32, true}, RouterCase{33, 1, 100, 64, bf16, false}}) {
    const Tensor logits = random_logits(c, 400, 4.0f);
    RouterOutputs saved = forward_gpu(c, logits);
    std::mt19937 gen(401);
    std::uniform_int_distribution<int32_t> few(0, 5);  // ids 0..5: rows and experts repeat
    std::vector<int32_t> ids(c.T * c.H * c.K);
    for (int32_t& id : ids) id = few(gen) * static_cast<int32_t>(c.N + 1) % (c.N * c.N);
    saved.expert_ids = Tensor::from_vector(ids, {c.T, c.H, c.K}, Device::cuda);
    expect_backward_matches(c, logits, saved, 402);
  }
}

template <class T>
bool same_bits(const Tensor& a, const Tensor& b) {
  const std::vector<T> x = a.to_vector<T>(), y = b.to_vector<T>();
  return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(T)) == 0;
}

TEST(RouterGpu, BitwiseRepeatable) {
  FLASHMOE_REQUIRE_GPU();
  const RouterCase cases[] = {
      {1000, 4, 128, 16, bf16, true}, {333, 1, 1024, 64, f32, false}, {7, 1, 2000, 16, f32, true}};
  uint32_t seed = 500;
  for (const RouterCase& c : cases) {
    const Tensor host_logits = random_logits(c, seed++, 1.0f);
    const Tensor logits = host_logits.to(Device::cuda);
    const Tensor dgates = Tensor::from_floats(random_values(c.T * c.H * c.K, seed++, 1.0f),
                                              {c.T, c.H, c.K}, DType::f32, Device::cuda);
    RouterOutputs first = poisoned_outputs(c), second = poisoned_outputs(c);
    router_forward(logits, c.K, c.norm, first);
    router_forward(logits, c.K, c.norm, second);
    EXPECT_TRUE(same_bits<int32_t>(first.expert_ids, second.expert_ids)) << describe(c);
    EXPECT_TRUE(same_bits<float>(first.gates, second.gates)) << describe(c);
    EXPECT_TRUE(same_bits<float>(first.logsumexp, second.logsumexp)) << describe(c);
    Tensor d1 = Tensor::empty(logit_shape(c), DType::f32, Device::cuda);
    Tensor d2 = Tensor::empty(logit_shape(c), DType::f32, Device::cuda);
    d1.fill_bytes(0xFF);
    d2.fill_bytes(0xFF);
    router_backward(logits, first, dgates, c.norm, d1);
    router_backward(logits, first, dgates, c.norm, d2);
    EXPECT_TRUE(same_bits<float>(d1, d2)) << describe(c) << " backward";
  }
}

// Each bad call throws flashmoe::Error before any kernel runs: the poisoned
// outputs stay poisoned.
TEST(RouterGpu, BadInputThrowsBeforeLaunch) {
  FLASHMOE_REQUIRE_GPU();
  const RouterCase c{5, 1, 16, 8, f32, true};
  const Tensor host_logits = random_logits(c, 600, 1.0f);
  const Tensor logits = host_logits.to(Device::cuda);
  RouterOutputs out = poisoned_outputs(c);
  auto still_poisoned = [](const Tensor& t) {
    const Tensor host = t.to(Device::cpu);
    const auto* bytes = static_cast<const uint8_t*>(host.raw());
    return std::all_of(bytes, bytes + host.nbytes(), [](uint8_t b) { return b == 0xFF; });
  };

  const Tensor int_logits = Tensor::zeros(logit_shape(c), DType::i32, Device::cuda);
  EXPECT_THROW(router_forward(int_logits, c.K, c.norm, out), Error);
  EXPECT_THROW(router_forward(logits, 16 * 16 + 1, c.norm, out), Error);  // K > N^2
  EXPECT_THROW(router_forward(logits, 0, c.norm, out), Error);
  const Tensor wide = Tensor::from_floats(random_values(2 * 64, 601, 1.0f), {1, 1, 2, 64},
                                          DType::f32, Device::cuda);
  RouterOutputs wide_out;
  EXPECT_THROW(router_forward(wide, 600, c.norm, wide_out), Error);  // K > 512 on CUDA
  // The backend itself refuses host tensors.
  EXPECT_THROW(detail::router_forward_cuda(host_logits, c.K, c.norm, out), Error);
  for (const Tensor* t : {&out.expert_ids, &out.gates, &out.logsumexp}) {
    EXPECT_TRUE(still_poisoned(*t));
  }

  router_forward(logits, c.K, c.norm, out);
  const Tensor dgates = Tensor::from_floats(random_values(c.T * c.H * c.K, 602, 1.0f),
                                            {c.T, c.H, c.K}, DType::f32, Device::cuda);
  Tensor dlogits = Tensor::empty(logit_shape(c), DType::f32, Device::cuda);
  dlogits.fill_bytes(0xFF);
  EXPECT_THROW(router_backward(logits, out, dgates.to(Device::cpu), c.norm, dlogits), Error);
  EXPECT_THROW(router_backward(logits, out, dgates.to(DType::bf16), c.norm, dlogits), Error);
  Tensor host_dlogits = Tensor::empty(logit_shape(c), DType::f32, Device::cpu);
  EXPECT_THROW(router_backward(logits, out, dgates, c.norm, host_dlogits), Error);
  EXPECT_THROW(detail::router_backward_cuda(host_logits, out, dgates, c.norm, dlogits), Error);
  EXPECT_TRUE(still_poisoned(dlogits));
}

}  // namespace
}  // namespace flashmoe
