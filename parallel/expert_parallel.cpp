#include "parallel/expert_parallel.h"

#include "kernels/elementwise.h"

namespace flashmoe {

namespace {

// The CPU backend of detail::split_slots_by_owner_cuda.
void split_slots_by_owner_cpu(const Tensor& ids, const Tensor& gates, int64_t local_experts,
                              int owners, Tensor& owner_ids, Tensor& owner_gates) {
  const int64_t pairs = ids.numel();
  const int32_t* id = ids.data<int32_t>();
  const float* gate = gates.data<float>();
  int32_t* out_ids = owner_ids.data<int32_t>();
  float* out_gates = owner_gates.data<float>();
  for (int p = 0; p < owners; ++p) {
    for (int64_t i = 0; i < pairs; ++i) {
      const bool mine = id[i] >= 0 && id[i] / local_experts == p;
      out_ids[p * pairs + i] = mine ? static_cast<int32_t>(id[i] - p * local_experts) : -1;
      out_gates[p * pairs + i] = mine ? gate[i] : 0.0f;
    }
  }
}

}  // namespace

ExpertExchange::ExpertExchange(Communicator& comm, int64_t num_experts) : comm_(comm) {
  const int P = comm.size();
  FLASHMOE_CHECK(num_experts % P == 0, "moe.num_experts is " << num_experts
                                                             << ", expected a multiple of the " << P
                                                             << " ranks");
  local_experts_ = num_experts / P;
  first_expert_ = comm.rank() * local_experts_;
}

void ExpertExchange::set_tokens(int64_t tokens) {
  if (tokens == tokens_) return;
  const int P = comm_.size();
  const std::vector<int64_t> ones(P, 1);
  send_counts_.assign(P, tokens);
  Tensor send = Tensor::from_vector(send_counts_, {P, 1}, device_);
  Tensor recv = Tensor::empty({P, 1}, DType::i64, device_);
  comm_.all_to_all(send, ones, recv, ones);
  recv_counts_ = recv.to_vector<int64_t>();
  tokens_ = tokens;
}

void ExpertExchange::copy_to_every_owner(const Tensor& rows) {
  const int64_t T = tokens_;
  Shape shape = rows.shape();
  shape[0] = comm_.size() * T;
  ensure(send_rows_, shape, rows.dtype(), device_);
  for (int p = 0; p < comm_.size(); ++p) send_rows_.rows(p * T, (p + 1) * T).copy_from(rows);
}

void ExpertExchange::send_to_owners(const Tensor& send, Tensor& recv) {
  Shape shape = send.shape();
  shape[0] = 0;
  for (int64_t count : recv_counts_) shape[0] += count;
  ensure(recv, shape, send.dtype(), device_);
  comm_.all_to_all(send, send_counts_, recv, recv_counts_);
}

void ExpertExchange::return_and_sum(const Tensor& partials, Tensor& returned, Tensor& out) {
  const int64_t T = tokens_;
  Shape shape = partials.shape();
  shape[0] = comm_.size() * T;
  ensure(returned, shape, partials.dtype(), device_);
  comm_.all_to_all(partials, recv_counts_, returned, send_counts_);
  shape[0] = T;
  ensure(out, shape, partials.dtype(), device_);
  out.copy_from(returned.rows(0, T));
  for (int p = 1; p < comm_.size(); ++p) add_into(returned.rows(p * T, (p + 1) * T), out);
}

const ExpertRows& ExpertExchange::dispatch(const Tensor& x, const Tensor& ids,
                                           const Tensor& gates) {
  device_ = x.device();
  set_tokens(ids.size(0));
  const int P = comm_.size();
  const int64_t T = tokens_, S = ids.size(1);
  copy_to_every_owner(x);
  send_to_owners(send_rows_, owned_.x);
  ensure(send_ids_, {P * T, S}, DType::i32, device_);
  ensure(send_gates_, {P * T, S}, DType::f32, device_);
  if (device_ == Device::cpu) {
    split_slots_by_owner_cpu(ids, gates, local_experts_, P, send_ids_, send_gates_);
  } else {
    detail::split_slots_by_owner_cuda(ids, gates, local_experts_, P, send_ids_, send_gates_);
  }
  send_to_owners(send_ids_, owned_.ids);
  send_to_owners(send_gates_, owned_.gates);
  return owned_;
}

void ExpertExchange::combine(const Tensor& partial_y, Tensor& y) {
  return_and_sum(partial_y, returned_, y);
}

const Tensor& ExpertExchange::dispatch_grad(const Tensor& dy) {
  copy_to_every_owner(dy);
  send_to_owners(send_rows_, owned_dy_);
  return owned_dy_;
}

void ExpertExchange::combine_grad(const Tensor& partial_dx, const Tensor& owned_dgates, Tensor& dx,
                                  Tensor& dgates) {
  return_and_sum(partial_dx, returned_, dx);
  return_and_sum(owned_dgates, returned_dgates_, dgates);
}

}  // namespace flashmoe
