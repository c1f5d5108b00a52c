#include "parallel/expert_parallel.h"

#include "kernels/elementwise.h"
#include "kernels/embedding.h"

namespace flashmoe {

namespace {

// out[i] = table[index[i]]: the embedding lookup is the row gather of both backends.
void gather_rows(const Tensor& table, const Tensor& index, Tensor& out) {
  embedding_forward(index, table, Tensor(), 1, out);
}

int64_t total(const std::vector<int64_t>& counts) {
  int64_t sum = 0;
  for (int64_t c : counts) sum += c;
  return sum;
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

int ExpertExchange::owner_of(int32_t expert) const {
  FLASHMOE_CHECK(
      expert >= 0 && expert < local_experts_ * comm_.size(),
      "expert id " << expert << ", expected [0, " << local_experts_ * comm_.size() << ")");
  return static_cast<int>(expert / local_experts_);
}

void ExpertExchange::build_plan(const std::vector<int32_t>& ids, const std::vector<float>& gates,
                                std::vector<int32_t>& send_ids, std::vector<float>& send_gates) {
  const int P = comm_.size();
  const int64_t T = tokens_, S = slots_;
  std::vector<int32_t> tokens, combine(P * T, -1);
  send_counts_.assign(P, 0);
  slot_rows_.assign(T * S, -1);
  for (int p = 0; p < P; ++p) {
    const int32_t base = static_cast<int32_t>(p * local_experts_);
    for (int64_t t = 0; t < T; ++t) {
      const int32_t* row_ids = ids.data() + t * S;
      int64_t first = 0;
      while (first < S && owner_of(row_ids[first]) != p) ++first;
      if (first == S) continue;
      const auto row = static_cast<int32_t>(tokens.size());
      tokens.push_back(static_cast<int32_t>(t));
      combine[p * T + t] = row;
      ++send_counts_[p];
      for (int64_t s = 0; s < S; ++s) {
        const bool owned = owner_of(row_ids[s]) == p;
        send_ids.push_back((owned ? row_ids[s] : row_ids[first]) - base);
        send_gates.push_back(owned ? gates[t * S + s] : 0.0f);
        if (owned) slot_rows_[t * S + s] = row;
      }
    }
  }
  // Tokens without a row on some owner read the zero row after the returned rows.
  const auto zero_row = static_cast<int32_t>(tokens.size());
  for (int32_t& row : combine) row = row < 0 ? zero_row : row;
  send_tokens_ = Tensor::from_vector(tokens, {zero_row}, device_);
  combine_rows_ = Tensor::from_vector(combine, {P, T}, device_);
}

void ExpertExchange::exchange_counts() {
  const int P = comm_.size();
  const std::vector<int64_t> ones(P, 1);
  Tensor send = Tensor::from_vector(send_counts_, {P, 1}, device_);
  Tensor recv = Tensor::empty({P, 1}, DType::i64, device_);
  comm_.all_to_all(send, ones, recv, ones);
  recv_counts_ = recv.to_vector<int64_t>();
}

void ExpertExchange::send_to_owners(const Tensor& send, Tensor& recv) {
  comm_.all_to_all(send, send_counts_, recv, recv_counts_);
}

// recv gets one row more than was sent, kept zero: the row of absent (token, owner) pairs.
void ExpertExchange::return_to_senders(const Tensor& send, Tensor& recv) {
  const int64_t sent = total(send_counts_);
  Shape shape = send.shape();
  shape[0] = sent + 1;
  ensure(recv, shape, send.dtype(), device_);
  recv.rows(sent, sent + 1).fill_bytes(0);
  comm_.all_to_all(send, recv_counts_, recv, send_counts_);
}

// out[t] = sum over owners p, ascending, of partials[combine_rows_[p][t]].
void ExpertExchange::sum_partials(const Tensor& partials, Tensor& out) {
  for (int p = 0; p < comm_.size(); ++p) {
    const Tensor index = combine_rows_.rows(p, p + 1).view({tokens_});
    if (p == 0) {
      gather_rows(partials, index, out);
    } else {
      gather_rows(partials, index, gathered_);
      add_into(gathered_, out);
    }
  }
}

const ExpertRows& ExpertExchange::dispatch(const Tensor& x, const Tensor& ids,
                                           const Tensor& gates) {
  device_ = x.device();
  tokens_ = ids.size(0);
  slots_ = ids.size(1);
  std::vector<int32_t> send_ids;
  std::vector<float> send_gates;
  build_plan(ids.to_vector<int32_t>(), gates.to_vector<float>(), send_ids, send_gates);
  exchange_counts();
  const int64_t sent = total(send_counts_), received = total(recv_counts_);
  gather_rows(x, send_tokens_, send_rows_);
  ensure(owned_.x, {received, x.size(1)}, x.dtype(), device_);
  send_to_owners(send_rows_, owned_.x);
  sent_ids_ = Tensor::from_vector(send_ids, {sent, slots_}, device_);
  ensure(owned_.ids, {received, slots_}, DType::i32, device_);
  send_to_owners(sent_ids_, owned_.ids);
  sent_gates_ = Tensor::from_vector(send_gates, {sent, slots_}, device_);
  ensure(owned_.gates, {received, slots_}, DType::f32, device_);
  send_to_owners(sent_gates_, owned_.gates);
  return owned_;
}

void ExpertExchange::combine(const Tensor& partial_y, Tensor& y) {
  return_to_senders(partial_y, returned_);
  sum_partials(returned_, y);
}

const Tensor& ExpertExchange::dispatch_grad(const Tensor& dy) {
  gather_rows(dy, send_tokens_, send_rows_);
  ensure(owned_dy_, {total(recv_counts_), dy.size(1)}, dy.dtype(), device_);
  send_to_owners(send_rows_, owned_dy_);
  return owned_dy_;
}

void ExpertExchange::combine_grad(const Tensor& partial_dx, const Tensor& owned_dgates, Tensor& dx,
                                  Tensor& dgates) {
  return_to_senders(partial_dx, returned_);
  sum_partials(returned_, dx);
  return_to_senders(owned_dgates, returned_dgates_);
  // Each slot's gradient comes from the row of the owner holding its expert.
  const std::vector<float> returned = returned_dgates_.to_vector<float>();
  std::vector<float> out(slot_rows_.size());
  for (size_t i = 0; i < out.size(); ++i) out[i] = returned[slot_rows_[i] * slots_ + i % slots_];
  dgates = Tensor::from_vector(out, {tokens_, slots_}, device_);
}

}  // namespace flashmoe
