// Expert parallelism (SPEC section 4): the exchanges of the FlashMoE layer when its
// expert tables are sharded over the P ranks of a Communicator. Rank r owns experts
// [r E/P, (r + 1) E/P) of both tables.
//
// Every rank has T tokens, each routed to S = H*K global expert ids. With fine-grained
// experts nearly every token has a slot on every owner (S = 16 slots over P = 4 owners
// miss an owner with probability (3/4)^16 = 1%), so every token goes to every owner:
// the exchanges are collectives of fixed size, no count depends on the routing, and
// nothing needs the host. Forward:
//   dispatch: an all-gather of x [T, D] and of the routing (ids and gate bits packed
//             in one int32 [T, 2S]): every owner gets every rank's rows, ranks and
//             tokens ascending (R = P T rows; block r holds rank r's tokens). The owner
//             keeps the slots whose expert it owns, as local ids and gates; the other
//             slots are empty (id -1, gate 0), so they read no table row and add exact
//             zeros to y and to every gradient (the empty slots only pass through the
//             backward's sort, as keys after every expert). An id outside [0, E) is
//             empty on every owner.
//   the owner runs experts_forward on the rows it received (its ExpertRows), and
//   combine:  a reduce-scatter of the partial y [R, D]: each rank gets, for its own
//             tokens, the sum of the P owners' partials.
// Backward mirrors it: dy is all-gathered, the owner runs experts_backward
// (its table gradients are then complete), and combine_grad reduce-scatters the dx and
// dgates partials (a slot's dgates is nonzero on its owner only).
//
// The sums' order is fixed for a world size (Communicator::reduce_scatter_sum), so
// results repeat bit for bit. Every rank must hold as many tokens; the ranks' counts
// are compared (one host synchronisation) only when this rank's T changes (every rank
// changes on the same call: the data loader gives every rank as many tokens).
// Otherwise the steps only queue device work and communication, so a warmed-up layer
// can be captured in a CUDA graph. Every rank calls the steps together and in order
// (they are collectives).
//
// Overlap. The exchange has its own duplicate of the layer's communicator, so its
// transfers are ordered apart from the layer's other collectives (the batchnorm
// statistics), and on the GPU a high-priority side stream where every transfer but the
// combine runs, beside the caller's work. The owner's own tokens (block `rank` of its
// rows) need nothing from the others, so the caller computes their rows while the
// others' are on the way: the routing's transfer in the forward, dy's in the backward.
// x starts as the layer begins, beside the norm and the router; the dx and dgates
// partials return beside the expert tables' gradients. receive(), receive_grad() and
// wait() join the transfers.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <utility>

#include "core/stream.h"
#include "core/tensor.h"
#include "parallel/communicator.h"

namespace flashmoe {

// The rows an owner computes: x [R, D], local expert ids and gates [R, S].
struct ExpertRows {
  Tensor x, ids, gates;
};

class ExpertExchange {
 public:
  // Throws unless num_experts is a multiple of the world size. `device` holds the
  // tensors exchanged.
  ExpertExchange(const Communicator& comm, int64_t num_experts, Device device);

  int64_t first_expert() const { return first_expert_; }
  int64_t local_experts() const { return local_experts_; }

  // Forward. start_dispatch(x) sends x [T, D] of this rank's tokens toward every
  // owner. dispatch(ids, gates) sends their routing [T, S] and returns, at once, the
  // rows they give this rank's shard: rows [own_begin, own_begin + T) of the owned
  // rows (x is the caller's). receive() waits for the others and returns all R owned
  // rows.
  void start_dispatch(const Tensor& x);
  ExpertRows dispatch(const Tensor& ids, const Tensor& gates);
  const ExpertRows& receive();
  int64_t own_begin() const { return comm_->rank() * tokens_; }
  // The owned rows of the other ranks' tokens: [0, own_begin) and [own_begin + T, R).
  std::array<std::pair<int64_t, int64_t>, 2> other_rows() const;
  // Partial y [R, D] of the owned rows -> y [T, D] of this rank's tokens.
  void combine(const Tensor& partial_y, Tensor& y);
  // Backward. start_dispatch_grad(dy) sends dy [T, D] toward every owner (the own rows
  // use dy itself); receive_grad() waits and returns the owned rows' dy [R, D].
  void start_dispatch_grad(const Tensor& dy);
  const Tensor& receive_grad();
  // The owned rows' dx partials [R, D] and dgates [R, S] -> dx [T, D] and dgates
  // [T, S], summed beside the caller's next work: wait() before reading either. The
  // partials must stay unchanged until then.
  void combine_grad(const Tensor& partial_dx, const Tensor& owned_dgates, Tensor& dx,
                    Tensor& dgates);
  // The current stream waits for the transfers started beside it.
  void wait();

  // Balance of the last dispatch: the most filled slots an owner received, over the
  // mean over owners (1: balanced; P: one owner computes everything). Every rank calls
  // it (a collective); it synchronises, so call it at log intervals.
  double load_imbalance();

 private:
  // Checks, when T changes, that every rank holds T tokens.
  void check_tokens(int64_t tokens, Device device);
  // send [T, ...] -> recv [P T, ...], every rank's rows.
  void gather(const Tensor& send, Tensor& recv);
  // partials [P T, ...] -> out [T, ...], summed over the owners.
  void scatter_sum(const Tensor& partials, Tensor& out);

  std::unique_ptr<Communicator> comm_;
  std::unique_ptr<SideStream> side_;  // GPU only
  int64_t first_expert_, local_experts_;
  int64_t tokens_ = -1;
  Tensor x_;  // this rank's tokens, from start_dispatch
  ExpertRows owned_;
  // Reused buffers.
  Tensor routing_, gathered_routing_, owned_dy_, count_workspace_;
};

namespace detail {
// routing [T, 2S] int32: row t = token t's S ids, then its S gates' bits.
void pack_routing(const Tensor& ids, const Tensor& gates, Tensor& routing);
// gathered [R, 2S] -> ids, gates [R, S]: local ids in [0, local_experts) and gates of
// the slots whose expert is in [first_expert, first_expert + local_experts), -1 and 0
// for the others.
void own_routing(const Tensor& gathered, int64_t first_expert, int64_t local_experts, Tensor& ids,
                 Tensor& gates);
// The same from unpacked routing: global ids and gates [T, S] -> ids, gates [T, S].
void own_routing(const Tensor& global_ids, const Tensor& global_gates, int64_t first_expert,
                 int64_t local_experts, Tensor& ids, Tensor& gates);
// count [1] fp64 = the slots of ids (any shape, int32) that are filled (id >= 0).
void count_filled(const Tensor& ids, Tensor& count, Tensor& workspace);
}  // namespace detail

}  // namespace flashmoe
