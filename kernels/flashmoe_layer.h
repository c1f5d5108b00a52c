// The FlashMoE layer (SPEC section 1) as one object with the same interface on
// the CPU and the GPU:
//   xn = norm(x);  q = W_r xn;  ids, g = router(q);  y_routed = experts(x, ids, g)
//   y  = W_down (act(W_gate x) * (W_up x)) + y_routed
// Parameters live in the storage dtype (fp32 or bf16) on the layer's device and
// are initialised from Philox, so every backend and world size starts from the
// same values; gradients are fp32. Buffers are allocated on the first call and
// reused; forward and backward never synchronise with the host, so a whole step
// can be captured in a CUDA graph.
//
// Expert parallelism (SPEC section 4): given a communicator of P > 1 ranks, the layer
// holds only its rank's shard of the expert tables (rows [r E/P, (r + 1) E/P), with the
// values of the full table's rows), routes its own tokens with the full router, and
// computes the routed branch through parallel/expert_parallel.h; its batchnorm
// statistics are summed across the ranks. Its replicated parameters' gradients are this
// rank's share: the caller sums them across ranks. With P > 1 and moe.exchange:
// collectives the exchange queues only device work and communication (after the first
// call for a token count, which exchanges the ranks' counts), so a warmed-up step can
// still be captured in a CUDA graph; peer copies order each round by stream waits on
// flags that the other GPUs write, which a graph cannot capture.
//
// Load balance: with moe.balance_loss = alpha > 0, a training forward counts the router's
// key selections (summed over the ranks) and backward adds the gradient of the balance
// loss of kernels/router_balance.h to the router's, with scale alpha N / (2H) times the
// step's loss scale (set_loss_scale; by default 1 / the tokens of every rank, the mean
// over the global batch), and writes its value for this rank's tokens (balance_loss).
// With P > 1 on GPUs the count and its sum over the ranks run beside the forward, on a
// stream and a duplicate of the communicator of their own, since only the backward reads
// them: on the main stream the sum was a collective that every rank waited at in every
// layer. One GPU counts on the main stream (a few µs; beside, it measured slower).
//
// The expert tables' gradients feed only the optimizer, so on GPUs backward queues
// them (the sort of the pairs by expert and the per-expert sums) on a stream beside the
// rest, shared by the device's layers, and returns dx without waiting for them:
// finish_backward() makes the current stream wait for them. Until then the x of the
// forward and the dy of the backward must stay unchanged.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/config.h"
#include "core/parameter.h"
#include "core/stream.h"
#include "kernels/experts.h"
#include "kernels/norm.h"
#include "kernels/router.h"
#include "kernels/router_balance.h"
#include "kernels/router_stats.h"
#include "parallel/expert_parallel.h"

namespace flashmoe {

class FlashMoELayer {
 public:
  // `seed` and `stream_base` pick the Philox streams of the parameters, so layers of
  // one model draw distinct values. `comm`: the ranks the experts are sharded over
  // (outlives the layer); nullptr or one rank keeps every expert here.
  FlashMoELayer(int64_t dim, const MoeConfig& config, Device device, DType dtype, uint64_t seed,
                uint64_t stream_base, Communicator* comm = nullptr);

  // y [T, D] for x [T, D]; `training` selects batch or running statistics.
  const Tensor& forward(const Tensor& x, bool training);
  // dx [T, D] for dy [T, D]; fills every parameter's gradient (overwriting), the expert
  // tables' after finish_backward().
  const Tensor& backward(const Tensor& dy);
  // The current stream waits for the expert tables' gradients of the last backward.
  void finish_backward();

  std::vector<Parameter*> parameters();
  // The scale of the loss this layer's output feeds (the model's loss_scale), which the
  // balance loss takes too.
  void set_loss_scale(double loss_scale);
  // [] fp32 after a training backward with alpha > 0; undefined otherwise.
  const Tensor& balance_loss() const { return balance_loss_; }
  const Tensor& router_logits() const { return logits_; }  // [T, H, 2, N] fp32
  const RouterOutputs& routing() const { return routing_; }
  // Synchronises: for log intervals. With P > 1 a collective (shard_imbalance).
  RouterStats stats();
  BatchNorm& batchnorm() { return batchnorm_; }  // its `sync` hook syncs statistics across ranks

  int64_t num_experts() const { return config_.num_experts; }  // all ranks' experts
  int64_t first_local_expert() const { return exchange_ ? exchange_->first_expert() : 0; }
  int num_keys() const { return num_keys_; }
  Device device() const { return device_; }
  DType dtype() const { return dtype_; }

 private:
  template <class Branch>
  void run_shared_branch(Branch branch);
  void fork_shared_branch();
  void join_shared_branch();
  void forward_norm(bool training);
  void backward_norm(const Tensor& dxn);
  ExpertInputs expert_inputs(const Tensor& x, const Tensor& ids, const Tensor& gates) const;
  void routed_forward(const Tensor& ids, const Tensor& gates);
  // `peer` of the experts_*_rows functions: the block of another rank, or kOwnBlock.
  static constexpr int kOwnBlock = -1;
  void experts_forward_rows(const ExpertInputs& in, int64_t begin, int64_t end,
                            int peer = kOwnBlock);
  void count_key_usage();
  void join_key_count();
  // Fills expert_grads_ and queues the tables' gradients; returns {dx, dgates} of this
  // rank's tokens (with P > 1, dx after exchange_->wait()).
  std::pair<const Tensor*, const Tensor*> routed_backward(const Tensor& dy);
  void experts_backward_rows_of(const Tensor& dy, int64_t begin, int64_t end, int peer = kOwnBlock);
  void backward_tables(const Tensor& dy);

  int64_t dim_;
  MoeConfig config_;
  GradLayout expert_grad_layout_;
  int num_keys_;
  Device device_;
  DType dtype_;

  Parameter w_gate_up_;   // [2I, D]: W_gate rows, then W_up rows
  Parameter w_down_;      // [D, I]
  Parameter w_router_;    // [H*2N, D]
  Parameter down_embed_;  // [E, D]
  Parameter up_embed_;    // [E, D]
  BatchNorm batchnorm_;
  std::unique_ptr<SideStream> side_;          // the shared branch's stream (cuda only)
  std::unique_ptr<ExpertExchange> exchange_;  // P > 1 only
  Communicator* comm_ = nullptr;              // P > 1 only
  std::unique_ptr<Communicator> count_comm_;  // the key count's sum (balance loss, P > 1)
  std::unique_ptr<SideStream> count_side_;    // and its stream (cuda)
  std::shared_ptr<SideStream> tables_side_;   // the tables' gradients (cuda; per device)
  double loss_scale_ = 0;                     // 0: the default, 1 / global tokens
  bool balancing_ = false;                    // the last forward counted key selections

  // Saved by forward for backward, and reused buffers.
  Tensor x_, xn_, rstd_, logits_rows_, logits_, gate_up_, hidden_, y_routed_, y_shared_, y_, h_;
  BatchNormSaved bn_saved_;
  RouterOutputs routing_;
  ExpertInputs expert_in_;
  ExpertGrads expert_grads_;
  Tensor dlogits_, dlogits_cast_, dxn_, dx_norm_, dhidden_, dgate_up_, dx_shared_, dx_;
  Tensor unused_gain_grad_, stats_workspace_;
  Tensor y_partial_, dx_routed_, dgates_routed_;  // expert parallelism
  Tensor key_counts_, key_fractions_, balance_loss_;
  BalanceLossBuffers balance_buffers_;
};

}  // namespace flashmoe
