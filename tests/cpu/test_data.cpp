#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "tests/test_util.h"
#include "trainer/data.h"

namespace flashmoe {
namespace {

using test::expect_one_line_error;
using Row = std::vector<int32_t>;

// 64 subjects × 4 relations in a vocabulary of 128; 8 sequences of 16 tokens per step.
RunConfig facts_config() {
  RunConfig config;
  config.model.vocab = 128;
  config.model.seq_len = 16;
  config.train.batch_tokens = 128;
  config.train.eval_every = 0;
  config.data.facts.num_subjects = 64;
  config.data.facts.num_relations = 4;
  return config;
}

RunConfig file_config(DataKind kind, const std::string& path, int64_t token_bytes = 2) {
  RunConfig config = facts_config();
  config.model.vocab = kind == DataKind::text ? 256 : 65536;
  config.data.kind = kind;
  config.data.path = path;
  config.data.token_bytes = token_bytes;
  return config;
}

std::vector<Row> rows_of(const Batch& batch) {
  std::vector<Row> rows;
  for (int64_t b = 0; b < batch.sequences; ++b) {
    auto begin = batch.tokens.begin() + b * (batch.seq_len + 1);
    rows.emplace_back(begin, begin + batch.seq_len + 1);
  }
  return rows;
}

std::vector<Row> rows_of(const std::vector<Batch>& batches) {
  std::vector<Row> rows;
  for (const Batch& batch : batches) {
    for (Row& row : rows_of(batch)) rows.push_back(std::move(row));
  }
  return rows;
}

// A scratch directory per test, removed afterwards.
class DataFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* test = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = std::filesystem::temp_directory_path() /
           ("flashmoe-data-" + std::string(test->name()) + "-" + std::to_string(getpid()));
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string write(const std::string& name, const std::string& bytes) const {
    const std::string path = (dir_ / name).string();
    std::ofstream(path, std::ios::binary) << bytes;
    return path;
  }

  // `ids` as little-endian integers of `width` bytes.
  std::string write_ids(const std::string& name, const std::vector<uint32_t>& ids,
                        int width) const {
    std::string bytes;
    for (uint32_t id : ids) {
      for (int b = 0; b < width; ++b) bytes.push_back(static_cast<char>(id >> (8 * b)));
    }
    return write(name, bytes);
  }

  std::filesystem::path dir_;
};

TEST(DataFacts, SameConfigGivesSameBatches) {
  DataLoader first(facts_config(), 0, 1), second(facts_config(), 0, 1);
  for (int step = 0; step < 5; ++step) EXPECT_EQ(first.next_batch(), second.next_batch());
  EXPECT_EQ(first.eval_batches(256), second.eval_batches(256));

  RunConfig reseeded = facts_config();
  reseeded.train.seed += 1;
  EXPECT_NE(DataLoader(reseeded, 0, 1).next_batch(), DataLoader(facts_config(), 0, 1).next_batch());
}

// The global micro-batch of one rank, cut in rank order, is what the ranks get.
void expect_shards_make_the_global_batch(const RunConfig& config) {
  DataLoader single(config, 0, 1);
  for (int world_size : {2, 4}) {
    SCOPED_TRACE("world size " + std::to_string(world_size));
    std::vector<DataLoader> ranks;
    for (int rank = 0; rank < world_size; ++rank) ranks.emplace_back(config, rank, world_size);
    single.seek(0);
    for (int step = 0; step < 3; ++step) {
      std::vector<Row> global = rows_of(single.next_batch()), joined;
      for (DataLoader& rank : ranks) {
        Batch shard = rank.next_batch();
        EXPECT_EQ(shard.sequences, single.batch_sequences() / world_size);
        for (Row& row : rows_of(shard)) joined.push_back(std::move(row));
      }
      EXPECT_EQ(joined, global);
      EXPECT_EQ(std::set<Row>(joined.begin(), joined.end()).size(), joined.size())
          << "a sequence appears on two ranks";
    }
    EXPECT_EQ(ranks[world_size - 1].position(), single.position());
  }
}

TEST(DataShards, FactsRanksAreDisjointAndMakeTheOneRankBatch) {
  RunConfig config = facts_config();
  config.train.grad_accum = 2;
  config.train.batch_tokens = 16 * 2 * 8;
  expect_shards_make_the_global_batch(config);
}

TEST_F(DataFiles, RanksAreDisjointAndMakeTheOneRankBatch) {
  std::vector<uint32_t> ids(20000);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<uint32_t>(i);
  expect_shards_make_the_global_batch(
      file_config(DataKind::tokens, write_ids("ids.bin", ids, 2), 2));
}

TEST(DataResume, SeekContinuesAsIfUninterrupted) {
  RunConfig config = facts_config();
  DataLoader unbroken(config, 1, 2);
  std::vector<Batch> expected;
  uint64_t saved_position = 0;
  for (int step = 0; step < 6; ++step) {
    if (step == 2) saved_position = unbroken.position();
    expected.push_back(unbroken.next_batch());
  }
  EXPECT_EQ(saved_position, 2u * 8u);  // global sequences: 2 steps of 8

  DataLoader resumed(config, 1, 2);
  resumed.seek(saved_position);
  for (int step = 2; step < 6; ++step) EXPECT_EQ(resumed.next_batch(), expected[step]);
  EXPECT_EQ(resumed.position(), unbroken.position());
}

// Checks every whole fact of `row` against the layout and records its value in `values`.
void check_facts(const Row& row, const uint8_t* mask, const FactsLayout& layout,
                 uint64_t facts_seed, std::map<std::pair<int64_t, int64_t>, int32_t>& values) {
  const int32_t first_name = layout.name_token(0), first_value = layout.value_token(0);
  std::set<int64_t> keys;
  for (size_t start = 0; start + FactsLayout::kFactTokens <= row.size();
       start += FactsLayout::kFactTokens) {
    const int64_t first = row[start] - first_name, last = row[start + 1] - first_name;
    const int64_t relation = row[start + 2] - layout.relation_token(0);
    ASSERT_TRUE(first >= 0 && first < layout.name_tokens && last >= 0 && last < layout.name_tokens);
    ASSERT_TRUE(relation >= 0 && relation < layout.relations);
    const int64_t subject = first * layout.name_tokens + last;
    ASSERT_LT(subject, layout.subjects);
    const int32_t value = row[start + 3];
    EXPECT_TRUE(value >= first_value && value < first_value + layout.value_tokens);
    EXPECT_EQ(value, fact_value(layout, facts_seed, subject, relation));
    EXPECT_EQ(row[start + 4], FactsLayout::kSeparator);
    auto [it, fresh] = values.try_emplace({subject, relation}, value);
    EXPECT_EQ(it->second, value) << "one key, two values";
    EXPECT_TRUE(keys.insert(subject * layout.relations + relation).second)
        << "a key repeats within one sequence";
  }
  for (size_t t = 0; t + 1 < row.size(); ++t) {
    EXPECT_EQ(mask[t], (t + 1) % FactsLayout::kFactTokens == 3) << "target " << t + 1;
  }
}

TEST(DataFacts, LayoutPutsEachValueAfterItsKeyAndMasksExactlyTheValues) {
  RunConfig config = facts_config();
  const FactsLayout layout = facts_layout(config.data, config.model);
  EXPECT_EQ(layout.name_tokens, 8);
  EXPECT_EQ(layout.value_tokens, 128 - 1 - 4 - 8);

  DataLoader loader(config, 0, 1);
  std::map<std::pair<int64_t, int64_t>, int32_t> values;
  std::vector<Batch> batches = loader.eval_batches(512);
  for (int step = 0; step < 40; ++step) batches.push_back(loader.next_batch());
  for (const Batch& batch : batches) {
    std::vector<Row> rows = rows_of(batch);
    for (size_t b = 0; b < rows.size(); ++b) {
      check_facts(rows[b], batch.value_mask.data() + b * batch.seq_len, layout,
                  config.data.facts.seed, values);
    }
  }
  EXPECT_GT(values.size(), 200u) << "most of the 256 keys should have appeared";
}

TEST(DataFacts, EvalIsRepeatableAndApartFromTraining) {
  RunConfig config = facts_config();
  DataLoader loader(config, 0, 1);
  const std::vector<Batch> eval = loader.eval_batches(512);
  EXPECT_EQ(eval.size(), 4u);  // 32 sequences in micro-batches of 8
  EXPECT_EQ(loader.eval_batches(512), eval);

  std::vector<Row> train;
  for (int step = 0; step < 20; ++step) {
    for (Row& row : rows_of(loader.next_batch())) train.push_back(std::move(row));
  }
  const std::set<Row> train_set(train.begin(), train.end());
  for (const Row& row : rows_of(eval)) EXPECT_EQ(train_set.count(row), 0u);
  EXPECT_EQ(loader.eval_batches(512), eval) << "training moved the evaluation set";

  RunConfig reseeded = config;
  reseeded.train.seed += 1;
  EXPECT_EQ(DataLoader(reseeded, 0, 1).eval_batches(512), eval);

  std::vector<Row> joined;
  for (int rank = 0; rank < 4; ++rank) {
    std::vector<Batch> shard = DataLoader(config, rank, 4).eval_batches(512);
    ASSERT_EQ(shard.size(), eval.size());
    for (size_t i = 0; i < shard.size(); ++i) {
      for (Row& row : rows_of(shard[i])) joined.push_back(std::move(row));
    }
  }
  std::vector<Row> expected = rows_of(eval), sorted_joined = joined;
  std::ranges::sort(expected);
  std::ranges::sort(sorted_joined);
  EXPECT_EQ(sorted_joined, expected);
}

TEST(DataFacts, ShippedConfigsFit) {
  for (const char* name : {"cpu-tiny", "smoke", "peer-1m"}) {
    SCOPED_TRACE(name);
    RunConfig config = load_config(std::string(FLASHMOE_SOURCE_DIR) + "/configs/" + name + ".yaml");
    DataLoader loader(config, 0, 1);
    Batch batch = loader.next_batch();
    EXPECT_EQ(batch.sequences * config.model.seq_len * config.train.grad_accum,
              config.train.batch_tokens);
    EXPECT_EQ(batch.tokens.size(),
              static_cast<size_t>(batch.sequences * (config.model.seq_len + 1)));
  }
}

TEST_F(DataFiles, TextIsReadAsBytes) {
  std::string text;
  for (int i = 0; i < 400; ++i) text += "line " + std::to_string(i) + ": the quick brown fox\n";
  text += "\xC3\xA9\xFF";  // bytes above 127 are tokens too
  const std::string path = write("corpus.txt", text);
  DataLoader loader(file_config(DataKind::text, path), 0, 1);
  const size_t train_end = text.size() - text.size() / 10;
  const std::string train_part = text.substr(0, train_end);
  for (int step = 0; step < 5; ++step) {
    Batch batch = loader.next_batch();
    EXPECT_TRUE(std::ranges::all_of(batch.value_mask, [](uint8_t m) { return m == 0; }));
    for (const Row& row : rows_of(batch)) {
      std::string bytes;
      for (int32_t token : row) bytes.push_back(static_cast<char>(token));
      EXPECT_NE(train_part.find(bytes), std::string::npos) << "a window outside the training part";
    }
  }
  const Row first_eval = rows_of(loader.eval_batches(16)).at(0);
  EXPECT_EQ(first_eval.front(), static_cast<uint8_t>(text[train_end]));
}

// Ids that count up from `base`, so a token tells where in the file it came from.
void expect_windows_in_their_split(const std::string& path, int width, uint32_t base, int64_t vocab,
                                   size_t count) {
  RunConfig config = file_config(DataKind::tokens, path, width);
  config.model.vocab = vocab;
  DataLoader loader(config, 0, 1);
  const uint32_t held_out_begin = base + static_cast<uint32_t>(count - count / 10);
  for (int step = 0; step < 20; ++step) {
    for (const Row& row : rows_of(loader.next_batch())) {
      for (size_t t = 1; t < row.size(); ++t) ASSERT_EQ(row[t], row[t - 1] + 1);
      EXPECT_GE(static_cast<uint32_t>(row.front()), base);
      EXPECT_LT(static_cast<uint32_t>(row.back()), held_out_begin);
    }
  }
  const std::vector<Row> eval = rows_of(loader.eval_batches(16 * 12));
  ASSERT_EQ(eval.size(), 12u);
  for (size_t i = 0; i < eval.size(); ++i) {
    EXPECT_EQ(static_cast<uint32_t>(eval[i].front()), held_out_begin + 16 * i);
    for (size_t t = 1; t < eval[i].size(); ++t) ASSERT_EQ(eval[i][t], eval[i][t - 1] + 1);
  }
}

TEST_F(DataFiles, Uint16AndUint32IdsAreLittleEndianWithTheLastFractionHeldOut) {
  const size_t count = 3000;
  std::vector<uint32_t> ids16(count), ids32(count);
  for (size_t i = 0; i < count; ++i) {
    ids16[i] = 0x0102 + static_cast<uint32_t>(i);
    ids32[i] = 0x00FFF000 + static_cast<uint32_t>(i);
  }
  expect_windows_in_their_split(write_ids("ids16.bin", ids16, 2), 2, 0x0102, 65536, count);
  expect_windows_in_their_split(write_ids("ids32.bin", ids32, 4), 4, 0x00FFF000, 0x01000000, count);
}

TEST_F(DataFiles, BadFilesGiveOneLineErrors) {
  const std::string missing = (dir_ / "missing.bin").string();
  expect_one_line_error([&] { DataLoader(file_config(DataKind::tokens, missing), 0, 1); },
                        "data.path '" + missing + "' cannot be read (No such file or directory)");

  const std::string empty = write("empty.txt", "");
  expect_one_line_error([&] { DataLoader(file_config(DataKind::text, empty), 0, 1); },
                        "data.path '" + empty + "' is empty, expected at least 17 tokens");

  const std::string short_file = write("short.txt", "0123456789");
  expect_one_line_error([&] { DataLoader(file_config(DataKind::text, short_file), 0, 1); },
                        "holds 10 tokens, expected at least 17 (one sequence");

  const std::string odd = write("odd.bin", "abc");
  expect_one_line_error([&] { DataLoader(file_config(DataKind::tokens, odd), 0, 1); },
                        "has 3 bytes, expected a multiple of data.token_bytes = 2");

  std::vector<uint32_t> ids(100, 7);
  ids[3] = 5000;
  RunConfig bad_id = file_config(DataKind::tokens, write_ids("bad.bin", ids, 2), 2);
  bad_id.model.vocab = 4096;
  expect_one_line_error([&] { DataLoader(bad_id, 0, 1); },
                        "token id 5000 at byte offset 6 is >= model.vocab = 4096");

  RunConfig short_eval =
      file_config(DataKind::tokens, write_ids("ok.bin", std::vector<uint32_t>(200, 7), 2), 2);
  short_eval.train.eval_every = 10;
  short_eval.train.eval_tokens = 64;
  expect_one_line_error([&] { DataLoader(short_eval, 0, 1); },
                        "train.eval_tokens is 64 and needs 65 held-out tokens, but the last "
                        "data.eval_fraction = 0.1 of data.path");
}

TEST(DataErrors, ConfigMismatchesSayWhatIsWrong) {
  RunConfig small_vocab = facts_config();
  small_vocab.model.vocab = 14;
  expect_one_line_error([&] { DataLoader(small_vocab, 0, 1); },
                        "model.vocab is 14, expected >= 15 for data.facts.num_subjects = 64 and "
                        "data.facts.num_relations = 4");
  small_vocab.model.vocab = 15;
  EXPECT_EQ(facts_layout(small_vocab.data, small_vocab.model).value_tokens, 2);

  expect_one_line_error([&] { DataLoader(facts_config(), 0, 3); },
                        "train.batch_tokens is 128, expected a positive multiple of model.seq_len "
                        "× train.grad_accum × world size = 16 × 1 × 3 = 48");

  expect_one_line_error([&] { DataLoader(facts_config(), 2, 2); },
                        "rank 2 with world size 2, expected");

  RunConfig short_sequences = facts_config();
  short_sequences.model.seq_len = 3;
  short_sequences.train.batch_tokens = 24;
  expect_one_line_error([&] { DataLoader(short_sequences, 0, 1); },
                        "model.seq_len is 3, expected >= 4 for data.kind facts");

  DataLoader loader(facts_config(), 0, 4);
  expect_one_line_error(
      [&] { loader.eval_batches(100); },
      "train.eval_tokens is 100, expected a positive multiple of model.seq_len = 16");
  expect_one_line_error(
      [&] { loader.eval_batches(16 * 6); },
      "6 sequences of model.seq_len = 16, expected a multiple of the world size 4");
}

}  // namespace
}  // namespace flashmoe
