// Run configuration: one typed struct per YAML section, loaded from a file plus
// `--set key.path=value` overrides. Every key is validated when loaded, so the rest of
// the stack can trust these values; every error is one line naming the file and line
// (or the --set), the key path and what was expected. docs/config.md documents each key.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "kernels/activation.h"  // Activation: the kernels' enum, so configs pass straight through

namespace flashmoe {

enum class PosEmbedding : uint8_t { rope, learned };
enum class RouterNorm : uint8_t { batchnorm, rmsnorm, none };
enum class Precision : uint8_t { fp32, bf16 };
enum class Schedule : uint8_t { cosine, constant };
enum class DataKind : uint8_t { facts, text, tokens };
// How expert parallelism moves tokens between GPUs (parallel/expert_parallel.h).
enum class ExchangeKind : uint8_t { automatic, peer_copies, collectives };

// The spelling used in configs ("silu", "batchnorm", ...), for logs and to_yaml.
const char* to_string(PosEmbedding value);
const char* to_string(Activation value);
const char* to_string(RouterNorm value);
const char* to_string(Precision value);
const char* to_string(Schedule value);
const char* to_string(DataKind value);
const char* to_string(ExchangeKind value);

struct ModelConfig {
  int64_t vocab = 512;
  int64_t d_model = 64;
  int64_t n_layers = 2;
  int64_t n_heads = 4;
  int64_t seq_len = 32;
  // Blocks whose FFN is the FlashMoE layer; the others use a dense SwiGLU. When the key
  // is absent it means every block, so this default matches n_layers' default.
  std::vector<int64_t> moe_layers = {0, 1};
  PosEmbedding pos_embedding = PosEmbedding::rope;
  double rope_theta = 10000.0;
  double norm_eps = 1e-5;
  bool operator==(const ModelConfig&) const = default;
};

struct MoeConfig {
  int64_t num_experts = 256;  // E = N², N product keys per half
  int64_t top_k = 8;          // experts per token per head
  int64_t heads = 1;
  int64_t shared_intermediate = 256;
  Activation act = Activation::silu;
  RouterNorm router_norm = RouterNorm::batchnorm;
  bool norm_topk_prob = false;
  double balance_loss = 0;  // alpha of the router's load-balancing loss; 0: none
  double bn_momentum = 0.1;
  double bn_eps = 1e-5;
  ExchangeKind exchange = ExchangeKind::automatic;
  bool operator==(const MoeConfig&) const = default;
};

struct TrainConfig {
  Device device = Device::cpu;
  Precision precision = Precision::fp32;
  // Tokens per optimizer step over all ranks and all grad_accum micro-batches.
  int64_t batch_tokens = 1024;
  int64_t steps = 300;
  int64_t grad_accum = 1;
  uint64_t seed = 1234;
  bool deterministic = true;
  int64_t eval_every = 100;  // 0: never
  int64_t eval_tokens = 4096;
  bool operator==(const TrainConfig&) const = default;
};

struct OptimConfig {
  double lr = 1e-3;
  double expert_lr = 1e-3;  // when the key is absent: lr
  std::array<double, 2> betas = {0.9, 0.95};
  double eps = 1e-8;
  double weight_decay = 0.1;
  int64_t warmup = 30;  // steps
  Schedule schedule = Schedule::cosine;
  double min_lr_ratio = 0.1;  // final lr / peak lr of the cosine schedule
  double clip = 1.0;          // max global grad norm; 0: no clipping
  bool operator==(const OptimConfig&) const = default;
};

struct FactsConfig {
  int64_t num_subjects = 1024;
  int64_t num_relations = 8;
  uint64_t seed = 1;
  bool operator==(const FactsConfig&) const = default;
};

struct DataConfig {
  DataKind kind = DataKind::facts;
  std::string path;         // text or token file; unused by facts
  int64_t token_bytes = 2;  // 2: uint16 ids, 4: uint32 ids
  double eval_fraction = 0.1;
  FactsConfig facts;
  bool operator==(const DataConfig&) const = default;
};

struct CheckpointConfig {
  std::string dir = "checkpoints";
  int64_t every = 0;  // steps; 0: never
  int64_t keep = 3;
  std::string resume = "auto";  // "auto", "never" or a checkpoint directory
  bool operator==(const CheckpointConfig&) const = default;
};

struct LogConfig {
  int64_t every = 10;  // steps
  std::string file;    // empty: stderr only
  bool operator==(const LogConfig&) const = default;
};

struct RunConfig {
  ModelConfig model;
  MoeConfig moe;
  TrainConfig train;
  OptimConfig optim;
  DataConfig data;
  CheckpointConfig checkpoint;
  LogConfig log;
  bool operator==(const RunConfig&) const = default;
};

// Reads and validates `path`, then applies the overrides ("key.path=value", the value a
// YAML scalar or flow sequence) before validation. Throws flashmoe::Error.
RunConfig load_config(const std::string& path, const std::vector<std::string>& overrides = {});

// As load_config on YAML text; `source_name` stands for the file in error messages.
RunConfig parse_config(const std::string& yaml_text, const std::string& source_name,
                       const std::vector<std::string>& overrides = {});

// Every key with its resolved value; parse_config(to_yaml(c), ...) == c.
std::string to_yaml(const RunConfig& config);

}  // namespace flashmoe
