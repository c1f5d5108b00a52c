#include "trainer/trainer.h"

#include <cmath>
#include <csignal>
#include <filesystem>
#include <set>
#include <sstream>

#include "core/log.h"
#include "core/stream.h"
#include "kernels/elementwise.h"
#include "optim/schedule.h"
#include "trainer/token_stager.h"

namespace flashmoe {

std::atomic<bool> Trainer::stop_requested_{false};

void Trainer::request_stop() { stop_requested_.store(true); }

namespace {

DType storage_dtype(Precision precision) {
  return precision == Precision::bf16 ? DType::bf16 : DType::f32;
}

std::string format_duration(double seconds) {
  const auto total = static_cast<int64_t>(seconds);
  std::ostringstream os;
  if (total >= 3600) os << total / 3600 << "h";
  if (total >= 60) os << (total / 60) % 60 << "m";
  os << total % 60 << "s";
  return os.str();
}

// Reads a one-element device (or host) tensor of any float dtype.
double read_scalar(const Tensor& t) { return t.to_doubles()[0]; }

}  // namespace

Trainer::Trainer(const RunConfig& config, Communicator& comm)
    : config_(config),
      comm_(comm),
      device_(config.train.device),
      data_(config, comm.rank(), comm.size()) {
  model_ = std::make_unique<Model>(config.model, config.moe, device_,
                                   storage_dtype(config.train.precision), config.train.seed, &comm);
  bucket_replicated_gradients();
  optimizer_ = std::make_unique<AdamW>(config.optim, config.train.steps, model_->parameters());
  stager_ = std::make_unique<TokenStager>(device_);
  loss_sum_ = Tensor::zeros({}, DType::f32, device_);
  if (!config.log.file.empty() && comm.rank() == 0) {
    jsonl_ = std::fopen(config.log.file.c_str(), "a");
    FLASHMOE_CHECK(jsonl_, "cannot open log.file " << config.log.file << " for appending");
  }
  resume_if_asked();
}

Trainer::~Trainer() {
  if (jsonl_) std::fclose(jsonl_);
}

std::vector<std::pair<std::string, Tensor>> Trainer::tensors_to_save(bool experts) const {
  std::vector<std::pair<std::string, Tensor>> out;
  std::set<std::string> expert_tables;
  for (Parameter* p : model_->parameters()) {
    if (p->expert_table == experts) out.emplace_back(p->name, p->value);
    if (p->expert_table) expert_tables.insert(p->name);
  }
  // Optimizer state is named "<parameter>.<master|m|v>" (and "optimizer.step").
  for (const OptimizerTensor& s : optimizer_->state()) {
    const bool expert_state = expert_tables.count(s.name.substr(0, s.name.rfind('.'))) > 0;
    if (expert_state == experts) out.emplace_back(s.name, s.tensor);
  }
  if (!experts) {
    int index = 0;
    for (FlashMoELayer* layer : model_->moe_layers()) {
      const std::string prefix = "moe." + std::to_string(index++) + ".batchnorm.";
      out.emplace_back(prefix + "running_mean", layer->batchnorm().running_mean);
      out.emplace_back(prefix + "running_var", layer->batchnorm().running_var);
    }
  }
  return out;
}

void Trainer::resume_if_asked() {
  const CheckpointConfig& ck = config_.checkpoint;
  std::optional<CheckpointReader> reader;
  if (ck.resume == "auto") {
    if (!ck.dir.empty() && std::filesystem::exists(ck.dir)) reader = open_latest_checkpoint(ck.dir);
  } else if (ck.resume != "never") {
    reader.emplace(ck.resume);
  }
  if (!reader) return;
  verify_compatible(reader->state(), comm_.size(), reader->path());
  // The tensors share storage with the model and optimizer: loading fills those.
  auto replicated = tensors_to_save(false), experts = tensors_to_save(true);
  std::vector<CheckpointReader::Target> targets;
  for (auto& [name, tensor] : replicated) targets.push_back({kModelFile, name, &tensor});
  for (auto& [name, tensor] : experts) {
    targets.push_back({experts_file(comm_.rank()), name, &tensor});
  }
  reader->load_all(targets);  // checks every file and shape before writing any tensor
  step_ = reader->state().step;
  tokens_seen_ = reader->state().tokens_seen;
  data_.seek(static_cast<uint64_t>(reader->state().data_position));
  FLASHMOE_LOG(info, "resumed from " << reader->path() << " at step " << step_);
}

void Trainer::train_step() {
  const int64_t accum = config_.train.grad_accum;
  // The mean over every target of the global batch: per-rank sums add up to it.
  const double loss_scale = 1.0 / static_cast<double>(config_.train.batch_tokens);
  loss_sum_.fill_bytes(0);
  Model::GradientsReady ready;
  if (comm_.size() > 1) ready = [this](size_t group) { start_gradient_sum(group); };
  for (int64_t micro = 0; micro < accum; ++micro) {
    const Batch batch = data_.next_batch();
    const Tensor& tokens = stager_->stage(batch.tokens, batch.sequences, batch.seq_len + 1);
    const bool last = micro + 1 == accum;
    add_into(model_->forward_backward(tokens, loss_scale, /*accumulate=*/micro > 0,
                                      last ? ready : Model::GradientsReady{}),
             loss_sum_);
  }
  finish_gradient_sums();
  optimizer_->step(comm_);
  ++step_;
  tokens_seen_ += config_.train.batch_tokens;
}

// Each rank's gradients of the replicated parameters cover its own tokens (already
// scaled by the global token count); expert shards are complete on their owner. With
// P > 1 the replicated gradients live in one flat fp32 bucket from the start, group
// after group in the order the backward finishes them: the backward writes into it,
// and each group is summed in place by one all-reduce as soon as its block is done,
// beside the backward of the blocks below it. No copies in or out.
void Trainer::bucket_replicated_gradients() {
  if (comm_.size() == 1) return;
  const std::vector<std::vector<Parameter*>> groups = model_->gradient_groups();
  int64_t total = 0;
  for (const std::vector<Parameter*>& group : groups) {
    for (const Parameter* p : group) {
      if (p->expert_table) continue;
      expect_dtype(p->grad, DType::f32, "replicated gradient");
      total += p->grad.numel();
    }
  }
  grad_bucket_ = Tensor::zeros({total}, DType::f32, device_);
  int64_t at = 0;
  for (const std::vector<Parameter*>& group : groups) {
    GradientGroup g;
    const int64_t begin = at;
    for (Parameter* p : group) {
      if (p->expert_table) continue;
      Tensor view = grad_bucket_.rows(at, at + p->grad.numel()).view(p->grad.shape());
      view.copy_from(p->grad);
      p->grad = view;
      g.grads.emplace_back(p, view);
      at += view.numel();
    }
    g.slice = grad_bucket_.rows(begin, at);
    gradient_groups_.push_back(std::move(g));
  }
  grad_comm_ = comm_.duplicate();
  if (device_ == Device::cuda) grad_side_ = std::make_unique<SideStream>(StreamPriority::high);
}

void Trainer::start_gradient_sum(size_t group) {
  FLASHMOE_CHECK(group < gradient_groups_.size(),
                 "gradient group " << group << " is ready, expected < " << gradient_groups_.size());
  GradientGroup& g = gradient_groups_[group];
  for (const auto& [p, view] : g.grads) {
    FLASHMOE_CHECK(p->grad.raw() == view.raw(),
                   "gradient of " << p->name
                                  << " was reallocated, expected it to stay in the all-reduce "
                                     "bucket (ops must write gradients in place)");
  }
  if (g.slice.numel() == 0) return;
  run_beside(grad_side_.get(), [&] { grad_comm_->all_reduce_sum(g.slice); });
}

void Trainer::finish_gradient_sums() {
  if (grad_side_) grad_side_->join();
}

StepLog Trainer::log_step(std::chrono::steady_clock::time_point since, int64_t steps_since) {
  StepLog log{};
  log.step = step_;
  comm_.all_reduce_sum(loss_sum_);    // each rank's share of the global mean
  log.loss = read_scalar(loss_sum_);  // waits for the device: the interval's one sync
  log.grad_norm = optimizer_->grad_norm();
  log.lr = scheduled_lr(config_.optim, config_.train.steps, step_ - 1);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
  log.tokens_per_second = seconds > 0 ? steps_since * config_.train.batch_tokens / seconds : 0;
  log.eta_seconds = steps_since ? seconds / steps_since * (config_.train.steps - step_) : 0;
  double used = 0;
  log.shard_imbalance = 1;
  std::vector<FlashMoELayer*> layers = model_->moe_layers();
  for (FlashMoELayer* layer : layers) {
    const RouterStats stats = layer->stats();
    used += stats.fraction_used;
    log.shard_imbalance = std::max(log.shard_imbalance, stats.shard_imbalance);
  }
  log.experts_used = layers.empty() ? 0 : used / layers.size();
  FLASHMOE_CHECK(std::isfinite(log.loss),
                 "loss is " << log.loss << " at step " << step_
                            << ", expected a finite loss (lower optim.lr or check the data)");
  return log;
}

EvalLog Trainer::evaluate() {
  const bool facts = config_.data.kind == DataKind::facts;
  Tensor sums = Tensor::zeros({3}, DType::f64, device_);
  for (const Batch& batch : data_.eval_batches(config_.train.eval_tokens)) {
    const Tensor& tokens = stager_->stage(batch.tokens, batch.sequences, batch.seq_len + 1);
    // Recall on fact values; on other data, accuracy over every target.
    std::vector<int32_t> mask(batch.value_mask.begin(), batch.value_mask.end());
    if (!facts) std::fill(mask.begin(), mask.end(), 1);
    const Tensor& target_mask = stager_->stage(mask, batch.sequences, batch.seq_len);
    add_into(model_->evaluate(tokens, target_mask), sums);
  }
  comm_.all_reduce_sum(sums);
  const std::vector<double> s = sums.to_doubles();  // {nll sum, correct, counted}
  FLASHMOE_CHECK(s[2] > 0, "evaluation counted no targets, expected train.eval_tokens > 0");
  return {step_, s[0] / s[2], s[1] / s[2]};
}

void Trainer::save_checkpoint() {
  const CheckpointConfig& ck = config_.checkpoint;
  if (ck.dir.empty()) return;
  if (device_ == Device::cuda) synchronize_stream();
  CheckpointGroup group{comm_.rank(), comm_.size(), [this] { comm_.barrier(); }};
  CheckpointWriter writer(ck.dir, step_, group);
  if (comm_.rank() == 0) writer.write_tensors(kModelFile, tensors_to_save(false));
  writer.write_tensors(experts_file(comm_.rank()), tensors_to_save(true));
  TrainerState state;
  state.step = step_;
  state.tokens_seen = tokens_seen_;
  state.data_position = static_cast<int64_t>(data_.position());
  state.rng_seed = config_.train.seed;
  state.world_size = comm_.size();
  state.config_yaml = to_yaml(config_);
  const std::string path = writer.commit(state, ck.keep);
  FLASHMOE_LOG(info, "saved checkpoint " << path);
}

bool Trainer::stop_agreed() {
  // Ranks see a signal at different moments; summing the flags makes them agree.
  Tensor flag = Tensor::zeros({1}, DType::f32, device_);
  if (stop_requested_.load()) flag.fill(1.0f);
  comm_.all_reduce_sum(flag);
  return read_scalar(flag) > 0;
}

void Trainer::write_jsonl(const std::string& line) {
  if (!jsonl_) return;
  std::fprintf(jsonl_, "%s\n", line.c_str());
  std::fflush(jsonl_);
}

void Trainer::report_step(const StepLog& log) {
  history_.push_back(log);
  // Expert parallelism: how much more the busiest rank's experts compute than the mean.
  std::ostringstream shards;
  if (comm_.size() > 1) shards << " | shard load max/mean " << log.shard_imbalance;
  FLASHMOE_LOG(info, "step " << log.step << "/" << config_.train.steps << " | loss " << log.loss
                             << " | lr " << log.lr << " | grad norm " << log.grad_norm << " | "
                             << static_cast<int64_t>(log.tokens_per_second)
                             << " tok/s | experts used " << 100 * log.experts_used << "%"
                             << shards.str() << " | ETA " << format_duration(log.eta_seconds));
  std::ostringstream json;
  json.precision(9);
  json << "{\"step\": " << log.step << ", \"loss\": " << log.loss << ", \"lr\": " << log.lr
       << ", \"grad_norm\": " << log.grad_norm
       << ", \"tokens_per_second\": " << log.tokens_per_second
       << ", \"experts_used\": " << log.experts_used;
  if (comm_.size() > 1) json << ", \"shard_imbalance\": " << log.shard_imbalance;
  json << "}";
  write_jsonl(json.str());
}

void Trainer::report_eval(const EvalLog& eval) {
  const char* metric = config_.data.kind == DataKind::facts ? "recall" : "accuracy";
  FLASHMOE_LOG(info, "eval step " << eval.step << " | loss " << eval.loss << " | " << metric << " "
                                  << 100 * eval.accuracy << "%");
  std::ostringstream json;
  json.precision(9);
  json << "{\"step\": " << eval.step << ", \"eval_loss\": " << eval.loss << ", \"eval_" << metric
       << "\": " << eval.accuracy << "}";
  write_jsonl(json.str());
}

std::optional<EvalLog> Trainer::run(int64_t stop_at) {
  using Clock = std::chrono::steady_clock;
  const TrainConfig& train = config_.train;
  std::optional<EvalLog> last_eval;
  // Throughput counts training steps only: eval and checkpoint time is left out.
  Clock::time_point since = Clock::now();
  int64_t steps_since = 0;
  bool stopped = false;
  while (step_ < train.steps && !stopped) {
    train_step();
    ++steps_since;
    const bool last = step_ == train.steps;
    if (step_ % config_.log.every == 0 || last) {
      report_step(log_step(since, steps_since));
      steps_since = 0;
    }
    // One rank reads its own flag every step; several agree at log intervals.
    if (comm_.size() == 1 ? stop_requested_.load() : step_ % config_.log.every == 0) {
      stopped = stop_agreed();
    }
    stopped = stopped || step_ == stop_at;
    if ((train.eval_every > 0 && step_ % train.eval_every == 0) || last) {
      last_eval = evaluate();
      report_eval(*last_eval);
    }
    const int64_t every = config_.checkpoint.every;
    if ((every > 0 && step_ % every == 0) || last || stopped) save_checkpoint();
    if (steps_since == 0) since = Clock::now();
  }
  if (stopped) FLASHMOE_LOG(info, "stopped at step " << step_);
  return last_eval;
}

}  // namespace flashmoe
