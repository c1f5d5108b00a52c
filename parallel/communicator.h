// Communication between the ranks of a job, one interface for every backend:
// `local` (one rank, no communication), MPI (host buffers: the CPU backend and CI)
// and NCCL (device buffers). The trainer and the layers see only this interface.
//
// Collectives are called by every rank in the same order. Sums run in a fixed rank
// order inside each implementation, so results repeat bit for bit for a given
// world size.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/tensor.h"

namespace flashmoe {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // t = sum over ranks of t, in place (fp32 or fp64).
  virtual void all_reduce_sum(Tensor& t) = 0;
  // Every rank's t = root's t.
  virtual void broadcast(Tensor& t, int root) = 0;
  // Rows of `send` are grouped by destination rank: send_counts[p] rows for rank p,
  // in rank order; `recv` receives recv_counts[p] rows from rank p, in rank order.
  // Counts are rows of the tensors' trailing shape.
  virtual void all_to_all(const Tensor& send, const std::vector<int64_t>& send_counts, Tensor& recv,
                          const std::vector<int64_t>& recv_counts) = 0;
  // recv [P n, ...] = every rank's send [n, ...], in rank order (any dtype; every rank
  // sends as many rows).
  virtual void all_gather(const Tensor& send, Tensor& recv) = 0;
  // recv [n, ...] = the sum over ranks of their send rows [rank n, (rank + 1) n), of
  // send [P n, ...] (fp32, bf16 or fp64). The order of the sum is fixed for a world
  // size: rank order on MPI, NCCL's ring order on NCCL.
  virtual void reduce_scatter_sum(const Tensor& send, Tensor& recv) = 0;
  virtual void barrier() = 0;
  // A communicator over the same ranks whose collectives are ordered independently of
  // this one's: the two may run at once (on two CUDA streams), so long as every rank
  // calls each one's collectives in the same order.
  virtual std::unique_ptr<Communicator> duplicate() const = 0;
};

// The byte layout of an all_to_all, per peer, once every argument is checked: one
// non-negative count per rank, rows of one size (a row is the tensors' trailing shape,
// so a buffer of zero rows still has one), and counts that fit the buffers.
struct AllToAllLayout {
  std::vector<int64_t> send_bytes, send_offset, recv_bytes, recv_offset;
};
AllToAllLayout all_to_all_layout(const Tensor& send, const std::vector<int64_t>& send_counts,
                                 const Tensor& recv, const std::vector<int64_t>& recv_counts,
                                 int world_size);

// Checks that `whole` holds world_size blocks like `part` (same dtype and trailing
// shape, world_size times the rows) and returns the bytes of one block.
int64_t gathered_block_bytes(const Tensor& part, const Tensor& whole, int world_size,
                             const char* op);

// The single-rank communicator: every collective is the identity.
std::unique_ptr<Communicator> make_local_communicator();

}  // namespace flashmoe
