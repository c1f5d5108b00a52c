#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <limits>

#include "core/config.h"
#include "tests/test_util.h"

namespace flashmoe {
namespace {

// The message of the Error that parsing throws, or a note that it threw none.
std::string error_of(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  return test::error_of([&] { parse_config(yaml, "x.yaml", overrides); });
}

std::vector<std::filesystem::path> shipped_configs() {
  std::vector<std::filesystem::path> files;
  for (const auto& entry : std::filesystem::directory_iterator(FLASHMOE_SOURCE_DIR "/configs")) {
    if (entry.path().extension() == ".yaml") files.push_back(entry.path());
  }
  return files;
}

TEST(ConfigFiles, EveryShippedConfigParsesAndRoundTrips) {
  std::vector<std::filesystem::path> files = shipped_configs();
  ASSERT_GE(files.size(), 3u);
  for (const auto& file : files) {
    SCOPED_TRACE(file.string());
    RunConfig config = load_config(file.string());
    EXPECT_EQ(parse_config(to_yaml(config), "dump"), config);
  }
}

TEST(ConfigFiles, ShippedConfigsSayWhatTheyPromise) {
  const std::string dir = FLASHMOE_SOURCE_DIR "/configs/";
  RunConfig tiny = load_config(dir + "cpu-tiny.yaml");
  EXPECT_EQ(tiny.train.device, Device::cpu);
  EXPECT_EQ(tiny.train.precision, Precision::fp32);
  EXPECT_EQ(tiny.moe.num_experts, 256);
  RunConfig smoke = load_config(dir + "smoke.yaml");
  EXPECT_EQ(smoke.train.device, Device::cuda);
  EXPECT_EQ(smoke.train.precision, Precision::bf16);
  EXPECT_EQ(smoke.moe.num_experts, 16384);
  EXPECT_EQ(smoke.moe.top_k, 16);
  RunConfig peer = load_config(dir + "peer-1m.yaml");
  EXPECT_EQ(peer.moe.num_experts, 1048576);
  EXPECT_EQ(peer.moe.heads, 8);
  EXPECT_EQ(peer.moe.top_k, 16);
}

TEST(ConfigDefaults, EmptyDocumentGivesTheDefaults) {
  EXPECT_EQ(parse_config("", "empty.yaml"), RunConfig{});
  EXPECT_EQ(parse_config("# only a comment\n", "empty.yaml"), RunConfig{});
}

TEST(ConfigDefaults, AbsentMoeLayersMeansEveryBlock) {
  RunConfig config = parse_config("model:\n  n_layers: 4\n", "x.yaml");
  EXPECT_EQ(config.model.moe_layers, (std::vector<int64_t>{0, 1, 2, 3}));
  RunConfig dense = parse_config("model:\n  n_layers: 4\n  moe_layers: []\n", "x.yaml");
  EXPECT_TRUE(dense.model.moe_layers.empty());
}

TEST(ConfigDefaults, AbsentExpertLrFollowsLr) {
  EXPECT_EQ(parse_config("optim:\n  lr: 0.02\n", "x.yaml").optim.expert_lr, 0.02);
  EXPECT_EQ(parse_config("optim:\n  lr: 0.02\n  expert_lr: 0.5\n", "x.yaml").optim.expert_lr, 0.5);
}

TEST(ConfigValues, ParsesEveryType) {
  RunConfig config = parse_config(
      "model: {pos_embedding: learned, norm_eps: 1.0e-6}\n"
      "moe: {act: gelu, router_norm: none, norm_topk_prob: true, balance_loss: 0.01,\n"
      "      exchange: collectives}\n"
      "train: {seed: 18446744073709551615, deterministic: False}\n"
      "optim: {betas: [0.8, 0.99], schedule: constant}\n"
      "data: {kind: tokens, path: 'data/ids.bin', token_bytes: 4}\n"
      "log: {file:}\n",
      "x.yaml");
  EXPECT_EQ(config.model.pos_embedding, PosEmbedding::learned);
  EXPECT_EQ(config.model.norm_eps, 1e-6);
  EXPECT_EQ(config.moe.act, Activation::gelu);
  EXPECT_EQ(config.moe.router_norm, RouterNorm::none);
  EXPECT_TRUE(config.moe.norm_topk_prob);
  EXPECT_EQ(config.moe.balance_loss, 0.01);
  EXPECT_EQ(config.moe.exchange, ExchangeKind::collectives);
  EXPECT_EQ(config.train.seed, std::numeric_limits<uint64_t>::max());
  EXPECT_FALSE(config.train.deterministic);
  EXPECT_EQ(config.optim.betas, (std::array<double, 2>{0.8, 0.99}));
  EXPECT_EQ(config.optim.schedule, Schedule::constant);
  EXPECT_EQ(config.data.kind, DataKind::tokens);
  EXPECT_EQ(config.data.path, "data/ids.bin");
  EXPECT_EQ(config.data.token_bytes, 4);
  EXPECT_EQ(config.log.file, "");
}

TEST(ConfigErrors, UnknownKeyListsTheKnownOnes) {
  EXPECT_EQ(error_of("model:\n  vocab: 512\n  d_modle: 64\n"),
            "x.yaml:3: unknown key model.d_modle (known keys of model: vocab, d_model, "
            "n_layers, n_heads, seq_len, moe_layers, pos_embedding, rope_theta, norm_eps)");
  EXPECT_EQ(error_of("modle: {}\n"),
            "x.yaml:1: unknown key modle (known keys: model, moe, train, optim, data, "
            "checkpoint, log)");
  EXPECT_EQ(error_of("data:\n  facts:\n    subjects: 3\n"),
            "x.yaml:3: unknown key data.facts.subjects (known keys of data.facts: "
            "num_subjects, num_relations, seed)");
}

TEST(ConfigErrors, WrongType) {
  EXPECT_EQ(error_of("model:\n  d_model: abc\n"),
            "x.yaml:2: model.d_model is abc, expected an integer in [1, 65536]");
  EXPECT_EQ(error_of("model:\n  d_model: 64.5\n"),
            "x.yaml:2: model.d_model is 64.5, expected an integer in [1, 65536]");
  // A quoted number is a string: say so instead of guessing.
  EXPECT_EQ(error_of("moe:\n  top_k: \"8\"\n"),
            "x.yaml:2: moe.top_k is \"8\", expected an integer in [1, 512]");
  EXPECT_EQ(error_of("moe:\n  top_k:\n"),
            "x.yaml:2: moe.top_k is empty, expected an integer in [1, 512]");
  EXPECT_EQ(error_of("moe:\n  norm_topk_prob: yes\n"),
            "x.yaml:2: moe.norm_topk_prob is yes, expected true or false");
  EXPECT_EQ(error_of("moe:\n  act: swish\n"),
            "x.yaml:2: moe.act is swish, expected one of silu, gelu, relu");
  EXPECT_EQ(error_of("optim:\n  betas: 0.9\n"),
            "x.yaml:2: optim.betas is 0.9, expected a list of 2 numbers in [0, 1)");
  EXPECT_EQ(error_of("model: [1, 2]\n"), "x.yaml:1: model is a list, expected a mapping");
  EXPECT_EQ(error_of("checkpoint:\n  resume: {a: 1}\n"),
            "x.yaml:2: checkpoint.resume is a mapping, expected a non-empty string");
  EXPECT_EQ(error_of("- model\n"),
            "x.yaml:1: the config is a list, expected a mapping of sections");
}

TEST(ConfigErrors, OutOfRange) {
  EXPECT_EQ(error_of("moe:\n  top_k: 0\n"),
            "x.yaml:2: moe.top_k is 0, expected an integer in [1, 512]");
  EXPECT_EQ(error_of("optim:\n  lr: 0\n"), "x.yaml:2: optim.lr is 0, expected a number in (0, 10]");
  EXPECT_EQ(error_of("optim:\n  lr: nan\n"),
            "x.yaml:2: optim.lr is nan, expected a number in (0, 10]");
  EXPECT_EQ(error_of("optim:\n  betas: [0.9, 1.0]\n"),
            "x.yaml:2: optim.betas[1] is 1.0, expected a list of 2 numbers in [0, 1)");
  EXPECT_EQ(error_of("train:\n  seed: -1\n"),
            "x.yaml:2: train.seed is -1, expected an integer in [0, 18446744073709551615]");
  EXPECT_EQ(error_of("data:\n  token_bytes: 3\n"),
            "x.yaml:2: data.token_bytes is 3, expected one of 2, 4");
  EXPECT_EQ(error_of("checkpoint:\n  resume: ''\n"),
            "x.yaml:2: checkpoint.resume is \"\", expected a non-empty string");
}

TEST(ConfigErrors, MoeLayersMustNameDistinctBlocks) {
  EXPECT_EQ(error_of("model:\n  n_layers: 4\n  moe_layers:\n    - 1\n    - 4\n"),
            "x.yaml:5: model.moe_layers[1] is 4, expected a list of layer indices in [0, 3] "
            "(model.n_layers is 4)");
  EXPECT_EQ(error_of("model:\n  moe_layers: [1, 1]\n"),
            "x.yaml:2: model.moe_layers[1] is 1, expected each layer listed once");
}

TEST(ConfigErrors, CrossFieldChecksNameBothKeys) {
  EXPECT_EQ(error_of("moe:\n  num_experts: 1000\n"),
            "x.yaml:2: moe.num_experts is 1000, expected a perfect square (N² experts from N "
            "product keys)");
  EXPECT_EQ(error_of("moe:\n  num_experts: 16\n  top_k: 17\n"),
            "x.yaml:3: moe.top_k is 17, expected at most moe.num_experts (16)");
  EXPECT_EQ(error_of("model:\n  d_model: 64\n  n_heads: 3\n"),
            "x.yaml:2: model.d_model is 64, expected a multiple of model.n_heads (3)");
  EXPECT_EQ(error_of("model:\n  d_model: 60\n  n_heads: 4\n"),
            "x.yaml:2: model.d_model / model.n_heads is 15, expected an even head width for "
            "model.pos_embedding rope");
  EXPECT_EQ(error_of("model:\n  d_model: 60\n  n_heads: 4\n  pos_embedding: learned\n"),
            "(no error)");
  EXPECT_EQ(error_of("train:\n  batch_tokens: 1000\n"),
            "x.yaml:2: train.batch_tokens is 1000, expected a multiple of model.seq_len × "
            "train.grad_accum (32 × 1)");
  EXPECT_EQ(error_of("data:\n  kind: text\n"),
            "x.yaml:2: data.path is empty, expected a file for data.kind text");
  EXPECT_EQ(error_of("model:\n  vocab: 100\ndata:\n  kind: text\n  path: a.txt\n"),
            "x.yaml:2: model.vocab is 100, expected at least 256 for data.kind text (one token "
            "per byte)");
  EXPECT_EQ(error_of("checkpoint:\n  dir: ''\n  every: 10\n"),
            "x.yaml:2: checkpoint.dir is empty, expected a directory because checkpoint.every "
            "is 10");
}

TEST(ConfigErrors, DuplicateKey) {
  EXPECT_EQ(error_of("model:\n  vocab: 512\n  vocab: 256\n"),
            "x.yaml:3: duplicate key model.vocab (first at line 2)");
}

TEST(ConfigErrors, MalformedYaml) {
  // The wording after the line is yaml-cpp's, which may change between its versions.
  EXPECT_TRUE(error_of("model:\n  moe_layers: [0, 1\nmoe:\n  top_k: 8\n")
                  .starts_with("x.yaml:3: malformed YAML ("));
  EXPECT_EQ(error_of("a: 1\n---\nb: 2\n"),
            "x.yaml:3: a second YAML document, expected one per config file");
}

TEST(ConfigErrors, MissingFile) {
  const std::string path = ::testing::TempDir() + "flashmoe-no-such-config.yaml";
  try {
    load_config(path);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()),
              path + ": cannot open config file (No such file or directory)");
  }
}

TEST(ConfigErrors, MessagesAreOneLine) {
  std::string message = error_of("log:\n  every: |\n    one\n    two\n");
  EXPECT_EQ(message,
            "x.yaml:2: log.every is \"one\\ntwo\\n\", expected an integer in [1, 1000000000]");
  EXPECT_EQ(message.find('\n'), std::string::npos);
}

TEST(ConfigLines, PointAtTheOffendingKey) {
  const std::string yaml =
      "# comment\n"
      "model:\n"
      "  vocab: 512\n"
      "\n"
      "moe:\n"
      "  num_experts: 256\n"
      "  # another comment\n"
      "  top_k: 0\n";
  EXPECT_EQ(error_of(yaml), "x.yaml:8: moe.top_k is 0, expected an integer in [1, 512]");
  EXPECT_EQ(error_of("model: {vocab: 512,\n  d_model: 0}\n"),
            "x.yaml:2: model.d_model is 0, expected an integer in [1, 65536]");
}

TEST(ConfigLines, LoadConfigNamesTheFile) {
  const std::string path = ::testing::TempDir() + "flashmoe-config-test.yaml";
  std::ofstream(path) << "train:\n  device: cuda\n  steps: 0\n";
  try {
    load_config(path);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()),
              path + ":3: train.steps is 0, expected an integer in [1, 1000000000]");
  }
  std::filesystem::remove(path);
}

TEST(ConfigOverrides, ApplyBeforeValidation) {
  RunConfig config = parse_config("moe:\n  top_k: 0\n", "x.yaml",
                                  {"moe.top_k=16", "optim.betas=[0.8, 0.9]", "log.file=run.log",
                                   "data.facts.seed=7", "train.device=cuda"});
  EXPECT_EQ(config.moe.top_k, 16);
  EXPECT_EQ(config.optim.betas, (std::array<double, 2>{0.8, 0.9}));
  EXPECT_EQ(config.log.file, "run.log");
  EXPECT_EQ(config.data.facts.seed, 7u);
  EXPECT_EQ(config.train.device, Device::cuda);
}

TEST(ConfigOverrides, LaterOverridesWin) {
  RunConfig config = parse_config("", "x.yaml", {"moe.top_k=4", "moe.top_k=12"});
  EXPECT_EQ(config.moe.top_k, 12);
}

TEST(ConfigOverrides, ErrorsNameTheSet) {
  EXPECT_EQ(
      error_of("", {"moe.topk=4"}),
      "--set moe.topk=4: unknown key moe.topk (known keys of moe: num_experts, top_k, "
      "heads, shared_intermediate, act, router_norm, norm_topk_prob, balance_loss, bn_momentum, "
      "bn_eps, exchange)");
  EXPECT_EQ(error_of("moe:\n  top_k: 8\n", {"moe.top_k=0"}),
            "--set moe.top_k=0: moe.top_k is 0, expected an integer in [1, 512]");
  EXPECT_EQ(error_of("", {"optim.betas=[0.9, 1.5]"}),
            "--set optim.betas=[0.9, 1.5]: optim.betas[1] is 1.5, expected a list of 2 numbers "
            "in [0, 1)");
  EXPECT_EQ(error_of("", {"nonsense.key=1"}),
            "--set nonsense.key=1: unknown key nonsense (known keys: model, moe, train, optim, "
            "data, checkpoint, log)");
  EXPECT_EQ(error_of("", {"model.n_heads=3"}),
            "--set model.n_heads=3: model.d_model is 64, expected a multiple of model.n_heads "
            "(3)");
  EXPECT_EQ(error_of("model: 3\n", {"model.vocab=5"}),
            "--set model.vocab=5: model is 3, expected a mapping");
}

TEST(ConfigOverrides, MalformedSet) {
  EXPECT_EQ(error_of("", {"moe.top_k"}),
            "--set moe.top_k: expected key.path=value, e.g. --set moe.top_k=16");
  EXPECT_EQ(error_of("", {"moe..top_k=3"}),
            "--set moe..top_k=3: expected key.path=value, e.g. --set moe.top_k=16");
  EXPECT_EQ(error_of("", {"=3"}), "--set =3: expected key.path=value, e.g. --set moe.top_k=16");
  EXPECT_TRUE(error_of("", {"optim.betas=[0.9"})
                  .starts_with("--set optim.betas=[0.9: malformed YAML value ("));
}

TEST(ConfigYaml, RoundTripsEveryField) {
  RunConfig config;
  config.model = {.vocab = 300,
                  .d_model = 96,
                  .n_layers = 3,
                  .n_heads = 6,
                  .seq_len = 48,
                  .moe_layers = {2, 0},
                  .pos_embedding = PosEmbedding::learned,
                  .rope_theta = 12345.678,
                  .norm_eps = 1.0 / 3.0};
  config.moe = {.num_experts = 4096,
                .top_k = 32,
                .heads = 4,
                .shared_intermediate = 384,
                .act = Activation::relu,
                .router_norm = RouterNorm::rmsnorm,
                .norm_topk_prob = true,
                .bn_momentum = 0.1 + 0.2,
                .bn_eps = 1e-7};
  config.train = {.device = Device::cuda,
                  .precision = Precision::bf16,
                  .batch_tokens = 48 * 64,
                  .steps = 7,
                  .grad_accum = 2,
                  .seed = std::numeric_limits<uint64_t>::max(),
                  .deterministic = false,
                  .eval_every = 0,
                  .eval_tokens = 5};
  config.optim = {.lr = 3e-4,
                  .expert_lr = 1e-2,
                  .betas = {0.0, 0.999},
                  .eps = 1e-12,
                  .weight_decay = 0,
                  .warmup = 0,
                  .schedule = Schedule::constant,
                  .min_lr_ratio = 1,
                  .clip = 0};
  config.data = {.kind = DataKind::tokens,
                 .path = "null",  // a string that plain YAML would read as null
                 .token_bytes = 4,
                 .eval_fraction = 0,
                 .facts = {.num_subjects = 5, .num_relations = 6, .seed = 0}};
  config.checkpoint = {.dir = "dir with: colon", .every = 0, .keep = 1, .resume = "never"};
  config.log = {.every = 1, .file = "123"};
  EXPECT_EQ(parse_config(to_yaml(config), "dump"), config);
  EXPECT_EQ(parse_config(to_yaml(RunConfig{}), "dump"), RunConfig{});
}

}  // namespace
}  // namespace flashmoe
