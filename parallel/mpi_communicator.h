// Communicators over MPI: the MPI one moves host tensors (the CPU backend, CI);
// the NCCL one moves device tensors, with its unique id broadcast through MPI.
#pragma once

#include <mpi.h>

#include <memory>

#include "parallel/communicator.h"

namespace flashmoe {

// MPI_Init_thread on construction (unless already initialised), MPI_Finalize on
// destruction; holds the world's rank and size.
class MpiSession {
 public:
  MpiSession(int* argc, char*** argv);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
  int rank() const { return rank_; }
  int size() const { return size_; }
  // Ends every rank of the job: a rank that meets an error must not leave the
  // others waiting in a collective.
  [[noreturn]] static void abort_job(int code);

 private:
  bool owns_ = false;
  int rank_ = 0, size_ = 1;
};

// One GPU per rank: the rank's index among the ranks of its node
// (OMPI_COMM_WORLD_LOCAL_RANK, else the world rank) selects the device.
void select_rank_device(int world_rank);

std::unique_ptr<Communicator> make_mpi_communicator(MPI_Comm comm);
// One GPU per rank: the caller selects the device (cudaSetDevice) first.
std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm comm);

}  // namespace flashmoe
