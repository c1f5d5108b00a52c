// AdamW on the CPU against hand-computed and fp64 reference values, and the lr schedule.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "optim/adamw.h"
#include "optim/schedule.h"
#include "parallel/communicator.h"
#include "tests/test_util.h"

namespace flashmoe {
namespace {

Parameter make_param(const std::string& name, const std::vector<float>& values, Shape shape,
                     DType dtype = DType::f32) {
  Parameter p;
  p.name = name;
  p.value = Tensor::from_floats(values, std::move(shape), dtype, Device::cpu);
  return p;
}

void set_dense_grad(Parameter& p, const std::vector<float>& grad) {
  p.grad = Tensor::from_floats(grad, p.value.shape(), DType::f32, Device::cpu);
}

void set_sparse_grad(Parameter& p, const std::vector<int32_t>& rows,
                     const std::vector<float>& grad) {
  const int64_t slots = int64_t(rows.size());
  p.rows = Tensor::from_vector(rows, {slots}, Device::cpu);
  p.grad = Tensor::from_floats(grad, {slots, p.value.size(1)}, DType::f32, Device::cpu);
}

// Constant lr, no warmup, no decay, no clipping: each test turns on what it checks.
OptimConfig plain_config() {
  OptimConfig c;
  c.lr = 0.1;
  c.expert_lr = 0.1;
  c.betas = {0.9, 0.999};
  c.eps = 1e-8;
  c.weight_decay = 0;
  c.warmup = 0;
  c.schedule = Schedule::constant;
  c.clip = 0;
  return c;
}

std::vector<float> state_tensor(const AdamW& optimizer, const std::string& name) {
  for (const OptimizerTensor& s : optimizer.state()) {
    if (s.name == name) return s.tensor.to_floats();
  }
  ADD_FAILURE() << "no optimizer state named " << name;
  return {};
}

// One AdamW update of one element in fp64: the formula of optim/adamw.h.
struct ReferenceElement {
  double w = 0, m = 0, v = 0;
  void update(double g, double lr, double weight_decay, const OptimConfig& c, int64_t t) {
    m = c.betas[0] * m + (1 - c.betas[0]) * g;
    v = c.betas[1] * v + (1 - c.betas[1]) * g * g;
    const double m_hat = m / (1 - std::pow(c.betas[0], double(t)));
    const double v_hat = v / (1 - std::pow(c.betas[1], double(t)));
    w -= lr * (m_hat / (std::sqrt(v_hat) + c.eps) + weight_decay * w);
  }
};

// fp32 arithmetic against fp64 expectations.
void expect_close(const std::vector<float>& got, const std::vector<double>& want,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_NEAR(got[i], want[i], 2e-6 * std::max(1.0, std::abs(want[i])))
        << what << " element " << i;
  }
}

TEST(OptimAdamW, MatchesHandComputedSteps) {
  OptimConfig config = plain_config();
  config.weight_decay = 0.1;
  Parameter p = make_param("w", {1.0f, -0.5f}, {2});
  AdamW optimizer(config, 3, {&p});
  auto comm = make_local_communicator();
  // Update 1, element 0 (g = 0.5): m = 0.1 * 0.5 = 0.05, v = 0.001 * 0.25 = 0.00025,
  // m_hat = 0.05 / 0.1 = 0.5, v_hat = 0.00025 / 0.001 = 0.25,
  // w = 1 - 0.1 * (0.5 / (0.5 + 1e-8) + 0.1 * 1) = 0.890000002.
  // The other values follow the same formula (computed in fp64).
  const std::vector<std::vector<float>> grads = {{0.5f, -0.25f}, {-0.1f, 0.4f}, {0.3f, 0.2f}};
  const std::vector<std::vector<double>> want_w = {{0.890000002, -0.395000004},
                                                   {0.829997395679, -0.418661302336},
                                                   {0.755241800225, -0.45907330378}};
  const std::vector<std::vector<double>> want_m = {
      {0.05, -0.025}, {0.035, 0.0175}, {0.0615, 0.03575}};
  const std::vector<std::vector<double>> want_v = {
      {0.00025, 6.25e-05}, {0.00025975, 0.0002224375}, {0.00034949025, 0.0002622150625}};
  for (size_t t = 0; t < grads.size(); ++t) {
    set_dense_grad(p, grads[t]);
    optimizer.step(*comm);
    const std::string at = " after update " + std::to_string(t + 1);
    expect_close(state_tensor(optimizer, "w.master"), want_w[t], "master" + at);
    expect_close(state_tensor(optimizer, "w.m"), want_m[t], "m" + at);
    expect_close(state_tensor(optimizer, "w.v"), want_v[t], "v" + at);
    EXPECT_EQ(p.value.to_floats(), state_tensor(optimizer, "w.master")) << "value" << at;
  }
  EXPECT_EQ(optimizer.step_count(), 3);
}

TEST(OptimAdamW, WeightDecayFollowsTheFlagOnly) {
  OptimConfig config = plain_config();
  config.weight_decay = 0.5;
  config.expert_lr = 0.2;
  Parameter decayed = make_param("w", {2.0f, -4.0f}, {2});
  Parameter gain = make_param("norm.gain", {2.0f, -4.0f}, {2});
  gain.weight_decay = false;
  Parameter experts = make_param("experts", {2.0f, -4.0f}, {1, 2});
  experts.expert_table = true;  // decays: only the flag turns decay off
  AdamW optimizer(config, 10, {&decayed, &gain, &experts});
  // Zero gradients leave m = v = 0, so the update is the decay alone: w *= 1 - lr * wd.
  for (Parameter* p : {&decayed, &gain, &experts}) set_dense_grad(*p, {0.0f, 0.0f});
  optimizer.step(*make_local_communicator());
  expect_close(decayed.value.to_floats(), {2.0 * 0.95, -4.0 * 0.95}, "decayed parameter");
  EXPECT_EQ(gain.value.to_floats(), (std::vector<float>{2.0f, -4.0f}));
  expect_close(experts.value.to_floats(), {2.0 * 0.9, -4.0 * 0.9}, "expert table");
}

TEST(OptimAdamW, ExpertTablesUseExpertLrUnderTheSameSchedule) {
  OptimConfig config = plain_config();
  config.lr = 0.1;
  config.expert_lr = 0.01;
  config.warmup = 10;  // first update runs at 1/10 of the peak
  Parameter dense = make_param("w", {1.0f}, {1});
  Parameter experts = make_param("experts", {1.0f}, {1, 1});
  experts.expert_table = true;
  AdamW optimizer(config, 100, {&dense, &experts});
  set_dense_grad(dense, {1.0f});
  set_dense_grad(experts, {1.0f});
  optimizer.step(*make_local_communicator());
  // First update: m_hat / sqrt(v_hat) = g / |g| = 1, so w moves by the scheduled lr.
  expect_close(dense.value.to_floats(), {1.0 - 0.1 / 10}, "replicated parameter");
  expect_close(experts.value.to_floats(), {1.0 - 0.01 / 10}, "expert table");
}

TEST(OptimAdamW, RowSparseUpdatesOnlyListedRowsLazily) {
  OptimConfig config = plain_config();
  config.weight_decay = 0.1;
  config.expert_lr = 0.05;
  const int64_t E = 5, D = 3;
  std::vector<float> initial(E * D);
  for (int64_t i = 0; i < E * D; ++i) initial[i] = 0.1f * float(i) - 0.7f;
  Parameter table = make_param("experts", initial, {E, D});
  table.expert_table = true;
  AdamW optimizer(config, 10, {&table});
  auto comm = make_local_communicator();

  std::vector<ReferenceElement> want(E * D);
  for (int64_t i = 0; i < E * D; ++i) want[i].w = initial[i];
  auto reference_step = [&](const std::vector<int32_t>& rows, const std::vector<float>& grad,
                            int64_t t) {
    for (size_t r = 0; r < rows.size(); ++r) {
      if (rows[r] < 0) continue;
      for (int64_t d = 0; d < D; ++d) {
        want[rows[r] * D + d].update(grad[r * D + d], 0.05, 0.1, config, t);
      }
    }
  };
  auto check = [&](const std::string& when) {
    std::vector<double> w, m, v;
    for (const ReferenceElement& e : want) {
      w.push_back(e.w);
      m.push_back(e.m);
      v.push_back(e.v);
    }
    expect_close(state_tensor(optimizer, "experts.master"), w, "master " + when);
    expect_close(state_tensor(optimizer, "experts.m"), m, "m " + when);
    expect_close(state_tensor(optimizer, "experts.v"), v, "v " + when);
  };

  // Update 1: rows 3 and 0; the -1 slot holds a huge gradient that must be ignored,
  // also by the norm.
  const std::vector<int32_t> rows1 = {3, -1, 0};
  const std::vector<float> grad1 = {0.5f, -0.2f, 0.1f, 1e30f, 1e30f, 1e30f, -0.3f, 0.4f, 0.25f};
  set_sparse_grad(table, rows1, grad1);
  optimizer.step(*comm);
  reference_step(rows1, grad1, 1);
  check("after update 1");
  // The norm covers slots 0 and 2 only (their fp32 inputs are within 1e-8 of the decimals).
  const double listed_squares = 0.25 + 0.04 + 0.01 + 0.09 + 0.16 + 0.0625;
  EXPECT_NEAR(optimizer.grad_norm(), std::sqrt(listed_squares), 1e-7);
  const std::vector<float> master_after_1 = state_tensor(optimizer, "experts.master");
  const std::vector<float> m_after_1 = state_tensor(optimizer, "experts.m");

  // Update 2: row 1 first seen at t = 2 (global bias correction), row 3 again; row 0 rests.
  const std::vector<int32_t> rows2 = {-1, 1, 3};
  const std::vector<float> grad2 = {7.0f, 7.0f, 7.0f, 0.2f, -0.6f, 0.05f, -0.1f, 0.3f, 0.7f};
  set_sparse_grad(table, rows2, grad2);
  optimizer.step(*comm);
  reference_step(rows2, grad2, 2);
  check("after update 2");

  const std::vector<float> master = state_tensor(optimizer, "experts.master");
  const std::vector<float> m = state_tensor(optimizer, "experts.m");
  const std::vector<float> v = state_tensor(optimizer, "experts.v");
  const std::vector<float> value = table.value.to_floats();
  for (int64_t d = 0; d < D; ++d) {
    // Row 0 untouched by update 2: no moment decay, no weight decay, bit for bit.
    EXPECT_EQ(master[0 * D + d], master_after_1[0 * D + d]);
    EXPECT_EQ(m[0 * D + d], m_after_1[0 * D + d]);
    for (int64_t row : {2, 4}) {  // never listed
      EXPECT_EQ(master[row * D + d], initial[row * D + d]);
      EXPECT_EQ(value[row * D + d], initial[row * D + d]);
      EXPECT_EQ(m[row * D + d], 0.0f);
      EXPECT_EQ(v[row * D + d], 0.0f);
    }
  }
}

TEST(OptimAdamW, RowSparseRejectsInvalidRows) {
  Parameter table = make_param("experts", std::vector<float>(6, 1.0f), {3, 2});
  AdamW optimizer(plain_config(), 10, {&table});
  auto comm = make_local_communicator();
  set_sparse_grad(table, {0, 3}, {1, 1, 1, 1});
  EXPECT_THROW(optimizer.step(*comm), Error);
  set_sparse_grad(table, {1, 1}, {1, 1, 1, 1});
  EXPECT_THROW(optimizer.step(*comm), Error);
  set_sparse_grad(table, {-2}, {1, 1});
  EXPECT_THROW(optimizer.step(*comm), Error);
  EXPECT_EQ(table.value.to_floats(), std::vector<float>(6, 1.0f));
}

TEST(OptimAdamW, RejectsMismatchedGradients) {
  Parameter p = make_param("w", {1.0f, 2.0f, 3.0f}, {3});
  AdamW optimizer(plain_config(), 10, {&p});
  auto comm = make_local_communicator();
  EXPECT_THROW(optimizer.step(*comm), Error);  // no gradient yet
  p.grad = Tensor::from_floats({1.0f, 2.0f}, {2}, DType::f32, Device::cpu);
  EXPECT_THROW(optimizer.step(*comm), Error);
  p.grad = Tensor::from_floats({1.0f, 2.0f, 3.0f}, {3}, DType::bf16, Device::cpu);
  EXPECT_THROW(optimizer.step(*comm), Error);
  set_dense_grad(p, {1.0f, 2.0f, 3.0f});
  EXPECT_THROW(optimizer.step(*comm, 0.0), Error);
  EXPECT_EQ(optimizer.step_count(), 0);
}

TEST(OptimAdamW, ClipsByGlobalNormAndReportsIt) {
  for (double clip : {1.0, 10.0}) {
    OptimConfig config = plain_config();
    config.clip = clip;
    Parameter dense = make_param("w", {0.0f}, {1});
    Parameter experts = make_param("experts", {0.0f}, {1, 1});
    experts.expert_table = true;
    AdamW optimizer(config, 10, {&dense, &experts});
    set_dense_grad(dense, {3.0f});
    set_dense_grad(experts, {4.0f});
    const double grad_scale = 0.5;
    optimizer.step(*make_local_communicator(), grad_scale);
    // ||(3, 4)|| = 5, times grad_scale.
    EXPECT_NEAR(optimizer.grad_norm(), 2.5, 1e-12);
    const double factor = grad_scale * std::min(1.0, clip / (2.5 + 1e-6));
    // m = (1 - b1) g after one update: shows the applied (scaled, clipped) gradient.
    expect_close(state_tensor(optimizer, "w.m"), {0.1 * 3 * factor}, "m of w");
    expect_close(state_tensor(optimizer, "experts.m"), {0.1 * 4 * factor}, "m of experts");
  }
}

// A stand-in for a 2-rank job whose other rank holds an expert shard with the same
// gradients: its all-reduce doubles the tensor.
class MirroredRankCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 2; }
  void all_reduce_sum(Tensor& t) override {
    ++all_reduces;
    reduced_numel = t.numel();
    for (int64_t i = 0; i < t.numel(); ++i) t.data<double>()[i] *= 2;
  }
  void broadcast(Tensor&, int) override { FLASHMOE_FAIL("not used by the optimizer"); }
  void all_to_all(const Tensor&, const std::vector<int64_t>&, Tensor&,
                  const std::vector<int64_t>&) override {
    FLASHMOE_FAIL("not used by the optimizer");
  }
  void all_gather(const Tensor&, Tensor&) override { FLASHMOE_FAIL("not used by the optimizer"); }
  void reduce_scatter_sum(const Tensor&, Tensor&) override {
    FLASHMOE_FAIL("not used by the optimizer");
  }
  void barrier() override { FLASHMOE_FAIL("not used by the optimizer"); }
  std::unique_ptr<Communicator> duplicate() const override {
    FLASHMOE_FAIL("not used by the optimizer");
  }
  int all_reduces = 0;
  int64_t reduced_numel = 0;
};

TEST(OptimAdamW, NormCountsEachShardOnceAndReplicatedOnce) {
  Parameter dense = make_param("w", {0.0f}, {1});
  Parameter experts = make_param("experts", {0.0f, 0.0f}, {2, 1});
  experts.expert_table = true;
  AdamW optimizer(plain_config(), 10, {&dense, &experts});
  set_dense_grad(dense, {3.0f});
  set_sparse_grad(experts, {1}, {4.0f});
  MirroredRankCommunicator comm;
  optimizer.step(comm);
  EXPECT_EQ(comm.all_reduces, 1);
  EXPECT_EQ(comm.reduced_numel, 1);
  // Expert shards: 16 on each of 2 ranks; the replicated 9 counted once.
  EXPECT_NEAR(optimizer.grad_norm(), std::sqrt(2 * 16.0 + 9.0), 1e-12);
}

TEST(OptimAdamW, Bf16ValueIsTheRoundedMaster) {
  OptimConfig config = plain_config();
  config.lr = 1e-3;  // steps below bf16 resolution: only the master keeps them
  const std::vector<float> initial = {1.0f, -0.3f, 0.7f, 2.5f, -1.25f};
  Parameter p = make_param("w", initial, {5}, DType::bf16);
  AdamW optimizer(config, 10, {&p});
  auto comm = make_local_communicator();
  for (int t = 0; t < 3; ++t) {
    set_dense_grad(p, {0.5f, -0.5f, 0.25f, 1.0f, -2.0f});
    optimizer.step(*comm);
  }
  const std::vector<float> master = state_tensor(optimizer, "w.master");
  const std::vector<bf16> value = p.value.to_vector<bf16>();
  for (size_t i = 0; i < master.size(); ++i) {
    EXPECT_EQ(value[i].bits, to_bf16(master[i]).bits) << "element " << i;
    // Three updates of about lr * sign(g) each, from the bf16-rounded start.
    const float start = round_bf16(initial[i]);
    EXPECT_NEAR(master[i], start - (i == 1 || i == 4 ? -3e-3f : 3e-3f), 1e-6) << "element " << i;
  }
}

TEST(OptimAdamW, StateRestoresTrainingBitForBit) {
  OptimConfig config = plain_config();
  config.weight_decay = 0.1;
  config.clip = 0.5;
  config.schedule = Schedule::cosine;
  config.warmup = 1;
  const std::vector<std::vector<float>> grads = {
      {0.5f, -1.0f, 0.25f, 2.0f}, {-0.3f, 0.7f, 0.1f, 0.4f}, {0.9f, 0.2f, -0.6f, 0.05f}};
  auto make_params = [](std::vector<Parameter>& params) {
    params.push_back(make_param("w", {0.1f, 0.2f}, {2}, DType::bf16));
    params.push_back(make_param("experts", {1.0f, -1.0f}, {2, 1}));
    params.back().expert_table = true;
  };
  auto load_grads = [](std::vector<Parameter>& params, const std::vector<float>& g) {
    set_dense_grad(params[0], {g[0], g[1]});
    set_sparse_grad(params[1], {1, -1}, {g[2], g[3]});
  };
  auto comm = make_local_communicator();

  std::vector<Parameter> straight;
  make_params(straight);
  AdamW uninterrupted(config, 3, {&straight[0], &straight[1]});
  for (const std::vector<float>& g : grads) {
    load_grads(straight, g);
    uninterrupted.step(*comm);
  }

  std::vector<Parameter> first;
  make_params(first);
  AdamW before(config, 3, {&first[0], &first[1]});
  for (int t = 0; t < 2; ++t) {
    load_grads(first, grads[t]);
    before.step(*comm);
  }
  std::vector<std::string> names;
  for (const OptimizerTensor& s : before.state()) names.push_back(s.name);
  EXPECT_EQ(names, (std::vector<std::string>{"w.master", "w.m", "w.v", "experts.master",
                                             "experts.m", "experts.v", "optimizer.step"}));

  // A fresh optimizer over fresh parameters, restored from the saved tensors.
  std::vector<Parameter> resumed;
  make_params(resumed);
  for (int i = 0; i < 2; ++i) resumed[i].value.copy_from(first[i].value);
  AdamW after(config, 3, {&resumed[0], &resumed[1]});
  const std::vector<OptimizerTensor> saved = before.state();
  std::vector<OptimizerTensor> restored = after.state();
  for (size_t i = 0; i < saved.size(); ++i) restored[i].tensor.copy_from(saved[i].tensor);
  EXPECT_EQ(after.step_count(), 2);
  load_grads(resumed, grads[2]);
  after.step(*comm);

  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(resumed[i].value.to_floats(), straight[i].value.to_floats()) << resumed[i].name;
  }
  const std::vector<OptimizerTensor> want = uninterrupted.state(), got = after.state();
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(got[i].tensor.to_doubles(), want[i].tensor.to_doubles()) << want[i].name;
  }
  EXPECT_EQ(after.grad_norm(), uninterrupted.grad_norm());
}

TEST(Schedule, WarmupRampsLinearlyToThePeak) {
  OptimConfig config;
  config.warmup = 10;
  const LrSchedule schedule = make_lr_schedule(config, 110);
  EXPECT_DOUBLE_EQ(lr_factor(schedule, 0), 0.1);
  EXPECT_DOUBLE_EQ(lr_factor(schedule, 4), 0.5);
  EXPECT_DOUBLE_EQ(lr_factor(schedule, 9), 1.0);
}

TEST(Schedule, CosineDecaysToTheMinimumAtTheLastStep) {
  OptimConfig config;
  config.warmup = 10;
  config.min_lr_ratio = 0.1;
  const LrSchedule schedule = make_lr_schedule(config, 110);
  EXPECT_DOUBLE_EQ(lr_factor(schedule, 10), 1.0);
  // A quarter of the way: 0.1 + 0.9 * (1 + cos(pi / 4)) / 2.
  EXPECT_NEAR(lr_factor(schedule, 35), 0.1 + 0.45 * (1 + std::sqrt(0.5)), 1e-15);
  EXPECT_NEAR(lr_factor(schedule, 60), 0.55, 1e-15);
  EXPECT_DOUBLE_EQ(lr_factor(schedule, 110), 0.1);
  EXPECT_DOUBLE_EQ(lr_factor(schedule, 500), 0.1);
  EXPECT_GT(lr_factor(schedule, 109), 0.1);
}

TEST(Schedule, ConstantHoldsThePeakAfterWarmup) {
  OptimConfig config;
  config.warmup = 4;
  config.schedule = Schedule::constant;
  const LrSchedule schedule = make_lr_schedule(config, 100);
  EXPECT_DOUBLE_EQ(lr_factor(schedule, 1), 0.5);
  for (int64_t step : {4, 50, 99, 150}) EXPECT_DOUBLE_EQ(lr_factor(schedule, step), 1.0);
}

TEST(Schedule, EdgeCasesAndScaledLr) {
  OptimConfig config;
  config.lr = 3e-4;
  config.warmup = 0;
  config.min_lr_ratio = 0.2;
  EXPECT_DOUBLE_EQ(scheduled_lr(config, 50, 0), 3e-4);  // no warmup: starts at the peak
  EXPECT_DOUBLE_EQ(scheduled_lr(config, 50, 50), 3e-4 * 0.2);
  config.warmup = 10;  // warmup longer than the run: ramp, then the minimum
  EXPECT_DOUBLE_EQ(scheduled_lr(config, 5, 4), 3e-4 * 0.5);
  EXPECT_DOUBLE_EQ(scheduled_lr(config, 5, 12), 3e-4 * 0.2);
  EXPECT_THROW(scheduled_lr(config, 0, 0), Error);
  EXPECT_THROW(scheduled_lr(config, 5, -1), Error);
}

}  // namespace
}  // namespace flashmoe
