// Training and evaluation data: sequences of model.seq_len + 1 token ids (the inputs and
// their targets, shifted by one), dealt out to the ranks in deterministic, disjoint shards.
// Three sources (data.kind); docs/data.md is the long version.
//
// facts (the default): a synthetic fact-recall corpus generated from data.facts.seed, with
// S = num_subjects subjects and R = num_relations relations. Every key (subject, relation)
// maps to one fixed value token, drawn uniformly from the value range. With
// A = ceil(sqrt(S)) name tokens, subject s is written as two of them, (s / A, s % A), like a
// first and a last name, so the vocabulary grows with sqrt(S) while the keys grow with S·R.
// Disjoint token ranges:
//   0                     separator
//   [1, 1 + R)            relations
//   [1 + R, 1 + R + A)    subject names
//   [1 + R + A, vocab)    values: V = vocab - 1 - R - A of them, at least 2,
// so model.vocab >= R + ceil(sqrt(S)) + 3. A fact is 5 tokens,
//   [first name] [last name] [relation] [value] [separator],
// and a sequence is ceil((seq_len + 1) / 5) facts cut to seq_len + 1 tokens. It starts with a
// whole fact, so every value in it follows its key. The keys of one sequence are distinct
// whenever there are at least as many keys as facts per sequence: a repeated key could be
// answered by copying from the context, and recall is meant to measure memory.
// Training sequence p is drawn from Philox(train.seed, training stream, p); evaluation
// sequence i from Philox(data.facts.seed, evaluation stream, i): the same facts (recall is
// memorisation), other sequences, and the same held-out set whatever train.seed is.
//
// text (one token per byte, vocab 256) and tokens (little-endian uint16 or uint32 ids,
// data.token_bytes): the last data.eval_fraction of the file (by tokens) is held out. A
// training sequence starts at an offset drawn from Philox(train.seed, window stream, p)
// uniformly over the windows that lie wholly in the training part; evaluation sequence i
// starts at held_out_begin + i·seq_len (consecutive windows sharing one token). value_mask
// is all zero.
//
// Sharding: a global micro-batch is G = batch_tokens / (seq_len · grad_accum) sequences at
// global positions [p, p + G); with P ranks each gets B = G / P of them, rank r the
// positions [p + r·B, p + (r + 1)·B). Sequence k of the global batch goes to rank k / B, so
// the ranks together see exactly what one rank would, and the data depends only on the
// seeds, the position, the rank and the world size.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/config.h"

namespace flashmoe {

// `sequences` rows; row b holds the inputs tokens[b][0, seq_len) and the targets
// tokens[b][1, seq_len]. value_mask[b][t] is 1 where the target tokens[b][t + 1] is the
// value of a fact, the tokens that recall accuracy is measured on.
struct Batch {
  int64_t sequences = 0;
  int64_t seq_len = 0;
  std::vector<int32_t> tokens;      // [sequences, seq_len + 1]
  std::vector<uint8_t> value_mask;  // [sequences, seq_len]
  bool operator==(const Batch&) const = default;
};

// The token ranges of the facts corpus (header comment above).
struct FactsLayout {
  static constexpr int64_t kFactTokens = 5;
  static constexpr int32_t kSeparator = 0;
  int64_t subjects = 0;
  int64_t relations = 0;
  int64_t name_tokens = 0;   // A = ceil(sqrt(subjects))
  int64_t value_tokens = 0;  // V = vocab - 1 - relations - A

  int64_t keys() const { return subjects * relations; }
  int32_t relation_token(int64_t relation) const { return static_cast<int32_t>(1 + relation); }
  int32_t name_token(int64_t name) const { return static_cast<int32_t>(1 + relations + name); }
  int32_t value_token(int64_t value) const {
    return static_cast<int32_t>(1 + relations + name_tokens + value);
  }
  bool is_value(int32_t token) const { return token >= value_token(0); }
};

// The layout for data.facts and model.vocab; throws when the vocabulary is too small.
FactsLayout facts_layout(const DataConfig& data, const ModelConfig& model);

// The value token that data.facts.seed assigns to the key (subject, relation).
int32_t fact_value(const FactsLayout& layout, uint64_t facts_seed, int64_t subject,
                   int64_t relation);

class SequenceSource;

// One rank's view of the data. Reads the model, train and data sections of the config;
// every mismatch (vocab, batch size, file contents, rank) is a one-line flashmoe::Error here,
// at construction, rather than in the middle of a run.
class DataLoader {
 public:
  DataLoader(const RunConfig& config, int rank, int world_size);
  DataLoader(DataLoader&&) noexcept;
  DataLoader& operator=(DataLoader&&) noexcept;
  ~DataLoader();

  // This rank's share of the next global micro-batch (batch_sequences() rows).
  Batch next_batch();

  // Global training sequences consumed so far: the same on every rank, saved in checkpoints.
  uint64_t position() const { return position_; }
  // Continue from `position`, so a resumed run sees the batches an unbroken one would.
  void seek(uint64_t position) { position_ = position; }

  // Rows of this rank's micro-batches: train.batch_tokens / (seq_len · grad_accum · world size).
  int64_t batch_sequences() const { return batch_sequences_; }

  // This rank's share of the held-out set of eval_tokens / seq_len sequences, in micro-batches
  // of at most batch_sequences() rows, sharded like training batches. The same on every call.
  std::vector<Batch> eval_batches(int64_t eval_tokens) const;

 private:
  int64_t eval_sequence_count(int64_t eval_tokens) const;

  std::unique_ptr<SequenceSource> source_;
  int64_t seq_len_ = 0;
  int rank_ = 0;
  int world_size_ = 1;
  int64_t batch_sequences_ = 0;
  uint64_t position_ = 0;
};

}  // namespace flashmoe
