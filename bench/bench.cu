// flashmoe-bench: times the router and expert kernels (and later the layer) on
// the SPEC section 11 cases with CUDA events: warm-up, >= 20 repetitions, the
// median, and inputs rotated across several sets so the L2 cache does not
// flatter. Every time is also read against the measured device-to-device copy
// bandwidth: bytes / time over the copy rate is the fraction of the memory
// roofline reached, where bytes is the least traffic the op must make.
//
//   flashmoe-bench [--case NAME]... [--reps N] [--json FILE]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "core/graph.h"
#include "core/philox.h"
#include "core/stream.h"
#include "core/tensor.h"
#include "kernels/attention.h"
#include "kernels/experts.h"
#include "kernels/flashmoe_layer.h"
#include "kernels/router.h"

namespace flashmoe {
namespace {

struct Options {
  std::vector<std::string> cases;
  int reps = 50;
  std::string json;
};

struct Result {
  std::string name, op;
  double ms;
  double bytes;         // least device-memory traffic; 0 where not modelled
  double peak_gib = 0;  // peak device memory of the case, 0 where not measured
};

// Device-to-device copy of 1 GiB; counts bytes read plus bytes written.
double copy_bandwidth_gbs() {
  const size_t bytes = size_t(1) << 30;
  Tensor a = Tensor::empty({int64_t(bytes / 4)}, DType::i32, Device::cuda);
  a.fill_bytes(0xa5);  // not zeros: timings on zeros can flatter
  Tensor b = Tensor::empty({int64_t(bytes / 4)}, DType::i32, Device::cuda);
  double ms = time_median_ms(
      [&](int) {
        CUDA_CHECK(
            cudaMemcpyAsync(b.raw(), a.raw(), bytes, cudaMemcpyDeviceToDevice, current_stream()));
      },
      20);
  return 2.0 * bytes / (ms * 1e-3) / 1e9;
}

// Enough input sets that together they exceed the L2 cache twice, at most 8.
int rotation_sets(double bytes_per_set) {
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  int sets = static_cast<int>(2.0 * prop.l2CacheSize / std::max(bytes_per_set, 1.0)) + 1;
  return std::clamp(sets, 2, 8);
}

struct RouterCase {
  const char* name;
  int64_t T;
  int N, K, H;
};

void bench_router(const RouterCase& c, const Options& opt, std::vector<Result>& results) {
  const double logit_bytes = double(c.T) * c.H * 2 * c.N * 2;
  const int sets = rotation_sets(logit_bytes);
  std::vector<Tensor> logits;
  for (int s = 0; s < sets; ++s) {
    logits.push_back(random_tensor({c.T, c.H, 2, c.N}, DType::bf16, 100 + s, 4.0f));
  }
  std::vector<RouterOutputs> outs(sets);
  for (int s = 0; s < sets; ++s) router_forward(logits[s], c.K, false, outs[s]);
  Tensor dgates = random_tensor({c.T, c.H, c.K}, DType::f32, 7, 1.0f);
  Tensor dlogits = Tensor::empty({c.T, c.H, 2, c.N}, DType::f32, Device::cuda);
  const double out_bytes = double(c.T) * c.H * (c.K * 8 + 2 * 4);
  double fwd = time_median_ms(
      [&](int i) { router_forward(logits[i % sets], c.K, false, outs[i % sets]); }, opt.reps);
  results.push_back({c.name, "router fwd", fwd, logit_bytes + out_bytes});
  double bwd = time_median_ms(
      [&](int i) { router_backward(logits[i % sets], outs[i % sets], dgates, false, dlogits); },
      opt.reps);
  // Reads logits, logsumexp, ids, gates and dgates; writes fp32 dlogits.
  const double dlogit_bytes = double(c.T) * c.H * 2 * c.N * 4;
  results.push_back(
      {c.name, "router bwd", bwd, logit_bytes + out_bytes + c.T * c.H * c.K * 4.0 + dlogit_bytes});
}

// With owners = P > 1, the load of one owner of 1/P of the experts under expert
// parallelism: P T rows (every rank's tokens), E / P local experts, and a slot empty
// (id -1) unless its uniform id over the whole table falls in the owner's shard.
struct ExpertCase {
  const char* name;
  int64_t T, D, E, S;
  int owners = 1;
};

void bench_experts(const ExpertCase& whole, const Options& opt, std::vector<Result>& results) {
  const int64_t local_E = whole.E / whole.owners;
  const ExpertCase c{whole.name, whole.T * whole.owners, whole.D, local_E, whole.S};
  const double table_bytes = 2.0 * c.E * c.D * 2;
  const int sets = rotation_sets(table_bytes);
  // The tables are the large operand; rotating them keeps L2 honest. The index
  // sets rotate with them (uniform random experts, as a balanced router gives).
  std::vector<ExpertInputs> inputs(sets);
  for (int s = 0; s < sets; ++s) {
    ExpertInputs& in = inputs[s];
    in.x = random_tensor({c.T, c.D}, DType::bf16, 200 + s, 1.0f);
    in.down_embed = random_tensor({c.E, c.D}, DType::bf16, 300 + s, 0.05f);
    in.up_embed = random_tensor({c.E, c.D}, DType::bf16, 400 + s, 0.05f);
    std::vector<int32_t> ids(c.T * c.S);
    for (size_t i = 0; i < ids.size(); ++i) {
      const int64_t id = philox_u32(500 + s, 0, i) % whole.E;
      ids[i] = id < local_E ? static_cast<int32_t>(id) : -1;
    }
    in.ids = Tensor::from_vector(ids, {c.T, c.S}, Device::cuda);
    in.gates = random_tensor({c.T, c.S}, DType::f32, 600 + s, 1.0f);
    in.validate_ids = false;
  }
  Tensor y, h;
  Tensor dy = random_tensor({c.T, c.D}, DType::bf16, 700, 1.0f);
  ExpertGrads grads;
  const GradLayout layout = c.E > 65536 ? GradLayout::row_sparse : GradLayout::dense;
  experts_forward(inputs[0], y, h);
  experts_backward(inputs[0], h, dy, layout, grads);

  const double pairs = double(c.T) * c.S / whole.owners;           // filled ones
  const double touched = std::min<double>(c.E, pairs);             // rows read at least once
  const double io = 2.0 * c.T * c.D * 2 + double(c.T) * c.S * 12;  // x, y, ids, gates, h
  const double fwd_bytes = io + 2 * touched * c.D * 2;
  const double grad_rows = layout == GradLayout::dense ? c.E : touched;
  const double bwd_bytes = io + c.T * c.D * 2 * 2 + 2 * touched * c.D * 2 + 2 * grad_rows * c.D * 4;
  double fwd = time_median_ms([&](int i) { experts_forward(inputs[i % sets], y, h); }, opt.reps);
  double bwd = time_median_ms(
      [&](int i) { experts_backward(inputs[i % sets], h, dy, layout, grads); }, opt.reps);
  double both = time_median_ms(
      [&](int i) {
        experts_forward(inputs[i % sets], y, h);
        experts_backward(inputs[i % sets], h, dy, layout, grads);
      },
      opt.reps);
  results.push_back({c.name, "experts fwd", fwd, fwd_bytes});
  results.push_back({c.name, "experts bwd", bwd, bwd_bytes});
  results.push_back({c.name, "experts fwd+bwd", both, fwd_bytes + bwd_bytes});
}

// Causal self-attention with RoPE, bf16 (the smoke model's: 64 sequences of 256 tokens,
// 4 heads of 64): forward, and forward+backward. Its time is mostly the head layouts
// and the softmaxes, not the products.
struct AttentionCase {
  const char* name;
  int64_t batch, seq_len, heads, head_dim;
};

void bench_attention(const AttentionCase& c, const Options& opt, std::vector<Result>& results) {
  const int64_t T = c.batch * c.seq_len, D = c.heads * c.head_dim;
  const int sets = rotation_sets(double(T) * 3 * D * 2);
  std::vector<Tensor> qkv;
  for (int s = 0; s < sets; ++s)
    qkv.push_back(random_tensor({T, 3 * D}, DType::bf16, 1000 + s, 1.0f));
  const Tensor dout = random_tensor({T, D}, DType::bf16, 1100, 1.0f);
  CausalSelfAttention attention(c.heads, c.head_dim,
                                make_rope_table(c.seq_len, c.head_dim, 10000.0, Device::cuda));
  AttentionWorkspace workspace;
  const double fwd = time_median_ms(
      [&](int i) { attention.forward(qkv[i % sets], c.batch, workspace); }, opt.reps);
  const double both = time_median_ms(
      [&](int i) {
        attention.forward(qkv[i % sets], c.batch, workspace);
        attention.backward(dout, workspace);
      },
      opt.reps);
  results.push_back({c.name, "attention fwd", fwd, 0});
  results.push_back({c.name, "attention fwd+bwd", both, 0});
}

// The whole layer, bf16: forward, forward+backward, and the peak device memory of a
// forward+backward (parameters, activations, gradients and workspaces).
void bench_layer(const LayerCase& c, const Options& opt, std::vector<Result>& results) {
  const MoeConfig moe = moe_config(c);
  const double table_bytes = 2.0 * c.E * c.D * 2;
  const int sets = std::min(rotation_sets(table_bytes), 2);
  // The peak of one layer's forward+backward, measured before the rotation copies exist.
  double peak_gib = 0;
  const int64_t base = device_bytes_in_use();
  reset_device_bytes_peak();
  std::vector<std::unique_ptr<FlashMoELayer>> layers;
  std::vector<Tensor> xs;
  Tensor dy = random_tensor({c.T, c.D}, DType::bf16, 900, 1.0f);
  for (int s = 0; s < sets; ++s) {
    layers.push_back(
        std::make_unique<FlashMoELayer>(c.D, moe, Device::cuda, DType::bf16, 1 + s, 0));
    xs.push_back(random_tensor({c.T, c.D}, DType::bf16, 800 + s, 1.0f));
    layers[s]->forward(xs[s], true);
    layers[s]->backward(dy);
    layers[s]->finish_backward();
    CUDA_CHECK(cudaDeviceSynchronize());
    if (s == 0) peak_gib = (device_bytes_peak() - base) / double(1 << 30);
  }
  const int reps = table_bytes > 1e9 ? 20 : opt.reps;
  double fwd = time_median_ms([&](int i) { layers[i % sets]->forward(xs[i % sets], true); }, reps);
  double both = time_median_ms(
      [&](int i) {
        layers[i % sets]->forward(xs[i % sets], true);
        layers[i % sets]->backward(dy);
        layers[i % sets]->finish_backward();
      },
      reps);
  // The same step replayed from a CUDA graph: the difference is host launch overhead.
  CapturedGraph step([&] {
    layers[0]->forward(xs[0], true);
    layers[0]->backward(dy);
    layers[0]->finish_backward();
  });
  double graphed = time_median_ms([&](int) { step.replay(); }, reps);
  results.push_back({c.name, "layer fwd", fwd, 0});
  results.push_back({c.name, "layer fwd+bwd", both, 0, peak_gib});
  results.push_back({c.name, "layer fwd+bwd, graph", graphed, 0});
}

bool selected(const Options& opt, const std::string& name) {
  return opt.cases.empty() ||
         std::find(opt.cases.begin(), opt.cases.end(), name) != opt.cases.end();
}

Options parse_args(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      FLASHMOE_CHECK(i + 1 < argc, arg << " needs a value");
      return argv[++i];
    };
    if (arg == "--case") {
      opt.cases.push_back(value());
    } else if (arg == "--reps") {
      opt.reps = std::stoi(value());
      FLASHMOE_CHECK(opt.reps >= 20, "--reps is " << opt.reps << ", expected >= 20");
    } else if (arg == "--json") {
      opt.json = value();
    } else {
      FLASHMOE_FAIL("unknown argument " << arg
                                        << ", expected --case NAME, --reps N or --json FILE");
    }
  }
  return opt;
}

void write_json(const std::string& path, const std::string& gpu, double copy_gbs,
                const std::vector<Result>& results) {
  std::ofstream out(path);
  FLASHMOE_CHECK(out, "cannot write " << path);
  out << "{\n  \"gpu\": \"" << gpu << "\",\n  \"copy_bandwidth_gbs\": " << copy_gbs
      << ",\n  \"results\": [\n";
  for (size_t i = 0; i < results.size(); ++i) {
    const Result& r = results[i];
    out << "    {\"case\": \"" << r.name << "\", \"op\": \"" << r.op
        << "\", \"median_ms\": " << r.ms << ", \"min_bytes\": " << r.bytes << "}"
        << (i + 1 < results.size() ? "," : "") << "\n";
  }
  out << "  ]\n}\n";
}

int run(int argc, char** argv) {
  Options opt = parse_args(argc, argv);
  FLASHMOE_CHECK(cuda_available(), "flashmoe-bench needs a CUDA device, found none");
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const double copy_gbs = copy_bandwidth_gbs();
  std::printf("GPU: %s, %d SMs, L2 %.0f MiB; device-to-device copy %.0f GB/s (read + write)\n",
              prop.name, prop.multiProcessorCount, prop.l2CacheSize / 1048576.0, copy_gbs);
  std::vector<Result> results;
  const RouterCase router_cases[] = {{"router-small", 4096, 64, 8, 1},
                                     {"router-large", 32768, 128, 16, 1},
                                     {"router-k64", 4096, 128, 64, 1},
                                     {"router-peer-1m", 4096, 1024, 16, 8}};
  for (const RouterCase& c : router_cases) {
    if (selected(opt, c.name)) bench_router(c, opt, results);
  }
  const ExpertCase expert_cases[] = {{"quickstart", 4096, 1024, 16384, 64},
                                     {"peer-1m", 4096, 1024, 1048576, 128},
                                     {"smoke", 16384, 256, 16384, 16},
                                     {"quickstart-k16", 4096, 1024, 16384, 16},
                                     {"smoke-owner-of-2", 16384, 256, 16384, 16, 2},
                                     {"smoke-owner-of-4", 16384, 256, 16384, 16, 4}};
  for (const ExpertCase& c : expert_cases) {
    if (selected(opt, c.name)) bench_experts(c, opt, results);
  }
  const AttentionCase attention_case{"smoke-attention", 64, 256, 4, 64};
  if (selected(opt, attention_case.name)) bench_attention(attention_case, opt, results);
  const LayerCase layer_cases[] = {{"quickstart", 4096, 1024, 4096, 16384, 64, 1},
                                   {"peer-1m", 4096, 1024, 4096, 1048576, 16, 8},
                                   {"heavy", 8192, 1024, 1024, 102400, 512, 1}};
  for (const LayerCase& c : layer_cases) {
    if (selected(opt, c.name) || selected(opt, std::string(c.name) + "-layer")) {
      bench_layer(c, opt, results);
    }
  }
  std::printf("\n| case | op | median ms | min bytes (MB) | GB/s | of copy BW | peak GiB |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  for (const Result& r : results) {
    const double gbs = r.bytes / (r.ms * 1e-3) / 1e9;
    if (r.bytes > 0) {
      std::printf("| %s | %s | %.4f | %.1f | %.0f | %.0f%% |", r.name.c_str(), r.op.c_str(), r.ms,
                  r.bytes / 1e6, gbs, 100.0 * gbs / copy_gbs);
    } else {
      std::printf("| %s | %s | %.4f | - | - | - |", r.name.c_str(), r.op.c_str(), r.ms);
    }
    if (r.peak_gib > 0) {
      std::printf(" %.2f |\n", r.peak_gib);
    } else {
      std::printf(" - |\n");
    }
  }
  if (!opt.json.empty()) write_json(opt.json, prop.name, copy_gbs, results);
  return 0;
}

}  // namespace
}  // namespace flashmoe

int main(int argc, char** argv) {
  try {
    return flashmoe::run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "flashmoe-bench: %s\n", e.what());
    return 1;
  }
}
