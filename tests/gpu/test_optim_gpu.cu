// AdamW on the GPU: equal to the CPU path to fp32 rounding over odd shapes, fp32 and bf16,
// dense and row-sparse; bitwise repeatable; and replayable from a captured CUDA graph.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/graph.h"
#include "core/stream.h"
#include "optim/adamw.h"
#include "parallel/communicator.h"
#include "tests/test_util.h"

namespace flashmoe {
namespace {

using test::bytes_of;

struct ParamSpec {
  std::string name;
  Shape shape;
  DType dtype;
  int64_t sparse_slots;  // -1: dense gradient
  bool expert_table;
  bool weight_decay;
};

const std::vector<ParamSpec>& mixed_specs() {
  static const std::vector<ParamSpec> specs = {
      {"scalar", {1}, DType::f32, -1, false, true},
      {"gain", {7}, DType::bf16, -1, false, false},
      {"small", {33, 5}, DType::f32, -1, false, true},
      {"large", {4099, 129}, DType::bf16, -1, false, true},  // 130 norm chunks
      {"wide", {1031, 1025}, DType::f32, -1, false, true},   // 256 chunks of 4128 and less
      {"dense_experts", {9, 11}, DType::bf16, -1, true, true},
      {"experts", {257, 13}, DType::f32, 40, true, true},
      {"experts_bf16", {1000, 3}, DType::bf16, 333, true, false},
      {"narrow_experts", {64, 1}, DType::f32, 64, true, true},
  };
  return specs;
}

OptimConfig test_config() {
  OptimConfig c;
  c.lr = 1e-2;
  c.expert_lr = 3e-2;
  c.betas = {0.9, 0.95};
  c.eps = 1e-8;
  c.weight_decay = 0.1;
  c.warmup = 2;
  c.schedule = Schedule::cosine;
  c.min_lr_ratio = 0.1;
  c.clip = 0.5;  // far below the random gradients' norm: clipping is active
  return c;
}

constexpr int kSteps = 4;
constexpr int64_t kTotalSteps = 10;
constexpr double kGradScale = 0.25;

std::vector<float> uniform_floats(std::mt19937_64& rng, int64_t n, float bound) {
  std::uniform_real_distribution<float> dist(-bound, bound);
  std::vector<float> out(static_cast<size_t>(n));
  for (float& x : out) x = dist(rng);
  return out;
}

// Parameters with seeded random values on `device`: the same values on every device.
std::vector<Parameter> make_params(const std::vector<ParamSpec>& specs, Device device) {
  std::vector<Parameter> params;
  std::mt19937_64 rng(7);
  for (const ParamSpec& s : specs) {
    Parameter p;
    p.name = s.name;
    int64_t numel = 1;
    for (int64_t d : s.shape) numel *= d;
    p.value = Tensor::from_floats(uniform_floats(rng, numel, 1.0f), s.shape, s.dtype, device);
    p.expert_table = s.expert_table;
    p.weight_decay = s.weight_decay;
    params.push_back(std::move(p));
  }
  return params;
}

std::vector<Parameter*> pointers(std::vector<Parameter>& params) {
  std::vector<Parameter*> out;
  for (Parameter& p : params) out.push_back(&p);
  return out;
}

// t = host values, copied into t's storage when it already has that shape (so a captured
// graph sees the new values), else into a new tensor on `device`.
void load(Tensor& t, const Tensor& host, Device device) {
  if (t.defined() && t.shape() == host.shape() && t.dtype() == host.dtype() &&
      t.device() == device) {
    t.copy_from(host);
  } else {
    t = host.to(device);
  }
}

// The seeded gradients of update `step`. Row-sparse slots list distinct random rows, about
// a quarter of them -1; at step 2 every slot of narrow_experts is -1.
void load_gradients(const std::vector<ParamSpec>& specs, std::vector<Parameter>& params, int step,
                    Device device) {
  std::mt19937_64 rng(1000 + step);
  for (size_t i = 0; i < specs.size(); ++i) {
    const ParamSpec& s = specs[i];
    Parameter& p = params[i];
    if (s.sparse_slots < 0) {
      int64_t numel = 1;
      for (int64_t d : s.shape) numel *= d;
      load(p.grad,
           Tensor::from_floats(uniform_floats(rng, numel, 1.0f), s.shape, DType::f32, Device::cpu),
           device);
      continue;
    }
    const int64_t E = s.shape[0], D = s.shape[1], R = s.sparse_slots;
    std::vector<int32_t> order(static_cast<size_t>(E));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    std::vector<int32_t> rows(static_cast<size_t>(R));
    std::bernoulli_distribution unused(0.25);
    for (int64_t r = 0; r < R; ++r) {
      const bool all_unused = step == 2 && s.name == "narrow_experts";
      rows[r] = all_unused || unused(rng) ? -1 : order[r];
    }
    load(p.rows, Tensor::from_vector(rows, {R}, Device::cpu), device);
    load(p.grad,
         Tensor::from_floats(uniform_floats(rng, R * D, 1.0f), {R, D}, DType::f32, Device::cpu),
         device);
  }
}

// Everything an update writes: parameter values, optimizer state, and the norms.
struct Outcome {
  std::vector<std::vector<uint8_t>> tensors;
  std::vector<double> norms;
};

Outcome run_gpu(const std::vector<ParamSpec>& specs) {
  std::vector<Parameter> params = make_params(specs, Device::cuda);
  AdamW optimizer(test_config(), kTotalSteps, pointers(params));
  auto comm = make_local_communicator();
  Outcome out;
  for (int step = 0; step < kSteps; ++step) {
    load_gradients(specs, params, step, Device::cuda);
    optimizer.step(*comm, kGradScale);
    out.norms.push_back(optimizer.grad_norm());
  }
  for (const Parameter& p : params) out.tensors.push_back(bytes_of(p.value));
  for (const OptimizerTensor& s : optimizer.state()) out.tensors.push_back(bytes_of(s.tensor));
  return out;
}

// kSteps updates on the CPU and the GPU from the same seeded gradients.
void expect_gpu_matches_cpu(const std::vector<ParamSpec>& specs) {
  std::vector<Parameter> cpu = make_params(specs, Device::cpu);
  std::vector<Parameter> gpu = make_params(specs, Device::cuda);
  AdamW cpu_optimizer(test_config(), kTotalSteps, pointers(cpu));
  AdamW gpu_optimizer(test_config(), kTotalSteps, pointers(gpu));
  auto comm = make_local_communicator();
  for (int step = 0; step < kSteps; ++step) {
    load_gradients(specs, cpu, step, Device::cpu);
    load_gradients(specs, gpu, step, Device::cuda);
    cpu_optimizer.step(*comm, kGradScale);
    gpu_optimizer.step(*comm, kGradScale);
    const double want_norm = cpu_optimizer.grad_norm();
    EXPECT_GT(want_norm, test_config().clip) << "clipping should be active";
    EXPECT_NEAR(gpu_optimizer.grad_norm(), want_norm, 1e-9 * want_norm) << "step " << step;

    const std::vector<OptimizerTensor> want = cpu_optimizer.state(), got = gpu_optimizer.state();
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < want.size(); ++i) {
      if (want[i].tensor.dtype() != DType::f32) continue;  // the step counter, below
      EXPECT_LT(test::relative_error(got[i].tensor, want[i].tensor), 1e-6)
          << want[i].name << " after update " << step + 1;
    }
    EXPECT_EQ(gpu_optimizer.step_count(), step + 1);
    for (size_t i = 0; i < specs.size(); ++i) {
      if (specs[i].dtype == DType::f32) {
        EXPECT_LT(test::relative_error(gpu[i].value, cpu[i].value), 1e-6) << specs[i].name;
        continue;
      }
      // bf16 values may round the (slightly different) masters to neighbouring bf16 values;
      // what must hold is value = the GPU's own master, rounded.
      const std::vector<bf16> value = gpu[i].value.to_vector<bf16>();
      const std::vector<float> master = got[3 * i].tensor.to_floats();
      ASSERT_EQ(value.size(), master.size());
      for (size_t e = 0; e < value.size(); ++e) {
        ASSERT_EQ(value[e].bits, to_bf16(master[e]).bits) << specs[i].name << " element " << e;
      }
    }
  }
}

TEST(OptimGpu, MatchesCpuOverShapesDtypesAndSparsity) {
  FLASHMOE_REQUIRE_GPU();
  expect_gpu_matches_cpu(mixed_specs());
}

// More parameters than one multi-tensor launch takes (64), so the updates and the norm's
// chunks span three launches; one expert table has no gradient slots at all.
TEST(OptimGpu, MatchesCpuOverSeveralLaunches) {
  FLASHMOE_REQUIRE_GPU();
  std::vector<ParamSpec> specs = {{"no_slots", {5, 4}, DType::f32, 0, true, true}};
  for (int copy = 0; specs.size() < 2 * 64 + 3; ++copy) {
    for (ParamSpec s : mixed_specs()) {
      if (s.name == "wide") continue;  // keeps the CPU side quick
      s.name += "." + std::to_string(copy);
      specs.push_back(s);
    }
  }
  expect_gpu_matches_cpu(specs);
}

TEST(OptimGpu, BitwiseRepeatable) {
  FLASHMOE_REQUIRE_GPU();
  const Outcome first = run_gpu(mixed_specs());
  const Outcome second = run_gpu(mixed_specs());
  EXPECT_EQ(first.norms, second.norms);
  ASSERT_EQ(first.tensors.size(), second.tensors.size());
  for (size_t i = 0; i < first.tensors.size(); ++i) {
    EXPECT_TRUE(first.tensors[i] == second.tensors[i]) << "tensor " << i << " differs";
  }
}

// step() neither allocates nor synchronises, and reads t and the lr from device memory:
// one captured step replayed kSteps times equals kSteps eager steps bit for bit.
TEST(OptimGpu, CapturedStepReplaysLikeEagerSteps) {
  FLASHMOE_REQUIRE_GPU();
  const std::vector<ParamSpec>& specs = mixed_specs();
  const Outcome eager = run_gpu(specs);

  std::vector<Parameter> params = make_params(specs, Device::cuda);
  AdamW optimizer(test_config(), kTotalSteps, pointers(params));
  auto comm = make_local_communicator();
  load_gradients(specs, params, 0, Device::cuda);
  CapturedGraph graph([&] { optimizer.step(*comm, kGradScale); });
  EXPECT_EQ(optimizer.step_count(), 0) << "capture must not run the step";

  Outcome replayed;
  for (int step = 0; step < kSteps; ++step) {
    load_gradients(specs, params, step, Device::cuda);  // into the captured buffers
    graph.replay();
    replayed.norms.push_back(optimizer.grad_norm());
  }
  for (const Parameter& p : params) replayed.tensors.push_back(bytes_of(p.value));
  for (const OptimizerTensor& s : optimizer.state()) replayed.tensors.push_back(bytes_of(s.tensor));

  EXPECT_EQ(replayed.norms, eager.norms);
  ASSERT_EQ(replayed.tensors.size(), eager.tensors.size());
  for (size_t i = 0; i < eager.tensors.size(); ++i) {
    EXPECT_TRUE(replayed.tensors[i] == eager.tensors[i]) << "tensor " << i << " differs";
  }
}

}  // namespace
}  // namespace flashmoe
