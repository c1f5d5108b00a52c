#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <barrier>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "tests/test_util.h"
#include "trainer/checkpoint.h"
#include "trainer/safetensors.h"

namespace flashmoe {
namespace {

using test::error_of;
using test::expect_one_line_error;

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------
// Helpers.

// A fresh directory under /tmp for each test, removed afterwards.
class TempDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* test = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / ("flashmoe-" + std::string(test->test_suite_name()) + "-" +
                                        test->name() + "-" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  fs::path dir_;
};

class SafetensorsTest : public TempDirTest {};
class CheckpointTest : public TempDirTest {};

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream bytes;
  bytes << in.rdbuf();
  return bytes.str();
}

void write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

std::string little_endian_u64(uint64_t value) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>(value >> (8 * i));
  return bytes;
}

// A safetensors file made by hand: header length, header, data.
void write_raw_safetensors(const fs::path& path, const std::string& header,
                           const std::string& data) {
  write_bytes(path, little_endian_u64(header.size()) + header + data);
}

// The bytes a CPU tensor holds: equal bytes is bitwise equality, whatever the dtype.
std::string bytes_of(const Tensor& tensor) {
  Tensor host = tensor.device() == Device::cpu ? tensor : tensor.to(Device::cpu);
  return std::string(static_cast<const char*>(host.raw()), host.nbytes());
}

void flip_byte(const fs::path& path, size_t from_end) {
  std::string bytes = read_bytes(path);
  bytes[bytes.size() - 1 - from_end] ^= 0x40;
  write_bytes(path, bytes);
}

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

NamedTensors every_dtype() {
  return {
      {"f32",
       Tensor::from_vector<float>({1.5f, -2.25f, 3e-38f, 7.f, 0.f, -0.f}, {2, 3}, Device::cpu)},
      {"bf16",
       Tensor::from_floats({1.f, -0.5f, 3.14159f, 65504.f, 1e-20f}, {5}, DType::bf16, Device::cpu)},
      {"i32", Tensor::from_vector<int32_t>({-1, 2, INT32_MAX, INT32_MIN}, {2, 2}, Device::cpu)},
      {"i64", Tensor::from_vector<int64_t>({INT64_MIN, 0, INT64_MAX}, {3}, Device::cpu)},
      {"f64", Tensor::from_vector<double>({1e300, -1e-300}, {1, 2}, Device::cpu)},
      {"scalar", Tensor::from_vector<float>({42.f}, {}, Device::cpu)},
      {"empty", Tensor::zeros({0}, DType::f32, Device::cpu)},
      {"empty_bf16_rows", Tensor::zeros({3, 0}, DType::bf16, Device::cpu)},
  };
}

// ---------------------------------------------------------------------------------------
// safetensors.

TEST_F(SafetensorsTest, RoundTripsEveryDtypeEmptyTensorsAndMetadata) {
  const NamedTensors tensors = every_dtype();
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"}, {"quote\"and\\slash", "line\nbreak \x01 caf\xc3\xa9"}, {"empty", ""}};
  const std::string path = (dir_ / "all.safetensors").string();
  write_safetensors(path, tensors, metadata);

  SafetensorsFile file = read_safetensors(path);
  EXPECT_EQ(file.metadata(), metadata);
  ASSERT_EQ(file.tensors().size(), tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& [name, tensor] = tensors[i];
    SCOPED_TRACE(name);
    EXPECT_EQ(file.tensors()[i].name, name);  // the order given
    EXPECT_EQ(file.tensors()[i].dtype, tensor.dtype());
    EXPECT_EQ(file.tensors()[i].shape, tensor.shape());
    EXPECT_EQ(bytes_of(file.load(name, Device::cpu)), bytes_of(tensor));
  }
}

TEST_F(SafetensorsTest, WritesTheStandardLayoutByteForByte) {
  const fs::path path = dir_ / "small.safetensors";
  write_safetensors(path.string(),
                    {{"a", Tensor::from_vector<float>({1.f, 2.f}, {2}, Device::cpu)},
                     {"b", Tensor::from_vector<int64_t>({7}, {1}, Device::cpu)}},
                    {{"format", "pt"}});
  const std::string bytes = read_bytes(path);
  const std::string json =
      "{\"__metadata__\":{\"format\":\"pt\"},"
      "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
      "\"b\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[8,16]}}";
  const size_t padded = (json.size() + 7) / 8 * 8;
  ASSERT_EQ(bytes.size(), 8 + padded + 16);
  EXPECT_EQ(bytes.substr(0, 8), little_endian_u64(padded));
  EXPECT_EQ(bytes.substr(8, padded), json + std::string(padded - json.size(), ' '));
  const float a[2] = {1.f, 2.f};
  const int64_t b = 7;
  EXPECT_EQ(bytes.substr(8 + padded, 8), std::string(reinterpret_cast<const char*>(a), 8));
  EXPECT_EQ(bytes.substr(8 + padded + 8), std::string(reinterpret_cast<const char*>(&b), 8));
}

// As other writers lay files out: other key orders, whitespace, escapes, data order
// unlike header order.
TEST_F(SafetensorsTest, ReadsFilesOfOtherWriters) {
  const fs::path path = dir_ / "other.safetensors";
  const float a[2] = {0.5f, -4.f};
  const int32_t b = 9;
  write_raw_safetensors(
      path,
      "{ \"b\" : {\"data_offsets\": [8, 12], \"shape\": [], \"dtype\": \"I32\"},\n"
      "  \"a\\u00e9\\ud83d\\ude00\": {\"dtype\": \"F32\", \"shape\": [2], "
      "\"data_offsets\": [0, 8]},\n  \"__metadata__\": {\"k\": \"v\\/w\"} }\t ",
      std::string(reinterpret_cast<const char*>(a), 8) +
          std::string(reinterpret_cast<const char*>(&b), 4));
  SafetensorsFile file = read_safetensors(path.string());
  ASSERT_EQ(file.tensors().size(), 2u);
  const std::string name_a = "a\xc3\xa9\xf0\x9f\x98\x80";
  EXPECT_EQ(file.tensors()[0].name, name_a);  // in data order
  EXPECT_EQ(file.tensors()[1].name, "b");
  EXPECT_EQ(file.metadata().at("k"), "v/w");
  EXPECT_EQ(file.load(name_a, Device::cpu).to_vector<float>(), std::vector<float>({0.5f, -4.f}));
  EXPECT_EQ(file.load("b", Device::cpu).to_vector<int32_t>(), std::vector<int32_t>({9}));
}

TEST_F(SafetensorsTest, CorruptFilesGiveOneLineErrorsNamingTheFile) {
  const fs::path path = dir_ / "bad.safetensors";
  const std::string file = path.string();
  const std::string good_entry = "\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}";
  auto expect_read_error = [&](const std::string& bytes, const std::string& fragment) {
    SCOPED_TRACE(fragment);
    write_bytes(path, bytes);
    expect_one_line_error([&] { read_safetensors(file); }, {file, fragment});
  };
  auto raw = [](const std::string& header, size_t data_bytes) {
    return little_endian_u64(header.size()) + header + std::string(data_bytes, '\0');
  };

  expect_read_error("abc", "shorter than the 8-byte header length");
  expect_read_error(std::string("\x89PNG\r\n\x1a\n", 8) + "garbage", "header length");
  expect_read_error(raw("not json", 0), "malformed JSON header at byte 0");
  expect_read_error(raw("{" + good_entry, 8), "malformed JSON header");
  expect_read_error(raw("{" + good_entry + "} x", 8), "unexpected bytes after the header");
  expect_read_error(raw("{" + good_entry + ",}", 8), "expected a string key");
  expect_read_error(raw("{" + good_entry + "," + good_entry + "}", 8), "duplicate key \"w\"");
  expect_read_error(raw("{\"w\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8),
                    "non-negative integer");
  expect_read_error(raw("{\"w\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4),
                    "dtype \"F16\", expected one of F32, BF16, I32, I64, F64");
  expect_read_error(raw("{\"w\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8), "lacks a key");
  expect_read_error(raw("{\"w\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8),
                    "spans 8 bytes, expected 12");
  expect_read_error(raw("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8),
                    "invalid data_offsets");
  // Overlapping, gapped, truncated and over-long data sections.
  const std::string two =
      "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
      "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}";
  expect_read_error(raw(two, 12), "tensor \"b\" at bytes [4, 12) overlaps the previous tensor");
  const std::string gap =
      "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
      "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}";
  expect_read_error(raw(gap, 12), "gap before tensor \"b\"");
  expect_read_error(raw("{" + good_entry + "}", 5), "data section holds 5 bytes");
  expect_read_error(raw("{" + good_entry + "}", 9), "data section holds 9 bytes");
  expect_read_error(raw("{\"w\":" + std::string(100, '['), 0), "nesting deeper");
  expect_one_line_error([&] { read_safetensors((dir_ / "missing.safetensors").string()); },
                        {"cannot open", "missing.safetensors"});
}

TEST_F(SafetensorsTest, TruncatedWrittenFileIsRejected) {
  const fs::path path = dir_ / "t.safetensors";
  write_safetensors(path.string(), every_dtype());
  std::string bytes = read_bytes(path);
  write_bytes(path, bytes.substr(0, bytes.size() - 3));
  expect_one_line_error([&] { read_safetensors(path.string()); },
                        {path.string(), "offsets cover", "truncated"});
  write_bytes(path, bytes.substr(0, 20));
  expect_one_line_error([&] { read_safetensors(path.string()); }, {path.string(), "header length"});
}

TEST_F(SafetensorsTest, MismatchedDestinationsAreRejectedBeforeAnyLoad) {
  const std::string path = (dir_ / "m.safetensors").string();
  write_safetensors(path, {{"a", Tensor::from_vector<float>({1.f, 2.f}, {2}, Device::cpu)},
                           {"b", Tensor::from_vector<float>({3.f, 4.f}, {1, 2}, Device::cpu)}});
  SafetensorsFile file = read_safetensors(path);
  Tensor a = Tensor::from_vector<float>({-1.f, -1.f}, {2}, Device::cpu);
  Tensor b_wrong_shape = Tensor::from_vector<float>({-1.f, -1.f}, {2}, Device::cpu);
  expect_one_line_error(
      [&] {
        file.load_all({{"a", &a}, {"b", &b_wrong_shape}});
      },
      {path, "tensor \"b\" is fp32 [1, 2], the destination is fp32 [2]"});
  EXPECT_EQ(a.to_vector<float>(), std::vector<float>({-1.f, -1.f}));  // untouched
  Tensor b_wrong_dtype = Tensor::zeros({1, 2}, DType::bf16, Device::cpu);
  expect_one_line_error([&] { file.load_into("b", b_wrong_dtype); },
                        {"is fp32 [1, 2]", "bf16 [1, 2]"});
  expect_one_line_error([&] { file.load_into("c", a); }, {path, "has no tensor \"c\""});
  file.load_all({{"a", &a}});
  EXPECT_EQ(a.to_vector<float>(), std::vector<float>({1.f, 2.f}));
}

TEST_F(SafetensorsTest, RejectsUnwritableTensorLists) {
  const std::string path = (dir_ / "w.safetensors").string();
  Tensor t = Tensor::zeros({1}, DType::f32, Device::cpu);
  expect_one_line_error(
      [&] {
        write_safetensors(path, {{"x", t}, {"x", t}});
      },
      {"duplicate tensor name"});
  expect_one_line_error([&] { write_safetensors(path, {{"__metadata__", t}}); }, {"reserved"});
  expect_one_line_error([&] { write_safetensors(path, {{"u", Tensor()}}); }, {"undefined"});
  expect_one_line_error([&] { write_safetensors((dir_ / "no/such/dir.safetensors").string(), {}); },
                        {"cannot create"});
}

TEST_F(SafetensorsTest, DeviceTensorsRoundTrip) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device: device round trip skipped";
  const NamedTensors host = every_dtype();
  NamedTensors device;
  for (const auto& [name, tensor] : host) device.emplace_back(name, tensor.to(Device::cuda));
  const std::string path = (dir_ / "d.safetensors").string();
  write_safetensors(path, device);
  SafetensorsFile file = read_safetensors(path);
  for (const auto& [name, tensor] : host) {
    EXPECT_EQ(bytes_of(file.load(name, Device::cuda)), bytes_of(tensor)) << name;
  }
}

// ---------------------------------------------------------------------------------------
// Checkpoints.

// Known-answer vectors of XXH64 with seed 0 (as xxhsum -H64 prints them).
TEST_F(CheckpointTest, ChecksumIsXxh64) {
  std::string bytes_1024;
  for (int i = 0; i < 1024; ++i) bytes_1024 += static_cast<char>(i % 256);
  const std::pair<std::string, uint64_t> vectors[] = {
      {"", 0xef46db3751d8e999ULL},
      {"abc", 0x44bc2cf5ad770999ULL},
      {"The quick brown fox jumps over the lazy dog", 0x0b242d361fda71bcULL},
      {bytes_1024, 0x6f3914f18fe4df57ULL}};
  for (const auto& [text, hash] : vectors) {
    write_bytes(dir_ / "f", text);
    EXPECT_EQ(checksum_file((dir_ / "f").string()), (FileChecksum{text.size(), hash}));
  }
}

TrainerState state_at(int64_t step, int world_size = 1) {
  TrainerState state;
  state.step = step;
  state.tokens_seen = step * 1024;
  state.data_position = step * 4 + 1;
  state.rng_seed = 0xfedcba9876543210ULL;
  state.rng_offset = static_cast<uint64_t>(step) * 77;
  state.world_size = world_size;
  state.config_yaml = "model:\n  d_model: 64\ncheckpoint:\n  dir: \"ckpt\"\n";
  state.extra = {{"note", "resumed: twice"}, {"loss", "2.5"}};
  return state;
}

TEST_F(CheckpointTest, TrainerStateRoundTripsThroughYaml) {
  TrainerState state = state_at(12);
  EXPECT_EQ(parse_trainer_state(to_yaml(state), "s.yaml"), state);
  for (std::string config : {"", "no final newline", "  leading spaces\n", "two\n\n", "\ttab"}) {
    state.config_yaml = config;
    EXPECT_EQ(parse_trainer_state(to_yaml(state), "s.yaml"), state) << to_yaml(state);
  }
  const std::string yaml = to_yaml(state_at(3));
  expect_one_line_error([&] { parse_trainer_state(yaml + "surprise: 1\n", "s.yaml"); },
                        {"s.yaml", "unknown key 'surprise'"});
  expect_one_line_error([&] { parse_trainer_state("step: [1]\n", "s.yaml"); },
                        {"s.yaml", "'format'"});
  std::string bad_step = yaml;
  bad_step.replace(bad_step.find("step: 3"), 7, "step: x");
  expect_one_line_error([&] { parse_trainer_state(bad_step, "s.yaml"); },
                        {"s.yaml:2: key 'step' is not an integer"});
  expect_one_line_error([&] { parse_trainer_state("a: [", "s.yaml"); },
                        {"s.yaml", "malformed YAML"});
}

// Saves `step` as one rank would: model, optimizer and expert shard, values from the step.
std::string save_step(const fs::path& dir, int64_t step, int64_t keep = 3) {
  CheckpointWriter writer(dir.string(), step);
  const float value = static_cast<float>(step);
  writer.write_tensors(
      kModelFile,
      {{"embed", Tensor::from_floats({value, 1, 2, 3}, {2, 2}, DType::bf16, Device::cpu)},
       {"norm", Tensor::from_vector<float>({value}, {1}, Device::cpu)}},
      {{"step", std::to_string(step)}});
  writer.write_tensors(
      kOptimizerFile,
      {{"embed.exp_avg", Tensor::from_vector<float>({value, 0, 0, 0}, {2, 2}, Device::cpu)}});
  writer.write_tensors(experts_file(0),
                       {{"down_embed", Tensor::from_vector<float>({value, -value, 5, 6, 7, 8},
                                                                  {3, 2}, Device::cpu)}});
  return writer.commit(state_at(step), keep);
}

std::vector<std::string> entries(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) {
    names.push_back(entry.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

TEST_F(CheckpointTest, SaveWritesTheLayoutAndReadsBack) {
  const std::string path = save_step(dir_, 1234);
  EXPECT_EQ(path, (dir_ / "step_00001234").string());
  EXPECT_EQ(entries(dir_), std::vector<std::string>({"step_00001234"}));  // no .tmp left
  EXPECT_EQ(entries(path),
            std::vector<std::string>({"COMPLETE", "experts_rank0.safetensors", "model.safetensors",
                                      "optimizer.safetensors", "trainer_state.yaml"}));
  // COMPLETE: a header, "<size> <xxh64> <name>" per file, a closing line.
  std::istringstream complete(read_bytes(fs::path(path) / "COMPLETE"));
  std::vector<std::string> lines;
  for (std::string line; std::getline(complete, line);) lines.push_back(line);
  ASSERT_EQ(lines.size(), 6u);
  const FileChecksum model = checksum_file(path + "/model.safetensors");
  char expected_model_line[128];
  std::snprintf(expected_model_line, sizeof expected_model_line, "%llu %016llx model.safetensors",
                static_cast<unsigned long long>(model.size),
                static_cast<unsigned long long>(model.xxh64));
  EXPECT_EQ(lines[2], expected_model_line);
  EXPECT_EQ(lines[5].rfind("end 4 ", 0), 0u) << lines[5];

  CheckpointReader reader(path);
  EXPECT_EQ(reader.state(), state_at(1234));
  EXPECT_EQ(reader.files(),
            std::vector<std::string>({"experts_rank0.safetensors", "model.safetensors",
                                      "optimizer.safetensors", "trainer_state.yaml"}));
  EXPECT_TRUE(reader.has_file(kOptimizerFile));
  EXPECT_FALSE(reader.has_file(experts_file(1)));
  EXPECT_EQ(reader.safetensors(kModelFile).metadata().at("step"), "1234");
  Tensor embed = Tensor::zeros({2, 2}, DType::bf16, Device::cpu);
  Tensor down = Tensor::zeros({3, 2}, DType::f32, Device::cpu);
  reader.load_all({{kModelFile, "embed", &embed}, {experts_file(0), "down_embed", &down}});
  EXPECT_EQ(bytes_of(embed),
            bytes_of(Tensor::from_floats({1234, 1, 2, 3}, {2, 2}, DType::bf16, Device::cpu)));
  EXPECT_EQ(down.to_vector<float>(), std::vector<float>({1234, -1234, 5, 6, 7, 8}));
  expect_one_line_error([&] { reader.safetensors(experts_file(1)); },
                        {"has no experts_rank1.safetensors", "model.safetensors"});
}

TEST_F(CheckpointTest, KeepsTheNewestKeepCheckpoints) {
  for (int64_t step = 1; step <= 5; ++step) save_step(dir_, step * 10, /*keep=*/2);
  EXPECT_EQ(entries(dir_), std::vector<std::string>({"step_00000040", "step_00000050"}));
  save_step(dir_, 60, /*keep=*/1);
  EXPECT_EQ(entries(dir_), std::vector<std::string>({"step_00000060"}));
}

TEST_F(CheckpointTest, ResumeAutoPicksTheNewestValidCheckpoint) {
  EXPECT_EQ(find_latest_checkpoint((dir_ / "absent").string()), std::nullopt);
  EXPECT_EQ(find_latest_checkpoint(dir_.string()), std::nullopt);
  for (int64_t step : {100, 200, 300}) save_step(dir_, step);
  EXPECT_EQ(find_latest_checkpoint(dir_.string()), (dir_ / "step_00000300").string());

  // A flipped byte in the newest one's data: caught by the checksum, the one before wins.
  flip_byte(dir_ / "step_00000300" / "experts_rank0.safetensors", 2);
  expect_one_line_error(
      [&] { CheckpointReader((dir_ / "step_00000300").string()); },
      {"step_00000300", "experts_rank0.safetensors has checksum", "the file is corrupt"});
  std::optional<CheckpointReader> latest = open_latest_checkpoint(dir_.string());
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(latest->path(), (dir_ / "step_00000200").string());
  EXPECT_EQ(latest->state().step, 200);

  // Truncated files, a missing COMPLETE and an edited COMPLETE are skipped too.
  const fs::path step200 = dir_ / "step_00000200";
  const std::string model = read_bytes(step200 / kModelFile);
  write_bytes(step200 / kModelFile, model.substr(0, model.size() - 1));
  expect_one_line_error([&] { CheckpointReader(step200.string()); },
                        {"model.safetensors is", "bytes, COMPLETE says", "truncated"});
  EXPECT_EQ(find_latest_checkpoint(dir_.string()), (dir_ / "step_00000100").string());
  fs::remove(step200 / kCompleteFile);
  expect_one_line_error([&] { CheckpointReader(step200.string()); }, {"has no COMPLETE marker"});
  flip_byte(dir_ / "step_00000100" / kCompleteFile, 30);
  expect_one_line_error([&] { CheckpointReader((dir_ / "step_00000100").string()); },
                        {"step_00000100", "COMPLETE does not match its closing line"});
  EXPECT_EQ(find_latest_checkpoint(dir_.string()), std::nullopt);
}

TEST_F(CheckpointTest, InterruptedSaveLeavesOnlyATemporaryDirectory) {
  save_step(dir_, 10);
  std::string temp;
  {
    CheckpointWriter writer(dir_.string(), 20);
    writer.write_tensors(kModelFile, {{"w", Tensor::zeros({4}, DType::f32, Device::cpu)}});
    temp = writer.temp_path();
  }  // never committed: as if the job had died here
  EXPECT_EQ(fs::path(temp).filename().string().rfind("step_00000020.tmp-", 0), 0u) << temp;
  EXPECT_TRUE(fs::exists(temp));
  EXPECT_EQ(find_latest_checkpoint(dir_.string()), (dir_ / "step_00000010").string());
  save_step(dir_, 30);  // the next save removes the leftover
  EXPECT_EQ(entries(dir_), std::vector<std::string>({"step_00000010", "step_00000030"}));
}

TEST_F(CheckpointTest, ExistingCheckpointsAreNeverOverwritten) {
  save_step(dir_, 50);
  const std::string before = read_bytes(dir_ / "step_00000050" / kCompleteFile);
  expect_one_line_error([&] { save_step(dir_, 50); },
                        {"step_00000050", "already exists and verifies"});
  EXPECT_EQ(read_bytes(dir_ / "step_00000050" / kCompleteFile), before);
  EXPECT_EQ(find_latest_checkpoint(dir_.string()), (dir_ / "step_00000050").string());

  // An invalid one of the same step is moved aside (kept), and the new one takes its name.
  flip_byte(dir_ / "step_00000050" / kModelFile, 0);
  save_step(dir_, 50);
  std::vector<std::string> names = entries(dir_);
  ASSERT_EQ(names.size(), 2u);
  EXPECT_EQ(names[0], "step_00000050");
  EXPECT_EQ(names[1].rfind("step_00000050.invalid-", 0), 0u) << names[1];
  EXPECT_NO_THROW(CheckpointReader((dir_ / "step_00000050").string()));
}

TEST_F(CheckpointTest, WorldSizeMismatchIsAClearError) {
  save_step(dir_, 7);
  CheckpointReader reader((dir_ / "step_00000007").string());
  EXPECT_NO_THROW(verify_compatible(reader.state(), 1, reader.path()));
  expect_one_line_error(
      [&] { verify_compatible(reader.state(), 4, reader.path()); },
      {"step_00000007", "was saved by 1 ranks, this run has 4", "same world size"});
}

TEST_F(CheckpointTest, ShapeMismatchLeavesEveryDestinationUnchanged) {
  save_step(dir_, 8);
  CheckpointReader reader((dir_ / "step_00000008").string());
  Tensor embed = Tensor::from_floats({-1, -1, -1, -1}, {2, 2}, DType::bf16, Device::cpu);
  Tensor norm = Tensor::from_vector<float>({-1}, {1}, Device::cpu);
  Tensor down_other_shape = Tensor::from_vector<float>({-1, -1, -1, -1}, {2, 2}, Device::cpu);
  const std::string embed_before = bytes_of(embed), norm_before = bytes_of(norm);
  expect_one_line_error(
      [&] {
        reader.load_all({{kModelFile, "embed", &embed},
                         {kModelFile, "norm", &norm},
                         {experts_file(0), "down_embed", &down_other_shape}});
      },
      {"experts_rank0.safetensors", "tensor \"down_embed\" is fp32 [3, 2]",
       "destination is fp32 [2, 2]"});
  EXPECT_EQ(bytes_of(embed), embed_before);
  EXPECT_EQ(bytes_of(norm), norm_before);
  expect_one_line_error(
      [&] {
        reader.load_all({{kModelFile, "missing", &norm}});
      },
      {"has no tensor \"missing\""});
  EXPECT_EQ(bytes_of(norm), norm_before);
}

TEST_F(CheckpointTest, RejectsBadFileNamesAndStates) {
  CheckpointWriter writer(dir_.string(), 3);
  Tensor t = Tensor::zeros({1}, DType::f32, Device::cpu);
  expect_one_line_error(
      [&] {
        writer.write_tensors("../escape.safetensors", {{"t", t}});
      },
      {"'../escape.safetensors' is invalid"});
  expect_one_line_error([&] { writer.write_tensors("COMPLETE", {{"t", t}}); }, {"is invalid"});
  expect_one_line_error([&] { writer.commit(state_at(4), 3); },
                        {"trainer state of step 4", "expected step 3"});
  expect_one_line_error([&] { writer.commit(state_at(3, 2), 3); },
                        {"world size 2", "world size 1"});
}

// Two ranks (threads here, processes under MPI) write one checkpoint together.
TEST_F(CheckpointTest, RanksWriteTheirShardsIntoOneCheckpoint) {
  const int world_size = 2;
  std::barrier sync(world_size);
  std::vector<std::string> paths(world_size);
  std::vector<std::string> errors(world_size);
  auto rank_main = [&](int rank) {
    errors[rank] = error_of([&] {
      CheckpointWriter writer(dir_.string(), 40,
                              {rank, world_size, [&] { sync.arrive_and_wait(); }});
      if (rank == 0) {
        writer.write_tensors(kModelFile,
                             {{"w", Tensor::from_vector<float>({1}, {1}, Device::cpu)}});
      }
      writer.write_tensors(experts_file(rank),
                           {{"down_embed", Tensor::from_vector<float>({float(rank), float(rank)},
                                                                      {1, 2}, Device::cpu)}});
      paths[rank] = writer.commit(state_at(40, world_size), 2);
    });
  };
  std::thread rank1(rank_main, 1);
  rank_main(0);
  rank1.join();
  EXPECT_EQ(errors, std::vector<std::string>(world_size, "(no error)"));
  EXPECT_EQ(paths[0], (dir_ / "step_00000040").string());
  EXPECT_EQ(paths[1], paths[0]);

  CheckpointReader reader(paths[0]);
  EXPECT_EQ(reader.state().world_size, 2);
  EXPECT_NO_THROW(verify_compatible(reader.state(), 2, reader.path()));
  for (int rank = 0; rank < world_size; ++rank) {
    Tensor down = Tensor::zeros({1, 2}, DType::f32, Device::cpu);
    reader.load_all({{experts_file(rank), "down_embed", &down}});
    EXPECT_EQ(down.to_vector<float>(), std::vector<float>(2, float(rank)));
  }
}

}  // namespace
}  // namespace flashmoe
