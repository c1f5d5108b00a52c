#include "parallel/mpi_communicator.h"

#include <cuda_runtime.h>

#include <cstdlib>
#include <vector>

#include "kernels/elementwise.h"

namespace flashmoe {

MpiSession::MpiSession(int* argc, char*** argv) {
  int initialised = 0;
  MPI_CHECK(MPI_Initialized(&initialised));
  if (!initialised) {
    int provided = 0;
    MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
    owns_ = true;
  }
  MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &rank_));
  MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &size_));
}

MpiSession::~MpiSession() {
  if (owns_) MPI_Finalize();
}

void MpiSession::abort_job(int code) {
  MPI_Abort(MPI_COMM_WORLD, code);
  std::abort();  // MPI_Abort does not return; this keeps [[noreturn]] honest
}

namespace {

int to_int(int64_t value, const char* what) {
  FLASHMOE_CHECK(value >= 0 && value <= INT32_MAX,
                 what << " is " << value << ", expected it to fit an MPI int count");
  return static_cast<int>(value);
}

class MpiCommunicator final : public Communicator {
 public:
  // Owns (and frees) `comm` when `owned`: the duplicates this class makes.
  MpiCommunicator(MPI_Comm comm, bool owned) : comm_(comm), owned_(owned) {
    MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    MPI_CHECK(MPI_Comm_size(comm_, &size_));
  }
  ~MpiCommunicator() override {
    if (owned_) MPI_Comm_free(&comm_);
  }
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  // Gathers every rank's tensor and sums them in rank order, so every rank gets the
  // same bits whatever MPI's own reduction order would be.
  void all_reduce_sum(Tensor& t) override {
    expect_device(t, Device::cpu, "MPI all_reduce tensor");
    FLASHMOE_CHECK(t.dtype() == DType::f32 || t.dtype() == DType::f64,
                   "MPI all_reduce of " << dtype_name(t.dtype()) << ", expected fp32 or fp64");
    const int bytes = to_int(static_cast<int64_t>(t.nbytes()), "all_reduce bytes");
    Tensor blocks = Tensor::empty({size_ * t.numel()}, t.dtype(), Device::cpu);
    MPI_CHECK(MPI_Allgather(t.raw(), bytes, MPI_BYTE, blocks.raw(), bytes, MPI_BYTE, comm_));
    Tensor flat = t.view({t.numel()});
    sum_in_rank_order(blocks, flat);
  }

  void broadcast(Tensor& t, int root) override {
    expect_device(t, Device::cpu, "MPI broadcast tensor");
    MPI_CHECK(MPI_Bcast(t.raw(), to_int(static_cast<int64_t>(t.nbytes()), "broadcast bytes"),
                        MPI_BYTE, root, comm_));
  }

  void all_to_all(const Tensor& send, const std::vector<int64_t>& send_counts, Tensor& recv,
                  const std::vector<int64_t>& recv_counts) override {
    expect_device(send, Device::cpu, "MPI all_to_all send buffer");
    expect_device(recv, Device::cpu, "MPI all_to_all receive buffer");
    const AllToAllLayout layout = all_to_all_layout(send, send_counts, recv, recv_counts, size_);
    std::vector<int> scounts(size_), sdispls(size_), rcounts(size_), rdispls(size_);
    for (int p = 0; p < size_; ++p) {
      scounts[p] = to_int(layout.send_bytes[p], "all_to_all send bytes");
      sdispls[p] = to_int(layout.send_offset[p], "all_to_all send offset");
      rcounts[p] = to_int(layout.recv_bytes[p], "all_to_all receive bytes");
      rdispls[p] = to_int(layout.recv_offset[p], "all_to_all receive offset");
    }
    MPI_CHECK(MPI_Alltoallv(send.raw(), scounts.data(), sdispls.data(), MPI_BYTE, recv.raw(),
                            rcounts.data(), rdispls.data(), MPI_BYTE, comm_));
  }

  void all_gather(const Tensor& send, Tensor& recv) override {
    expect_device(send, Device::cpu, "MPI all_gather send buffer");
    expect_device(recv, Device::cpu, "MPI all_gather receive buffer");
    const int bytes =
        to_int(gathered_block_bytes(send, recv, size_, "all_gather"), "all_gather bytes");
    MPI_CHECK(MPI_Allgather(send.raw(), bytes, MPI_BYTE, recv.raw(), bytes, MPI_BYTE, comm_));
  }

  // Every rank's block for this rank, then their sum in rank order.
  void reduce_scatter_sum(const Tensor& send, Tensor& recv) override {
    expect_device(send, Device::cpu, "MPI reduce_scatter send buffer");
    expect_device(recv, Device::cpu, "MPI reduce_scatter receive buffer");
    const int bytes =
        to_int(gathered_block_bytes(recv, send, size_, "reduce_scatter"), "reduce_scatter bytes");
    Tensor blocks = Tensor::empty(send.shape(), send.dtype(), Device::cpu);
    MPI_CHECK(MPI_Alltoall(send.raw(), bytes, MPI_BYTE, blocks.raw(), bytes, MPI_BYTE, comm_));
    sum_in_rank_order(blocks, recv);
  }

  void barrier() override { MPI_CHECK(MPI_Barrier(comm_)); }

  std::unique_ptr<Communicator> duplicate() const override {
    MPI_Comm copy;
    MPI_CHECK(MPI_Comm_dup(comm_, &copy));
    return std::make_unique<MpiCommunicator>(copy, /*owned=*/true);
  }

 private:
  // out = blocks[0] + blocks[1] + ..., the P blocks of out's shape added in rank order,
  // rounded to the storage type after each addition.
  void sum_in_rank_order(const Tensor& blocks, Tensor& out) const {
    const int64_t n = out.size(0);
    out.copy_from(blocks.rows(0, n));
    for (int p = 1; p < size_; ++p) add_into(blocks.rows(p * n, (p + 1) * n), out);
  }

  MPI_Comm comm_;
  bool owned_;
  int rank_ = 0, size_ = 1;
};

}  // namespace

std::unique_ptr<Communicator> make_mpi_communicator(MPI_Comm comm) {
  return std::make_unique<MpiCommunicator>(comm, /*owned=*/false);
}

void select_rank_device(int world_rank) {
  const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
  int count = 0;
  CUDA_CHECK(cudaGetDeviceCount(&count));
  const int local_rank = local ? std::atoi(local) : world_rank;
  FLASHMOE_CHECK(local_rank < count, "rank " << world_rank << " needs GPU " << local_rank
                                             << ", expected fewer ranks per node than the " << count
                                             << " GPUs");
  CUDA_CHECK(cudaSetDevice(local_rank));
}

}  // namespace flashmoe
