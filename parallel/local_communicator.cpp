#include "parallel/communicator.h"

namespace flashmoe {

namespace {
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

// Bytes and offsets of `counts` rows of `row` bytes each, within a buffer of `capacity`.
void lay_out(const std::vector<int64_t>& counts, int64_t row, int64_t capacity, const char* what,
             std::vector<int64_t>& bytes, std::vector<int64_t>& offset) {
  int64_t at = 0;
  for (int64_t c : counts) {
    offset.push_back(at);
    bytes.push_back(c * row);
    at += c * row;
  }
  FLASHMOE_CHECK(at <= capacity,
                 what << " total " << at << " bytes, expected at most the buffer's " << capacity);
}
}  // namespace

AllToAllLayout all_to_all_layout(const Tensor& send, const std::vector<int64_t>& send_counts,
                                 const Tensor& recv, const std::vector<int64_t>& recv_counts,
                                 int world_size) {
  check_counts(send_counts, world_size, "all_to_all send counts");
  check_counts(recv_counts, world_size, "all_to_all receive counts");
  const int64_t row = row_bytes(send);
  FLASHMOE_CHECK(row == row_bytes(recv), "all_to_all buffers have rows of "
                                             << row << " and " << row_bytes(recv)
                                             << " bytes, expected equal rows");
  AllToAllLayout layout;
  lay_out(send_counts, row, static_cast<int64_t>(send.nbytes()), "all_to_all send counts",
          layout.send_bytes, layout.send_offset);
  lay_out(recv_counts, row, static_cast<int64_t>(recv.nbytes()), "all_to_all receive counts",
          layout.recv_bytes, layout.recv_offset);
  return layout;
}

int64_t gathered_block_bytes(const Tensor& part, const Tensor& whole, int world_size,
                             const char* op) {
  FLASHMOE_CHECK(part.rank() >= 1 && whole.rank() == part.rank(),
                 op << " buffers have shapes " << shape_string(part.shape()) << " and "
                    << shape_string(whole.shape()) << ", expected rows [n, ...] and [P n, ...]");
  Shape expected = part.shape();
  expected[0] *= world_size;
  FLASHMOE_CHECK(whole.shape() == expected && whole.dtype() == part.dtype(),
                 op << " gathered buffer is " << dtype_name(whole.dtype()) << " "
                    << shape_string(whole.shape()) << ", expected " << dtype_name(part.dtype())
                    << " " << shape_string(expected) << " for " << world_size << " ranks");
  return static_cast<int64_t>(part.nbytes());
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
    all_to_all_layout(send, send_counts, recv, recv_counts, 1);
    FLASHMOE_CHECK(send_counts[0] == recv_counts[0], "all_to_all in a 1-rank job sends "
                                                         << send_counts[0] << " rows and receives "
                                                         << recv_counts[0] << ", expected equal");
    recv.rows(0, recv_counts[0]).copy_from(send.rows(0, send_counts[0]));
  }
  void all_gather(const Tensor& send, Tensor& recv) override {
    gathered_block_bytes(send, recv, 1, "all_gather");
    recv.copy_from(send);
  }
  void reduce_scatter_sum(const Tensor& send, Tensor& recv) override {
    gathered_block_bytes(recv, send, 1, "reduce_scatter");
    recv.copy_from(send);
  }
  void barrier() override {}
  std::unique_ptr<Communicator> duplicate() const override {
    return std::make_unique<LocalCommunicator>();
  }
};
}  // namespace

std::unique_ptr<Communicator> make_local_communicator() {
  return std::make_unique<LocalCommunicator>();
}

}  // namespace flashmoe
