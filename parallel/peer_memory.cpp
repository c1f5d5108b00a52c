#include "parallel/peer_memory.h"

#include <cuda.h>
#include <cudaTypedefs.h>

#include <cstring>

#include "core/error.h"

namespace flashmoe {

namespace {

constexpr int kHandleWords = sizeof(cudaIpcMemHandle_t) / sizeof(int32_t);

// The driver's stream memory operations, looked up through the runtime so that
// nothing links libcuda (machines without a GPU driver still run the CPU build).
struct StreamMemoryOps {
  PFN_cuStreamWaitValue32_v11070 wait = nullptr;
  PFN_cuStreamWriteValue32_v11070 write = nullptr;
};

template <class Fn>
void driver_entry_point(const char* name, Fn& fn) {
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  CUDA_CHECK(cudaGetDriverEntryPointByVersion(name, reinterpret_cast<void**>(&fn), 11070,
                                              cudaEnableDefault, &found));
  FLASHMOE_CHECK(found == cudaDriverEntryPointSuccess && fn,
                 "the CUDA driver has no " << name << ", expected a driver for CUDA 11.7 or later");
}

const StreamMemoryOps& stream_memory_ops() {
  static const StreamMemoryOps ops = [] {
    StreamMemoryOps o;
    driver_entry_point("cuStreamWaitValue32", o.wait);
    driver_entry_point("cuStreamWriteValue32", o.write);
    return o;
  }();
  return ops;
}

void check_driver(CUresult result, const char* what) {
  FLASHMOE_CHECK(result == CUDA_SUCCESS,
                 what << " failed with CUDA driver error " << static_cast<int>(result));
}

CUdeviceptr flag_address(void* table, int kind, int rank, int size) {
  return reinterpret_cast<CUdeviceptr>(static_cast<int32_t*>(table) + kind * size + rank);
}

}  // namespace

PeerMemory::PeerMemory(int rank, int size, const std::vector<Tensor>& buffers, int flag_kinds)
    : rank_(rank),
      size_(size),
      flag_kinds_(flag_kinds),
      buffers_(buffers),
      flags_(Tensor::zeros({flag_kinds, size}, DType::i32, Device::cuda)),
      mapped_(size, std::vector<void*>(buffers.size() + 1, nullptr)) {
  for (const Tensor& buffer : buffers_) expect_device(buffer, Device::cuda, "peer buffer");
}

std::unique_ptr<PeerMemory> PeerMemory::map(Communicator& comm, const std::vector<Tensor>& buffers,
                                            int flag_kinds, std::string& why) {
  const int P = comm.size(), rank = comm.rank();
  std::unique_ptr<PeerMemory> memory(new PeerMemory(rank, P, buffers, flag_kinds));
  std::vector<Tensor> exported = buffers;
  exported.push_back(memory->flags_);
  const int n = static_cast<int>(exported.size());
  // A failure is recorded, not thrown, until every rank has heard of it: the others
  // would wait in the collectives below otherwise.
  std::string failure;
  std::vector<int32_t> mine(n * kHandleWords);
  for (int i = 0; i < n && failure.empty(); ++i) {
    cudaIpcMemHandle_t handle;
    const cudaError_t exported_ok = cudaIpcGetMemHandle(&handle, exported[i].raw());
    if (exported_ok != cudaSuccess) {
      (void)cudaGetLastError();
      failure = "rank " + std::to_string(rank) +
                " cannot export its GPU memory: " + cudaGetErrorString(exported_ok);
      break;
    }
    std::memcpy(&mine[i * kHandleWords], &handle, sizeof handle);
  }
  Tensor gathered = Tensor::empty({P * n * kHandleWords}, DType::i32, Device::cuda);
  comm.all_gather(Tensor::from_vector(mine, {n * kHandleWords}, Device::cuda), gathered);
  const std::vector<int32_t> handles = gathered.to_vector<int32_t>();

  for (int p = 0; p < P && failure.empty(); ++p) {
    for (int i = 0; i < n && p != rank; ++i) {
      cudaIpcMemHandle_t handle;
      std::memcpy(&handle, &handles[(p * n + i) * kHandleWords], sizeof handle);
      const cudaError_t opened =
          cudaIpcOpenMemHandle(&memory->mapped_[p][i], handle, cudaIpcMemLazyEnablePeerAccess);
      if (opened == cudaSuccess) continue;
      (void)cudaGetLastError();  // not sticky: the collectives path still works
      memory->mapped_[p][i] = nullptr;
      failure = "rank " + std::to_string(rank) + " cannot map the GPU memory of rank " +
                std::to_string(p) + ": " + cudaGetErrorString(opened);
      break;
    }
  }
  Tensor failed_ranks = Tensor::empty({P}, DType::i32, Device::cuda);
  comm.all_gather(
      Tensor::from_vector(std::vector<int32_t>{failure.empty() ? 0 : 1}, {1}, Device::cuda),
      failed_ranks);
  const std::vector<int32_t> failed = failed_ranks.to_vector<int32_t>();
  for (int p = 0; p < P; ++p) {
    if (!failed[p]) continue;
    why =
        p == rank ? failure : "rank " + std::to_string(p) + " cannot share GPU memory with a peer";
    memory->unmap();
    comm.barrier();  // every rank has unmapped this one's memory before it is freed
    return nullptr;
  }
  stream_memory_ops();  // fail here, not mid-step, on a driver without them
  return memory;
}

void PeerMemory::unmap() {
  for (auto& peer : mapped_) {
    for (void*& p : peer) {
      if (p) (void)cudaIpcCloseMemHandle(p);  // also called from the destructor: no throw
      p = nullptr;
    }
  }
}

PeerMemory::~PeerMemory() { unmap(); }

void* PeerMemory::peer_address(int peer, int index, size_t offset, size_t bytes) const {
  FLASHMOE_CHECK(peer >= 0 && peer < size_ && peer != rank_ && index >= 0 &&
                     index < static_cast<int>(buffers_.size()) &&
                     offset + bytes <= buffers_[index].nbytes() && mapped_[peer][index],
                 "peer access of " << bytes << " bytes to buffer " << index << " of rank " << peer
                                   << " at byte " << offset
                                   << ", expected another mapped rank and a range inside the "
                                      "buffer");
  return static_cast<uint8_t*>(mapped_[peer][index]) + offset;
}

Tensor PeerMemory::peer_tensor(int peer, int index, size_t offset, const Tensor& like) const {
  return Tensor::borrow(peer_address(peer, index, offset, like.nbytes()), like.shape(),
                        like.dtype(), Device::cuda);
}

void PeerMemory::put(int peer, int index, size_t offset, const Tensor& src,
                     cudaStream_t stream) const {
  void* dst = peer_address(peer, index, offset, src.nbytes());
  CUDA_CHECK(cudaMemcpyAsync(dst, src.raw(), src.nbytes(), cudaMemcpyDeviceToDevice, stream));
}

void PeerMemory::check_flag(int peer, int kind) const {
  FLASHMOE_CHECK(peer >= 0 && peer < size_ && peer != rank_ && kind >= 0 && kind < flag_kinds_,
                 "flag " << kind << " of rank " << peer << " on rank " << rank_
                         << ", expected another rank in [0, " << size_ << ") and a kind below "
                         << flag_kinds_);
}

void PeerMemory::raise(int peer, int kind, uint32_t value, cudaStream_t stream) const {
  check_flag(peer, kind);
  check_driver(stream_memory_ops().write(reinterpret_cast<CUstream>(stream),
                                         flag_address(mapped_[peer].back(), kind, rank_, size_),
                                         value, CU_STREAM_WRITE_VALUE_DEFAULT),
               "raising a peer's flag (cuStreamWriteValue32)");
}

// GEQ compares cyclically ((int32_t)(flag - value) >= 0), so the values may wrap.
void PeerMemory::wait(int peer, int kind, uint32_t value, cudaStream_t stream) const {
  check_flag(peer, kind);
  check_driver(stream_memory_ops().wait(reinterpret_cast<CUstream>(stream),
                                        flag_address(flags_.raw(), kind, peer, size_), value,
                                        CU_STREAM_WAIT_VALUE_GEQ),
               "waiting for a peer's flag (cuStreamWaitValue32)");
}

}  // namespace flashmoe
