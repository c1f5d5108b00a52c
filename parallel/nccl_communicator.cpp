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
  // Takes ownership of `comm`, a split of another communicator.
  explicit NcclCommunicator(ncclComm_t comm) : comm_(comm) {
    NCCL_CHECK(ncclCommUserRank(comm_, &rank_));
    NCCL_CHECK(ncclCommCount(comm_, &size_));
  }
  ~NcclCommunicator() override { ncclCommDestroy(comm_); }
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

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
    const AllToAllLayout layout = all_to_all_layout(send, send_counts, recv, recv_counts, size_);
    const auto* sbase = static_cast<const uint8_t*>(send.raw());
    auto* rbase = static_cast<uint8_t*>(recv.raw());
    NCCL_CHECK(ncclGroupStart());
    for (int p = 0; p < size_; ++p) {
      if (layout.send_bytes[p] > 0) {
        NCCL_CHECK(ncclSend(sbase + layout.send_offset[p], layout.send_bytes[p], ncclUint8, p,
                            comm_, current_stream()));
      }
      if (layout.recv_bytes[p] > 0) {
        NCCL_CHECK(ncclRecv(rbase + layout.recv_offset[p], layout.recv_bytes[p], ncclUint8, p,
                            comm_, current_stream()));
      }
    }
    NCCL_CHECK(ncclGroupEnd());
  }

  void all_gather(const Tensor& send, Tensor& recv) override {
    expect_device(send, Device::cuda, "NCCL all_gather send buffer");
    expect_device(recv, Device::cuda, "NCCL all_gather receive buffer");
    const int64_t bytes = gathered_block_bytes(send, recv, size_, "all_gather");
    NCCL_CHECK(ncclAllGather(send.raw(), recv.raw(), bytes, ncclUint8, comm_, current_stream()));
  }

  void reduce_scatter_sum(const Tensor& send, Tensor& recv) override {
    expect_device(send, Device::cuda, "NCCL reduce_scatter send buffer");
    expect_device(recv, Device::cuda, "NCCL reduce_scatter receive buffer");
    gathered_block_bytes(recv, send, size_, "reduce_scatter");
    NCCL_CHECK(ncclReduceScatter(send.raw(), recv.raw(), recv.numel(), nccl_type(recv.dtype()),
                                 ncclSum, comm_, current_stream()));
  }

  void barrier() override {
    // An all-reduce of one element orders every rank's stream, then the host waits.
    if (!barrier_flag_.defined()) barrier_flag_ = Tensor::zeros({1}, DType::f32, Device::cuda);
    all_reduce_sum(barrier_flag_);
    synchronize_stream();
  }

  // Every rank in one colour, keyed by its rank: the same ranks in the same order.
  std::unique_ptr<Communicator> duplicate() const override {
    ncclComm_t copy = nullptr;
    NCCL_CHECK(ncclCommSplit(comm_, 0, rank_, &copy, nullptr));
    return std::make_unique<NcclCommunicator>(copy);
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
