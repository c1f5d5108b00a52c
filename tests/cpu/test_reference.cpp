// The CPU reference (kernels/reference.h, kernels/layer_reference.h) against
// independent oracles: finite differences in fp64, brute-force enumeration of all
// N^2 experts, textbook batch statistics and a token-by-token transcription of
// SPEC section 1; and the public CPU ops against the reference, bad inputs included.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "core/error.h"
#include "core/tensor.h"
#include "kernels/experts.h"
#include "kernels/layer_reference.h"
#include "kernels/reference.h"
#include "kernels/router.h"
#include "tests/test_util.h"

namespace flashmoe {
namespace {

using ref::LayerCache;
using ref::LayerConfig;
using ref::LayerGrads;
using ref::LayerParams;

// ---------------------------------------------------------------------------------------
// Helpers

std::vector<double> uniform_vector(std::mt19937_64& rng, int64_t size, double low, double high) {
  std::uniform_real_distribution<double> dist(low, high);
  std::vector<double> v(size);
  for (double& value : v) value = dist(rng);
  return v;
}

int uniform_int(std::mt19937_64& rng, int low, int high) {
  return std::uniform_int_distribution<int>(low, high)(rng);
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  return std::inner_product(a.begin(), a.end(), b.begin(), 0.0);
}

std::vector<float> to_float_vector(const std::vector<double>& v) {
  return std::vector<float>(v.begin(), v.end());
}

// `statement` throws a one-line flashmoe::Error whose message contains `expected`.
#define EXPECT_ERROR_CONTAINS(statement, expected)                                   \
  do {                                                                               \
    const std::string message = test::error_of([&] { statement; });                  \
    EXPECT_NE(message.find(expected), std::string::npos) << message;                 \
    EXPECT_EQ(message.find('\n'), std::string::npos) << "not one line: " << message; \
  } while (0)

// ---------------------------------------------------------------------------------------
// The layer's gradients against central finite differences, every element.

enum class NormMode { batchnorm_training, batchnorm_eval, rmsnorm, none };

const char* name_of(NormMode mode) {
  switch (mode) {
    case NormMode::batchnorm_training: return "batchnorm";
    case NormMode::batchnorm_eval: return "batchnormEval";
    case NormMode::rmsnorm: return "rmsnorm";
    case NormMode::none: return "none";
  }
  return "?";
}

const char* name_of(Activation act) {
  switch (act) {
    case Activation::silu: return "silu";
    case Activation::gelu: return "gelu";
    case Activation::relu: return "relu";
  }
  return "?";
}

// T = 5, D = 6, N = 4 (E = 16), K = 3: small enough to check every element.
constexpr int64_t kTokens = 5;

LayerConfig small_config(NormMode mode, Activation act, bool norm_topk_prob, int heads,
                         int64_t intermediate) {
  LayerConfig cfg;
  cfg.dim = 6;
  cfg.shared_intermediate = intermediate;
  cfg.num_experts = 16;
  cfg.heads = heads;
  cfg.top_k = 3;
  cfg.act = act;
  cfg.norm = mode == NormMode::rmsnorm ? RouterNorm::rmsnorm
             : mode == NormMode::none  ? RouterNorm::none
                                       : RouterNorm::batchnorm;
  cfg.norm_topk_prob = norm_topk_prob;
  cfg.training = mode != NormMode::batchnorm_eval;
  return cfg;
}

LayerParams<double> random_params(const LayerConfig& cfg, std::mt19937_64& rng) {
  const int64_t D = cfg.dim, I = cfg.shared_intermediate, E = cfg.num_experts;
  const int64_t router_rows = int64_t{cfg.heads} * 2 * num_keys_for(E);
  LayerParams<double> p;
  p.w_gate = uniform_vector(rng, I * D, -0.6, 0.6);
  p.w_up = uniform_vector(rng, I * D, -0.6, 0.6);
  p.w_down = uniform_vector(rng, D * I, -0.6, 0.6);
  p.w_router = uniform_vector(rng, router_rows * D, -1.0, 1.0);
  p.down_embed = uniform_vector(rng, E * D, -0.6, 0.6);
  p.up_embed = uniform_vector(rng, E * D, -0.6, 0.6);
  p.running_mean = uniform_vector(rng, D, -0.3, 0.3);
  p.running_var = uniform_vector(rng, D, 0.5, 1.5);
  return p;
}

struct Problem {
  LayerConfig cfg;
  LayerParams<double> params;
  std::vector<double> x;        // [T, D]
  std::vector<double> weights;  // R [T, D]: the loss is L = sum(y * R)
};

struct Evaluation {
  double loss;
  LayerCache<double> cache;
};

Evaluation evaluate(const Problem& p) {
  LayerParams<double> params = p.params;  // batchnorm in training updates running stats
  Evaluation e;
  e.loss = dot(ref::layer_forward(p.cfg, params, p.x, kTokens, e.cache), p.weights);
  return e;
}

// relu has a kink at 0: finite differences need every pre-activation away from it.
bool far_from_relu_kink(const Problem& p, const LayerCache<double>& cache) {
  if (p.cfg.act != Activation::relu) return true;
  auto far = [](double v) { return std::abs(v) >= 1e-3; };
  return std::all_of(cache.expert_pre.begin(), cache.expert_pre.end(), far) &&
         std::all_of(cache.shared.gate_pre.begin(), cache.shared.gate_pre.end(), far);
}

constexpr double kStep = 1e-6;

// Central differences of the loss with respect to every element of `v`, a vector of
// `p`. False when a perturbation changes the selected experts (top-K is piecewise
// constant, so the difference would not be a derivative).
bool central_differences(Problem& p, std::vector<double>& v, const std::vector<int32_t>& ids,
                         std::vector<double>& fd) {
  fd.assign(v.size(), 0.0);
  for (size_t i = 0; i < v.size(); ++i) {
    const double saved = v[i];
    v[i] = saved + kStep;
    const Evaluation plus = evaluate(p);
    v[i] = saved - kStep;
    const Evaluation minus = evaluate(p);
    v[i] = saved;
    if (plus.cache.expert_ids != ids || minus.cache.expert_ids != ids) return false;
    fd[i] = (plus.loss - minus.loss) / (2 * kStep);
  }
  return true;
}

struct Checked {
  const char* name;
  std::vector<double>* value;
  const std::vector<double>* analytic;
};

using GradCase = std::tuple<NormMode, Activation, bool, int, int64_t>;

class LayerGradient : public ::testing::TestWithParam<GradCase> {};

TEST_P(LayerGradient, EveryElementMatchesFiniteDifferences) {
  const auto [mode, act, norm_topk_prob, heads, intermediate] = GetParam();
  const LayerConfig cfg = small_config(mode, act, norm_topk_prob, heads, intermediate);
  constexpr int kMaxDraws = 20;
  for (int draw = 0; draw < kMaxDraws; ++draw) {
    std::mt19937_64 rng(1000 + draw);
    Problem p{cfg, random_params(cfg, rng), uniform_vector(rng, kTokens * cfg.dim, -1, 1),
              uniform_vector(rng, kTokens * cfg.dim, -1, 1)};
    const Evaluation base = evaluate(p);
    if (!far_from_relu_kink(p, base.cache)) continue;
    const LayerGrads<double> grads = ref::layer_backward(cfg, p.params, base.cache, p.weights);
    const std::vector<Checked> checked = {{"x", &p.x, &grads.dx},
                                          {"w_gate", &p.params.w_gate, &grads.w_gate},
                                          {"w_up", &p.params.w_up, &grads.w_up},
                                          {"w_down", &p.params.w_down, &grads.w_down},
                                          {"w_router", &p.params.w_router, &grads.w_router},
                                          {"down_embed", &p.params.down_embed, &grads.down_embed},
                                          {"up_embed", &p.params.up_embed, &grads.up_embed}};
    std::vector<std::vector<double>> fd(checked.size());
    bool stable = true;
    for (size_t c = 0; c < checked.size() && stable; ++c) {
      stable = central_differences(p, *checked[c].value, base.cache.expert_ids, fd[c]);
    }
    if (!stable) continue;
    for (size_t c = 0; c < checked.size(); ++c) {
      ASSERT_EQ(checked[c].analytic->size(), checked[c].value->size()) << checked[c].name;
      EXPECT_LT(test::relative_error(*checked[c].analytic, fd[c]), 1e-6)
          << checked[c].name << " (draw " << draw << ")";
    }
    EXPECT_EQ(grads.w_gate.empty(), intermediate == 0);
    return;
  }
  FAIL() << "no draw in " << kMaxDraws << " kept the selection and relu signs stable";
}

std::string grad_case_name(const ::testing::TestParamInfo<GradCase>& info) {
  const auto [mode, act, norm_topk_prob, heads, intermediate] = info.param;
  return std::string(name_of(mode)) + "_" + name_of(act) + (norm_topk_prob ? "_ntp" : "") + "_H" +
         std::to_string(heads) + "_I" + std::to_string(intermediate);
}

INSTANTIATE_TEST_SUITE_P(
    AllConfigs, LayerGradient,
    ::testing::Combine(::testing::Values(NormMode::batchnorm_training, NormMode::batchnorm_eval,
                                         NormMode::rmsnorm, NormMode::none),
                       ::testing::Values(Activation::silu, Activation::gelu, Activation::relu),
                       ::testing::Bool(), ::testing::Values(1, 3), ::testing::Values(0, 5)),
    grad_case_name);

// ---------------------------------------------------------------------------------------
// Top-K against enumeration of all N^2 experts.

// All N^2 experts, best first: score descending, id ascending on ties.
template <class Real>
struct Ranking {
  std::vector<int32_t> ids;
  std::vector<Real> scores;
};

template <class Real>
Ranking<Real> brute_force_ranking(const std::vector<Real>& l0, const std::vector<Real>& l1) {
  const int N = static_cast<int>(l0.size());
  auto score = [&](int32_t e) { return l0[e / N] + l1[e % N]; };
  Ranking<Real> ranking{std::vector<int32_t>(N * N), {}};
  std::iota(ranking.ids.begin(), ranking.ids.end(), 0);
  std::sort(ranking.ids.begin(), ranking.ids.end(), [&](int32_t a, int32_t b) {
    return score(a) > score(b) || (score(a) == score(b) && a < b);
  });
  for (int32_t e : ranking.ids) ranking.scores.push_back(score(e));
  return ranking;
}

// A tie that decides the order or the cut: equal neighbours among the first K + 1.
template <class Real>
bool decisive_tie(const Ranking<Real>& ranking, int K) {
  const auto end = ranking.scores.begin() + std::min<size_t>(K + 1, ranking.scores.size());
  return std::adjacent_find(ranking.scores.begin(), end) != end;
}

// One row of N logits: constant, quantised to a few levels (frequent ties), or continuous.
std::vector<double> random_logit_row(std::mt19937_64& rng, int N) {
  const int style = uniform_int(rng, 0, 9);
  std::vector<double> row(N);
  if (style == 0) {
    std::fill(row.begin(), row.end(), uniform_int(rng, -2, 2) * 0.5);
  } else if (style <= 6) {
    const int levels = uniform_int(rng, 2, 4);
    for (double& q : row) q = uniform_int(rng, 0, levels - 1) * 0.5;
  } else {
    row = uniform_vector(rng, N, -3, 3);
  }
  return row;
}

int random_top_k(std::mt19937_64& rng, int N) {
  const int all = N * N;
  switch (uniform_int(rng, 0, 3)) {
    case 0: return uniform_int(rng, 1, std::min(all, 16));
    case 1: return uniform_int(rng, 1, all);
    case 2: return all;
    default: return uniform_int(rng, std::max(1, all - 16), all);
  }
}

// ref::router_forward on logits [T, H, 2, N] against brute force for every (t, h):
// identical ids, and gates equal to exp(brute-force score), bit for bit. Returns
// whether any (t, h) had a decisive tie.
template <class Real>
bool router_matches_brute_force(const ref::RouterShape& shape, const std::vector<Real>& logits) {
  const int N = shape.num_keys, K = shape.top_k;
  const int64_t rows = shape.tokens * shape.heads;
  std::vector<int32_t> ids(rows * K);
  std::vector<Real> gates(rows * K), logsumexp(rows * 2);
  ref::router_forward(shape, logits.data(), false, ids.data(), gates.data(), logsumexp.data());
  bool tie = false;
  std::vector<Real> l0(N), l1(N), pruned_scores(K);
  std::vector<int32_t> pruned_ids(K);
  for (int64_t th = 0; th < rows; ++th) {
    ref::log_softmax(logits.data() + th * 2 * N, N, l0.data());
    ref::log_softmax(logits.data() + th * 2 * N + N, N, l1.data());
    const Ranking<Real> ranking = brute_force_ranking(l0, l1);
    const std::vector<int32_t> expected_ids(ranking.ids.begin(), ranking.ids.begin() + K);
    const std::vector<Real> expected_scores(ranking.scores.begin(), ranking.scores.begin() + K);
    tie = tie || decisive_tie(ranking, K);
    ref::topk_product(l0.data(), l1.data(), N, K, pruned_ids.data(), pruned_scores.data());
    EXPECT_EQ(pruned_ids, expected_ids) << "N " << N << " K " << K;
    EXPECT_EQ(pruned_scores, expected_scores) << "N " << N << " K " << K;
    const std::vector<int32_t> row_ids(ids.begin() + th * K, ids.begin() + (th + 1) * K);
    EXPECT_EQ(row_ids, expected_ids) << "N " << N << " K " << K << " row " << th;
    for (int k = 0; k < K; ++k) {
      EXPECT_EQ(gates[th * K + k], std::exp(expected_scores[k])) << "N " << N << " K " << K;
    }
  }
  return tie;
}

TEST(TopK, MatchesBruteForceEnumerationWithTies) {
  std::mt19937_64 rng(7);
  int cases = 0, cases_with_ties = 0, full_k = 0, single_key = 0, not_power_of_two = 0;
  int multi_head = 0;
  for (int c = 0; c < 1200; ++c) {
    const int N = c % 100 == 0                  ? 1
                  : uniform_int(rng, 0, 4) == 0 ? uniform_int(rng, 1, 8)
                                                : uniform_int(rng, 1, 64);
    const ref::RouterShape shape{uniform_int(rng, 1, 2), uniform_int(rng, 1, 3), N,
                                 random_top_k(rng, N)};
    std::vector<double> logits;
    for (int64_t row = 0; row < shape.tokens * shape.heads * 2; ++row) {
      const std::vector<double> q = random_logit_row(rng, N);
      logits.insert(logits.end(), q.begin(), q.end());
    }
    const bool tie = router_matches_brute_force(shape, logits);
    router_matches_brute_force(shape, to_float_vector(logits));
    if (HasFailure()) return;
    ++cases;
    cases_with_ties += tie;
    full_k += shape.top_k == N * N;
    single_key += N == 1;
    not_power_of_two += (N & (N - 1)) != 0;
    multi_head += shape.heads > 1;
  }
  RecordProperty("cases", cases);
  RecordProperty("cases_with_ties", cases_with_ties);
  EXPECT_GE(cases, 1000);
  EXPECT_GE(cases_with_ties, 500) << "of " << cases;
  EXPECT_GE(full_k, 100);
  EXPECT_GE(single_key, 10);
  EXPECT_GE(not_power_of_two, 800);
  EXPECT_GE(multi_head, 500);
}

// ---------------------------------------------------------------------------------------
// Router backward against finite differences of the gates.

TEST(RouterBackward, MatchesFiniteDifferencesOfGates) {
  for (bool norm_topk_prob : {false, true}) {
    SCOPED_TRACE(norm_topk_prob ? "norm_topk_prob" : "raw gates");
    const ref::RouterShape shape{3, 2, 5, 4};
    const int64_t slots = shape.tokens * shape.heads * shape.top_k;
    std::mt19937_64 rng(11);
    std::vector<double> logits = uniform_vector(rng, shape.tokens * shape.heads * 2 * 5, -2, 2);
    const std::vector<double> dgates = uniform_vector(rng, slots, -1, 1);
    auto forward = [&](std::vector<int32_t>& ids, std::vector<double>& gates,
                       std::vector<double>& logsumexp) {
      ids.resize(slots);
      gates.resize(slots);
      logsumexp.resize(shape.tokens * shape.heads * 2);
      ref::router_forward(shape, logits.data(), norm_topk_prob, ids.data(), gates.data(),
                          logsumexp.data());
      return dot(gates, dgates);
    };
    std::vector<int32_t> ids, moved_ids;
    std::vector<double> gates, logsumexp, unused_gates, unused_lse;
    forward(ids, gates, logsumexp);
    std::vector<double> analytic(logits.size());
    ref::router_backward(shape, logits.data(), ids.data(), gates.data(), logsumexp.data(),
                         dgates.data(), norm_topk_prob, analytic.data());
    std::vector<double> fd(logits.size());
    for (size_t i = 0; i < logits.size(); ++i) {
      const double saved = logits[i];
      logits[i] = saved + kStep;
      const double plus = forward(moved_ids, unused_gates, unused_lse);
      ASSERT_EQ(moved_ids, ids);
      logits[i] = saved - kStep;
      const double minus = forward(moved_ids, unused_gates, unused_lse);
      ASSERT_EQ(moved_ids, ids);
      logits[i] = saved;
      fd[i] = (plus - minus) / (2 * kStep);
    }
    EXPECT_LT(test::relative_error(analytic, fd), 1e-7);
  }
}

// ---------------------------------------------------------------------------------------
// Batchnorm statistics.

struct TextbookStats {
  std::vector<double> mean, biased_var, unbiased_var;
};

TextbookStats textbook_stats(const std::vector<double>& x, int64_t T, int64_t D) {
  TextbookStats s{std::vector<double>(D, 0), std::vector<double>(D, 0), std::vector<double>(D)};
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t t = 0; t < T; ++t) s.mean[d] += x[t * D + d] / T;
    for (int64_t t = 0; t < T; ++t) {
      s.biased_var[d] += (x[t * D + d] - s.mean[d]) * (x[t * D + d] - s.mean[d]) / T;
    }
    s.unbiased_var[d] = s.biased_var[d] * T / (T - 1);
  }
  return s;
}

void expect_near_relative(const std::vector<double>& actual, const std::vector<double>& expected,
                          double tolerance) {
  EXPECT_LT(test::relative_error(actual, expected), tolerance);
}

TEST(BatchNorm, TrainingNormalisesAndUpdatesRunningStatsLikePyTorch) {
  const int64_t T = 7, D = 3;
  std::mt19937_64 rng(3);
  const std::vector<double> x = uniform_vector(rng, T * D, -2, 3);
  const TextbookStats s = textbook_stats(x, T, D);
  std::vector<double> running_mean = {0.5, -0.5, 0.0}, running_var = {2.0, 1.0, 0.5};
  const std::vector<double> old_mean = running_mean, old_var = running_var;
  const ref::NormCache<double> cache =
      ref::batchnorm_forward(x, T, D, true, 0.1, 1e-5, running_mean, running_var);
  for (int64_t d = 0; d < D; ++d) {
    EXPECT_NEAR(running_mean[d], 0.9 * old_mean[d] + 0.1 * s.mean[d], 1e-14);
    EXPECT_NEAR(running_var[d], 0.9 * old_var[d] + 0.1 * s.unbiased_var[d], 1e-14);
    for (int64_t t = 0; t < T; ++t) {
      EXPECT_NEAR(cache.normalized[t * D + d],
                  (x[t * D + d] - s.mean[d]) / std::sqrt(s.biased_var[d] + 1e-5), 1e-12);
    }
  }
}

TEST(BatchNorm, EvalUsesRunningStatsAndLeavesThemUnchanged) {
  const int64_t T = 4, D = 3;
  std::mt19937_64 rng(4);
  const std::vector<double> x = uniform_vector(rng, T * D, -2, 2);
  std::vector<double> running_mean = {0.5, -0.5, 0.0}, running_var = {2.0, 1.0, 0.5};
  const ref::NormCache<double> cache =
      ref::batchnorm_forward(x, T, D, false, 0.1, 1e-5, running_mean, running_var);
  EXPECT_EQ(running_mean, (std::vector<double>{0.5, -0.5, 0.0}));
  EXPECT_EQ(running_var, (std::vector<double>{2.0, 1.0, 0.5}));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t d = 0; d < D; ++d) {
      EXPECT_NEAR(cache.normalized[t * D + d],
                  (x[t * D + d] - running_mean[d]) / std::sqrt(running_var[d] + 1e-5), 1e-14);
    }
  }
}

// The data-parallel recipe: every part's partials, summed, give the statistics of the
// whole batch (and in float too, with a mean far from zero, thanks to the fp64 sums).
TEST(BatchNorm, StatisticsFromSummedPartialsEqualTheWholeBatch) {
  const int64_t T = 11, D = 4;
  std::mt19937_64 rng(5);
  std::vector<double> x = uniform_vector(rng, T * D, -1, 1);
  for (double& v : x) v += 100;
  const TextbookStats s = textbook_stats(x, T, D);
  const std::vector<float> xf = to_float_vector(x);
  ref::MomentSums total{0, std::vector<double>(D, 0), std::vector<double>(D, 0)};
  ref::MomentSums total_f = total;
  const int64_t parts[] = {0, 3, 8, 11};  // uneven parts: 3, 5 and 3 tokens
  for (int p = 0; p < 3; ++p) {
    const int64_t rows = parts[p + 1] - parts[p];
    const ref::MomentSums part = ref::moment_sums(x.data() + parts[p] * D, rows, D);
    const ref::MomentSums part_f = ref::moment_sums(xf.data() + parts[p] * D, rows, D);
    for (auto [sum, add] : {std::pair{&total, &part}, std::pair{&total_f, &part_f}}) {
      sum->count += add->count;
      for (int64_t d = 0; d < D; ++d) {
        sum->sum[d] += add->sum[d];
        sum->sum_squares[d] += add->sum_squares[d];
      }
    }
  }
  const ref::BatchStats split = ref::batch_stats(total);
  const ref::BatchStats whole = ref::batch_stats(ref::moment_sums(x.data(), T, D));
  EXPECT_EQ(split.count, T);
  expect_near_relative(split.mean, s.mean, 1e-14);
  expect_near_relative(split.var, s.biased_var, 1e-9);
  expect_near_relative(whole.mean, s.mean, 1e-14);
  expect_near_relative(whole.var, s.biased_var, 1e-9);
  const TextbookStats sf = textbook_stats(std::vector<double>(xf.begin(), xf.end()), T, D);
  expect_near_relative(ref::batch_stats(total_f).var, sf.biased_var, 1e-9);
}

// ---------------------------------------------------------------------------------------
// layer_forward against SPEC section 1 transcribed token by token.

std::vector<double> spec_log_softmax(const double* q, int N) {
  double sum = 0;
  for (int n = 0; n < N; ++n) sum += std::exp(q[n]);
  std::vector<double> l(N);
  for (int n = 0; n < N; ++n) l[n] = q[n] - std::log(sum);
  return l;
}

std::vector<double> spec_norm(const LayerConfig& cfg, const LayerParams<double>& p,
                              const std::vector<double>& x, int64_t T) {
  const int64_t D = cfg.dim;
  std::vector<double> xn = x;
  const TextbookStats s = textbook_stats(x, T, D);
  for (int64_t t = 0; t < T; ++t) {
    double mean_square = 0;
    for (int64_t d = 0; d < D; ++d) mean_square += x[t * D + d] * x[t * D + d] / D;
    for (int64_t d = 0; d < D; ++d) {
      double& v = xn[t * D + d];
      if (cfg.norm == RouterNorm::rmsnorm) v /= std::sqrt(mean_square + cfg.bn_eps);
      if (cfg.norm == RouterNorm::batchnorm && cfg.training) {
        v = (v - s.mean[d]) / std::sqrt(s.biased_var[d] + cfg.bn_eps);
      }
      if (cfg.norm == RouterNorm::batchnorm && !cfg.training) {
        v = (v - p.running_mean[d]) / std::sqrt(p.running_var[d] + cfg.bn_eps);
      }
    }
  }
  return xn;
}

std::vector<double> spec_layer(const LayerConfig& cfg, const LayerParams<double>& p,
                               const std::vector<double>& x, int64_t T) {
  const int64_t D = cfg.dim, I = cfg.shared_intermediate;
  const int N = num_keys_for(cfg.num_experts), K = cfg.top_k;
  const std::vector<double> xn = spec_norm(cfg, p, x, T);
  std::vector<double> y(T * D, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    const double* xt = &x[t * D];
    for (int h = 0; h < cfg.heads; ++h) {
      std::vector<double> q(2 * N, 0.0);
      for (int r = 0; r < 2 * N; ++r) {
        for (int64_t d = 0; d < D; ++d) q[r] += p.w_router[(h * 2 * N + r) * D + d] * xn[t * D + d];
      }
      const Ranking<double> best =
          brute_force_ranking(spec_log_softmax(q.data(), N), spec_log_softmax(q.data() + N, N));
      double gate_sum = 0;
      for (int k = 0; k < K; ++k) gate_sum += std::exp(best.scores[k]);
      for (int k = 0; k < K; ++k) {
        const double gate = std::exp(best.scores[k]) / (cfg.norm_topk_prob ? gate_sum : 1.0);
        const int64_t e = best.ids[k];
        const double a =
            activate(cfg.act, std::inner_product(xt, xt + D, &p.down_embed[e * D], 0.0)) * gate;
        for (int64_t d = 0; d < D; ++d) y[t * D + d] += a * p.up_embed[e * D + d];
      }
    }
    for (int64_t i = 0; i < I; ++i) {
      const double gate = std::inner_product(xt, xt + D, &p.w_gate[i * D], 0.0);
      const double up = std::inner_product(xt, xt + D, &p.w_up[i * D], 0.0);
      for (int64_t d = 0; d < D; ++d)
        y[t * D + d] += p.w_down[d * I + i] * activate(cfg.act, gate) * up;
    }
  }
  return y;
}

TEST(LayerForward, MatchesTokenByTokenTranscriptionOfSpec) {
  int checked = 0;
  for (NormMode mode : {NormMode::batchnorm_training, NormMode::batchnorm_eval, NormMode::rmsnorm,
                        NormMode::none}) {
    for (int heads : {1, 3}) {
      for (int64_t intermediate : {0, 5}) {
        const LayerConfig cfg =
            small_config(mode, Activation::gelu, heads == 3, heads, intermediate);
        std::mt19937_64 rng(20 + checked);
        LayerParams<double> params = random_params(cfg, rng);
        const std::vector<double> x = uniform_vector(rng, kTokens * cfg.dim, -1, 1);
        const std::vector<double> expected = spec_layer(cfg, params, x, kTokens);
        LayerCache<double> cache;
        const std::vector<double> y = ref::layer_forward(cfg, params, x, kTokens, cache);
        EXPECT_LT(test::relative_error(y, expected), 1e-12)
            << name_of(mode) << " H " << heads << " I " << intermediate;
        EXPECT_EQ(cache.logits.size(), size_t(kTokens * heads * 2 * 4));
        ++checked;
      }
    }
  }
  EXPECT_EQ(checked, 16);
}

// The float instantiation (the slow CPU path) follows the fp64 one to float rounding.
TEST(LayerForward, FloatAgreesWithDouble) {
  const LayerConfig cfg = small_config(NormMode::batchnorm_training, Activation::silu, true, 3, 5);
  std::mt19937_64 rng(30);
  LayerParams<double> params = random_params(cfg, rng);
  const std::vector<double> x = uniform_vector(rng, kTokens * cfg.dim, -1, 1);
  LayerParams<float> params_f;
  for (auto [to, from] : {std::pair{&params_f.w_gate, &params.w_gate},
                          {&params_f.w_up, &params.w_up},
                          {&params_f.w_down, &params.w_down},
                          {&params_f.w_router, &params.w_router},
                          {&params_f.down_embed, &params.down_embed},
                          {&params_f.up_embed, &params.up_embed},
                          {&params_f.running_mean, &params.running_mean},
                          {&params_f.running_var, &params.running_var}}) {
    *to = to_float_vector(*from);
  }
  LayerCache<double> cache;
  LayerCache<float> cache_f;
  const std::vector<double> y = ref::layer_forward(cfg, params, x, kTokens, cache);
  const std::vector<float> y_f =
      ref::layer_forward(cfg, params_f, to_float_vector(x), kTokens, cache_f);
  ASSERT_EQ(cache_f.expert_ids, cache.expert_ids);
  EXPECT_LT(test::relative_error(std::vector<double>(y_f.begin(), y_f.end()), y), 1e-5);
  const std::vector<double> dy = uniform_vector(rng, kTokens * cfg.dim, -1, 1);
  const LayerGrads<double> grads = ref::layer_backward(cfg, params, cache, dy);
  const LayerGrads<float> grads_f =
      ref::layer_backward(cfg, params_f, cache_f, to_float_vector(dy));
  EXPECT_LT(
      test::relative_error(std::vector<double>(grads_f.dx.begin(), grads_f.dx.end()), grads.dx),
      1e-5);
  EXPECT_LT(
      test::relative_error(std::vector<double>(grads_f.w_router.begin(), grads_f.w_router.end()),
                           grads.w_router),
      1e-5);
}

// ---------------------------------------------------------------------------------------
// The public ops on CPU tensors agree with the reference, bit for bit.

Tensor float_tensor(const std::vector<float>& values, Shape shape) {
  return Tensor::from_vector(values, std::move(shape), Device::cpu);
}

TEST(CpuOps, RouterMatchesReference) {
  for (bool norm_topk_prob : {false, true}) {
    const ref::RouterShape shape{7, 2, 6, 5};
    std::mt19937_64 rng(8);
    const std::vector<float> logits = to_float_vector(uniform_vector(rng, 7 * 2 * 2 * 6, -2, 2));
    const std::vector<float> dgates = to_float_vector(uniform_vector(rng, 7 * 2 * 5, -1, 1));
    std::vector<int32_t> ids(7 * 2 * 5);
    std::vector<float> gates(ids.size()), logsumexp(7 * 2 * 2), dlogits(logits.size());
    ref::router_forward(shape, logits.data(), norm_topk_prob, ids.data(), gates.data(),
                        logsumexp.data());
    ref::router_backward(shape, logits.data(), ids.data(), gates.data(), logsumexp.data(),
                         dgates.data(), norm_topk_prob, dlogits.data());

    const Tensor logits_t = float_tensor(logits, {7, 2, 2, 6});
    RouterOutputs out;
    router_forward(logits_t, 5, norm_topk_prob, out);
    EXPECT_EQ(out.expert_ids.shape(), (Shape{7, 2, 5}));
    EXPECT_EQ(out.expert_ids.to_vector<int32_t>(), ids);
    EXPECT_EQ(out.gates.to_vector<float>(), gates);
    EXPECT_EQ(out.logsumexp.to_vector<float>(), logsumexp);
    Tensor dlogits_t = Tensor::zeros({7, 2, 2, 6}, DType::f32, Device::cpu);
    router_backward(logits_t, out, float_tensor(dgates, {7, 2, 5}), norm_topk_prob, dlogits_t);
    EXPECT_EQ(dlogits_t.to_vector<float>(), dlogits);
  }
}

struct ExpertCase {
  int64_t T = 6, D = 5, E = 16, S = 4;
  std::vector<float> x, down, up, gates, dy;
  std::vector<int32_t> ids;

  explicit ExpertCase(uint64_t seed) {
    std::mt19937_64 rng(seed);
    x = to_float_vector(uniform_vector(rng, T * D, -1, 1));
    down = to_float_vector(uniform_vector(rng, E * D, -1, 1));
    up = to_float_vector(uniform_vector(rng, E * D, -1, 1));
    gates = to_float_vector(uniform_vector(rng, T * S, 0, 1));
    dy = to_float_vector(uniform_vector(rng, T * D, -1, 1));
    ids.resize(T * S);
    for (int32_t& id : ids) id = uniform_int(rng, 0, 11);  // repeats; experts 12..15 untouched
  }
  ref::ExpertShape shape() const { return {T, D, E, S}; }
  ExpertInputs inputs(Activation act) const {
    return {float_tensor(x, {T, D}),     float_tensor(down, {E, D}),
            float_tensor(up, {E, D}),    Tensor::from_vector(ids, {T, S}, Device::cpu),
            float_tensor(gates, {T, S}), act};
  }
};

TEST(CpuOps, ExpertsForwardBackwardMatchReferenceDenseAndRowSparse) {
  const ExpertCase c(9);
  const int64_t T = c.T, D = c.D, E = c.E, S = c.S;
  std::vector<float> y(T * D), h(T * S), dx(T * D), dgates(T * S), d_down(E * D), d_up(E * D);
  ref::experts_forward(c.shape(), Activation::silu, c.x.data(), c.down.data(), c.up.data(),
                       c.ids.data(), c.gates.data(), y.data(), h.data());
  ref::experts_backward(c.shape(), Activation::silu, c.x.data(), c.down.data(), c.up.data(),
                        c.ids.data(), c.gates.data(), h.data(), c.dy.data(), dx.data(),
                        dgates.data(), d_down.data(), d_up.data());

  const ExpertInputs in = c.inputs(Activation::silu);
  Tensor y_t, h_t;
  experts_forward(in, y_t, h_t);
  EXPECT_EQ(y_t.to_vector<float>(), y);
  EXPECT_EQ(h_t.to_vector<float>(), h);

  ExpertGrads dense;
  experts_backward(in, h_t, float_tensor(c.dy, {T, D}), GradLayout::dense, dense);
  EXPECT_EQ(dense.dx.to_vector<float>(), dx);
  EXPECT_EQ(dense.dgates.to_vector<float>(), dgates);
  EXPECT_EQ(dense.d_down.to_vector<float>(), d_down);
  EXPECT_EQ(dense.d_up.to_vector<float>(), d_up);

  ExpertGrads sparse;
  experts_backward(in, h_t, float_tensor(c.dy, {T, D}), GradLayout::row_sparse, sparse);
  EXPECT_EQ(sparse.dx.to_vector<float>(), dx);
  const int64_t R = std::min(E, T * S);
  ASSERT_EQ(sparse.rows.shape(), (Shape{R}));
  const std::vector<int32_t> rows = sparse.rows.to_vector<int32_t>();
  const std::vector<int32_t> touched = ref::touched_experts(c.ids.data(), T * S);
  ASSERT_LT(touched.size(), size_t(R));  // the -1 tail is exercised
  const std::vector<float> sparse_down = sparse.d_down.to_vector<float>();
  const std::vector<float> sparse_up = sparse.d_up.to_vector<float>();
  for (int64_t r = 0; r < R; ++r) {
    const bool used = r < int64_t(touched.size());
    EXPECT_EQ(rows[r], used ? touched[r] : -1);
    for (int64_t d = 0; d < D; ++d) {
      EXPECT_EQ(sparse_down[r * D + d], used ? d_down[touched[r] * D + d] : 0.0f);
      EXPECT_EQ(sparse_up[r * D + d], used ? d_up[touched[r] * D + d] : 0.0f);
    }
  }
}

// The forward and the backward's rows phase over token ranges, as separate calls in any
// order (expert parallelism computes its own tokens first), then the tables phase, give
// exactly the outputs of one call over every token.
TEST(CpuOps, ExpertsOverTokenRangesMatchOneCall) {
  ExpertCase c(33);
  c.ids[5] = -1;  // an empty slot
  const int64_t T = c.T, D = c.D, S = c.S;
  const std::pair<int64_t, int64_t> ranges[] = {{2, 5}, {5, T}, {0, 2}};
  const ExpertInputs in = c.inputs(Activation::gelu);
  const Tensor dy = float_tensor(c.dy, {T, D});
  Tensor y, h;
  experts_forward(in, y, h);
  Tensor y_parts = Tensor::zeros({T, D}, DType::f32, Device::cpu);
  Tensor h_parts = Tensor::zeros({T, S}, DType::f32, Device::cpu);
  for (const auto& [begin, end] : ranges) {
    Tensor y_part = y_parts.rows(begin, end), h_part = h_parts.rows(begin, end);
    experts_forward(in.tokens(begin, end), y_part, h_part);
  }
  EXPECT_EQ(y_parts.to_vector<float>(), y.to_vector<float>());
  EXPECT_EQ(h_parts.to_vector<float>(), h.to_vector<float>());
  for (GradLayout layout : {GradLayout::dense, GradLayout::row_sparse}) {
    ExpertGrads whole, parts;
    experts_backward(in, h, dy, layout, whole);
    for (const auto& [begin, end] : ranges) {
      ExpertGrads part = parts.tokens(in, begin, end);
      experts_backward_rows(in.tokens(begin, end), h.rows(begin, end), dy.rows(begin, end), part);
    }
    experts_backward_tables(in, dy, layout, parts);
    EXPECT_EQ(parts.dx.to_vector<float>(), whole.dx.to_vector<float>());
    EXPECT_EQ(parts.dgates.to_vector<float>(), whole.dgates.to_vector<float>());
    EXPECT_EQ(parts.d_down.to_vector<float>(), whole.d_down.to_vector<float>());
    EXPECT_EQ(parts.d_up.to_vector<float>(), whole.d_up.to_vector<float>());
    if (layout == GradLayout::row_sparse) {
      EXPECT_EQ(parts.rows.to_vector<int32_t>(), whole.rows.to_vector<int32_t>());
    }
  }
}

// An empty slot (id < 0) adds nothing: every output equals that of the same slot filled
// with expert 0 at gate 0 (which adds exact zeros), except h and dgates, which are 0, and
// the row-sparse rows, which leave out experts only empty slots name.
TEST(CpuOps, ExpertsSkipEmptySlots) {
  ExpertCase c(21);
  for (size_t i = 0; i < c.ids.size(); i += 3) c.ids[i] = i % 2 ? -1 : -7;
  c.ids[1] = 15;  // expert 15 is touched once, by a filled slot
  ExpertCase zeroed = c;
  for (size_t i = 0; i < c.ids.size(); ++i) {
    if (c.ids[i] < 0) {
      zeroed.ids[i] = 0;
      zeroed.gates[i] = 0.0f;
    }
  }
  const int64_t T = c.T, D = c.D, S = c.S;
  for (const Activation act : {Activation::silu, Activation::gelu, Activation::relu}) {
    const ExpertInputs in = c.inputs(act), filled = zeroed.inputs(act);
    Tensor y, h, y_filled, h_filled;
    experts_forward(in, y, h);
    experts_forward(filled, y_filled, h_filled);
    EXPECT_EQ(y.to_vector<float>(), y_filled.to_vector<float>());
    const std::vector<float> h_values = h.to_vector<float>(),
                             h_filled_values = h_filled.to_vector<float>();
    for (int64_t i = 0; i < T * S; ++i) {
      EXPECT_EQ(h_values[i], c.ids[i] < 0 ? 0.0f : h_filled_values[i]) << "pair " << i;
    }
    const Tensor dy = float_tensor(c.dy, {T, D});
    ExpertGrads dense, dense_filled, sparse;
    experts_backward(in, h, dy, GradLayout::dense, dense);
    experts_backward(filled, h_filled, dy, GradLayout::dense, dense_filled);
    EXPECT_EQ(dense.dx.to_vector<float>(), dense_filled.dx.to_vector<float>());
    EXPECT_EQ(dense.d_down.to_vector<float>(), dense_filled.d_down.to_vector<float>());
    EXPECT_EQ(dense.d_up.to_vector<float>(), dense_filled.d_up.to_vector<float>());
    const std::vector<float> dgates = dense.dgates.to_vector<float>(),
                             dgates_filled = dense_filled.dgates.to_vector<float>();
    for (int64_t i = 0; i < T * S; ++i) {
      EXPECT_EQ(dgates[i], c.ids[i] < 0 ? 0.0f : dgates_filled[i]) << "pair " << i;
    }
    experts_backward(in, h, dy, GradLayout::row_sparse, sparse);
    const std::vector<int32_t> touched = ref::touched_experts(c.ids.data(), T * S);
    ASSERT_FALSE(touched.empty());
    EXPECT_GE(touched.front(), 0);
    const std::vector<int32_t> rows = sparse.rows.to_vector<int32_t>();
    for (size_t r = 0; r < rows.size(); ++r) {
      EXPECT_EQ(rows[r], r < touched.size() ? touched[r] : -1);
    }
  }
  // Every slot empty: zeros everywhere, no touched row.
  ExpertCase none = c;
  std::fill(none.ids.begin(), none.ids.end(), -1);
  const ExpertInputs in = none.inputs(Activation::silu);
  Tensor y, h;
  experts_forward(in, y, h);
  EXPECT_EQ(y.to_vector<float>(), std::vector<float>(T * D, 0.0f));
  ExpertGrads sparse;
  experts_backward(in, h, float_tensor(c.dy, {T, D}), GradLayout::row_sparse, sparse);
  EXPECT_EQ(sparse.dx.to_vector<float>(), std::vector<float>(T * D, 0.0f));
  EXPECT_EQ(sparse.rows.to_vector<int32_t>(), std::vector<int32_t>(sparse.rows.numel(), -1));
}

// ---------------------------------------------------------------------------------------
// Bad inputs: one-line errors naming the problem.

TEST(BadInput, RouterOpNamesTheProblem) {
  RouterOutputs out;
  const Tensor logits = Tensor::zeros({2, 1, 2, 6}, DType::f32, Device::cpu);
  EXPECT_ERROR_CONTAINS(
      router_forward(Tensor::zeros({2, 2, 6}, DType::f32, Device::cpu), 2, false, out),
      "expected [T, H, 2, N]");
  EXPECT_ERROR_CONTAINS(
      router_forward(Tensor::zeros({2, 1, 2, 6}, DType::i32, Device::cpu), 2, false, out),
      "router logits has dtype int32, expected fp32 or bf16");
  EXPECT_ERROR_CONTAINS(router_forward(logits, 37, false, out),
                        "top_k is 37, expected 1 <= top_k <= N^2 = 36");
  EXPECT_ERROR_CONTAINS(router_forward(logits, 0, false, out), "top_k is 0");
  EXPECT_ERROR_CONTAINS(
      router_forward(Tensor::zeros({0, 1, 2, 6}, DType::f32, Device::cpu), 2, false, out),
      "expected every dimension >= 1");
  router_forward(logits, 3, false, out);
  Tensor dlogits = Tensor::zeros({2, 1, 2, 6}, DType::f32, Device::cpu);
  EXPECT_ERROR_CONTAINS(
      router_backward(logits, out, Tensor::zeros({2, 1, 4}, DType::f32, Device::cpu), false,
                      dlogits),
      "dgates has shape [2, 1, 4], expected [2, 1, 3]");
  EXPECT_ERROR_CONTAINS(num_keys_for(15), "num_experts is 15, expected a perfect square");
  EXPECT_ERROR_CONTAINS(num_keys_for(0), "num_experts is 0, expected >= 1");
}

TEST(BadInput, ExpertOpsNameTheProblem) {
  const ExpertCase c(10);
  Tensor y, h;
  ExpertInputs bad_id = c.inputs(Activation::silu);
  bad_id.ids.data<int32_t>()[7] = 16;
  EXPECT_ERROR_CONTAINS(experts_forward(bad_id, y, h),
                        "expert id 16 at position 7, expected 0 <= id < E = 16");
  bad_id.ids.data<int32_t>()[7] = 17;
  EXPECT_ERROR_CONTAINS(experts_forward(bad_id, y, h), "expert id 17 at position 7");

  ExpertInputs float_ids = c.inputs(Activation::silu);
  float_ids.ids = Tensor::zeros({c.T, c.S}, DType::f32, Device::cpu);
  EXPECT_ERROR_CONTAINS(experts_forward(float_ids, y, h),
                        "expert ids has dtype fp32, expected int32");

  ExpertInputs wrong_table = c.inputs(Activation::silu);
  wrong_table.up_embed = Tensor::zeros({c.E, c.D + 1}, DType::f32, Device::cpu);
  EXPECT_ERROR_CONTAINS(experts_forward(wrong_table, y, h),
                        "up_embed has shape [16, 6], expected [16, 5]");

  ExpertInputs bf16_gates = c.inputs(Activation::silu);
  bf16_gates.gates = bf16_gates.gates.to(DType::bf16);
  EXPECT_ERROR_CONTAINS(experts_forward(bf16_gates, y, h), "gates has dtype bf16, expected fp32");

  ExpertInputs zero_width = c.inputs(Activation::silu);
  zero_width.x = Tensor::zeros({c.T, 0}, DType::f32, Device::cpu);
  zero_width.down_embed = zero_width.up_embed = Tensor::zeros({c.E, 0}, DType::f32, Device::cpu);
  EXPECT_ERROR_CONTAINS(experts_forward(zero_width, y, h), "expected D >= 1 and E >= 1");

  const ExpertInputs good = c.inputs(Activation::silu);
  experts_forward(good, y, h);
  ExpertGrads grads;
  EXPECT_ERROR_CONTAINS(
      experts_backward(good, h, Tensor::zeros({c.T, c.D + 1}, DType::f32, Device::cpu),
                       GradLayout::dense, grads),
      "dy has shape [6, 6], expected [6, 5]");
}

TEST(BadInput, LayerReferenceNamesTheProblem) {
  const LayerConfig good =
      small_config(NormMode::batchnorm_training, Activation::silu, false, 3, 5);
  std::mt19937_64 rng(12);
  const LayerParams<double> params = random_params(good, rng);
  const std::vector<double> x = uniform_vector(rng, kTokens * good.dim, -1, 1);
  LayerCache<double> cache;
  auto forward = [&](const LayerConfig& cfg, LayerParams<double> p, const std::vector<double>& in,
                     int64_t tokens) { ref::layer_forward(cfg, p, in, tokens, cache); };

  LayerConfig cfg = good;
  cfg.num_experts = 15;
  EXPECT_ERROR_CONTAINS(forward(cfg, params, x, kTokens), "expected a perfect square");
  cfg = good;
  cfg.top_k = 17;
  EXPECT_ERROR_CONTAINS(forward(cfg, params, x, kTokens),
                        "top_k is 17, expected 1 <= top_k <= N^2 = 16");
  cfg = good;
  cfg.dim = 0;
  EXPECT_ERROR_CONTAINS(forward(cfg, params, x, kTokens), "layer dim D is 0, expected >= 1");
  cfg = good;
  cfg.heads = 0;
  EXPECT_ERROR_CONTAINS(forward(cfg, params, x, kTokens), "router heads H is 0");
  cfg = good;
  cfg.num_experts = 0;
  EXPECT_ERROR_CONTAINS(forward(cfg, params, x, kTokens), "num_experts is 0, expected >= 1");
  cfg = good;
  cfg.shared_intermediate = -1;
  EXPECT_ERROR_CONTAINS(forward(cfg, params, x, kTokens), "shared_intermediate I is -1");

  const std::pair<const char*, std::vector<double> LayerParams<double>::*> members[] = {
      {"w_gate has 29 elements, expected [I, D] = 30", &LayerParams<double>::w_gate},
      {"w_up has 29 elements, expected [I, D] = 30", &LayerParams<double>::w_up},
      {"w_down has 29 elements, expected [D, I] = 30", &LayerParams<double>::w_down},
      {"w_router has 143 elements, expected [H*2N, D] = 144", &LayerParams<double>::w_router},
      {"down_embed has 95 elements, expected [E, D] = 96", &LayerParams<double>::down_embed},
      {"up_embed has 95 elements, expected [E, D] = 96", &LayerParams<double>::up_embed},
      {"running_mean has 5 elements, expected [D] = 6", &LayerParams<double>::running_mean},
      {"running_var has 5 elements, expected [D] = 6", &LayerParams<double>::running_var}};
  for (const auto& [expected, member] : members) {
    LayerParams<double> wrong = params;
    (wrong.*member).pop_back();
    EXPECT_ERROR_CONTAINS(forward(good, wrong, x, kTokens), expected);
  }
  EXPECT_ERROR_CONTAINS(forward(good, params, x, kTokens + 1),
                        "x has 30 elements, expected [T, D] = 36");
  EXPECT_ERROR_CONTAINS(forward(good, params, std::vector<double>(6), 1),
                        "tokens T is 1, expected >= 2 (batchnorm in training)");
  cfg = small_config(NormMode::none, Activation::silu, false, 3, 5);
  EXPECT_ERROR_CONTAINS(forward(cfg, params, {}, 0), "tokens T is 0, expected >= 1");

  LayerParams<double> p = params;
  ref::layer_forward(good, p, x, kTokens, cache);
  EXPECT_ERROR_CONTAINS(ref::layer_backward(good, p, cache, std::vector<double>(7)),
                        "dy has 7 elements, expected [T, D] = 30");
}

}  // namespace
}  // namespace flashmoe
