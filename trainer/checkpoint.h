// Checkpoints: one directory per saved step, written atomically by every rank of a job,
// verified completely before anything is loaded from it.
//
//   <checkpoint.dir>/
//     step_00001234/              a complete checkpoint (never modified once renamed here)
//       model.safetensors         replicated tensors (rank 0)
//       optimizer.safetensors     moments of the replicated tensors (rank 0)
//       experts_rank{r}.safetensors   rank r's expert shard and its moments
//       trainer_state.yaml        TrainerState (rank 0)
//       COMPLETE                  size and XXH64 of every file above, written last
//     step_00001500.tmp-<pid>/    a save in progress, or one that was interrupted
//
// The split of tensors into files is the trainer's; these names are the convention.
// A save writes everything into the .tmp directory (each file fsynced), then rank 0 writes
// COMPLETE, fsyncs, renames the directory to its final name and fsyncs the parent: a
// crash at any point leaves either the whole checkpoint or a .tmp directory, which the
// next save removes. Then all but the newest `keep` complete checkpoints are deleted.
//
// Resuming verifies the COMPLETE list (every file's size and checksum) before any tensor
// is read, and checks every destination's dtype and shape before any is written.
// One job writes to a checkpoint directory at a time. An error on one rank leaves the
// others waiting at a barrier: the trainer ends the whole job on any error.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "trainer/safetensors.h"

namespace flashmoe {

inline constexpr const char* kModelFile = "model.safetensors";
inline constexpr const char* kOptimizerFile = "optimizer.safetensors";
inline constexpr const char* kTrainerStateFile = "trainer_state.yaml";
inline constexpr const char* kCompleteFile = "COMPLETE";
std::string experts_file(int rank);  // "experts_rank{r}.safetensors"

// "step_00001234": the final directory name of the checkpoint of `step`.
std::string checkpoint_name(int64_t step);

// Everything besides tensors that a resumed run needs to continue bit for bit.
struct TrainerState {
  int64_t step = 0;  // optimizer steps completed
  int64_t tokens_seen = 0;
  int64_t data_position = 0;  // the data loader's position, in its own units
  uint64_t rng_seed = 0;
  uint64_t rng_offset = 0;  // Philox counter consumed so far
  int world_size = 1;
  std::string config_yaml;                   // to_yaml(RunConfig) of the run that saved it
  std::map<std::string, std::string> extra;  // anything else the trainer wants back
  bool operator==(const TrainerState&) const = default;
};

std::string to_yaml(const TrainerState& state);
// Every key is checked (known, present, right type); errors name `source_name` and the key.
TrainerState parse_trainer_state(const std::string& yaml_text, const std::string& source_name);

// Size and XXH64 (seed 0) of a file's bytes, read in chunks: the COMPLETE entries.
struct FileChecksum {
  uint64_t size = 0;
  uint64_t xxh64 = 0;
  bool operator==(const FileChecksum&) const = default;
};
FileChecksum checksum_file(const std::string& path);

// How the ranks of a job take part in a save. `barrier` returns once every rank has
// called it (a no-op for one rank); every rank passes the same directory and step.
struct CheckpointGroup {
  int rank = 0;
  int world_size = 1;
  std::function<void()> barrier = [] {};
};

class CheckpointWriter {
 public:
  // Collective. Rank 0 removes what interrupted saves left (`*.tmp-*`) and creates
  // step_XXXXXXXX.tmp-<pid>; after the barrier the other ranks find it by its step.
  CheckpointWriter(std::string checkpoint_dir, int64_t step, CheckpointGroup group = {});

  const std::string& temp_path() const { return temp_path_; }

  // Writes one safetensors file of this rank into the temporary directory, fsynced.
  // `file_name` is a plain name ([A-Za-z0-9._-]) ending in ".safetensors".
  void write_tensors(const std::string& file_name,
                     const std::vector<std::pair<std::string, Tensor>>& tensors,
                     const std::map<std::string, std::string>& metadata = {});

  // Collective, after every rank's write_tensors. Rank 0 writes the trainer state, waits
  // for every rank's files, writes COMPLETE, renames the directory to its final name and
  // keeps the newest `keep` complete checkpoints (always the new one). Returns the final
  // path. A step whose final directory exists already: an invalid one is moved aside to
  // step_XXXXXXXX.invalid-<pid>, a valid one is an error (never overwritten).
  std::string commit(const TrainerState& state, int64_t keep);

 private:
  std::string checkpoint_dir_;
  int64_t step_;
  CheckpointGroup group_;
  std::string temp_path_;
  bool committed_ = false;
};

// A verified checkpoint: every file listed in COMPLETE has its size and checksum, the
// trainer state parses and every safetensors header is valid. Tensors are read on request.
class CheckpointReader {
 public:
  explicit CheckpointReader(std::string path);

  const std::string& path() const { return path_; }
  const TrainerState& state() const { return state_; }
  // The files listed in COMPLETE, sorted by name.
  std::vector<std::string> files() const;
  bool has_file(const std::string& file_name) const;
  const SafetensorsFile& safetensors(const std::string& file_name) const;

  struct Target {
    std::string file;  // e.g. kModelFile
    std::string name;  // tensor name in that file
    Tensor* destination;
  };
  // Checks every target (file, tensor, dtype, shape) first, then loads them all: any
  // mismatch is an error before a single destination is modified.
  void load_all(const std::vector<Target>& targets) const;

 private:
  std::string path_;
  TrainerState state_;
  std::map<std::string, FileChecksum> checksums_;
  std::map<std::string, SafetensorsFile> safetensors_;
};

// Throws unless a run of `world_size` ranks can resume from `saved` (read from the
// checkpoint at `checkpoint_path`, which the message names).
void verify_compatible(const TrainerState& saved, int world_size,
                       const std::string& checkpoint_path);

// The newest complete checkpoint under `checkpoint_dir` whose files all verify; newer
// ones that are incomplete or corrupt are skipped with a warning. nullopt when there is
// none (or the directory does not exist).
std::optional<CheckpointReader> open_latest_checkpoint(const std::string& checkpoint_dir);
// The path of open_latest_checkpoint's result.
std::optional<std::string> find_latest_checkpoint(const std::string& checkpoint_dir);

}  // namespace flashmoe
