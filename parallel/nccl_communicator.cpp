#include <nccl.h>

#include "core/stream.h"
#include "parallel/mpi_communicator.h"

namespace flashmoe {

namespace {

ncclDataType_t nccl_type(DType dtype) {
  switch (dtype) {
    case DType::f32: return ncclFloat32;
    case DType::f64: return ncclFloat64;
    case DType::bf16: return ncclBfloat16;
    case DType::i32: return ncclInt32;
    case DType::i64: return ncclInt64;
  }
  FLASHMOE_FAIL("no NCCL type for " << dtype_name(dtype));
}

class NcclCommunicator final : public Communicator {
 public:
  explicit NcclCommunicator(MPI_Comm comm) {
    MPI_CHECK(MPI_Comm_rank(comm, &rank_));
    MPI_CHECK(MPI_Comm_size(comm, &size_));
    ncclUniqueId id;
    if (rank_ == 0) NCCL_CHECK(ncclGetUniqueId(&id));
    MPI_CHECK(MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, comm));
    NCCL_CHECK(ncclCommInitRank(&comm_, size_, id, rank_));
  }
  ~NcclCommunicator() override { ncclCommDestroy(comm_); }

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void all_reduce_sum(Tensor& t) override {
    expect_device(t, Device::cuda, "NCCL all_reduce tensor");
    NCCL_CHECK(ncclAllReduce(t.raw(), t.raw(), t.numel(), nccl_type(t.dtype()), ncclSum, comm_,
                             current_stream()));
  }

  void broadcast(Tensor& t, int root) override {
    expect_device(t, Device::cuda, "NCCL broadcast tensor");
    NCCL_CHECK(ncclBroadcast(t.raw(), t.raw(), t.numel(), nccl_type(t.dtype()), root, comm_,
                             current_stream()));
  }

  // Counts first are the caller's business (they size `recv`); the payload moves by
  // grouped point-to-point send/recv, one pair per peer.
  void all_to_all(const Tensor& send, const std::vector<int64_t>& send_counts, Tensor& recv,
                  const std::vector<int64_t>& recv_counts) override {
    expect_device(send, Device::cuda, "NCCL all_to_all send buffer");
    expect_device(recv, Device::cuda, "NCCL all_to_all receive buffer");
    check_counts(send_counts, size_, "all_to_all send counts");
    check_counts(recv_counts, size_, "all_to_all receive counts");
    const int64_t send_row = row_bytes(send), recv_row = row_bytes(recv);
    const auto* sbase = static_cast<const uint8_t*>(send.raw());
    auto* rbase = static_cast<uint8_t*>(recv.raw());
    int64_t send_total = 0, recv_total = 0;
    for (int p = 0; p < size_; ++p) {
      send_total += send_counts[p] * send_row;
      recv_total += recv_counts[p] * recv_row;
    }
    FLASHMOE_CHECK(send_total <= static_cast<int64_t>(send.nbytes()) &&
                       recv_total <= static_cast<int64_t>(recv.nbytes()),
                   "all_to_all counts exceed the buffers");
    int64_t soff = 0, roff = 0;
    NCCL_CHECK(ncclGroupStart());
    for (int p = 0; p < size_; ++p) {
      const int64_t sbytes = send_counts[p] * send_row, rbytes = recv_counts[p] * recv_row;
      if (sbytes > 0) {
        NCCL_CHECK(ncclSend(sbase + soff, sbytes, ncclUint8, p, comm_, current_stream()));
      }
      if (rbytes > 0) {
        NCCL_CHECK(ncclRecv(rbase + roff, rbytes, ncclUint8, p, comm_, current_stream()));
      }
      soff += sbytes;
      roff += rbytes;
    }
    NCCL_CHECK(ncclGroupEnd());
    FLASHMOE_CHECK(
        soff <= static_cast<int64_t>(send.nbytes()) && roff <= static_cast<int64_t>(recv.nbytes()),
        "all_to_all counts exceed the buffers");
  }

  void barrier() override {
    // An all-reduce of one element orders every rank's stream, then the host waits.
    if (!barrier_flag_.defined()) barrier_flag_ = Tensor::zeros({1}, DType::f32, Device::cuda);
    all_reduce_sum(barrier_flag_);
    synchronize_stream();
  }

 private:
  ncclComm_t comm_ = nullptr;
  int rank_ = 0, size_ = 1;
  Tensor barrier_flag_;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm comm) {
  return std::make_unique<NcclCommunicator>(comm);
}

}  // namespace flashmoe
