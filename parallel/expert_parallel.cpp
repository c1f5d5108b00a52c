#include "parallel/expert_parallel.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "core/log.h"

namespace flashmoe {

namespace {

// The peer inboxes, in PeerMemory's buffer order.
enum Inbox : int { kXInbox, kIdsInbox, kGatesInbox, kDyInbox, kYInbox, kDxInbox, kDgatesInbox };
// The flags, each raised to the number of the round it belongs to: the credit, then one
// per block that lands. x has none: the routing (its ids and gates as the owner sees
// them) follows it on the same lane, so the routing's flag says that all three have
// landed. The dx and dgates partials share one.
enum Flag : int { kCredit, kRoutingLanded, kYLanded, kDyLanded, kGradPartialsLanded, kFlagKinds };

void expect_block(const Tensor& t, int64_t rows, int64_t width, DType dtype, const char* what) {
  expect_shape(t, {rows, width}, what);
  expect_dtype(t, dtype, what);
}

}  // namespace

ExpertExchange::ExpertExchange(const Communicator& comm, int64_t num_experts, int64_t slots,
                               Device device, ExchangeKind kind)
    : comm_(comm.duplicate()), slots_(slots), kind_(kind) {
  const int P = comm.size(), rank = comm.rank();
  FLASHMOE_CHECK(num_experts % P == 0, "moe.num_experts is " << num_experts
                                                             << ", expected a multiple of the " << P
                                                             << " ranks");
  FLASHMOE_CHECK(slots >= 1, "tokens carry " << slots << " expert slots, expected >= 1");
  FLASHMOE_CHECK(device == Device::cuda || kind != ExchangeKind::peer_copies,
                 "moe.exchange is peer_copies on the cpu backend, expected GPUs (or auto, "
                 "collectives)");
  if (device == Device::cpu) kind_ = ExchangeKind::collectives;
  local_experts_ = num_experts / P;
  first_expert_ = rank * local_experts_;
  for (int k = 1; k < P; ++k) peers_.push_back((rank + k) % P);
  send_order_.assign(peers_.rbegin(), peers_.rend());
  if (device == Device::cuda) side_ = std::make_unique<SideStream>(StreamPriority::high);
}

// Our copies into the peers' memory finish before it is unmapped (no throwing here: a
// failed step's error has been reported already).
ExpertExchange::~ExpertExchange() {
  if (peer_) (void)cudaDeviceSynchronize();
}

void ExpertExchange::join_lanes() {
  if (dispatch_lane_) dispatch_lane_->join();
  if (own_lane_) own_lane_->join();
}

void ExpertExchange::wait() {
  if (side_) side_->join();
  join_lanes();
}

void ExpertExchange::prepare(const Tensor& x) {
  FLASHMOE_CHECK(x.defined() && x.rank() == 2,
                 "dispatch of x with shape "
                     << (x.defined() ? shape_string(x.shape()) : "undefined")
                     << ", expected [T, D]");
  const int64_t tokens = x.size(0);
  if (tokens == tokens_ && x.size(1) == width_ && x.dtype() == dtype_) return;
  const int P = comm_->size();
  Tensor mine = Tensor::from_vector(std::vector<int64_t>{tokens}, {1}, x.device());
  Tensor all = Tensor::empty({P}, DType::i64, x.device());
  comm_->all_gather(mine, all);
  const std::vector<int64_t> counts = all.to_vector<int64_t>();
  for (int p = 0; p < P; ++p) {
    FLASHMOE_CHECK(counts[p] == tokens, "rank " << p << " holds " << counts[p]
                                                << " tokens and rank " << comm_->rank() << " "
                                                << tokens
                                                << ", expected as many on every rank (expert "
                                                   "parallelism exchanges fixed-size blocks)");
  }
  tokens_ = tokens;
  width_ = x.size(1);
  dtype_ = x.dtype();
  if (kind_ != ExchangeKind::collectives) map_peer_inboxes(x);
}

// Every rank (re)maps together: its own copies finish before it unmaps the peers'
// inboxes, and the barrier orders every rank's last copies into the old inboxes, and its
// unmapping of them, before they (and the old flag table) are freed.
void ExpertExchange::map_peer_inboxes(const Tensor& x) {
  wait();
  synchronize_stream();
  if (peer_) peer_->unmap();
  comm_->barrier();
  peer_.reset();
  round_ = 0;  // the new flags are zero
  const int64_t R = comm_->size() * tokens_, S = slots_;
  owned_.x = Tensor::empty({R, width_}, dtype_, x.device());
  owned_.ids = Tensor::empty({R, S}, DType::i32, x.device());
  owned_.gates = Tensor::empty({R, S}, DType::f32, x.device());
  owned_dy_ = Tensor::empty({R, width_}, dtype_, x.device());
  y_inbox_ = Tensor::empty({R, width_}, dtype_, x.device());
  dx_inbox_ = Tensor::empty({R, width_}, dtype_, x.device());
  dgates_inbox_ = Tensor::empty({R, S}, DType::f32, x.device());
  std::string why;
  peer_ = PeerMemory::map(
      *comm_, {owned_.x, owned_.ids, owned_.gates, owned_dy_, y_inbox_, dx_inbox_, dgates_inbox_},
      kFlagKinds, why);
  if (!peer_) {
    if (kind_ != ExchangeKind::automatic) {
      tokens_ = -1;  // nothing is mapped: a later dispatch tries again
      FLASHMOE_FAIL("moe.exchange is peer_copies, but "
                    << why
                    << "; expected GPUs of one host with peer access (or moe.exchange: "
                       "collectives)");
    }
    FLASHMOE_LOG(info, "expert exchange: collectives, since " << why);
    kind_ = ExchangeKind::collectives;
    y_inbox_ = dx_inbox_ = dgates_inbox_ = Tensor();
    return;
  }
  if (!dispatch_lane_) dispatch_lane_ = std::make_unique<SideStream>(StreamPriority::high);
  if (!own_lane_) own_lane_ = std::make_unique<SideStream>(StreamPriority::high);
}

void ExpertExchange::gather(const Tensor& send, Tensor& recv) {
  Shape shape = send.shape();
  shape[0] *= comm_->size();
  ensure(recv, shape, send.dtype(), send.device());
  comm_->all_gather(send, recv);
}

void ExpertExchange::scatter_sum(const Tensor& partials, Tensor& out) {
  Shape shape = partials.shape();
  shape[0] = tokens_;
  ensure(out, shape, partials.dtype(), partials.device());
  comm_->reduce_scatter_sum(partials, out);
}

void ExpertExchange::send_blocks(int inbox, const Tensor& src, int landed) {
  dispatch_lane_->fork();
  for (int p : send_order_) {
    peer_->put(p, inbox, own_block_offset(src), src, dispatch_lane_->stream());
    peer_->raise(p, landed, round_, dispatch_lane_->stream());
  }
}

void ExpertExchange::start_dispatch(const Tensor& x) {
  prepare(x);
  x_ = x;
  gathered_ = false;
  if (!peer_) {
    run_beside(side_.get(), [&] { gather(x, owned_.x); });
    return;
  }
  // The last round is done here (its reads of the inboxes and its copies): so say.
  wait();
  ++round_;
  for (int p : peers_) peer_->raise(p, kCredit, round_, current_stream());
  dispatch_lane_->fork();
  for (int p : send_order_) {
    peer_->wait(p, kCredit, round_, dispatch_lane_->stream());
    peer_->put(p, kXInbox, own_block_offset(x), x, dispatch_lane_->stream());
  }
  copy_own_block(x, owned_.x);
}

void ExpertExchange::copy_own_block(const Tensor& mine, Tensor& owned) {
  Tensor block = owned.rows(own_begin(), own_begin() + tokens_);
  run_beside(own_lane_.get(), [&] { block.copy_from(mine); });
}

ExpertRows ExpertExchange::dispatch(const Tensor& ids, const Tensor& gates) {
  expect_block(ids, tokens_, slots_, DType::i32, "expert ids of the dispatch");
  const int64_t R = comm_->size() * tokens_, S = slots_;
  ensure(owned_.ids, {R, S}, DType::i32, ids.device());
  ensure(owned_.gates, {R, S}, DType::f32, ids.device());
  const int64_t begin = own_begin(), end = begin + tokens_;
  ExpertRows own{x_, owned_.ids.rows(begin, end), owned_.gates.rows(begin, end)};
  if (peer_) {
    detail::split_routing(ids, gates, comm_->size(), local_experts_, comm_->rank(), split_ids_,
                          split_gates_, own.ids, own.gates);
    send_routing();
    return own;
  }
  detail::pack_routing(ids, gates, routing_);
  run_beside(side_.get(), [&] { gather(routing_, gathered_routing_); });
  detail::own_routing(ids, gates, first_expert_, local_experts_, own.ids, own.gates);
  return own;
}

void ExpertExchange::send_routing() {
  dispatch_lane_->fork();
  for (int p : send_order_) {
    const Tensor ids = split_ids_.rows(p * tokens_, (p + 1) * tokens_);
    const Tensor gates = split_gates_.rows(p * tokens_, (p + 1) * tokens_);
    peer_->put(p, kIdsInbox, own_block_offset(ids), ids, dispatch_lane_->stream());
    peer_->put(p, kGatesInbox, own_block_offset(gates), gates, dispatch_lane_->stream());
    peer_->raise(p, kRoutingLanded, round_, dispatch_lane_->stream());
  }
}

void ExpertExchange::check_peer(int peer, const char* what) const {
  FLASHMOE_CHECK(peer >= 0 && peer < comm_->size() && peer != comm_->rank(),
                 what << " of block " << peer << " on rank " << comm_->rank()
                      << ", expected another rank's block in [0, " << comm_->size() << ")");
}

size_t ExpertExchange::own_block_offset(const Tensor& block) const {
  return comm_->rank() * block.nbytes();
}

Tensor ExpertExchange::peer_block(int peer, int inbox, const Tensor& local) const {
  return peer_->peer_tensor(peer, inbox, own_block_offset(local), local);
}

void ExpertExchange::unpack_block(int peer) {
  const int64_t begin = peer * tokens_, end = begin + tokens_;
  Tensor ids = owned_.ids.rows(begin, end), gates = owned_.gates.rows(begin, end);
  detail::own_routing(gathered_routing_.rows(begin, end), first_expert_, local_experts_, ids,
                      gates);
}

void ExpertExchange::unpack_gathered() {
  if (gathered_) return;
  wait();
  for (int p : peers_) unpack_block(p);
  gathered_ = true;
}

ExpertRows ExpertExchange::receive(int peer) {
  check_peer(peer, "x");
  if (peer_) {
    peer_->wait(peer, kRoutingLanded, round_, current_stream());
  } else {
    unpack_gathered();
  }
  const int64_t begin = peer * tokens_, end = begin + tokens_;
  return {owned_.x.rows(begin, end), owned_.ids.rows(begin, end), owned_.gates.rows(begin, end)};
}

double ExpertExchange::load_imbalance() {
  FLASHMOE_CHECK(owned_.ids.defined(), "expert load imbalance requested before any dispatch");
  const int P = comm_->size();
  Tensor mine, all = Tensor::empty({P}, DType::f64, owned_.ids.device());
  detail::count_filled(owned_.ids, mine, count_workspace_);
  comm_->all_gather(mine, all);
  const std::vector<double> filled = all.to_vector<double>();
  double most = 0, total = 0;
  for (double f : filled) {
    most = std::max(most, f);
    total += f;
  }
  return total > 0 ? most * P / total : 1.0;
}

Tensor ExpertExchange::partial_destination(int peer, const Tensor& local) {
  check_peer(peer, "partial y");
  expect_block(local, tokens_, width_, dtype_, "partial y");
  return peer_ ? peer_block(peer, kYInbox, local) : local;
}

void ExpertExchange::send_partial(int peer) {
  check_peer(peer, "partial y");
  if (peer_) peer_->raise(peer, kYLanded, round_, current_stream());
}

void ExpertExchange::combine(const Tensor& partial_y, Tensor& y) {
  if (!peer_) {
    scatter_sum(partial_y, y);
    return;
  }
  for (int p : peers_) peer_->wait(p, kYLanded, round_, current_stream());
  const int64_t own = own_begin();
  detail::sum_blocks(y_inbox_, partial_y.rows(own, own + tokens_), comm_->rank(), y);
  join_lanes();
}

void ExpertExchange::start_dispatch_grad(const Tensor& dy) {
  expect_block(dy, tokens_, width_, dtype_, "dy of the expert exchange (as x of the forward)");
  grad_gathered_ = false;
  if (!peer_) {
    run_beside(side_.get(), [&] { gather(dy, owned_dy_); });
    return;
  }
  send_blocks(kDyInbox, dy, kDyLanded);
  copy_own_block(dy, owned_dy_);
}

Tensor ExpertExchange::receive_grad(int peer) {
  check_peer(peer, "dy");
  if (peer_) {
    peer_->wait(peer, kDyLanded, round_, current_stream());
  } else {
    owned_dy();
  }
  return owned_dy_.rows(peer * tokens_, (peer + 1) * tokens_);
}

const Tensor& ExpertExchange::owned_dy() {
  if (peer_) {
    own_lane_->join();  // the own block's copy
  } else if (!grad_gathered_) {
    wait();
    grad_gathered_ = true;
  }
  return owned_dy_;
}

GradPartials ExpertExchange::grad_partial_destinations(int peer, const Tensor& local_dx,
                                                       const Tensor& local_dgates) {
  check_peer(peer, "partial dx");
  expect_block(local_dx, tokens_, width_, dtype_, "partial dx");
  expect_block(local_dgates, tokens_, slots_, DType::f32, "dgates");
  if (!peer_) return {local_dx, local_dgates};
  return {peer_block(peer, kDxInbox, local_dx), peer_block(peer, kDgatesInbox, local_dgates)};
}

void ExpertExchange::send_grad_partials(int peer) {
  check_peer(peer, "partial dx");
  if (!peer_) return;
  peer_->raise(peer, kGradPartialsLanded, round_, current_stream());
}

void ExpertExchange::combine_grad(const Tensor& partial_dx, const Tensor& owned_dgates, Tensor& dx,
                                  Tensor& dgates) {
  if (!peer_) {
    run_beside(side_.get(), [&] {
      scatter_sum(owned_dgates, dgates);
      scatter_sum(partial_dx, dx);
    });
    return;
  }
  const int64_t own = own_begin(), end = own + tokens_;
  run_beside(side_.get(), [&] {
    for (int p : peers_) peer_->wait(p, kGradPartialsLanded, round_, current_stream());
    detail::sum_blocks(dx_inbox_, partial_dx.rows(own, end), comm_->rank(), dx);
  });
  for (int p : peers_) peer_->wait(p, kGradPartialsLanded, round_, current_stream());
  detail::sum_blocks(dgates_inbox_, owned_dgates.rows(own, end), comm_->rank(), dgates);
}

void ExpertExchange::wait_dgates() {
  if (!peer_ && side_) side_->join();
}

}  // namespace flashmoe
