// The training loop behind flashmoe-train: model, AdamW, data, checkpoints and logs,
// on any backend and communicator (the loop knows neither).
//
// One step: grad_accum micro-batches of this rank's shard (forward and backward,
// gradients accumulated), the data-parallel sum of replicated gradients (started block
// by block during the last backward), one AdamW update. The host waits for the device
// only at log, eval and checkpoint intervals.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "core/config.h"
#include "core/stream.h"
#include "optim/adamw.h"
#include "parallel/communicator.h"
#include "trainer/checkpoint.h"
#include "trainer/data.h"
#include "trainer/model.h"

namespace flashmoe {

struct StepLog {
  int64_t step;
  double loss, lr, grad_norm, tokens_per_second, experts_used, eta_seconds;
  double shard_imbalance;  // the FlashMoE layers' worst RouterStats::shard_imbalance
};

struct EvalLog {
  int64_t step;
  double loss, accuracy;  // accuracy: recall on fact values, or next-token accuracy
};

class Trainer {
 public:
  Trainer(const RunConfig& config, Communicator& comm);
  ~Trainer();

  // Trains from the current step to train.steps, or until stop() is requested or step
  // `stop_at` is reached (as if interrupted there), then saves a checkpoint (when
  // checkpoint.dir is set). Returns the last eval.
  std::optional<EvalLog> run(int64_t stop_at = -1);
  EvalLog evaluate();
  int64_t step() const { return step_; }
  const std::vector<StepLog>& history() const { return history_; }  // every logged step
  Model& model() { return *model_; }

  // Async-signal-safe: the loop stops at the next step boundary (all ranks agree at a
  // log interval) and saves a checkpoint.
  static void request_stop();

 private:
  void resume_if_asked();
  void train_step();
  void bucket_replicated_gradients();
  void start_gradient_sum(size_t group);
  void finish_gradient_sums();
  StepLog log_step(std::chrono::steady_clock::time_point since, int64_t steps_since);
  void report_step(const StepLog& log);
  void report_eval(const EvalLog& eval);
  void save_checkpoint();
  bool stop_agreed();
  void write_jsonl(const std::string& line);
  std::vector<std::pair<std::string, Tensor>> tensors_to_save(bool experts) const;

  RunConfig config_;
  Communicator& comm_;
  Device device_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<AdamW> optimizer_;
  DataLoader data_;
  int64_t step_ = 0, tokens_seen_ = 0;
  Tensor loss_sum_;  // scalar fp32 on the device: this step's loss, summed over micro-batches
  // P > 1: the replicated parameters, whose gradients are views of one fp32 bucket
  // laid out by Model::gradient_groups(), summed group by group on their own
  // communicator and (GPU) stream.
  struct GradientGroup {
    std::vector<std::pair<Parameter*, Tensor>> grads;  // each with its view of the bucket
    Tensor slice;                                      // the group's part of the bucket
  };
  std::vector<GradientGroup> gradient_groups_;
  Tensor grad_bucket_;
  std::unique_ptr<Communicator> grad_comm_;
  std::unique_ptr<SideStream> grad_side_;
  std::unique_ptr<class TokenStager> stager_;  // host batches -> device, asynchronously
  std::vector<StepLog> history_;
  std::FILE* jsonl_ = nullptr;
  static std::atomic<bool> stop_requested_;
};

}  // namespace flashmoe
