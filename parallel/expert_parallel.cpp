#include "parallel/expert_parallel.h"

#include <algorithm>
#include <vector>

namespace flashmoe {

ExpertExchange::ExpertExchange(const Communicator& comm, int64_t num_experts, Device device)
    : comm_(comm.duplicate()) {
  const int P = comm.size();
  FLASHMOE_CHECK(num_experts % P == 0, "moe.num_experts is " << num_experts
                                                             << ", expected a multiple of the " << P
                                                             << " ranks");
  local_experts_ = num_experts / P;
  first_expert_ = comm.rank() * local_experts_;
  if (device == Device::cuda) side_ = std::make_unique<SideStream>(StreamPriority::high);
}

void ExpertExchange::wait() {
  if (side_) side_->join();
}

void ExpertExchange::check_tokens(int64_t tokens, Device device) {
  if (tokens == tokens_) return;
  const int P = comm_->size();
  Tensor mine = Tensor::from_vector(std::vector<int64_t>{tokens}, {1}, device);
  Tensor all = Tensor::empty({P}, DType::i64, device);
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

void ExpertExchange::start_dispatch(const Tensor& x) {
  check_tokens(x.size(0), x.device());
  x_ = x;
  run_beside(side_.get(), [&] { gather(x, owned_.x); });
}

ExpertRows ExpertExchange::dispatch(const Tensor& ids, const Tensor& gates) {
  FLASHMOE_CHECK(ids.defined() && ids.size(0) == tokens_, "dispatch of routing for "
                                                              << (ids.defined() ? ids.size(0) : 0)
                                                              << " tokens, expected the " << tokens_
                                                              << " of start_dispatch");
  detail::pack_routing(ids, gates, routing_);
  run_beside(side_.get(), [&] { gather(routing_, gathered_routing_); });
  const int64_t R = comm_->size() * tokens_, S = ids.size(1);
  ensure(owned_.ids, {R, S}, DType::i32, ids.device());
  ensure(owned_.gates, {R, S}, DType::f32, ids.device());
  const int64_t begin = own_begin(), end = begin + tokens_;
  ExpertRows own{x_, owned_.ids.rows(begin, end), owned_.gates.rows(begin, end)};
  detail::own_routing(ids, gates, first_expert_, local_experts_, own.ids, own.gates);
  return own;
}

const ExpertRows& ExpertExchange::receive() {
  wait();
  for (const auto& [begin, end] : other_rows()) {
    if (begin == end) continue;
    Tensor ids = owned_.ids.rows(begin, end), gates = owned_.gates.rows(begin, end);
    detail::own_routing(gathered_routing_.rows(begin, end), first_expert_, local_experts_, ids,
                        gates);
  }
  return owned_;
}

std::array<std::pair<int64_t, int64_t>, 2> ExpertExchange::other_rows() const {
  const int64_t begin = own_begin(), end = begin + tokens_;
  return {{{0, begin}, {end, comm_->size() * tokens_}}};
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

void ExpertExchange::combine(const Tensor& partial_y, Tensor& y) { scatter_sum(partial_y, y); }

void ExpertExchange::start_dispatch_grad(const Tensor& dy) {
  FLASHMOE_CHECK(dy.defined() && dy.size(0) == tokens_,
                 "dispatch of dy for " << (dy.defined() ? dy.size(0) : 0)
                                       << " tokens, expected the " << tokens_ << " of the forward");
  run_beside(side_.get(), [&] { gather(dy, owned_dy_); });
}

const Tensor& ExpertExchange::receive_grad() {
  wait();
  return owned_dy_;
}

void ExpertExchange::combine_grad(const Tensor& partial_dx, const Tensor& owned_dgates, Tensor& dx,
                                  Tensor& dgates) {
  run_beside(side_.get(), [&] {
    scatter_sum(owned_dgates, dgates);
    scatter_sum(partial_dx, dx);
  });
}

}  // namespace flashmoe
