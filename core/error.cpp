#include "core/error.h"

#include <cublas_api.h>
#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <cstring>

namespace flashmoe {

namespace {
// __FILE__ is absolute in CMake builds; the path from the repository root reads better.
const char* short_path(const char* file) {
  for (const char* dir : {"/core/", "/kernels/", "/parallel/", "/optim/", "/trainer/", "/tests/",
                          "/bench/", "/examples/"}) {
    if (const char* p = std::strstr(file, dir)) return p + 1;
  }
  return file;
}
}  // namespace

void throw_error(const char* file, int line, const std::string& message) {
  throw Error(std::string(short_path(file)) + ":" + std::to_string(line) + ": " + message);
}

void check_cuda(int status, const char* expr, const char* file, int line) {
  if (status == cudaSuccess) return;
  auto err = static_cast<cudaError_t>(status);
  throw_error(file, line,
              std::string("CUDA error ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) +
                  ") in " + expr + ", expected cudaSuccess");
}

void check_cublas(int status, const char* expr, const char* file, int line) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  throw_error(file, line,
              std::string("cuBLAS error ") +
                  cublasGetStatusName(static_cast<cublasStatus_t>(status)) + " in " + expr +
                  ", expected CUBLAS_STATUS_SUCCESS");
}

void check_nccl(int status, const char* expr, const char* file, int line) {
  if (status == ncclSuccess) return;
  throw_error(file, line,
              std::string("NCCL error: ") + ncclGetErrorString(static_cast<ncclResult_t>(status)) +
                  " in " + expr + ", expected ncclSuccess");
}

void check_mpi(int status, const char* expr, const char* file, int line) {
  if (status == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(status, text, &length);
  throw_error(file, line,
              std::string("MPI error: ") + std::string(text, length) + " in " + expr +
                  ", expected MPI_SUCCESS");
}

void check_last_launch(const char* kernel, const char* file, int line) {
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return;
  throw_error(file, line,
              std::string("launch of ") + kernel + " failed: " + cudaGetErrorName(err) + " (" +
                  cudaGetErrorString(err) + ")");
}

}  // namespace flashmoe
