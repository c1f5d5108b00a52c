#include "core/config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <span>
#include <sstream>

namespace flashmoe {
namespace {

// ---------------------------------------------------------------------------------------
// Names of enum values as spelled in configs.

template <class E>
struct Named {
  const char* name;
  E value;
};

constexpr Named<PosEmbedding> kPosEmbeddings[] = {{"rope", PosEmbedding::rope},
                                                  {"learned", PosEmbedding::learned}};
constexpr Named<Activation> kActivations[] = {
    {"silu", Activation::silu}, {"gelu", Activation::gelu}, {"relu", Activation::relu}};
constexpr Named<RouterNorm> kRouterNorms[] = {{"batchnorm", RouterNorm::batchnorm},
                                              {"rmsnorm", RouterNorm::rmsnorm},
                                              {"none", RouterNorm::none}};
constexpr Named<Device> kDevices[] = {{"cuda", Device::cuda}, {"cpu", Device::cpu}};
constexpr Named<Precision> kPrecisions[] = {{"fp32", Precision::fp32}, {"bf16", Precision::bf16}};
constexpr Named<Schedule> kSchedules[] = {{"cosine", Schedule::cosine},
                                          {"constant", Schedule::constant}};
constexpr Named<DataKind> kDataKinds[] = {
    {"facts", DataKind::facts}, {"text", DataKind::text}, {"tokens", DataKind::tokens}};
constexpr Named<ExchangeKind> kExchangeKinds[] = {{"auto", ExchangeKind::automatic},
                                                  {"peer_copies", ExchangeKind::peer_copies},
                                                  {"collectives", ExchangeKind::collectives}};

// Overloads pick the table from the enum type (the argument's value is not used).
std::span<const Named<PosEmbedding>> names_of(PosEmbedding) { return kPosEmbeddings; }
std::span<const Named<Activation>> names_of(Activation) { return kActivations; }
std::span<const Named<RouterNorm>> names_of(RouterNorm) { return kRouterNorms; }
std::span<const Named<Device>> names_of(Device) { return kDevices; }
std::span<const Named<Precision>> names_of(Precision) { return kPrecisions; }
std::span<const Named<Schedule>> names_of(Schedule) { return kSchedules; }
std::span<const Named<DataKind>> names_of(DataKind) { return kDataKinds; }
std::span<const Named<ExchangeKind>> names_of(ExchangeKind) { return kExchangeKinds; }

template <class E>
const char* name_of(E value) {
  for (const auto& named : names_of(value)) {
    if (named.value == value) return named.name;
  }
  FLASHMOE_FAIL("enum value " << static_cast<int>(value) << " has no config name");
}

// ---------------------------------------------------------------------------------------
// Text helpers.

// Shortest text that parses back to the same double, so to_yaml round-trips exactly.
std::string format_number(double value) {
  char buffer[32];
  auto result = std::to_chars(buffer, buffer + sizeof buffer, value);
  return std::string(buffer, result.ptr);
}

std::string join(std::span<const std::string> items) {
  std::string text;
  for (const std::string& item : items) text += (text.empty() ? "" : ", ") + item;
  return text;
}

template <class E>
std::string join_names(std::span<const Named<E>> names) {
  std::vector<std::string> items;
  for (const auto& named : names) items.emplace_back(named.name);
  return join(items);
}

std::string child_path(const std::string& parent, const std::string& key) {
  return parent.empty() ? key : parent + "." + key;
}

bool is_quoted(const YAML::Node& node) { return node.IsScalar() && node.Tag() == "!"; }

// A node's value for an error message, kept on one line and short.
std::string describe(const YAML::Node& node) {
  if (node.IsNull()) return "empty";
  if (node.IsSequence()) return "a list";
  if (node.IsMap()) return "a mapping";
  std::string text;
  for (char c : node.Scalar().substr(0, 60)) text += c == '\n' ? "\\n" : std::string(1, c);
  if (node.Scalar().size() > 60) text += "...";
  return is_quoted(node) ? "\"" + text + "\"" : text;
}

// Numbers must be plain scalars: a quoted "8" is a string, and saying so beats guessing.
template <class T>
std::optional<T> parse_number(const YAML::Node& node) {
  if (!node.IsScalar() || is_quoted(node)) return std::nullopt;
  const std::string& text = node.Scalar();
  T value{};
  auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (error != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return value;
}

std::optional<bool> parse_bool(const YAML::Node& node) {
  if (!node.IsScalar() || is_quoted(node)) return std::nullopt;
  const std::string& text = node.Scalar();  // the YAML 1.2 core schema spellings
  if (text == "true" || text == "True" || text == "TRUE") return true;
  if (text == "false" || text == "False" || text == "FALSE") return false;
  return std::nullopt;
}

// An interval of reals; open ends say so in the message, e.g. "(0, 10]".
struct Range {
  double lo;
  double hi;
  bool lo_open = false;
  bool hi_open = false;

  // Written so that NaN is never inside.
  bool contains(double v) const {
    return (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi);
  }
  std::string text() const {
    return (lo_open ? "(" : "[") + format_number(lo) + ", " + format_number(hi) +
           (hi_open ? ")" : "]");
  }
};

std::string integer_range_text(int64_t lo, int64_t hi) {
  return "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
}

// ---------------------------------------------------------------------------------------
// Where a key came from: a --set override, a file line, or just the file.

struct Override {
  std::vector<std::string> keys;  // "a.b" -> {"a", "b"}
  std::string path;               // "a.b"
  std::string value;              // YAML text
  std::string origin;             // "--set a.b=value", the location in messages
};

bool is_same_or_ancestor(const std::string& ancestor, const std::string& path) {
  if (!path.starts_with(ancestor)) return false;
  return path.size() == ancestor.size() || path[ancestor.size()] == '.' ||
         path[ancestor.size()] == '[';
}

class Context {
 public:
  Context(std::string source, std::vector<Override> overrides)
      : source_(std::move(source)), overrides_(std::move(overrides)) {}

  const std::vector<Override>& overrides() const { return overrides_; }

  // Remembers where `path` was written, for cross-field errors found after reading.
  void record(const std::string& path, const YAML::Mark& mark) { marks_[path] = mark; }

  std::string where(const std::string& path, const YAML::Mark& mark) const {
    if (const Override* set = override_covering(path)) return set->origin;
    if (!mark.is_null()) return source_ + ":" + std::to_string(mark.line + 1);
    // A key that is in no file line was created by an override below it.
    for (const Override& set : overrides_) {
      if (is_same_or_ancestor(path, set.path)) return set.origin;
    }
    return source_;
  }

  [[noreturn]] void fail(const std::string& path, const YAML::Mark& mark,
                         const std::string& message) const {
    throw Error(where(path, mark) + ": " + message);
  }

  // A cross-field error is placed at the first of `paths` that the user wrote.
  [[noreturn]] void fail_at(std::initializer_list<std::string> paths,
                            const std::string& message) const {
    for (const std::string& path : paths) {
      auto mark = marks_.find(path);
      if (override_covering(path) || (mark != marks_.end() && !mark->second.is_null())) {
        fail(path, mark == marks_.end() ? YAML::Mark::null_mark() : mark->second, message);
      }
    }
    throw Error(source_ + ": " + message);
  }

 private:
  // The last override that set `path` or a section holding it (later ones win).
  const Override* override_covering(const std::string& path) const {
    for (auto set = overrides_.rbegin(); set != overrides_.rend(); ++set) {
      if (is_same_or_ancestor(set->path, path)) return &*set;
    }
    return nullptr;
  }

  std::string source_;
  std::vector<Override> overrides_;
  std::map<std::string, YAML::Mark> marks_;
};

// ---------------------------------------------------------------------------------------
// The schema: one function per section names every key with its type and range. The
// same description drives reading (SectionReader) and writing (SectionWriter), so the
// two cannot drift apart. Keys are visited in order, and the reader relies on it:
// moe_layers is bounded by n_layers and expert_lr falls back to lr, both read before.

constexpr int64_t kMaxSteps = 1'000'000'000;
constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();
constexpr Range kUnitOpen{.lo = 0, .hi = 1, .lo_open = true, .hi_open = true};
constexpr Range kUnitHalfOpen{.lo = 0, .hi = 1, .lo_open = true};
constexpr Range kLearningRate{.lo = 0, .hi = 10, .lo_open = true};

template <class V>
void visit(V& v, ModelConfig& c) {
  v.integer("vocab", c.vocab, 2, kMaxInt32);
  v.integer("d_model", c.d_model, 1, 65536);
  v.integer("n_layers", c.n_layers, 1, 1024);
  v.integer("n_heads", c.n_heads, 1, 1024);
  v.integer("seq_len", c.seq_len, 1, 1 << 20);
  v.layer_list("moe_layers", c.moe_layers, c.n_layers);
  v.choice("pos_embedding", c.pos_embedding);
  v.real("rope_theta", c.rope_theta, Range{.lo = 0, .hi = 1e12, .lo_open = true});
  v.real("norm_eps", c.norm_eps, kUnitOpen);
}

template <class V>
void visit(V& v, MoeConfig& c) {
  v.integer("num_experts", c.num_experts, 1, int64_t{1} << 32);
  v.integer("top_k", c.top_k, 1, 512);
  v.integer("heads", c.heads, 1, 64);
  v.integer("shared_intermediate", c.shared_intermediate, 1, 1 << 20);
  v.choice("act", c.act);
  v.choice("router_norm", c.router_norm);
  v.boolean("norm_topk_prob", c.norm_topk_prob);
  v.real("balance_loss", c.balance_loss, Range{.lo = 0, .hi = 100});
  v.real("bn_momentum", c.bn_momentum, kUnitHalfOpen);
  v.real("bn_eps", c.bn_eps, kUnitOpen);
  v.choice("exchange", c.exchange);
}

template <class V>
void visit(V& v, TrainConfig& c) {
  v.choice("device", c.device);
  v.choice("precision", c.precision);
  v.integer("batch_tokens", c.batch_tokens, 1, int64_t{1} << 30);
  v.integer("steps", c.steps, 1, kMaxSteps);
  v.integer("grad_accum", c.grad_accum, 1, 65536);
  v.unsigned_integer("seed", c.seed);
  v.boolean("deterministic", c.deterministic);
  v.integer("eval_every", c.eval_every, 0, kMaxSteps);
  v.integer("eval_tokens", c.eval_tokens, 1, int64_t{1} << 30);
}

template <class V>
void visit(V& v, OptimConfig& c) {
  v.real("lr", c.lr, kLearningRate);
  v.real("expert_lr", c.expert_lr, kLearningRate, c.lr);
  v.real_pair("betas", c.betas, Range{.lo = 0, .hi = 1, .hi_open = true});
  v.real("eps", c.eps, kUnitHalfOpen);
  v.real("weight_decay", c.weight_decay, Range{.lo = 0, .hi = 10});
  v.integer("warmup", c.warmup, 0, kMaxSteps);
  v.choice("schedule", c.schedule);
  v.real("min_lr_ratio", c.min_lr_ratio, Range{.lo = 0, .hi = 1});
  v.real("clip", c.clip, Range{.lo = 0, .hi = 1e6});
}

template <class V>
void visit(V& v, FactsConfig& c) {
  v.integer("num_subjects", c.num_subjects, 1, kMaxInt32);
  v.integer("num_relations", c.num_relations, 1, 65536);
  v.unsigned_integer("seed", c.seed);
}

template <class V>
void visit(V& v, DataConfig& c) {
  v.choice("kind", c.kind);
  v.text("path", c.path, /*allow_empty=*/true);
  v.integer_of("token_bytes", c.token_bytes, {2, 4});
  v.real("eval_fraction", c.eval_fraction, Range{.lo = 0, .hi = 0.5});
  v.section("facts", c.facts);
}

template <class V>
void visit(V& v, CheckpointConfig& c) {
  v.text("dir", c.dir, /*allow_empty=*/true);
  v.integer("every", c.every, 0, kMaxSteps);
  v.integer("keep", c.keep, 1, 1000);
  v.text("resume", c.resume, /*allow_empty=*/false);
}

template <class V>
void visit(V& v, LogConfig& c) {
  v.integer("every", c.every, 1, kMaxSteps);
  v.text("file", c.file, /*allow_empty=*/true);
}

template <class V>
void visit(V& v, RunConfig& c) {
  v.section("model", c.model);
  v.section("moe", c.moe);
  v.section("train", c.train);
  v.section("optim", c.optim);
  v.section("data", c.data);
  v.section("checkpoint", c.checkpoint);
  v.section("log", c.log);
}

// ---------------------------------------------------------------------------------------
// Reading: a key absent from the YAML keeps the struct's default; a present key must hold
// a valid value; a key the schema does not name is an error.

class SectionReader {
 public:
  SectionReader(Context& context, const YAML::Node& map, std::string path)
      : context_(context), path_(std::move(path)) {
    for (auto it = map.begin(); it != map.end(); ++it) add_entry(it->first, it->second);
  }

  void integer(const char* key, int64_t& value, int64_t lo, int64_t hi) {
    const Entry* entry = take(key);
    if (!entry) return;
    std::optional<int64_t> parsed = parse_number<int64_t>(entry->value);
    if (!parsed || *parsed < lo || *parsed > hi) fail(*entry, integer_range_text(lo, hi));
    value = *parsed;
  }

  void integer_of(const char* key, int64_t& value, std::initializer_list<int64_t> allowed) {
    const Entry* entry = take(key);
    if (!entry) return;
    std::optional<int64_t> parsed = parse_number<int64_t>(entry->value);
    if (!parsed || std::find(allowed.begin(), allowed.end(), *parsed) == allowed.end()) {
      std::vector<std::string> items;
      for (int64_t item : allowed) items.push_back(std::to_string(item));
      fail(*entry, "one of " + join(items));
    }
    value = *parsed;
  }

  void unsigned_integer(const char* key, uint64_t& value) {
    const Entry* entry = take(key);
    if (!entry) return;
    std::optional<uint64_t> parsed = parse_number<uint64_t>(entry->value);
    if (!parsed) {
      fail(*entry,
           "an integer in [0, " + std::to_string(std::numeric_limits<uint64_t>::max()) + "]");
    }
    value = *parsed;
  }

  void real(const char* key, double& value, Range range,
            std::optional<double> if_absent = std::nullopt) {
    const Entry* entry = take(key);
    if (!entry) {
      if (if_absent) value = *if_absent;
      return;
    }
    std::optional<double> parsed = parse_number<double>(entry->value);
    if (!parsed || !range.contains(*parsed)) fail(*entry, "a number in " + range.text());
    value = *parsed;
  }

  void real_pair(const char* key, std::array<double, 2>& value, Range range) {
    const Entry* entry = take(key);
    if (!entry) return;
    const std::string expected = "a list of 2 numbers in " + range.text();
    if (!entry->value.IsSequence() || entry->value.size() != 2) fail(*entry, expected);
    for (size_t i = 0; i < 2; ++i) {
      std::optional<double> parsed = parse_number<double>(entry->value[i]);
      if (!parsed || !range.contains(*parsed)) fail_element(*entry, i, expected);
      value[i] = *parsed;
    }
  }

  void boolean(const char* key, bool& value) {
    const Entry* entry = take(key);
    if (!entry) return;
    std::optional<bool> parsed = parse_bool(entry->value);
    if (!parsed) fail(*entry, "true or false");
    value = *parsed;
  }

  // An empty value (`file:`) reads as the empty string.
  void text(const char* key, std::string& value, bool allow_empty) {
    const Entry* entry = take(key);
    if (!entry) return;
    const YAML::Node& node = entry->value;
    std::string parsed = node.IsScalar() ? node.Scalar() : "";
    if (!(node.IsScalar() || node.IsNull()) || (parsed.empty() && !allow_empty)) {
      fail(*entry, allow_empty ? "a string" : "a non-empty string");
    }
    value = parsed;
  }

  template <class E>
  void choice(const char* key, E& value) {
    const Entry* entry = take(key);
    if (!entry) return;
    for (const auto& named : names_of(value)) {
      if (entry->value.IsScalar() && entry->value.Scalar() == named.name) {
        value = named.value;
        return;
      }
    }
    fail(*entry, "one of " + join_names(names_of(value)));
  }

  // Distinct block indices below n_layers; absent means every block.
  void layer_list(const char* key, std::vector<int64_t>& value, int64_t n_layers) {
    const Entry* entry = take(key);
    if (!entry) {
      value.clear();
      for (int64_t layer = 0; layer < n_layers; ++layer) value.push_back(layer);
      return;
    }
    const std::string expected = "a list of layer indices in [0, " + std::to_string(n_layers - 1) +
                                 "] (model.n_layers is " + std::to_string(n_layers) + ")";
    if (!entry->value.IsSequence()) fail(*entry, expected);
    std::vector<int64_t> layers;
    for (size_t i = 0; i < entry->value.size(); ++i) {
      std::optional<int64_t> layer = parse_number<int64_t>(entry->value[i]);
      if (!layer || *layer < 0 || *layer >= n_layers) fail_element(*entry, i, expected);
      if (std::find(layers.begin(), layers.end(), *layer) != layers.end()) {
        fail_element(*entry, i, "each layer listed once");
      }
      layers.push_back(*layer);
    }
    value = layers;
  }

  // A missing section reads as an empty one, so fallbacks (moe_layers, expert_lr) apply.
  template <class S>
  void section(const char* key, S& value) {
    const Entry* entry = take(key);
    YAML::Node map = entry ? entry->value : YAML::Node(YAML::NodeType::Map);
    if (!map.IsMap()) fail(*entry, "a mapping");
    SectionReader reader(context_, map, child_path(path_, key));
    visit(reader, value);
    reader.reject_unknown_keys();
  }

  void reject_unknown_keys() const {
    for (const Entry& entry : entries_) {
      if (std::find(known_.begin(), known_.end(), entry.name) != known_.end()) continue;
      const std::string path = child_path(path_, entry.name);
      const std::string section = path_.empty() ? "" : " of " + path_;
      context_.fail(path, entry.key.Mark(),
                    "unknown key " + path + " (known keys" + section + ": " + join(known_) + ")");
    }
  }

 private:
  struct Entry {
    std::string name;
    YAML::Node key;
    YAML::Node value;
  };

  void add_entry(const YAML::Node& key, const YAML::Node& value) {
    if (!key.IsScalar()) {
      context_.fail(path_, key.Mark(),
                    "a key of " + (path_.empty() ? "the config" : path_) + " is " + describe(key) +
                        ", expected a name");
    }
    for (const Entry& entry : entries_) {
      if (entry.name != key.Scalar()) continue;
      // yaml-cpp keeps both copies and returns either; make the user pick one.
      context_.fail(child_path(path_, entry.name), key.Mark(),
                    "duplicate key " + child_path(path_, entry.name) + " (first at line " +
                        std::to_string(entry.key.Mark().line + 1) + ")");
    }
    entries_.push_back({key.Scalar(), key, value});
  }

  // The entry for `key`, or null when absent; either way `key` becomes a known key.
  const Entry* take(const char* key) {
    known_.emplace_back(key);
    for (const Entry& entry : entries_) {
      if (entry.name != key) continue;
      // The key's mark, not the value's: yaml-cpp places an empty value on the next line.
      context_.record(child_path(path_, key), entry.key.Mark());
      return &entry;
    }
    return nullptr;
  }

  [[noreturn]] void fail(const Entry& entry, const std::string& expected) const {
    const std::string path = child_path(path_, entry.name);
    context_.fail(path, entry.key.Mark(),
                  path + " is " + describe(entry.value) + ", expected " + expected);
  }

  [[noreturn]] void fail_element(const Entry& entry, size_t index,
                                 const std::string& expected) const {
    const std::string path = child_path(path_, entry.name) + "[" + std::to_string(index) + "]";
    const YAML::Node element = entry.value[index];
    context_.fail(path, element.Mark(),
                  path + " is " + describe(element) + ", expected " + expected);
  }

  Context& context_;
  std::string path_;
  std::vector<Entry> entries_;
  std::vector<std::string> known_;
};

// ---------------------------------------------------------------------------------------
// Writing: every key with its value; ranges and fallbacks only matter when reading.

class SectionWriter {
 public:
  explicit SectionWriter(YAML::Emitter& out) : out_(out) {}

  void integer(const char* key, int64_t value, int64_t, int64_t) {
    plain(key, std::to_string(value));
  }
  void integer_of(const char* key, int64_t value, std::initializer_list<int64_t>) {
    plain(key, std::to_string(value));
  }
  void unsigned_integer(const char* key, uint64_t value) { plain(key, std::to_string(value)); }
  void real(const char* key, double value, Range, std::optional<double> = std::nullopt) {
    plain(key, format_number(value));
  }
  void boolean(const char* key, bool value) { plain(key, value ? "true" : "false"); }
  // Quoted so that a path such as "null" or "123" reads back as that string.
  void text(const char* key, const std::string& value, bool) {
    out_ << YAML::Key << key << YAML::Value << YAML::DoubleQuoted << value;
  }
  template <class E>
  void choice(const char* key, E value) {
    plain(key, name_of(value));
  }
  void real_pair(const char* key, const std::array<double, 2>& value, Range) {
    out_ << YAML::Key << key << YAML::Value << YAML::Flow << YAML::BeginSeq
         << format_number(value[0]) << format_number(value[1]) << YAML::EndSeq;
  }
  void layer_list(const char* key, const std::vector<int64_t>& value, int64_t) {
    out_ << YAML::Key << key << YAML::Value << YAML::Flow << YAML::BeginSeq;
    for (int64_t layer : value) out_ << std::to_string(layer);
    out_ << YAML::EndSeq;
  }
  template <class S>
  void section(const char* key, S& value) {
    out_ << YAML::Key << key << YAML::Value << YAML::BeginMap;
    visit(*this, value);
    out_ << YAML::EndMap;
  }

 private:
  void plain(const char* key, const std::string& value) {
    out_ << YAML::Key << key << YAML::Value << value;
  }

  YAML::Emitter& out_;
};

// ---------------------------------------------------------------------------------------
// Cross-field checks, after every key has been read.

void require(const Context& context, bool ok, std::initializer_list<std::string> paths,
             const std::string& message) {
  if (!ok) context.fail_at(paths, message);
}

bool is_square(int64_t n) {
  int64_t root = 0;
  while ((root + 1) * (root + 1) <= n) ++root;
  return root * root == n;
}

void check_model_and_moe(const RunConfig& c, const Context& context) {
  const ModelConfig& m = c.model;
  const int64_t experts = c.moe.num_experts;
  require(context, is_square(experts), {"moe.num_experts"},
          "moe.num_experts is " + std::to_string(experts) +
              ", expected a perfect square (N² experts from N product keys)");
  require(context, c.moe.top_k <= experts, {"moe.top_k", "moe.num_experts"},
          "moe.top_k is " + std::to_string(c.moe.top_k) + ", expected at most moe.num_experts (" +
              std::to_string(experts) + ")");
  require(context, m.d_model % m.n_heads == 0, {"model.d_model", "model.n_heads"},
          "model.d_model is " + std::to_string(m.d_model) +
              ", expected a multiple of model.n_heads (" + std::to_string(m.n_heads) + ")");
  // RoPE rotates pairs of channels within each attention head.
  const int64_t head_width = m.d_model / m.n_heads;
  require(context, m.pos_embedding != PosEmbedding::rope || head_width % 2 == 0,
          {"model.d_model", "model.n_heads", "model.pos_embedding"},
          "model.d_model / model.n_heads is " + std::to_string(head_width) +
              ", expected an even head width for model.pos_embedding rope");
}

void check_train(const RunConfig& c, const Context& context) {
  const TrainConfig& t = c.train;
  const int64_t micro_tokens = c.model.seq_len * t.grad_accum;
  require(context, t.batch_tokens % micro_tokens == 0,
          {"train.batch_tokens", "model.seq_len", "train.grad_accum"},
          "train.batch_tokens is " + std::to_string(t.batch_tokens) +
              ", expected a multiple of model.seq_len × train.grad_accum (" +
              std::to_string(c.model.seq_len) + " × " + std::to_string(t.grad_accum) + ")");
  require(context, t.eval_every == 0 || t.eval_tokens % c.model.seq_len == 0,
          {"train.eval_tokens", "model.seq_len"},
          "train.eval_tokens is " + std::to_string(t.eval_tokens) +
              ", expected a multiple of model.seq_len (" + std::to_string(c.model.seq_len) + ")");
  require(context, t.eval_every == 0 || c.data.eval_fraction > 0,
          {"data.eval_fraction", "train.eval_every"},
          "data.eval_fraction is 0, expected > 0 because train.eval_every is " +
              std::to_string(t.eval_every));
}

void check_data(const RunConfig& c, const Context& context) {
  const DataConfig& d = c.data;
  const char* kind = name_of(d.kind);
  require(context, d.kind == DataKind::facts || !d.path.empty(), {"data.path", "data.kind"},
          std::string("data.path is empty, expected a file for data.kind ") + kind);
  require(context, d.kind != DataKind::text || c.model.vocab >= 256, {"model.vocab", "data.kind"},
          "model.vocab is " + std::to_string(c.model.vocab) +
              ", expected at least 256 for data.kind text (one token per byte)");
  const int64_t id_limit = int64_t{1} << (8 * d.token_bytes);
  require(context, d.kind != DataKind::tokens || c.model.vocab <= id_limit,
          {"model.vocab", "data.token_bytes"},
          "model.vocab is " + std::to_string(c.model.vocab) + ", expected at most " +
              std::to_string(id_limit) + " for data.token_bytes " + std::to_string(d.token_bytes));
}

void check_checkpoint(const RunConfig& c, const Context& context) {
  require(context, c.checkpoint.every == 0 || !c.checkpoint.dir.empty(),
          {"checkpoint.dir", "checkpoint.every"},
          "checkpoint.dir is empty, expected a directory because checkpoint.every is " +
              std::to_string(c.checkpoint.every));
}

void check_consistency(const RunConfig& config, const Context& context) {
  check_model_and_moe(config, context);
  check_train(config, context);
  check_data(config, context);
  check_checkpoint(config, context);
}

// ---------------------------------------------------------------------------------------
// Overrides and document loading.

bool is_key_name(const std::string& key) {
  if (key.empty()) return false;
  for (char c : key) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '_') return false;
  }
  return true;
}

Override parse_override(const std::string& arg) {
  Override set;
  set.origin = "--set " + arg;
  const size_t equals = arg.find('=');
  set.path = arg.substr(0, std::min(equals, arg.size()));
  std::stringstream path(set.path);
  for (std::string key; std::getline(path, key, '.');) set.keys.push_back(key);
  const bool valid = equals != std::string::npos && !set.path.ends_with('.') && !set.keys.empty() &&
                     std::all_of(set.keys.begin(), set.keys.end(), is_key_name);
  if (!valid) throw Error(set.origin + ": expected key.path=value, e.g. --set moe.top_k=16");
  set.value = arg.substr(equals + 1);
  return set;
}

YAML::Node load_override_value(const Override& set) {
  try {
    return YAML::Load(set.value);
  } catch (const YAML::Exception& e) {
    throw Error(set.origin + ": malformed YAML value (" + e.msg + ")");
  }
}

// Sets `value` at `keys` below `map`, creating sections that the file does not have.
void assign(YAML::Node map, std::span<const std::string> keys, const YAML::Node& value,
            const Override& set, const std::string& parent) {
  const std::string path = child_path(parent, keys[0]);
  if (keys.size() == 1) {
    map[keys[0]] = value;
    return;
  }
  // `child` refers to the node inside `map`, so assigning to it changes the tree.
  YAML::Node child = map[keys[0]];
  if (!child.IsDefined() || child.IsNull()) child = YAML::Node(YAML::NodeType::Map);
  if (!child.IsMap()) {
    throw Error(set.origin + ": " + path + " is " + describe(child) + ", expected a mapping");
  }
  assign(child, keys.subspan(1), value, set, path);
}

YAML::Node load_document(const std::string& text, const std::string& source) {
  std::vector<YAML::Node> documents;
  try {
    documents = YAML::LoadAll(text);
  } catch (const YAML::Exception& e) {
    throw Error(source + ":" + std::to_string(e.mark.line + 1) + ": malformed YAML (" + e.msg +
                ", column " + std::to_string(e.mark.column + 1) + ")");
  }
  if (documents.size() > 1) {
    throw Error(source + ":" + std::to_string(documents[1].Mark().line + 1) +
                ": a second YAML document, expected one per config file");
  }
  if (documents.empty() || documents[0].IsNull()) return YAML::Node(YAML::NodeType::Map);
  if (!documents[0].IsMap()) {
    throw Error(source + ":" + std::to_string(documents[0].Mark().line + 1) + ": the config is " +
                describe(documents[0]) + ", expected a mapping of sections");
  }
  return documents[0];
}

}  // namespace

const char* to_string(PosEmbedding value) { return name_of(value); }
const char* to_string(Activation value) { return name_of(value); }
const char* to_string(RouterNorm value) { return name_of(value); }
const char* to_string(Precision value) { return name_of(value); }
const char* to_string(Schedule value) { return name_of(value); }
const char* to_string(DataKind value) { return name_of(value); }
const char* to_string(ExchangeKind value) { return name_of(value); }

RunConfig parse_config(const std::string& yaml_text, const std::string& source_name,
                       const std::vector<std::string>& overrides) {
  std::vector<Override> sets;
  for (const std::string& arg : overrides) sets.push_back(parse_override(arg));
  Context context(source_name, std::move(sets));
  YAML::Node root = load_document(yaml_text, source_name);
  for (const Override& set : context.overrides()) {
    assign(root, set.keys, load_override_value(set), set, "");
  }
  RunConfig config;
  SectionReader reader(context, root, "");
  visit(reader, config);
  reader.reject_unknown_keys();
  check_consistency(config, context);
  return config;
}

RunConfig load_config(const std::string& path, const std::vector<std::string>& overrides) {
  std::error_code ignored;  // an unreadable path is reported by the open below
  if (std::filesystem::is_directory(path, ignored)) {
    throw Error(path + ": is a directory, expected a YAML config file");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open config file (" + std::strerror(errno) + ")");
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) throw Error(path + ": cannot read config file (" + std::strerror(errno) + ")");
  return parse_config(text.str(), path, overrides);
}

std::string to_yaml(const RunConfig& config) {
  // The schema visits mutable structs (reading fills them), so write from a copy.
  RunConfig copy = config;
  YAML::Emitter out;
  SectionWriter writer(out);
  out << YAML::BeginMap;
  visit(writer, copy);
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

}  // namespace flashmoe
