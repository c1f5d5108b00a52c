#include "parallel/communicator.h"

namespace flashmoe {

void check_counts(const std::vector<int64_t>& counts, int world_size, const char* what) {
  FLASHMOE_CHECK(
      static_cast<int>(counts.size()) == world_size,
      what << " has " << counts.size() << " entries, expected one per rank (" << world_size << ")");
  for (int64_t c : counts) FLASHMOE_CHECK(c >= 0, what << " holds " << c << ", expected >= 0");
}

int64_t row_bytes(const Tensor& t) {
  FLASHMOE_CHECK(t.rank() >= 1, "all_to_all buffer has shape " << shape_string(t.shape())
                                                               << ", expected rows [N, ...]");
  int64_t bytes = static_cast<int64_t>(dtype_size(t.dtype()));
  for (int d = 1; d < t.rank(); ++d) bytes *= t.size(d);
  return bytes;
}

namespace {
class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void all_reduce_sum(Tensor&) override {}
  void broadcast(Tensor&, int root) override {
    FLASHMOE_CHECK(root == 0, "broadcast from rank " << root << ", expected 0 in a 1-rank job");
  }
  void all_to_all(const Tensor& send, const std::vector<int64_t>& send_counts, Tensor& recv,
                  const std::vector<int64_t>& recv_counts) override {
    FLASHMOE_CHECK(
        send_counts.size() == 1 && recv_counts.size() == 1 && send_counts[0] == recv_counts[0],
        "all_to_all in a 1-rank job needs one equal send and receive count");
    recv.rows(0, recv_counts[0]).copy_from(send.rows(0, send_counts[0]));
  }
  void barrier() override {}
};
}  // namespace

std::unique_ptr<Communicator> make_local_communicator() {
  return std::make_unique<LocalCommunicator>();
}

}  // namespace flashmoe
