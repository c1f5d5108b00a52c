#include "kernels/flashmoe_layer.h"

#include <cmath>
#include <map>
#include <mutex>

#include "core/stream.h"
#include "kernels/elementwise.h"
#include "kernels/linear.h"
#include "kernels/swiglu.h"

namespace flashmoe {

namespace {
// Expert-table gradients above this many elements per table are kept row-sparse:
// a batch touches at most T*H*K rows of a table of millions.
constexpr int64_t kDenseExpertGradLimit = int64_t(1) << 26;

// Multiprocessors the shared branch's GEMMs leave free (fork_shared_branch() says why).
// 16 of an H100's 132 (smoke training, docs/benchmarks.md): one GPU +1.4% tok/s on
// average over six interleaved pairs of runs, two GPUs +0.6%, four within the noise;
// 32 was slower on two GPUs.
constexpr int kSharedBranchSmMargin = 16;

// The current device's stream for every layer's table gradients: they run one after
// another anyway, and the experts' scratch buffer is per stream, so one stream keeps
// one buffer, sized by the largest layer, instead of one a layer.
std::shared_ptr<SideStream> shared_tables_side() {
  static std::mutex mutex;
  static std::map<int, std::weak_ptr<SideStream>> sides;  // by device
  int device = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  std::shared_ptr<SideStream> side = sides[device].lock();
  if (!side) {
    side = std::make_shared<SideStream>();
    sides[device] = side;
  }
  return side;
}
}  // namespace

FlashMoELayer::FlashMoELayer(int64_t dim, const MoeConfig& config, Device device, DType dtype,
                             uint64_t seed, uint64_t stream_base, Communicator* comm)
    : dim_(dim),
      config_(config),
      num_keys_(num_keys_for(config.num_experts)),
      device_(device),
      dtype_(dtype) {
  FLASHMOE_CHECK(dim >= 1, "layer width is " << dim << ", expected >= 1");
  FLASHMOE_CHECK(config.top_k >= 1 && config.top_k <= config.num_experts,
                 "moe.top_k is " << config.top_k << ", expected 1 <= top_k <= num_experts = "
                                 << config.num_experts);
  const int64_t I = config.shared_intermediate, E = config.num_experts, H = config.heads;
  // The layout of the whole table, so that every world size updates the same rows.
  expert_grad_layout_ =
      E * dim > kDenseExpertGradLimit ? GradLayout::row_sparse : GradLayout::dense;
  FLASHMOE_CHECK(std::isfinite(config.balance_loss) && config.balance_loss >= 0,
                 "moe.balance_loss is " << config.balance_loss << ", expected a finite value >= 0");
  if (comm && comm->size() > 1) {
    comm_ = comm;
    exchange_ =
        std::make_unique<ExpertExchange>(*comm, E, H * config.top_k, device, config.exchange);
    batchnorm_.sync = [comm](Tensor& partial_sums) { comm->all_reduce_sum(partial_sums); };
    if (config.balance_loss > 0) {
      count_comm_ = comm->duplicate();
      if (device == Device::cuda) count_side_ = std::make_unique<SideStream>(StreamPriority::high);
    }
  }
  const int64_t local_E = exchange_ ? exchange_->local_experts() : E;
  w_gate_up_ =
      uniform_parameter("w_gate_up", {2 * I, dim}, dtype, device, seed, stream_base + 0, dim);
  w_down_ = uniform_parameter("w_down", {dim, I}, dtype, device, seed, stream_base + 1, I);
  w_router_ = uniform_parameter("w_router", {H * 2 * num_keys_, dim}, dtype, device, seed,
                                stream_base + 2, dim);
  for (Parameter* table : {&down_embed_, &up_embed_}) {
    const bool down = table == &down_embed_;
    Parameter& p = *table;
    p.name = down ? "down_embed" : "up_embed";
    p.value = Tensor::empty({local_E, dim}, dtype, device);
    init_uniform(p.value, seed, stream_base + (down ? 3 : 4), fan_in_bound(dim),
                 first_local_expert() * dim);
    p.expert_table = true;
    p.weight_decay = false;
    if (expert_grad_layout_ == GradLayout::dense)
      p.grad = Tensor::zeros({local_E, dim}, DType::f32, device);
  }
  batchnorm_.running_mean = Tensor::zeros({dim}, DType::f32, device);
  batchnorm_.running_var = Tensor::empty({dim}, DType::f32, device);
  batchnorm_.running_var.fill(1.0f);
  if (device == Device::cuda) {
    side_ = std::make_unique<SideStream>();
    tables_side_ = shared_tables_side();
  }
  batchnorm_.momentum = static_cast<float>(config.bn_momentum);
  batchnorm_.eps = static_cast<float>(config.bn_eps);
}

void FlashMoELayer::set_loss_scale(double loss_scale) {
  FLASHMOE_CHECK(std::isfinite(loss_scale) && loss_scale > 0,
                 "loss scale is " << loss_scale << ", expected a finite value > 0");
  loss_scale_ = loss_scale;
}

// The fractions f of kernels/router_balance.h, over every rank's tokens; on the count
// stream where there is one, so join_key_count() before reading them or writing the
// routing again.
void FlashMoELayer::count_key_usage() {
  run_beside(count_side_.get(), [&] {
    count_key_selections(routing_.expert_ids, num_keys_, key_counts_, key_fractions_);
    if (count_comm_) count_comm_->all_reduce_sum(key_fractions_);
    key_fractions(key_fractions_);
  });
}

void FlashMoELayer::join_key_count() {
  if (count_side_) count_side_->join();
}

std::vector<Parameter*> FlashMoELayer::parameters() {
  return {&w_gate_up_, &w_down_, &w_router_, &down_embed_, &up_embed_};
}

void FlashMoELayer::forward_norm(bool training) {
  switch (config_.router_norm) {
    case RouterNorm::batchnorm: batchnorm_forward(batchnorm_, x_, training, xn_, bn_saved_); break;
    case RouterNorm::rmsnorm:
      rmsnorm_forward(x_, Tensor(), static_cast<float>(config_.bn_eps), xn_, rstd_);
      break;
    case RouterNorm::none: xn_ = x_; break;
  }
}

void FlashMoELayer::backward_norm(const Tensor& dxn) {
  switch (config_.router_norm) {
    case RouterNorm::batchnorm: batchnorm_backward(batchnorm_, x_, bn_saved_, dxn, dx_norm_); break;
    case RouterNorm::rmsnorm:
      rmsnorm_backward(x_, Tensor(), rstd_, dxn, dx_norm_, unused_gain_grad_);
      break;
    case RouterNorm::none: dx_norm_ = dxn; break;
  }
}

// The shared branch runs on the side stream from the point of fork_shared_branch(), so
// that its GEMMs can fill what the routed branch leaves idle. The routed branch is
// queued first: the GPU starts on it while the host is still queueing the GEMMs. The
// forward forks at its start (beside the norm and the router) on one rank and under
// peer copies, whose transfers take no SM: the expert blocks after the router then run
// mostly alone. (Forked after the dispatch, the GEMMs filled the wait for the other
// ranks' routing but slowed both blocks: 0.3-0.7% fewer tok/s at 2 GPUs.) Under
// collectives it forks after the experts: the GEMMs then run beside the combine, whose
// transfer leaves most SMs idle, rather than beside NCCL's kernels and the expert
// kernels, which all need SMs.
// Its GEMMs leave kSharedBranchSmMargin multiprocessors to the routed branch: cuBLASLt
// picks persistent kernels for them, which otherwise hold every SM for their 20-40 µs,
// and the routed branch's next kernel (a norm's column sums, a rank's routing, the sum
// of the partials) waits for their end whatever the streams' priorities.
void FlashMoELayer::fork_shared_branch() {
  if (side_ && config_.shared_intermediate > 0) side_->fork();
}

template <class Branch>
void FlashMoELayer::run_shared_branch(Branch branch) {
  if (config_.shared_intermediate == 0) return;
  if (!side_) {
    branch();
    return;
  }
  StreamScope on_side(side_->stream());
  GemmSmMargin leave(kSharedBranchSmMargin);
  branch();
}

void FlashMoELayer::join_shared_branch() {
  if (side_ && config_.shared_intermediate > 0) side_->join();
}

ExpertInputs FlashMoELayer::expert_inputs(const Tensor& x, const Tensor& ids,
                                          const Tensor& gates) const {
  return {x, down_embed_.value, up_embed_.value, ids, gates, config_.act, /*validate_ids=*/false};
}

// One rank computes its tokens directly; P ranks compute the rows their experts own,
// block by block. The own tokens' block goes first: it needs nothing from the other
// ranks, so it runs while their routing is on the way. Under peer copies the expert
// kernels then store each other rank's partial y straight into that rank's inbox;
// under collectives the combine is one reduce-scatter after every block.
void FlashMoELayer::routed_forward(const Tensor& ids, const Tensor& gates) {
  if (!exchange_) {
    expert_in_ = expert_inputs(x_, ids, gates);
    experts_forward(expert_in_, y_routed_, h_);
    return;
  }
  const int64_t T = ids.size(0), R = T * comm_->size(), own = exchange_->own_begin();
  ensure(y_partial_, {R, dim_}, dtype_, device_);
  ensure(h_, {R, ids.size(1)}, DType::f32, device_);
  const ExpertRows own_rows = exchange_->dispatch(ids, gates);
  experts_forward_rows(expert_inputs(own_rows.x, own_rows.ids, own_rows.gates), own, own + T);
  for (int peer : exchange_->peers()) {
    const ExpertRows rows = exchange_->receive(peer);
    const int64_t begin = peer * T;
    experts_forward_rows(expert_inputs(rows.x, rows.ids, rows.gates), begin, begin + T, peer);
    exchange_->send_partial(peer);
  }
  if (!exchange_->peer_copies()) fork_shared_branch();
  const ExpertRows& owned = exchange_->owned();
  expert_in_ = expert_inputs(owned.x, owned.ids, owned.gates);
  exchange_->combine(y_partial_, y_routed_);
}

// The owned rows [begin, end) of h_ and of the partial y: y_partial_'s rows, or, for
// block `peer` of another rank, where the exchange says (that rank's inbox).
void FlashMoELayer::experts_forward_rows(const ExpertInputs& in, int64_t begin, int64_t end,
                                         int peer) {
  if (begin == end) return;
  Tensor y = y_partial_.rows(begin, end), h = h_.rows(begin, end);
  if (peer != kOwnBlock) y = exchange_->partial_destination(peer, y);
  experts_forward(in, y, h);
}

// With P ranks, the rows of the own tokens first, beside dy's transfer; then each
// other rank's block, whose dx and dgates partials its kernels store into that rank's
// inboxes (under peer copies).
// The tables' gradients are queued beside before the current stream waits for the
// peers' dgates partials; dx_routed_ is read only at the end of backward (after
// exchange_->wait()), so its partials travel while the router's backward runs.
std::pair<const Tensor*, const Tensor*> FlashMoELayer::routed_backward(const Tensor& dy) {
  if (!exchange_) {
    experts_backward_rows(expert_in_, h_, dy, expert_grads_);
    backward_tables(dy);
  } else {
    exchange_->start_dispatch_grad(dy);
    const int64_t T = dy.size(0), own = exchange_->own_begin();
    experts_backward_rows_of(dy, own, own + T);
    for (int peer : exchange_->peers()) {
      const int64_t begin = peer * T;
      experts_backward_rows_of(exchange_->receive_grad(peer), begin, begin + T, peer);
      exchange_->send_grad_partials(peer);
    }
    backward_tables(exchange_->owned_dy());
    exchange_->combine_grad(expert_grads_.dx, expert_grads_.dgates, dx_routed_, dgates_routed_);
    exchange_->wait_dgates();
  }
  down_embed_.grad = expert_grads_.d_down;
  up_embed_.grad = expert_grads_.d_up;
  down_embed_.rows = up_embed_.rows = expert_grads_.rows;
  if (!exchange_) return {&expert_grads_.dx, &expert_grads_.dgates};
  return {&dx_routed_, &dgates_routed_};
}

// The tables' gradients from the rows phase and every computed row's dy, beside the
// rest of the backward (finish_backward() joins them).
void FlashMoELayer::backward_tables(const Tensor& dy) {
  run_beside(tables_side_.get(),
             [&] { experts_backward_tables(expert_in_, dy, expert_grad_layout_, expert_grads_); });
}

void FlashMoELayer::finish_backward() {
  if (tables_side_) tables_side_->join();
}

// The backward's rows phase over owned rows [begin, end), whose dy is `dy`; for block
// `peer` of another rank, dx and dgates go where the exchange says.
void FlashMoELayer::experts_backward_rows_of(const Tensor& dy, int64_t begin, int64_t end,
                                             int peer) {
  if (begin == end) return;
  ExpertGrads part = expert_grads_.tokens(expert_in_, begin, end);
  if (peer != kOwnBlock) {
    const GradPartials out = exchange_->grad_partial_destinations(peer, part.dx, part.dgates);
    part.dx = out.dx;
    part.dgates = out.dgates;
  }
  experts_backward_rows(expert_in_.tokens(begin, end), h_.rows(begin, end), dy, part);
}

const Tensor& FlashMoELayer::forward(const Tensor& x, bool training) {
  FLASHMOE_CHECK(
      x.defined() && x.rank() == 2 && x.size(1) == dim_,
      "layer input has shape " << shape_string(x.shape()) << ", expected [T, " << dim_ << "]");
  expect_dtype(x, dtype_, "layer input");
  expect_device(x, device_, "layer input");
  const int64_t T = x.size(0), H = config_.heads, K = config_.top_k;
  // The last backward's tables phase reads the rows that the dispatch overwrites, and
  // the last count the routing that the router writes.
  finish_backward();
  join_key_count();
  x_ = x;
  if (exchange_) exchange_->start_dispatch(x_);  // x travels while the router runs
  if (!exchange_ || exchange_->peer_copies()) fork_shared_branch();
  forward_norm(training);
  // fp32 logits even with bf16 storage: bf16 would tie many keys, and the tie rule
  // (smaller id first) would then bias the selection toward low expert ids.
  linear_forward(xn_, w_router_.value, logits_rows_, DType::f32);
  logits_ = logits_rows_.view({T, H, 2, num_keys_});
  router_forward(logits_, static_cast<int>(K), config_.norm_topk_prob, routing_);
  balancing_ = training && config_.balance_loss > 0;
  if (balancing_) count_key_usage();
  routed_forward(routing_.expert_ids.view({T, H * K}), routing_.gates.view({T, H * K}));
  run_shared_branch([&] {
    linear_forward(x_, w_gate_up_.value, gate_up_);
    swiglu_forward(gate_up_, config_.act, hidden_);
    linear_forward(hidden_, w_down_.value, y_shared_);
  });

  if (config_.shared_intermediate == 0) return y_routed_;
  join_shared_branch();
  add(y_shared_, y_routed_, y_);
  return y_;
}

const Tensor& FlashMoELayer::backward(const Tensor& dy) {
  FLASHMOE_CHECK(x_.defined(), "layer backward called before forward");
  expect_shape(dy, x_.shape(), "layer dy");
  expect_dtype(dy, dtype_, "layer dy");
  const int64_t T = x_.size(0), H = config_.heads, K = config_.top_k;
  finish_backward();  // the last tables phase reads the buffers that this one writes
  fork_shared_branch();
  const auto [dx_routed, dgates] = routed_backward(dy);
  ensure(dlogits_, logits_.shape(), DType::f32, device_);
  router_backward(logits_, routing_, dgates->view({T, H, K}), config_.norm_topk_prob, dlogits_);
  if (balancing_) {
    join_key_count();
    const double tokens = double(T) * (comm_ ? comm_->size() : 1);
    const double scale = config_.balance_loss * num_keys_ / (2.0 * double(H)) *
                         (loss_scale_ > 0 ? loss_scale_ : 1.0 / tokens);
    balance_loss_backward(logits_, key_fractions_, scale, balance_buffers_, dlogits_,
                          balance_loss_);
  }
  Tensor dq = dlogits_.view({T, H * 2 * num_keys_});
  if (dtype_ != DType::f32) {
    ensure(dlogits_cast_, dq.shape(), dtype_, device_);
    convert(dq, dlogits_cast_);
    dq = dlogits_cast_;
  }
  linear_backward_weight(dq, xn_, w_router_.grad, false);
  linear_backward_input(dq, w_router_.value, dxn_);
  backward_norm(dxn_);
  if (exchange_) exchange_->wait();  // dx_routed was summed beside the router's backward
  add(*dx_routed, dx_norm_, dx_);
  run_shared_branch([&] {
    linear_backward_weight(dy, hidden_, w_down_.grad, false);
    linear_backward_input(dy, w_down_.value, dhidden_);
    swiglu_backward(gate_up_, dhidden_, config_.act, dgate_up_);
    linear_backward_weight(dgate_up_, x_, w_gate_up_.grad, false);
    linear_backward_input(dgate_up_, w_gate_up_.value, dx_shared_);
  });
  if (config_.shared_intermediate == 0) return dx_;
  join_shared_branch();
  add_into(dx_shared_, dx_);
  return dx_;
}

RouterStats FlashMoELayer::stats() {
  FLASHMOE_CHECK(routing_.expert_ids.defined(), "router statistics requested before forward");
  RouterStats stats =
      router_stats(routing_.expert_ids, routing_.gates, config_.num_experts, stats_workspace_);
  if (exchange_) stats.shard_imbalance = exchange_->load_imbalance();
  return stats;
}

}  // namespace flashmoe
