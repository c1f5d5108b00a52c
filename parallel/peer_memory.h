// Device memory that the other ranks of a job write into directly. Every rank exports
// its buffers through CUDA IPC and maps every peer's, so a rank's copy engines put data
// into a peer's memory over NVLink (or PCIe peer access), with no SM and no staging
// copy, or its kernels store their outputs there. After the data a rank raises a flag
// in the peer's memory, which the peer's stream waits on. GPUs of one host only.
//
// Flags: each rank holds a table of 32-bit flags, one per (kind, peer). Rank p raises
// entry (k, p) of rank q's table to a value on a stream, after that stream's earlier
// work, its copies and its kernels' stores into q's memory (the write is fenced behind
// them), and q's streams wait until the entry has reached that value. The values of a
// flag only grow (ExpertExchange raises each to its round's number), so no flag is ever
// lowered: a wait costs one stream operation, and several streams may wait for one raise.
#pragma once

#include <cuda_runtime.h>

#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "parallel/communicator.h"

namespace flashmoe {

class PeerMemory {
 public:
  // Collective over `comm`. Exports `buffers` (this rank's CUDA tensors, each one whole
  // allocation, the same list on every rank) and a flag table of `flag_kinds` kinds,
  // and maps every peer's. Returns null on every rank, with the first failure in
  // `why`, when some rank cannot export its memory or map some peer's.
  static std::unique_ptr<PeerMemory> map(Communicator& comm, const std::vector<Tensor>& buffers,
                                         int flag_kinds, std::string& why);
  // Unmaps the peers' memory (this rank's stays exported until destruction: free it
  // only after every rank has unmapped it). Idempotent; the destructor calls it.
  void unmap();
  ~PeerMemory();
  PeerMemory(const PeerMemory&) = delete;
  PeerMemory& operator=(const PeerMemory&) = delete;

  // A tensor of `like`'s shape and dtype at byte `offset` of `peer`'s buffer `index`,
  // which kernels of this rank write straight into (over NVLink); valid until unmap().
  Tensor peer_tensor(int peer, int index, size_t offset, const Tensor& like) const;
  // On `stream`: copies `src` to byte `offset` of `peer`'s buffer `index`.
  void put(int peer, int index, size_t offset, const Tensor& src, cudaStream_t stream) const;
  // On `stream`: sets flag (kind, this rank) at `peer` to `value`, after the stream's
  // earlier copies and kernels. A flag's values must grow, cyclically (by less than
  // 2^31 a raise).
  void raise(int peer, int kind, uint32_t value, cudaStream_t stream) const;
  // `stream` waits until `peer` has raised flag (kind, peer) here to `value` or later.
  void wait(int peer, int kind, uint32_t value, cudaStream_t stream) const;

 private:
  PeerMemory(int rank, int size, const std::vector<Tensor>& buffers, int flag_kinds);
  void check_flag(int peer, int kind) const;
  // The address of bytes [offset, offset + bytes) of `peer`'s buffer `index`.
  void* peer_address(int peer, int index, size_t offset, size_t bytes) const;

  int rank_, size_, flag_kinds_;
  std::vector<Tensor> buffers_;  // keeps this rank's exported memory alive
  Tensor flags_;                 // [flag_kinds, P] int32, this rank's table
  // mapped_[p][i]: peer p's buffer i (the flag table last); null for this rank.
  std::vector<std::vector<void*>> mapped_;
};

}  // namespace flashmoe
