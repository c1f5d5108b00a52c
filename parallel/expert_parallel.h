// Expert parallelism (SPEC section 4): the exchanges of the FlashMoE layer when its
// expert tables are sharded over the P ranks of a Communicator. Rank r owns experts
// [r E/P, (r + 1) E/P) of both tables.
//
// Forward, on this rank's T tokens routed to S = H*K global expert ids:
//   dispatch: for every (token, owner rank) with at least one selected expert on that
//             owner, one row goes to the owner: the token's x, and the S slots' local
//             ids and gates. Slots owned elsewhere are padding: the id of the token's
//             first slot on that owner and gate 0, so they add exact zeros to y and to
//             every gradient and touch no other table row. Rows go out grouped by owner
//             (ascending rank), tokens ascending within an owner; counts are exchanged
//             first, then the payloads.
//   the owner runs experts_forward on the rows it received (its ExpertInputs), and
//   combine:  returns each row's partial y; the sender sums a token's partials in
//             ascending owner rank, so the result is deterministic.
// Backward mirrors it: dispatch_grad sends each row's dy to its owner, which runs
// experts_backward (its table gradients are then complete); combine_grad returns the dx
// partials, summed like y, and the dgates of the slots each owner really holds (the
// padding slots' dgates are dropped).
//
// The plan is built on the host from the routing, so dispatch waits for the device:
// a layer with P > 1 cannot be captured in a CUDA graph. Every rank calls the four
// steps together and in order (they are collectives).
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
  // Fills the counts, slot_rows_, send_tokens_ and combine_rows_, and the rows' local
  // ids and gates, from the host copies of this rank's routing.
  void build_plan(const std::vector<int32_t>& ids, const std::vector<float>& gates,
                  std::vector<int32_t>& send_ids, std::vector<float>& send_gates);
  int owner_of(int32_t expert) const;
  void exchange_counts();
  void send_to_owners(const Tensor& send, Tensor& recv);
  void return_to_senders(const Tensor& send, Tensor& recv);
  void sum_partials(const Tensor& partials, Tensor& out);

  Communicator& comm_;
  int64_t first_expert_, local_experts_;
  Device device_ = Device::cpu;
  int64_t tokens_ = 0, slots_ = 0;
  std::vector<int64_t> send_counts_, recv_counts_;
  std::vector<int64_t> slot_rows_;  // [T*S]: the send row holding each slot
  Tensor send_tokens_;              // int32 [sent rows]: the token of each sent row
  Tensor combine_rows_;             // int32 [P, T]: row of (token, owner), or `sent` if none
  ExpertRows owned_;
  // Reused buffers.
  Tensor sent_ids_, sent_gates_, send_rows_, owned_dy_, returned_, returned_dgates_, gathered_;
};

}  // namespace flashmoe
