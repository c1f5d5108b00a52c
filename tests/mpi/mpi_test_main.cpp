// The MPI suites run under `mpirun -np P` (tests/CMakeLists.txt): every rank runs every
// test, and the job fails when a test fails on any rank. An exception escapes to
// std::terminate instead of failing one test quietly, so mpirun ends the whole job rather
// than leaving the other ranks waiting in a collective.
#include <gtest/gtest.h>

#include "parallel/mpi_communicator.h"

int main(int argc, char** argv) {
  flashmoe::MpiSession mpi(&argc, &argv);
  GTEST_FLAG_SET(catch_exceptions, false);
  if (mpi.rank() != 0) GTEST_FLAG_SET(brief, true);  // rank 0 reports; others only failures
  ::testing::InitGoogleTest(&argc, argv);
  int failed = RUN_ALL_TESTS();
  int any_failed = 0;
  MPI_CHECK(MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD));
  return any_failed;
}
