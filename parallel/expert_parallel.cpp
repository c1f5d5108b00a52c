#include "parallel/expert_parallel.h"

#include <vector>

namespace flashmoe {

ExpertExchange::ExpertExchange(Communicator& comm, int64_t num_experts) : comm_(comm) {
  const int P = comm.size();
  FLASHMOE_CHECK(num_experts % P == 0, "moe.num_experts is " << num_experts
                                                             << ", expected a multiple of the " << P
                                                             << " ranks");
  local_experts_ = num_experts / P;
  first_expert_ = comm.rank() * local_experts_;
}

void ExpertExchange::check_tokens(int64_t tokens, Device device) {
  if (tokens == tokens_) return;
  const int P = comm_.size();
  Tensor mine = Tensor::from_vector(std::vector<int64_t>{tokens}, {1}, device);
  Tensor all = Tensor::empty({P}, DType::i64, device);
  comm_.all_gather(mine, all);
  const std::vector<int64_t> counts = all.to_vector<int64_t>();
  for (int p = 0; p < P; ++p) {
    FLASHMOE_CHECK(counts[p] == tokens, "rank " << p << " holds " << counts[p]
                                                << " tokens and rank " << comm_.rank() << " "
                                                << tokens
                                                << ", expected as many on every rank (expert "
                                                   "parallelism exchanges fixed-size blocks)");
  }
  tokens_ = tokens;
}

void ExpertExchange::gather(const Tensor& send, Tensor& recv) {
  Shape shape = send.shape();
  shape[0] *= comm_.size();
  ensure(recv, shape, send.dtype(), send.device());
  comm_.all_gather(send, recv);
}

void ExpertExchange::scatter_sum(const Tensor& partials, Tensor& out) {
  Shape shape = partials.shape();
  shape[0] = tokens_;
  ensure(out, shape, partials.dtype(), partials.device());
  comm_.reduce_scatter_sum(partials, out);
}

const ExpertRows& ExpertExchange::dispatch(const Tensor& x, const Tensor& ids,
                                           const Tensor& gates) {
  check_tokens(x.size(0), x.device());
  gather(x, owned_.x);
  detail::pack_routing(ids, gates, routing_);
  gather(routing_, gathered_routing_);
  detail::own_routing(gathered_routing_, first_expert_, local_experts_, owned_.ids, owned_.gates);
  return owned_;
}

void ExpertExchange::combine(const Tensor& partial_y, Tensor& y) { scatter_sum(partial_y, y); }

const Tensor& ExpertExchange::dispatch_grad(const Tensor& dy) {
  gather(dy, owned_dy_);
  return owned_dy_;
}

void ExpertExchange::combine_grad(const Tensor& partial_dx, const Tensor& owned_dgates, Tensor& dx,
                                  Tensor& dgates) {
  scatter_sum(partial_dx, dx);
  scatter_sum(owned_dgates, dgates);
}

}  // namespace flashmoe
