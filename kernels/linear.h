// Dense linear maps for the shared SwiGLU branch, the router projection and the
// model: row-major x [M, K], weight W [N, K] (PyTorch's layout), y [M, N].
//   forward:         y  = x · W^T
//   input gradient:  dx = dy · W
//   weight gradient: dW = dy^T · x      (or dW += dy^T · x when accumulating)
// x, W, y, dy, dx are fp32 or bf16 (one dtype per call), except that the forward may
// write y in fp32 from bf16 operands (the router's logits); dW is fp32. Products
// accumulate in fp32: cuBLASLt on the GPU (fixed algorithm per shape, so results
// repeat bit for bit), blocked loops on the CPU.
#pragma once

#include "core/tensor.h"

namespace flashmoe {

// y in `out_dtype`: x's dtype or fp32.
void linear_forward(const Tensor& x, const Tensor& w, Tensor& y);
void linear_forward(const Tensor& x, const Tensor& w, Tensor& y, DType out_dtype);
void linear_backward_input(const Tensor& dy, const Tensor& w, Tensor& dx);
void linear_backward_weight(const Tensor& dy, const Tensor& x, Tensor& dw, bool accumulate);

// While a scope lives, the GPU products this thread queues leave `sms` multiprocessors
// free (cuBLASLt's SM count target): for products on a side stream beside latency-bound
// work. cuBLASLt's persistent kernels otherwise hold every multiprocessor until they
// end, and stream priorities cannot give any of them to the other stream's kernels.
class GemmSmMargin {
 public:
  explicit GemmSmMargin(int sms);
  ~GemmSmMargin();
  GemmSmMargin(const GemmSmMargin&) = delete;
  GemmSmMargin& operator=(const GemmSmMargin&) = delete;

 private:
  int previous_;
};

namespace detail {
// C = alpha * op(A) · op(B) + beta * C in cuBLAS's column-major convention;
// A, B of dtype `in`, C of dtype `out` (fp32 accumulation).
struct GemmArgs {
  bool trans_a, trans_b;
  int64_t m, n, k;
  const void* a;
  int64_t lda;
  const void* b;
  int64_t ldb;
  void* c;
  int64_t ldc;
  DType in, out;
  float beta;
};
void gemm_cuda(const GemmArgs& args);

// `count` independent products of the same shape, operand i at a + i * stride_a
// (elements), b + i * stride_b, c + i * stride_c: strided batched cuBLASLt.
struct GemmBatch {
  int64_t count = 1;
  int64_t stride_a = 0, stride_b = 0, stride_c = 0;
};
void gemm_cuda_batched(const GemmArgs& args, const GemmBatch& batch);
}  // namespace detail

}  // namespace flashmoe
