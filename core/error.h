// Error handling: every failure is a flashmoe::Error whose message is one line,
// "file:line: what is wrong (expected ...)". Every CUDA, cuBLAS, NCCL and MPI
// return code goes through one of the CHECK macros below.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace flashmoe {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

[[noreturn]] void throw_error(const char* file, int line, const std::string& message);

// Stream-style message building: FLASHMOE_CHECK(k > 0, "top_k is " << k << ", expected >= 1").
#define FLASHMOE_CHECK(cond, msg)                                            \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::ostringstream flashmoe_check_os_;                                 \
      flashmoe_check_os_ << msg;                                             \
      ::flashmoe::throw_error(__FILE__, __LINE__, flashmoe_check_os_.str()); \
    }                                                                        \
  } while (0)

#define FLASHMOE_FAIL(msg) FLASHMOE_CHECK(false, msg)

void check_cuda(int status, const char* expr, const char* file, int line);
void check_cublas(int status, const char* expr, const char* file, int line);
void check_nccl(int status, const char* expr, const char* file, int line);
void check_mpi(int status, const char* expr, const char* file, int line);
// After a kernel launch: launch-configuration errors surface here, not later.
void check_last_launch(const char* kernel, const char* file, int line);

#define CUDA_CHECK(expr) ::flashmoe::check_cuda(static_cast<int>(expr), #expr, __FILE__, __LINE__)
#define CUBLAS_CHECK(expr) \
  ::flashmoe::check_cublas(static_cast<int>(expr), #expr, __FILE__, __LINE__)
#define NCCL_CHECK(expr) ::flashmoe::check_nccl(static_cast<int>(expr), #expr, __FILE__, __LINE__)
#define MPI_CHECK(expr) ::flashmoe::check_mpi(static_cast<int>(expr), #expr, __FILE__, __LINE__)
#define CUDA_CHECK_LAUNCH(kernel) ::flashmoe::check_last_launch(kernel, __FILE__, __LINE__)

}  // namespace flashmoe
