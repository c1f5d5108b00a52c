// Expert parallelism (SPEC section 4): the exchanges of the FlashMoE layer when its
// expert tables are sharded over the P ranks of a Communicator. Rank r owns experts
// [r E/P, (r + 1) E/P) of both tables.
//
// The exchanges have a fixed capacity, so that no count depends on the routing and the
// plan needs nothing from the host. Forward, on this rank's T tokens routed to S = H*K
// global expert ids:
//   dispatch: every owner p (ascending rank) gets one row per token, tokens ascending:
//             the token's x, and the S slots' local ids and gates where p owns the
//             slot's expert; the other slots are empty (id -1, gate 0), so they read no
//             table row and add exact zeros to y and to every gradient. The owner
//             gathers and sums exactly its (token, expert) pairs (the empty slots
//             only pass through the backward's sort, as keys after every expert); a
//             token routed nowhere on an owner costs only its row of traffic. An id
//             outside [0, E) reaches no owner: its slot is empty everywhere.
//   the owner runs experts_forward on the rows it received (its ExpertRows), and
//   combine:  returns each row's partial y; the sender sums a token's P partials in
//             ascending owner rank, so the result is deterministic.
// Backward mirrors it: dispatch_grad sends each token's dy to every owner, which runs
// experts_backward (its table gradients are then complete); combine_grad returns the dx
// and dgates partials and sums them the same way (a slot's dgates is nonzero on its
// owner only: the other owners' empty slots give exact zeros).
//
// The row counts follow from the ranks' token counts alone. These are exchanged (one
// host synchronisation) only when this rank's T changes: every rank's T changes on the
// same call (the data loader gives every rank as many tokens). Otherwise the four
// steps only queue device work and communication on the current stream, so a warmed-up
// layer can be captured in a CUDA graph. Every rank calls the four steps together and
// in order (they are collectives).
#pragma once

#include <cstdint>
#include <vector>

#include "core/tensor.h"
#include "parallel/communicator.h"

namespace flashmoe {

// The rows an owner computes: x [R, D], local expert ids and gates [R, S].
struct ExpertRows {
  Tensor x, ids, gates;
};

class ExpertExchange {
 public:
  // Throws unless num_experts is a multiple of the world size.
  ExpertExchange(Communicator& comm, int64_t num_experts);

  int64_t first_expert() const { return first_expert_; }
  int64_t local_experts() const { return local_experts_; }

  // x [T, D] and the routing ids, gates [T, S] of this rank's tokens -> the rows this
  // rank computes with its shard of the tables.
  const ExpertRows& dispatch(const Tensor& x, const Tensor& ids, const Tensor& gates);
  // Partial y [R, D] of the owned rows -> y [T, D] of this rank's tokens.
  void combine(const Tensor& partial_y, Tensor& y);
  // dy [T, D] -> the owned rows' dy [R, D].
  const Tensor& dispatch_grad(const Tensor& dy);
  // The owned rows' dx partials [R, D] and dgates [R, S] -> dx [T, D], dgates [T, S].
  void combine_grad(const Tensor& partial_dx, const Tensor& owned_dgates, Tensor& dx,
                    Tensor& dgates);

 private:
  // Sets the counts for T tokens on this rank: T rows to every owner, and from every
  // sender its token count (exchanged when T changes).
  void set_tokens(int64_t tokens);
  // rows [T, ...] -> send_rows_ [P T, ...]: a copy for every owner.
  void copy_to_every_owner(const Tensor& rows);
  void send_to_owners(const Tensor& send, Tensor& recv);
  // The owned rows' partials [R, ...] -> out [T, ...]: the sum over owners, ascending.
  void return_and_sum(const Tensor& partials, Tensor& returned, Tensor& out);

  Communicator& comm_;
  int64_t first_expert_, local_experts_;
  Device device_ = Device::cpu;
  int64_t tokens_ = -1;
  std::vector<int64_t> send_counts_, recv_counts_;
  ExpertRows owned_;
  // Reused buffers.
  Tensor send_rows_, send_ids_, send_gates_, owned_dy_, returned_, returned_dgates_;
};

namespace detail {
// owner_ids, owner_gates [P T, S]: row p T + t holds token t's slots owned by p, as
// local ids and gates, and -1 and 0 elsewhere (device tensors).
void split_slots_by_owner_cuda(const Tensor& ids, const Tensor& gates, int64_t local_experts,
                               int owners, Tensor& owner_ids, Tensor& owner_gates);
}  // namespace detail

}  // namespace flashmoe
