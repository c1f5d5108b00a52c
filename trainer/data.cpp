#include "trainer/data.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>

#include "core/error.h"
#include "core/philox.h"

namespace flashmoe {

// A pure function from (split, index) to one sequence, so any position can be regenerated
// without state: that is what makes seek() exact and the rank shards independent.
class SequenceSource {
 public:
  enum class Split : uint8_t { train, eval };
  virtual ~SequenceSource() = default;
  // Writes seq_len + 1 tokens and seq_len mask bytes of sequence `index` of `split`.
  virtual void sequence(Split split, uint64_t index, std::span<int32_t> tokens,
                        std::span<uint8_t> value_mask) const = 0;
  // Throws unless the held-out split holds `count` evaluation sequences.
  virtual void check_eval_capacity(int64_t count) const = 0;
};

namespace {

using Split = SequenceSource::Split;

// The data's Philox streams. The tag keeps them apart from parameter initialisation, which
// draws from small stream numbers under the same train.seed.
constexpr uint64_t kDataStreamTag = uint64_t{0xDA7A} << 16;
enum Stream : uint64_t { kFactValues = 1, kTrainFacts = 2, kEvalFacts = 3, kTrainWindows = 4 };

// 64 random bits: draw `draw` for item `index` of `stream`.
uint64_t random_u64(uint64_t seed, uint64_t stream, uint32_t draw, uint64_t index) {
  const Philox4 block = philox4x32(seed, ((kDataStreamTag | stream) << 32) | draw, index);
  return (uint64_t{block.v[1]} << 32) | block.v[0];
}

// Uniform in [0, n) from 64 random bits: the high word of their product with n (the bias is
// below n / 2^64, far under anything a run can measure).
uint64_t uniform_below(uint64_t bits, uint64_t n) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(bits) * n) >> 64);
}

int64_t ceil_sqrt(int64_t n) {
  auto root = static_cast<int64_t>(std::sqrt(static_cast<double>(n)));
  while (root * root < n) ++root;
  while (root > 0 && (root - 1) * (root - 1) >= n) --root;
  return root;
}

class FactsSource final : public SequenceSource {
 public:
  explicit FactsSource(const RunConfig& config)
      : layout_(facts_layout(config.data, config.model)),
        train_seed_(config.train.seed),
        facts_seed_(config.data.facts.seed),
        facts_per_sequence_((config.model.seq_len + FactsLayout::kFactTokens) /
                            FactsLayout::kFactTokens) {
    FLASHMOE_CHECK(config.model.seq_len + 1 >= FactsLayout::kFactTokens,
                   "model.seq_len is " << config.model.seq_len
                                       << ", expected >= " << FactsLayout::kFactTokens - 1
                                       << " for data.kind facts (a sequence of seq_len + 1 "
                                          "tokens must hold one whole fact of "
                                       << FactsLayout::kFactTokens << " tokens)");
  }

  void sequence(Split split, uint64_t index, std::span<int32_t> tokens,
                std::span<uint8_t> value_mask) const override {
    const bool train = split == Split::train;
    const std::vector<int64_t> keys =
        draw_keys(train ? train_seed_ : facts_seed_, train ? kTrainFacts : kEvalFacts, index);
    for (size_t t = 0; t < tokens.size(); ++t) {
      tokens[t] = fact_token(keys[t / FactsLayout::kFactTokens], t % FactsLayout::kFactTokens);
    }
    for (size_t t = 0; t < value_mask.size(); ++t) value_mask[t] = layout_.is_value(tokens[t + 1]);
  }

  void check_eval_capacity(int64_t) const override {}  // the evaluation stream never ends

 private:
  // Keys are distinct within a sequence when there are enough of them (header comment).
  std::vector<int64_t> draw_keys(uint64_t seed, uint64_t stream, uint64_t index) const {
    const bool distinct = layout_.keys() >= facts_per_sequence_;
    std::vector<int64_t> keys;
    keys.reserve(facts_per_sequence_);
    for (uint32_t draw = 0; static_cast<int64_t>(keys.size()) < facts_per_sequence_; ++draw) {
      const auto key = static_cast<int64_t>(
          uniform_below(random_u64(seed, stream, draw, index), layout_.keys()));
      if (!distinct || std::ranges::find(keys, key) == keys.end()) keys.push_back(key);
    }
    return keys;
  }

  // Token `part` of the fact [first name] [last name] [relation] [value] [separator].
  int32_t fact_token(int64_t key, size_t part) const {
    const int64_t subject = key / layout_.relations, relation = key % layout_.relations;
    switch (part) {
      case 0: return layout_.name_token(subject / layout_.name_tokens);
      case 1: return layout_.name_token(subject % layout_.name_tokens);
      case 2: return layout_.relation_token(relation);
      case 3: return fact_value(layout_, facts_seed_, subject, relation);
      default: return FactsLayout::kSeparator;
    }
  }

  FactsLayout layout_;
  uint64_t train_seed_;
  uint64_t facts_seed_;
  int64_t facts_per_sequence_;
};

std::vector<uint8_t> read_file(const std::string& path) {
  std::error_code error;
  const uintmax_t size = std::filesystem::file_size(path, error);
  FLASHMOE_CHECK(!error, "data.path '" << path << "' cannot be read (" << error.message()
                                       << "), expected a text or token file");
  std::ifstream in(path, std::ios::binary);
  FLASHMOE_CHECK(in, "data.path '" << path << "' cannot be opened (" << std::strerror(errno)
                                   << "), expected a readable file");
  std::vector<uint8_t> bytes(size);
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(size));
  FLASHMOE_CHECK(static_cast<uintmax_t>(in.gcount()) == size,
                 "data.path '" << path << "': read " << in.gcount() << " of its " << size
                               << " bytes, expected the whole file");
  return bytes;
}

// A text file (one token per byte) or little-endian uint16/uint32 ids, held in memory as
// read, so a file costs its own size and no more.
class FileSource final : public SequenceSource {
 public:
  explicit FileSource(const RunConfig& config)
      : path_(config.data.path),
        token_bytes_(config.data.kind == DataKind::text ? 1 : config.data.token_bytes),
        bytes_(read_file(path_)),
        tokens_(bytes_.size() / token_bytes_),
        train_end_(tokens_ - held_out_tokens(config.data.eval_fraction)),
        seq_len_(config.model.seq_len),
        eval_fraction_(config.data.eval_fraction),
        train_seed_(config.train.seed) {
    check_length();
    check_ids(config.model.vocab);
  }

  void sequence(Split split, uint64_t index, std::span<int32_t> tokens,
                std::span<uint8_t> value_mask) const override {
    const uint64_t windows = train_end_ - seq_len_;  // starts of whole training windows
    const uint64_t start =
        split == Split::train
            ? uniform_below(random_u64(train_seed_, kTrainWindows, 0, index), windows)
            : train_end_ + index * seq_len_;
    for (size_t t = 0; t < tokens.size(); ++t) tokens[t] = static_cast<int32_t>(id_at(start + t));
    std::ranges::fill(value_mask, uint8_t{0});
  }

  void check_eval_capacity(int64_t count) const override {
    const uint64_t needed = count * seq_len_ + 1;
    FLASHMOE_CHECK(tokens_ - train_end_ >= needed,
                   "train.eval_tokens is "
                       << count * seq_len_ << " and needs " << needed
                       << " held-out tokens, but the last data.eval_fraction = " << eval_fraction_
                       << " of data.path '" << path_ << "' holds " << tokens_ - train_end_
                       << ", expected a longer file, a larger "
                          "data.eval_fraction or fewer train.eval_tokens");
  }

 private:
  uint64_t held_out_tokens(double eval_fraction) const {
    return static_cast<uint64_t>(std::floor(static_cast<double>(tokens_) * eval_fraction));
  }

  void check_length() const {
    FLASHMOE_CHECK(!bytes_.empty(), "data.path '" << path_ << "' is empty, expected at least "
                                                  << seq_len_ + 1 << " tokens (model.seq_len + 1)");
    FLASHMOE_CHECK(
        bytes_.size() % token_bytes_ == 0,
        "data.path '" << path_ << "' has " << bytes_.size()
                      << " bytes, expected a multiple of data.token_bytes = " << token_bytes_);
    FLASHMOE_CHECK(tokens_ >= static_cast<uint64_t>(seq_len_) + 1,
                   "data.path '" << path_ << "' holds " << tokens_ << " tokens, expected at least "
                                 << seq_len_ + 1 << " (one sequence of model.seq_len + 1)");
    FLASHMOE_CHECK(train_end_ >= static_cast<uint64_t>(seq_len_) + 1,
                   "data.path '" << path_ << "' keeps " << train_end_ << " of its " << tokens_
                                 << " tokens for training after data.eval_fraction = "
                                 << eval_fraction_ << ", expected at least " << seq_len_ + 1
                                 << " (one sequence of model.seq_len + 1)");
  }

  // Once, at load: a bad id would otherwise surface as an out-of-range embedding row.
  void check_ids(int64_t vocab) const {
    for (uint64_t i = 0; i < tokens_; ++i) {
      FLASHMOE_CHECK(id_at(i) < vocab, "data.path '" << path_ << "': token id " << id_at(i)
                                                     << " at byte offset " << i * token_bytes_
                                                     << " is >= model.vocab = " << vocab
                                                     << ", expected ids in [0, model.vocab)");
    }
  }

  int64_t id_at(uint64_t index) const {
    const uint8_t* p = bytes_.data() + index * token_bytes_;
    uint32_t id = 0;
    for (int64_t b = token_bytes_ - 1; b >= 0; --b) id = (id << 8) | p[b];  // little-endian
    return id;
  }

  std::string path_;
  int64_t token_bytes_;
  std::vector<uint8_t> bytes_;
  uint64_t tokens_;
  uint64_t train_end_;  // [0, train_end_) trains, [train_end_, tokens_) is held out
  int64_t seq_len_;
  double eval_fraction_;
  uint64_t train_seed_;
};

std::unique_ptr<SequenceSource> make_source(const RunConfig& config) {
  if (config.data.kind == DataKind::facts) return std::make_unique<FactsSource>(config);
  return std::make_unique<FileSource>(config);
}

int64_t sequences_per_rank(const TrainConfig& train, int64_t seq_len, int world_size) {
  const int64_t divisor = seq_len * train.grad_accum * world_size;
  FLASHMOE_CHECK(train.batch_tokens > 0 && train.batch_tokens % divisor == 0,
                 "train.batch_tokens is "
                     << train.batch_tokens
                     << ", expected a positive multiple of model.seq_len × train.grad_accum × "
                        "world size = "
                     << seq_len << " × " << train.grad_accum << " × " << world_size << " = "
                     << divisor << " (whole sequences for every rank in every micro-batch)");
  return train.batch_tokens / divisor;
}

Batch read_batch(const SequenceSource& source, Split split, uint64_t first, int64_t rows,
                 int64_t seq_len) {
  Batch batch{.sequences = rows,
              .seq_len = seq_len,
              .tokens = std::vector<int32_t>(rows * (seq_len + 1)),
              .value_mask = std::vector<uint8_t>(rows * seq_len)};
  for (int64_t row = 0; row < rows; ++row) {
    source.sequence(split, first + row,
                    std::span(batch.tokens).subspan(row * (seq_len + 1), seq_len + 1),
                    std::span(batch.value_mask).subspan(row * seq_len, seq_len));
  }
  return batch;
}

}  // namespace

FactsLayout facts_layout(const DataConfig& data, const ModelConfig& model) {
  FactsLayout layout{.subjects = data.facts.num_subjects,
                     .relations = data.facts.num_relations,
                     .name_tokens = ceil_sqrt(data.facts.num_subjects)};
  const int64_t minimum_vocab = layout.relations + layout.name_tokens + 3;
  FLASHMOE_CHECK(model.vocab >= minimum_vocab,
                 "model.vocab is " << model.vocab << ", expected >= " << minimum_vocab
                                   << " for data.facts.num_subjects = " << layout.subjects
                                   << " and data.facts.num_relations = " << layout.relations
                                   << " (1 separator + num_relations + ceil(sqrt(num_subjects)) "
                                      "name tokens + at least 2 value tokens)");
  layout.value_tokens = model.vocab - 1 - layout.relations - layout.name_tokens;
  return layout;
}

int32_t fact_value(const FactsLayout& layout, uint64_t facts_seed, int64_t subject,
                   int64_t relation) {
  const uint64_t key = subject * layout.relations + relation;
  return layout.value_token(static_cast<int64_t>(
      uniform_below(random_u64(facts_seed, kFactValues, 0, key), layout.value_tokens)));
}

DataLoader::DataLoader(const RunConfig& config, int rank, int world_size)
    : seq_len_(config.model.seq_len), rank_(rank), world_size_(world_size) {
  FLASHMOE_CHECK(world_size >= 1 && rank >= 0 && rank < world_size,
                 "rank " << rank << " with world size " << world_size
                         << ", expected world size >= 1 and 0 <= rank < world size");
  batch_sequences_ = sequences_per_rank(config.train, seq_len_, world_size);
  source_ = make_source(config);
  if (config.train.eval_every > 0) eval_sequence_count(config.train.eval_tokens);
}

DataLoader::DataLoader(DataLoader&&) noexcept = default;
DataLoader& DataLoader::operator=(DataLoader&&) noexcept = default;
DataLoader::~DataLoader() = default;

Batch DataLoader::next_batch() {
  Batch batch = read_batch(*source_, Split::train, position_ + rank_ * batch_sequences_,
                           batch_sequences_, seq_len_);
  position_ += batch_sequences_ * world_size_;
  return batch;
}

std::vector<Batch> DataLoader::eval_batches(int64_t eval_tokens) const {
  const int64_t count = eval_sequence_count(eval_tokens);
  const int64_t global_batch = batch_sequences_ * world_size_;
  std::vector<Batch> batches;
  for (int64_t begin = 0; begin < count; begin += global_batch) {
    // The last global batch may be short; it is still a multiple of the world size.
    const int64_t rows = std::min(global_batch, count - begin) / world_size_;
    batches.push_back(read_batch(*source_, Split::eval, begin + rank_ * rows, rows, seq_len_));
  }
  return batches;
}

int64_t DataLoader::eval_sequence_count(int64_t eval_tokens) const {
  FLASHMOE_CHECK(eval_tokens > 0 && eval_tokens % seq_len_ == 0,
                 "train.eval_tokens is "
                     << eval_tokens
                     << ", expected a positive multiple of model.seq_len = " << seq_len_);
  const int64_t count = eval_tokens / seq_len_;
  FLASHMOE_CHECK(count % world_size_ == 0, "train.eval_tokens is "
                                               << eval_tokens << ": " << count
                                               << " sequences of model.seq_len = " << seq_len_
                                               << ", expected a multiple of the world size "
                                               << world_size_ << " (every rank evaluates as many)");
  source_->check_eval_capacity(count);
  return count;
}

}  // namespace flashmoe
