#include "kernels/linear.h"

#include <vector>

namespace flashmoe {

namespace {
void check_pair(const Tensor& a, const char* a_name, const Tensor& b, const char* b_name) {
  FLASHMOE_CHECK(a.defined() && a.rank() == 2,
                 a_name << " has shape " << shape_string(a.shape()) << ", expected a matrix");
  FLASHMOE_CHECK(b.defined() && b.rank() == 2,
                 b_name << " has shape " << shape_string(b.shape()) << ", expected a matrix");
  expect_float(a, a_name);
  expect_dtype(b, a.dtype(), b_name);
  expect_device(b, a.device(), b_name);
}

// Row-major C[M, N] (+)= sum_k A(m, k) * B(k, n) on host floats, where A and B are
// read through strides so one loop serves all three products.
struct HostMatrix {
  const float* data;
  int64_t row_stride, col_stride;
  float at(int64_t r, int64_t c) const { return data[r * row_stride + c * col_stride]; }
};

void host_matmul(HostMatrix a, HostMatrix b, int64_t M, int64_t N, int64_t K, float* c,
                 bool accumulate) {
  // B laid out row-major first, so the inner loop runs over contiguous memory.
  std::vector<float> b_rows(K * N);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t n = 0; n < N; ++n) b_rows[k * N + n] = b.at(k, n);
  }
  std::vector<float> row(N);
  for (int64_t m = 0; m < M; ++m) {
    std::fill(row.begin(), row.end(), 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      const float am = a.at(m, k);
      const float* bk = b_rows.data() + k * N;
      for (int64_t n = 0; n < N; ++n) row[n] += am * bk[n];
    }
    for (int64_t n = 0; n < N; ++n) c[m * N + n] = accumulate ? c[m * N + n] + row[n] : row[n];
  }
}

void store(const std::vector<float>& values, Tensor& out) {
  out.copy_from(Tensor::from_floats(values, out.shape(), out.dtype(), Device::cpu));
}
}  // namespace

void linear_forward(const Tensor& x, const Tensor& w, Tensor& y) {
  linear_forward(x, w, y, x.dtype());
}

void linear_forward(const Tensor& x, const Tensor& w, Tensor& y, DType out_dtype) {
  check_pair(x, "x", w, "weight");
  FLASHMOE_CHECK(out_dtype == x.dtype() || out_dtype == DType::f32,
                 "linear output dtype " << dtype_name(out_dtype) << ", expected "
                                        << dtype_name(x.dtype()) << " or fp32");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  FLASHMOE_CHECK(w.size(1) == K, "weight has shape " << shape_string(w.shape()) << ", expected ["
                                                     << N << ", " << K << "] to match x");
  ensure(y, {M, N}, out_dtype, x.device());
  if (x.device() == Device::cuda) {
    // Column-major: y^T [N, M] = W [K, N]^T · x^T [K, M].
    detail::gemm_cuda(
        {true, false, N, M, K, w.raw(), K, x.raw(), K, y.raw(), N, x.dtype(), y.dtype(), 0.0f});
    return;
  }
  const std::vector<float> xf = x.to_floats(), wf = w.to_floats();
  std::vector<float> out(M * N);
  host_matmul({xf.data(), K, 1}, {wf.data(), 1, K}, M, N, K, out.data(), false);
  store(out, y);
}

void linear_backward_input(const Tensor& dy, const Tensor& w, Tensor& dx) {
  check_pair(dy, "dy", w, "weight");
  const int64_t M = dy.size(0), N = dy.size(1), K = w.size(1);
  FLASHMOE_CHECK(w.size(0) == N, "weight has shape " << shape_string(w.shape()) << ", expected ["
                                                     << N << ", K] to match dy");
  ensure(dx, {M, K}, dy.dtype(), dy.device());
  if (dy.device() == Device::cuda) {
    // Column-major: dx^T [K, M] = W^T [K, N] · dy^T [N, M].
    detail::gemm_cuda({false, false, K, M, N, w.raw(), K, dy.raw(), N, dx.raw(), K, dy.dtype(),
                       dx.dtype(), 0.0f});
    return;
  }
  const std::vector<float> dyf = dy.to_floats(), wf = w.to_floats();
  std::vector<float> out(M * K);
  host_matmul({dyf.data(), N, 1}, {wf.data(), K, 1}, M, K, N, out.data(), false);
  store(out, dx);
}

void linear_backward_weight(const Tensor& dy, const Tensor& x, Tensor& dw, bool accumulate) {
  check_pair(dy, "dy", x, "x");
  const int64_t M = dy.size(0), N = dy.size(1), K = x.size(1);
  FLASHMOE_CHECK(x.size(0) == M, "x has " << x.size(0) << " rows, expected " << M << " as dy");
  if (accumulate) {
    expect_tensor(dw, {N, K}, DType::f32, dy.device(), "weight gradient");
  } else {
    ensure(dw, {N, K}, DType::f32, dy.device());
  }
  if (dy.device() == Device::cuda) {
    // Column-major: dW^T [K, N] = x^T [K, M] · dy [M, N].
    detail::gemm_cuda({false, true, K, N, M, x.raw(), K, dy.raw(), N, dw.raw(), K, dy.dtype(),
                       DType::f32, accumulate ? 1.0f : 0.0f});
    return;
  }
  const std::vector<float> dyf = dy.to_floats(), xf = x.to_floats();
  host_matmul({dyf.data(), 1, N}, {xf.data(), K, 1}, N, K, M, dw.data<float>(), accumulate);
}

}  // namespace flashmoe
