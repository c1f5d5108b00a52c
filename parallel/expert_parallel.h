// Expert parallelism (SPEC section 4): the exchanges of the FlashMoE layer when its
// expert tables are sharded over the P ranks of a Communicator. Rank r owns experts
// [r E/P, (r + 1) E/P) of both tables.
//
// Every rank has T tokens, each routed to S = H*K global expert ids. With fine-grained
// experts nearly every token has a slot on every owner (S = 16 slots over P = 4 owners
// miss an owner with probability (3/4)^16 = 1%), so every token goes to every owner:
// the exchanges move blocks of fixed size, no count depends on the routing, and
// nothing needs the host. Forward:
//   dispatch: x [T, D] and the routing (ids and gates [T, S]) of every rank to every
//             owner: it gets every rank's rows, ranks and tokens ascending (R = P T
//             rows; block r holds rank r's tokens). The owner keeps the slots whose
//             expert it owns, as local ids and gates; the other slots are empty (id
//             -1, gate 0), so they read no table row and add exact zeros to y and to
//             every gradient (the empty slots only pass through the backward's sort,
//             as keys after every expert). An id outside [0, E) is empty on every
//             owner.
//   the owner runs experts_forward on the rows it received (its ExpertRows), and
//   combine:  the partial y [R, D] back, block r to rank r: each rank gets, for its
//             own tokens, the sum of the P owners' partials.
// Backward mirrors it: dy goes to every owner, the owner runs experts_backward (its
// table gradients are then complete), and combine_grad sums the dx and dgates partials
// the same way (a slot's dgates is nonzero on its owner only).
//
// Two transports move the blocks (moe.exchange):
// - collectives: the all-gathers and reduce-scatters of the Communicator (NCCL on
//   GPUs, MPI on the CPU); the routing travels packed (ids and gate bits in one
//   int32 [T, 2S]) and each owner keeps its slots of it. The sums' order is fixed for
//   a world size (Communicator::reduce_scatter_sum), so results repeat bit for bit.
// - peer copies (GPUs of one host, parallel/peer_memory.h): every block goes straight
//   into its owner's memory, and block by block, so the owner computes a rank's rows as
//   soon as they have landed. What every owner needs (x, the routing, dy) is put there
//   by the sender's copy engines, which leaves every SM to the kernels; the sender
//   splits the routing into each owner's local ids and gates first (one kernel for all
//   owners), so that an owner computes a block as soon as it lands. The partials
//   (y; dx and dgates) are stored by the owner's expert kernels themselves into the
//   inboxes of the rank whose block they are, over NVLink, while they compute: no copy
//   follows the kernel, so a rank's partials have landed when their kernel ends. The
//   receiver sums the P partials in rank order, in fp32, so results repeat bit for bit.
//   Rounds: a round is one forward and its backward. At the start of a round a rank
//   raises a credit at every peer (it is done with the inboxes of the last round), and
//   a rank writes into a peer's inboxes only after that peer's credit for the round:
//   x waits for it, the routing and dy follow x on the same lane, and a block's
//   partials are stored only once the block has landed, which the peer sent after
//   raising its credit. Every flag is raised to its round's number, so none needs
//   lowering (parallel/peer_memory.h).
//
// Every rank must hold as many tokens; the ranks' counts are compared (one host
// synchronisation) only when this rank's T changes (every rank changes on the same
// call: the data loader gives every rank as many tokens), and the peer inboxes are
// then allocated and mapped again. Otherwise the steps only queue device work and
// communication. Every rank calls the steps together and in order (they are
// collectives), and the backward of a round at most once. Under collectives a
// warmed-up round can be captured in a CUDA graph; under peer copies it cannot (its
// flag waits and its joins of lanes forked in earlier rounds).
//
// Overlap. The exchange has its own duplicate of the layer's communicator, so its
// transfers are ordered apart from the layer's other collectives (the batchnorm
// statistics), and on the GPU its own streams beside the caller's work. The owner's
// own tokens (block `rank` of its rows) need nothing from the others, so the caller
// computes their rows while the others' are on the way: the routing's transfer in the
// forward, dy's in the backward. x starts as the layer begins, beside the norm and the
// router; the dgates partials return first, since the router's backward needs them,
// and the dx partials beside that backward (and the caller's tables' gradients).
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "core/config.h"
#include "core/stream.h"
#include "core/tensor.h"
#include "parallel/communicator.h"
#include "parallel/peer_memory.h"

namespace flashmoe {

// The rows an owner computes: x [R, D], local expert ids and gates [R, S].
struct ExpertRows {
  Tensor x, ids, gates;
};

// Where a block's backward partials go: dx [T, D] and dgates [T, S].
struct GradPartials {
  Tensor dx, dgates;
};

class ExpertExchange {
 public:
  // Throws unless num_experts is a multiple of the world size. Tokens carry `slots`
  // expert slots (S = H K). `device` holds the tensors exchanged; `kind` picks the
  // transport (automatic: peer copies where every rank maps every peer's memory).
  ExpertExchange(const Communicator& comm, int64_t num_experts, int64_t slots, Device device,
                 ExchangeKind kind = ExchangeKind::automatic);
  ~ExpertExchange();

  int64_t first_expert() const { return first_expert_; }
  int64_t local_experts() const { return local_experts_; }
  // The transport in use; `automatic` is resolved at the first dispatch.
  bool peer_copies() const { return peer_ != nullptr; }

  // Forward. start_dispatch(x) sends x [T, D] of this rank's tokens toward every
  // owner. dispatch(ids, gates) sends their routing [T, S] and returns, at once, the
  // rows they give this rank's shard: block `rank` of the owned rows (x is the
  // caller's).
  void start_dispatch(const Tensor& x);
  ExpertRows dispatch(const Tensor& ids, const Tensor& gates);
  // The other ranks, in the order their blocks are received and computed: rank + 1,
  // rank + 2, ... (mod P), so that at each step every rank serves another one.
  const std::vector<int>& peers() const { return peers_; }
  // Block `peer` of the owned rows (that rank's T tokens), once it has arrived.
  ExpertRows receive(int peer);
  // All R = P T owned rows, after every receive.
  const ExpertRows& owned() const { return owned_; }
  int64_t own_begin() const { return comm_->rank() * tokens_; }
  // Where the caller computes block `peer`'s partial y [T, D] (after receive(peer)):
  // under peer copies that rank's inbox, else `local` (combine sends every block).
  Tensor partial_destination(int peer, const Tensor& local);
  // Block `peer`'s partial y is queued on the caller's stream: that rank may sum it.
  void send_partial(int peer);
  // Partial y [R, D] of the owned rows -> y [T, D] of this rank's tokens.
  void combine(const Tensor& partial_y, Tensor& y);

  // Backward. start_dispatch_grad(dy) sends dy [T, D] toward every owner (the own rows
  // use dy itself); receive_grad(peer) returns block `peer` of the owned rows' dy once
  // it has arrived, owned_dy() all R rows' after every receive_grad.
  void start_dispatch_grad(const Tensor& dy);
  Tensor receive_grad(int peer);
  const Tensor& owned_dy();
  // Where the caller computes block `peer`'s dx [T, D] and dgates [T, S] partials (after
  // receive_grad(peer)), as partial_destination; then send_grad_partials(peer).
  GradPartials grad_partial_destinations(int peer, const Tensor& local_dx,
                                         const Tensor& local_dgates);
  void send_grad_partials(int peer);
  // The owned rows' dx partials [R, D] and dgates [R, S] -> dx [T, D] and dgates
  // [T, S]: wait_dgates() before reading dgates, wait() before reading dx. Under peer
  // copies the current stream sums dgates as soon as the peers' have landed (the
  // router's backward needs it next), and dx is summed beside the caller's next work,
  // as both are under collectives. The partials must stay unchanged until wait().
  void combine_grad(const Tensor& partial_dx, const Tensor& owned_dgates, Tensor& dx,
                    Tensor& dgates);
  void wait_dgates();
  // The current stream waits for the transfers started beside it.
  void wait();

  // Balance of the last dispatch: the most filled slots an owner received, over the
  // mean over owners (1: balanced; P: one owner computes everything). Every rank calls
  // it (a collective); it synchronises, so call it at log intervals.
  double load_imbalance();

 private:
  // Checks, when the batch's layout changes, that every rank holds T tokens, and
  // (re)allocates and maps the peer inboxes.
  void prepare(const Tensor& x);
  void map_peer_inboxes(const Tensor& x);
  // send [T, ...] -> recv [P T, ...], every rank's rows.
  void gather(const Tensor& send, Tensor& recv);
  // partials [P T, ...] -> out [T, ...], summed over the owners.
  void scatter_sum(const Tensor& partials, Tensor& out);
  // Peer copies: on the dispatch lane, after the caller's stream so far, `src` to block
  // `rank` of every peer's inbox `inbox`, each followed by flag `landed` raised there.
  void send_blocks(int inbox, const Tensor& src, int landed);
  // Peer copies: every peer's share of the split routing into its owned ids and gates,
  // on the dispatch lane, each followed by the routing's flag there.
  void send_routing();
  // Collectives: block `peer` of the gathered routing -> its owned ids and gates.
  void unpack_block(int peer);
  // Collectives: waits for the gathered routing and unpacks every other rank's rows.
  void unpack_gathered();
  // Peer copies: this rank's rows (x or dy) into block `rank` of the owned rows, beside.
  void copy_own_block(const Tensor& mine, Tensor& owned);
  void check_peer(int peer, const char* what) const;
  // The byte offset of this rank's block in an inbox of blocks shaped as `block`.
  size_t own_block_offset(const Tensor& block) const;
  // Block `rank` of `peer`'s inbox `inbox`, shaped as `local`.
  Tensor peer_block(int peer, int inbox, const Tensor& local) const;
  void join_lanes();

  std::unique_ptr<Communicator> comm_;
  std::unique_ptr<SideStream> side_;  // GPU only
  int64_t first_expert_, local_experts_, slots_;
  ExchangeKind kind_;
  std::vector<int> peers_;
  // What every owner needs (x, routing, dy) leaves on one lane, to rank - 1 first, then
  // rank - 2, ...: each receiver computes rank + 1's block first, so its first block
  // lands after one copy at full rate, not after all of them at a share of it.
  std::vector<int> send_order_;
  // Peer copies: the round in progress (0 before the first), the value of its flags.
  uint32_t round_ = 0;
  int64_t tokens_ = -1, width_ = -1;
  DType dtype_ = DType::f32;
  Tensor x_;  // this rank's tokens, from start_dispatch
  ExpertRows owned_;
  bool gathered_ = false, grad_gathered_ = false;
  // Reused buffers. The inboxes (owned_'s x, ids and gates, dy, y, dx, dgates) are
  // mapped by every peer under peer copies. Collectives gather the routing packed
  // (routing_); peer copies send each owner its share (split_ids_, split_gates_ [P T, S]).
  Tensor routing_, gathered_routing_, split_ids_, split_gates_;
  Tensor owned_dy_, y_inbox_, dx_inbox_, dgates_inbox_;
  Tensor count_workspace_;
  std::unique_ptr<PeerMemory> peer_;
  std::unique_ptr<SideStream> dispatch_lane_;
  // The copies of this rank's own x and dy into its owned rows.
  std::unique_ptr<SideStream> own_lane_;
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
// Global ids and gates [T, S] -> what each of `owners` owners of local_experts experts
// each (owner p: [p E_l, (p + 1) E_l)) gets of them, as own_routing: ids and gates
// [owners T, S], block p for owner p, except block `own`, which goes to own_ids and
// own_gates [T, S] instead (block own of ids and gates is left as it was).
void split_routing(const Tensor& global_ids, const Tensor& global_gates, int owners,
                   int64_t local_experts, int own, Tensor& ids, Tensor& gates, Tensor& own_ids,
                   Tensor& own_gates);
// out [n, ...] = the sum over p < P of block p of inbox [P n, ...], with own_block in
// place of block `own`, in rank order, accumulated in fp32 (fp32 or bf16 storage).
void sum_blocks(const Tensor& inbox, const Tensor& own_block, int own, Tensor& out);
// count [1] fp64 = the slots of ids (any shape, int32) that are filled (id >= 0).
void count_filled(const Tensor& ids, Tensor& count, Tensor& workspace);
}  // namespace detail

}  // namespace flashmoe
