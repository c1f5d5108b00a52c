#include "trainer/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <bit>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "core/log.h"

namespace flashmoe {

namespace fs = std::filesystem;

namespace {

constexpr const char* kSafetensorsSuffix = ".safetensors";
constexpr const char* kTempInfix = ".tmp-";
constexpr const char* kCompleteHeader = "flashmoe checkpoint v1, size and xxh64 of each file";
constexpr int kTrainerStateFormat = 1;

// ---------------------------------------------------------------------------------------
// XXH64 (seed 0), streaming: fast enough (several GB/s) that verifying a checkpoint of
// many GB costs little more than reading it, and any xxhsum -H64 can check a file by hand.

class Xxh64 {
 public:
  void update(const uint8_t* data, size_t size) {
    total_size_ += size;
    if (buffered_ > 0) {
      size_t take = std::min(size, sizeof buffer_ - buffered_);
      std::memcpy(buffer_ + buffered_, data, take);
      buffered_ += take;
      data += take;
      size -= take;
      if (buffered_ < sizeof buffer_) return;
      consume_stripe(buffer_);
      buffered_ = 0;
    }
    for (; size >= sizeof buffer_; data += sizeof buffer_, size -= sizeof buffer_) {
      consume_stripe(data);
    }
    std::memcpy(buffer_, data, size);
    buffered_ = size;
  }

  uint64_t digest() const {
    uint64_t hash = kPrime5;  // seed 0 + prime 5, for inputs shorter than a stripe
    if (total_size_ >= sizeof buffer_) {
      hash = std::rotl(lanes_[0], 1) + std::rotl(lanes_[1], 7) + std::rotl(lanes_[2], 12) +
             std::rotl(lanes_[3], 18);
      for (uint64_t lane : lanes_) hash = (hash ^ round(0, lane)) * kPrime1 + kPrime4;
    }
    hash += total_size_;
    const uint8_t* p = buffer_;
    size_t left = buffered_;
    for (; left >= 8; p += 8, left -= 8) {
      hash = std::rotl(hash ^ round(0, read64(p)), 27) * kPrime1 + kPrime4;
    }
    if (left >= 4) {
      hash = std::rotl(hash ^ (read32(p) * kPrime1), 23) * kPrime2 + kPrime3;
      p += 4;
      left -= 4;
    }
    for (; left > 0; ++p, --left) hash = std::rotl(hash ^ (*p * kPrime5), 11) * kPrime1;
    hash = (hash ^ (hash >> 33)) * kPrime2;
    hash = (hash ^ (hash >> 29)) * kPrime3;
    return hash ^ (hash >> 32);
  }

 private:
  static constexpr uint64_t kPrime1 = 0x9E3779B185EBCA87ULL;
  static constexpr uint64_t kPrime2 = 0xC2B2AE3D27D4EB4FULL;
  static constexpr uint64_t kPrime3 = 0x165667B19E3779F9ULL;
  static constexpr uint64_t kPrime4 = 0x85EBCA77C2B2AE63ULL;
  static constexpr uint64_t kPrime5 = 0x27D4EB2F165667C5ULL;

  static uint64_t read64(const uint8_t* p) {
    uint64_t value;
    std::memcpy(&value, p, 8);
    return value;  // little-endian hosts only, as the safetensors I/O
  }
  static uint64_t read32(const uint8_t* p) {
    uint32_t value;
    std::memcpy(&value, p, 4);
    return value;
  }
  static uint64_t round(uint64_t lane, uint64_t input) {
    return std::rotl(lane + input * kPrime2, 31) * kPrime1;
  }
  void consume_stripe(const uint8_t* stripe) {
    for (int i = 0; i < 4; ++i) lanes_[i] = round(lanes_[i], read64(stripe + 8 * i));
  }

  uint64_t lanes_[4] = {kPrime1 + kPrime2, kPrime2, 0, 0 - kPrime1};
  uint8_t buffer_[32] = {};
  size_t buffered_ = 0;
  uint64_t total_size_ = 0;
};

uint64_t xxh64_of(const std::string& text) {
  Xxh64 hash;
  hash.update(reinterpret_cast<const uint8_t*>(text.data()), text.size());
  return hash.digest();
}

std::string hex64(uint64_t value) {
  char text[17];
  std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(value));
  return text;
}

// ---------------------------------------------------------------------------------------
// Files and directories: every failure becomes a one-line flashmoe::Error.

std::string quoted(const fs::path& path) {
  std::string text = "'";
  text += path.string();  // appended, not '+'-chained: GCC 12 warns falsely (-Wrestrict) on that
  return text + "'";
}

// Filesystem queries that answer false, instead of throwing, when the path cannot be read.
bool directory_exists(const fs::path& path) {
  std::error_code error;
  return fs::is_directory(path, error);
}

bool path_exists(const fs::path& path) {
  std::error_code error;
  return fs::exists(path, error);
}

// Makes the file's data, or the directory's entries, durable. Linux accepts fsync on a
// read-only descriptor, which is all a directory can be opened as.
void fsync_path(const fs::path& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  FLASHMOE_CHECK(fd >= 0, "cannot open " << quoted(path) << " to fsync: " << std::strerror(errno));
  int status = ::fsync(fd);
  int fsync_errno = errno;
  ::close(fd);
  FLASHMOE_CHECK(status == 0,
                 "cannot fsync " << quoted(path) << ": " << std::strerror(fsync_errno));
}

void write_text_file_synced(const fs::path& path, const std::string& text) {
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << text;
    out.close();
    FLASHMOE_CHECK(out, "cannot write " << quoted(path) << ": " << std::strerror(errno));
  }
  fsync_path(path);
}

std::string read_text_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  FLASHMOE_CHECK(in, "cannot open " << quoted(path) << ": " << std::strerror(errno));
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

void rename_path(const fs::path& from, const fs::path& to) {
  std::error_code error;
  fs::rename(from, to, error);
  FLASHMOE_CHECK(
      !error, "cannot rename " << quoted(from) << " to " << quoted(to) << ": " << error.message());
}

void remove_tree(const fs::path& path) {
  std::error_code error;
  fs::remove_all(path, error);
  FLASHMOE_CHECK(!error, "cannot remove " << quoted(path) << ": " << error.message());
}

// The entries of `dir` (names only), sorted; an error when it cannot be listed.
std::vector<std::string> list_directory(const fs::path& dir) {
  std::error_code error;
  std::vector<std::string> names;
  for (fs::directory_iterator it(dir, error), end; !error && it != end; it.increment(error)) {
    names.push_back(it->path().filename().string());
  }
  FLASHMOE_CHECK(!error, "cannot list " << quoted(dir) << ": " << error.message());
  std::sort(names.begin(), names.end());
  return names;
}

std::string process_id() { return std::to_string(::getpid()); }

// ---------------------------------------------------------------------------------------
// Names in a checkpoint directory.

// Names that go into COMPLETE: no separators, no spaces, nothing to escape.
bool is_plain_file_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." &&
         std::all_of(name.begin(), name.end(), [](char c) {
           return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-';
         });
}

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() &&
         text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The step of a final checkpoint directory name (exactly checkpoint_name(step)), else nullopt.
std::optional<int64_t> step_of(const std::string& name) {
  const std::string prefix = "step_";
  if (!name.starts_with(prefix)) return {};
  int64_t step = -1;
  std::from_chars(name.data() + prefix.size(), name.data() + name.size(), step);
  if (step < 0 || name != checkpoint_name(step)) return {};
  return step;
}

// Final checkpoint directories under `dir`, oldest step first.
std::vector<std::pair<int64_t, fs::path>> list_checkpoints(const fs::path& dir) {
  std::vector<std::pair<int64_t, fs::path>> checkpoints;
  for (const std::string& name : list_directory(dir)) {
    std::optional<int64_t> step = step_of(name);
    if (step && directory_exists(dir / name)) checkpoints.emplace_back(*step, dir / name);
  }
  std::sort(checkpoints.begin(), checkpoints.end());
  return checkpoints;
}

bool is_temp_name(const std::string& name) {
  return name.starts_with("step_") && name.find(kTempInfix) != std::string::npos;
}

// ---------------------------------------------------------------------------------------
// COMPLETE: a header line, "<size> <xxh64> <file>" per file, and a closing line
// "end <count> <xxh64 of all lines above>" so that a truncated or edited list is caught.

std::string format_complete(const std::map<std::string, FileChecksum>& checksums) {
  std::string text = std::string(kCompleteHeader) + "\n";
  for (const auto& [name, checksum] : checksums) {
    text += std::to_string(checksum.size) + " " + hex64(checksum.xxh64) + " " + name + "\n";
  }
  return text + "end " + std::to_string(checksums.size()) + " " + hex64(xxh64_of(text)) + "\n";
}

// The list without its closing line, once the closing line vouches for it.
std::string checked_complete_body(const std::string& text, const std::string& where) {
  const size_t closing_start = text.rfind("\nend ") + 1;
  FLASHMOE_CHECK(closing_start != 0 && ends_with(text, "\n"),
                 where << ": COMPLETE has no closing line, expected 'end <count> <xxh64>' "
                          "(truncated?)");
  const std::string body = text.substr(0, closing_start);
  const auto lines = std::count(body.begin(), body.end(), '\n');
  const std::string expected_closing =
      "end " + std::to_string(lines - 1) + " " + hex64(xxh64_of(body)) + "\n";
  FLASHMOE_CHECK(text.substr(closing_start) == expected_closing,
                 where << ": COMPLETE does not match its closing line, expected '"
                       << expected_closing.substr(0, expected_closing.size() - 1)
                       << "' (the list is corrupt)");
  return body;
}

std::map<std::string, FileChecksum> parse_complete(const std::string& text,
                                                   const std::string& where) {
  std::istringstream lines(checked_complete_body(text, where));
  std::string line;
  std::getline(lines, line);
  FLASHMOE_CHECK(line == kCompleteHeader, where << ": COMPLETE starts with an unknown line, "
                                                   "expected '"
                                                << kCompleteHeader << "'");
  std::map<std::string, FileChecksum> checksums;
  for (int line_number = 2; std::getline(lines, line); ++line_number) {
    std::istringstream fields(line);
    std::string hash, name, rest;
    FileChecksum checksum;
    bool parsed = static_cast<bool>(fields >> checksum.size >> hash >> name) && !(fields >> rest);
    auto [ptr, error] = std::from_chars(hash.data(), hash.data() + hash.size(), checksum.xxh64, 16);
    FLASHMOE_CHECK(parsed && hash.size() == 16 && error == std::errc() &&
                       ptr == hash.data() + hash.size() && is_plain_file_name(name) &&
                       checksums.emplace(name, checksum).second,
                   where << ": COMPLETE line " << line_number
                         << " is malformed, expected '<size> <16 hex digits> <file name>' with "
                            "each file listed once");
  }
  return checksums;
}

// Reads COMPLETE and checks every listed file: sizes first (cheap, catches truncation),
// then checksums. Returns the list.
std::map<std::string, FileChecksum> verify_complete_list(const fs::path& checkpoint) {
  const std::string where = "checkpoint " + quoted(checkpoint);
  FLASHMOE_CHECK(directory_exists(checkpoint), where << " is not a directory");
  FLASHMOE_CHECK(path_exists(checkpoint / kCompleteFile),
                 where << " has no " << kCompleteFile
                       << " marker, expected one (an unfinished or damaged save)");
  auto checksums = parse_complete(read_text_file(checkpoint / kCompleteFile), where);
  FLASHMOE_CHECK(checksums.count(kTrainerStateFile) == 1,
                 where << ": COMPLETE does not list " << kTrainerStateFile);
  for (const auto& [name, checksum] : checksums) {
    std::error_code error;
    uint64_t size = fs::file_size(checkpoint / name, error);
    FLASHMOE_CHECK(!error, where << ": " << name << " is listed in COMPLETE but cannot be read ("
                                 << error.message() << ")");
    FLASHMOE_CHECK(size == checksum.size, where << ": " << name << " is " << size
                                                << " bytes, COMPLETE says " << checksum.size
                                                << " (truncated or replaced)");
  }
  for (const auto& [name, checksum] : checksums) {
    uint64_t actual = checksum_file((checkpoint / name).string()).xxh64;
    FLASHMOE_CHECK(actual == checksum.xxh64,
                   where << ": " << name << " has checksum " << hex64(actual) << ", COMPLETE says "
                         << hex64(checksum.xxh64) << " (the file is corrupt)");
  }
  return checksums;
}

// ---------------------------------------------------------------------------------------
// Trainer state YAML.

std::string emit_trainer_state(const TrainerState& state, YAML::EMITTER_MANIP config_style) {
  YAML::Emitter out;
  out << YAML::BeginMap;
  out << YAML::Key << "format" << YAML::Value << kTrainerStateFormat;
  out << YAML::Key << "step" << YAML::Value << state.step;
  out << YAML::Key << "tokens_seen" << YAML::Value << state.tokens_seen;
  out << YAML::Key << "data_position" << YAML::Value << state.data_position;
  out << YAML::Key << "rng_seed" << YAML::Value << state.rng_seed;
  out << YAML::Key << "rng_offset" << YAML::Value << state.rng_offset;
  out << YAML::Key << "world_size" << YAML::Value << state.world_size;
  out << YAML::Key << "extra" << YAML::Value << YAML::BeginMap;
  for (const auto& [key, value] : state.extra) {
    out << YAML::Key << YAML::DoubleQuoted << key << YAML::Value << YAML::DoubleQuoted << value;
  }
  out << YAML::EndMap;
  out << YAML::Key << "config" << YAML::Value << config_style << state.config_yaml;
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

template <class T>
T read_scalar(const YAML::Node& root, const char* key, const std::string& source_name,
              const char* expected) {
  const YAML::Node node = root[key];
  FLASHMOE_CHECK(node.IsDefined(),
                 source_name << ": key '" << key << "' is missing, expected " << expected);
  if (node.IsScalar()) {
    try {
      return node.as<T>();
    } catch (const YAML::Exception&) {
      // reported below, with the other kinds of wrong value
    }
  }
  FLASHMOE_FAIL(source_name << ":" << node.Mark().line + 1 << ": key '" << key << "' is not "
                            << expected);
}

std::map<std::string, std::string> read_string_map(const YAML::Node& root, const char* key,
                                                   const std::string& source_name) {
  const YAML::Node node = root[key];
  FLASHMOE_CHECK(
      node.IsDefined() && node.IsMap(),
      source_name << ": key '" << key << "' is missing or not a map, expected a map of strings");
  std::map<std::string, std::string> values;
  for (const auto& entry : node) {
    FLASHMOE_CHECK(entry.second.IsScalar(),
                   source_name << ":" << entry.second.Mark().line + 1 << ": " << key << "."
                               << entry.first.Scalar() << " is not a string");
    values[entry.first.Scalar()] = entry.second.Scalar();
  }
  return values;
}

// ---------------------------------------------------------------------------------------
// Saving.

// Removes what interrupted saves (or prunes) left behind: nothing else ever has that name.
void remove_interrupted_saves(const fs::path& dir) {
  for (const std::string& name : list_directory(dir)) {
    if (!is_temp_name(name)) continue;
    FLASHMOE_LOG(warn, "removing " << quoted(dir / name) << ", left by an interrupted save");
    remove_tree(dir / name);
  }
}

// The temporary directory rank 0 created for `step`: the only one, since rank 0 removed
// every other before creating it.
fs::path find_temp_dir(const fs::path& dir, int64_t step, int rank) {
  const std::string prefix = checkpoint_name(step) + kTempInfix;
  std::vector<std::string> found;
  for (const std::string& name : list_directory(dir)) {
    if (name.starts_with(prefix)) found.push_back(name);
  }
  FLASHMOE_CHECK(found.size() == 1,
                 "rank " << rank << " found " << found.size() << " directories " << prefix
                         << "* in " << quoted(dir)
                         << ", expected exactly the one rank 0 created (is another job "
                            "saving to this directory?)");
  return dir / found.front();
}

std::map<std::string, FileChecksum> checksum_directory(const fs::path& dir) {
  std::map<std::string, FileChecksum> checksums;
  for (const std::string& name : list_directory(dir)) {
    std::error_code error;
    if (fs::is_regular_file(dir / name, error)) {
      checksums[name] = checksum_file((dir / name).string());
    }
  }
  return checksums;
}

// A final directory of the same step may exist (e.g. a corrupt one that resume skipped).
// A valid checkpoint is never replaced; an invalid one is moved aside, not deleted.
void move_aside_if_invalid(const fs::path& target) {
  try {
    verify_complete_list(target);
  } catch (const Error& e) {
    fs::path aside = target.string() + ".invalid-" + process_id();
    FLASHMOE_LOG(warn, "moving invalid checkpoint " << quoted(target) << " to " << quoted(aside)
                                                    << " (" << e.what() << ")");
    rename_path(target, aside);
    return;
  }
  FLASHMOE_FAIL("checkpoint " << quoted(target)
                              << " already exists and verifies; expected a step not saved yet "
                                 "(a valid checkpoint is never overwritten: move it away or use "
                                 "another checkpoint.dir)");
}

// Keeps `just_saved` and the newest keep - 1 other complete checkpoints. A deleted one is
// first renamed to a temporary name, so an interrupted deletion never leaves a
// half-deleted directory under a checkpoint's name.
void remove_old_checkpoints(const fs::path& dir, int64_t keep, int64_t just_saved) {
  auto checkpoints = list_checkpoints(dir);
  int64_t kept = 1;
  for (auto it = checkpoints.rbegin(); it != checkpoints.rend(); ++it) {
    const auto& [step, path] = *it;
    if (step == just_saved || !path_exists(path / kCompleteFile)) continue;
    if (kept < keep) {
      ++kept;
      continue;
    }
    fs::path doomed = path.string() + kTempInfix + "deleting";
    rename_path(path, doomed);
    remove_tree(doomed);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------

std::string experts_file(int rank) {
  return "experts_rank" + std::to_string(rank) + kSafetensorsSuffix;
}

std::string checkpoint_name(int64_t step) {
  char name[32];
  std::snprintf(name, sizeof name, "step_%08lld", static_cast<long long>(step));
  return name;
}

FileChecksum checksum_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  FLASHMOE_CHECK(in, "cannot open " << quoted(path) << ": " << std::strerror(errno));
  std::vector<char> buffer(size_t{4} << 20);
  Xxh64 hash;
  FileChecksum checksum;
  while (in) {
    in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    hash.update(reinterpret_cast<const uint8_t*>(buffer.data()), static_cast<size_t>(in.gcount()));
    checksum.size += static_cast<uint64_t>(in.gcount());
  }
  FLASHMOE_CHECK(in.eof(), "cannot read " << quoted(path) << ": " << std::strerror(errno));
  checksum.xxh64 = hash.digest();
  return checksum;
}

// A block scalar keeps the config readable; YAML's block rules alter some texts (no
// final newline, leading spaces), and those are written quoted, which is exact.
std::string to_yaml(const TrainerState& state) {
  std::string readable = emit_trainer_state(state, YAML::Literal);
  if (YAML::Load(readable)["config"].as<std::string>() == state.config_yaml) return readable;
  return emit_trainer_state(state, YAML::DoubleQuoted);
}

TrainerState parse_trainer_state(const std::string& yaml_text, const std::string& source_name) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    FLASHMOE_FAIL(source_name << ":" << e.mark.line + 1 << ": malformed YAML (" << e.msg << ")");
  }
  FLASHMOE_CHECK(root.IsMap(), source_name << " is not a YAML map, expected a trainer state");
  static const std::set<std::string> known = {"format",        "step",     "tokens_seen",
                                              "data_position", "rng_seed", "rng_offset",
                                              "world_size",    "extra",    "config"};
  for (const auto& entry : root) {
    FLASHMOE_CHECK(known.count(entry.first.Scalar()) == 1,
                   source_name << ":" << entry.first.Mark().line + 1 << ": unknown key '"
                               << entry.first.Scalar() << "' in a trainer state");
  }
  const int format = read_scalar<int>(root, "format", source_name, "an integer");
  FLASHMOE_CHECK(format == kTrainerStateFormat,
                 source_name << ": format " << format << ", expected " << kTrainerStateFormat);
  TrainerState state;
  state.step = read_scalar<int64_t>(root, "step", source_name, "an integer");
  state.tokens_seen = read_scalar<int64_t>(root, "tokens_seen", source_name, "an integer");
  state.data_position = read_scalar<int64_t>(root, "data_position", source_name, "an integer");
  state.rng_seed = read_scalar<uint64_t>(root, "rng_seed", source_name, "an unsigned integer");
  state.rng_offset = read_scalar<uint64_t>(root, "rng_offset", source_name, "an unsigned integer");
  state.world_size = read_scalar<int>(root, "world_size", source_name, "an integer");
  FLASHMOE_CHECK(state.world_size >= 1,
                 source_name << ": world_size " << state.world_size << ", expected >= 1");
  state.extra = read_string_map(root, "extra", source_name);
  state.config_yaml = read_scalar<std::string>(root, "config", source_name, "a string");
  return state;
}

// ---------------------------------------------------------------------------------------

CheckpointWriter::CheckpointWriter(std::string checkpoint_dir, int64_t step, CheckpointGroup group)
    : checkpoint_dir_(std::move(checkpoint_dir)), step_(step), group_(std::move(group)) {
  FLASHMOE_CHECK(step_ >= 0, "checkpoint step " << step_ << ", expected >= 0");
  FLASHMOE_CHECK(group_.world_size >= 1 && group_.rank >= 0 && group_.rank < group_.world_size,
                 "checkpoint group rank " << group_.rank << " of " << group_.world_size
                                          << ", expected 0 <= rank < world_size");
  FLASHMOE_CHECK(group_.barrier, "checkpoint group has no barrier function, expected one");
  const fs::path dir = checkpoint_dir_;
  if (group_.rank == 0) {
    std::error_code error;
    fs::create_directories(dir, error);
    FLASHMOE_CHECK(!error,
                   "cannot create checkpoint directory " << quoted(dir) << ": " << error.message());
    remove_interrupted_saves(dir);
    temp_path_ = (dir / (checkpoint_name(step_) + kTempInfix + process_id())).string();
    fs::create_directory(temp_path_, error);
    FLASHMOE_CHECK(!error, "cannot create " << quoted(temp_path_) << ": " << error.message());
  }
  group_.barrier();
  if (group_.rank != 0) temp_path_ = find_temp_dir(dir, step_, group_.rank).string();
}

void CheckpointWriter::write_tensors(const std::string& file_name,
                                     const std::vector<std::pair<std::string, Tensor>>& tensors,
                                     const std::map<std::string, std::string>& metadata) {
  FLASHMOE_CHECK(!committed_, "checkpoint " << checkpoint_name(step_)
                                            << " is committed already, expected no more files");
  FLASHMOE_CHECK(is_plain_file_name(file_name) && ends_with(file_name, kSafetensorsSuffix),
                 "checkpoint file name '" << file_name
                                          << "' is invalid, expected [A-Za-z0-9._-]+ ending in "
                                          << kSafetensorsSuffix);
  write_safetensors((fs::path(temp_path_) / file_name).string(), tensors, metadata);
}

std::string CheckpointWriter::commit(const TrainerState& state, int64_t keep) {
  FLASHMOE_CHECK(!committed_, "checkpoint " << checkpoint_name(step_) << " is committed already");
  FLASHMOE_CHECK(keep >= 1, "checkpoint keep " << keep << ", expected >= 1");
  FLASHMOE_CHECK(state.step == step_ && state.world_size == group_.world_size,
                 "trainer state of step " << state.step << " and world size " << state.world_size
                                          << " committed to checkpoint " << checkpoint_name(step_)
                                          << ", expected step " << step_ << " and world size "
                                          << group_.world_size);
  const fs::path dir = checkpoint_dir_;
  const fs::path temp = temp_path_;
  const fs::path target = dir / checkpoint_name(step_);
  if (group_.rank == 0) write_text_file_synced(temp / kTrainerStateFile, to_yaml(state));
  group_.barrier();  // every rank's files are written and fsynced
  if (group_.rank == 0) {
    write_text_file_synced(temp / kCompleteFile, format_complete(checksum_directory(temp)));
    fsync_path(temp);
    if (path_exists(target)) move_aside_if_invalid(target);
    rename_path(temp, target);
    fsync_path(dir);
    remove_old_checkpoints(dir, keep, step_);
  }
  group_.barrier();  // no rank goes on before the checkpoint is in place
  committed_ = true;
  return target.string();
}

// ---------------------------------------------------------------------------------------

CheckpointReader::CheckpointReader(std::string path) : path_(std::move(path)) {
  const fs::path dir = path_;
  checksums_ = verify_complete_list(dir);
  state_ = parse_trainer_state(read_text_file(dir / kTrainerStateFile),
                               (dir / kTrainerStateFile).string());
  for (const auto& [name, checksum] : checksums_) {
    if (ends_with(name, kSafetensorsSuffix)) {
      safetensors_.emplace(name, read_safetensors((dir / name).string()));
    }
  }
}

std::vector<std::string> CheckpointReader::files() const {
  std::vector<std::string> names;
  for (const auto& [name, checksum] : checksums_) names.push_back(name);
  return names;
}

bool CheckpointReader::has_file(const std::string& file_name) const {
  return checksums_.count(file_name) == 1;
}

const SafetensorsFile& CheckpointReader::safetensors(const std::string& file_name) const {
  auto it = safetensors_.find(file_name);
  if (it != safetensors_.end()) return it->second;
  std::string listed;
  for (const auto& [name, file] : safetensors_) listed += (listed.empty() ? "" : ", ") + name;
  FLASHMOE_FAIL("checkpoint " << quoted(path_) << " has no " << file_name
                              << ", expected one of its safetensors files: " << listed);
}

void CheckpointReader::load_all(const std::vector<Target>& targets) const {
  for (const Target& target : targets) {
    FLASHMOE_CHECK(target.destination != nullptr,
                   "no destination for " << target.file << ":" << target.name);
    safetensors(target.file).check_destination(target.name, *target.destination);
  }
  for (const Target& target : targets) {
    safetensors(target.file).load_into(target.name, *target.destination);
  }
}

void verify_compatible(const TrainerState& saved, int world_size,
                       const std::string& checkpoint_path) {
  FLASHMOE_CHECK(saved.world_size == world_size,
                 "checkpoint " << quoted(checkpoint_path) << " was saved by " << saved.world_size
                               << " ranks, this run has " << world_size
                               << " (expected the same world size: each rank's expert shard is "
                                  "its own file)");
}

std::optional<CheckpointReader> open_latest_checkpoint(const std::string& checkpoint_dir) {
  if (!path_exists(checkpoint_dir)) return std::nullopt;
  auto checkpoints = list_checkpoints(checkpoint_dir);
  for (auto it = checkpoints.rbegin(); it != checkpoints.rend(); ++it) {
    try {
      return CheckpointReader(it->second.string());
    } catch (const Error& e) {
      FLASHMOE_LOG(warn, "skipping checkpoint " << quoted(it->second) << ": " << e.what());
    }
  }
  return std::nullopt;
}

std::optional<std::string> find_latest_checkpoint(const std::string& checkpoint_dir) {
  std::optional<CheckpointReader> latest = open_latest_checkpoint(checkpoint_dir);
  if (!latest) return std::nullopt;
  return latest->path();
}

}  // namespace flashmoe
