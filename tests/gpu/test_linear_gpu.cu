// The cuBLASLt products of kernels/linear.h against the CPU's blocked loops, with and
// without a GemmSmMargin (which makes cuBLASLt choose its algorithms for fewer
// multiprocessors, down to one): odd sizes, K that is not a power of two, both dtypes,
// the weight gradient overwritten and accumulated. Outputs start poisoned, and each
// result must repeat bit for bit.
#include <gtest/gtest.h>

#include "kernels/linear.h"
#include "tests/test_util.h"

namespace flashmoe {
namespace {

using test::poisoned;
using test::relative_error;

struct Product {
  int64_t M, K, N;
};
const Product kProducts[] = {
    {1, 1, 1}, {7, 13, 5}, {33, 40, 17}, {4097, 96, 130}, {2048, 256, 1024}};

Tensor random_tensor(int64_t rows, int64_t cols, DType dtype, uint64_t seed) {
  return Tensor::from_floats(test::uniforms(rows * cols, seed, 11, -1.0f, 1.0f), {rows, cols},
                             dtype, Device::cpu);
}

// y = x W^T, dx = dy W, dW = dy^T x, then dW += dy^T x.
std::vector<Tensor> products(const Tensor& x, const Tensor& w, const Tensor& dy, Device device) {
  const Tensor xd = x.to(device), wd = w.to(device), dyd = dy.to(device);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  Tensor y, dx, dw;
  if (device == Device::cuda) {
    y = poisoned({M, N}, x.dtype());
    dx = poisoned({M, K}, x.dtype());
    dw = poisoned({N, K}, DType::f32);
  }
  linear_forward(xd, wd, y);
  linear_backward_input(dyd, wd, dx);
  linear_backward_weight(dyd, xd, dw, /*accumulate=*/false);
  Tensor dw_twice = Tensor::empty({N, K}, DType::f32, device);
  dw_twice.copy_from(dw);
  linear_backward_weight(dyd, xd, dw_twice, /*accumulate=*/true);
  return {y.to(Device::cpu), dx.to(Device::cpu), dw.to(Device::cpu), dw_twice.to(Device::cpu)};
}

class LinearGpu : public testing::TestWithParam<DType> {};

TEST_P(LinearGpu, MatchesCpuWithAndWithoutSmMargin) {
  FLASHMOE_REQUIRE_GPU();
  const DType dtype = GetParam();
  // bf16 rounds y and dx once when stored; fp32 outputs differ by the order of the sums.
  const double stored_tolerance = dtype == DType::f32 ? 1e-5 : 1e-2, fp32_tolerance = 1e-5;
  const char* names[] = {"y", "dx", "dW", "dW accumulated"};
  for (const Product& p : kProducts) {
    const Tensor x = random_tensor(p.M, p.K, dtype, 1), w = random_tensor(p.N, p.K, dtype, 2),
                 dy = random_tensor(p.M, p.N, dtype, 3);
    const std::vector<Tensor> cpu = products(x, w, dy, Device::cpu);
    for (int margin : {0, 16, 1 << 20}) {
      SCOPED_TRACE(testing::Message()
                   << "M=" << p.M << " K=" << p.K << " N=" << p.N << " SM margin " << margin);
      GemmSmMargin leave(margin);
      const std::vector<Tensor> gpu = products(x, w, dy, Device::cuda),
                                again = products(x, w, dy, Device::cuda);
      for (size_t i = 0; i < cpu.size(); ++i) {
        EXPECT_LT(relative_error(gpu[i], cpu[i]), i < 2 ? stored_tolerance : fp32_tolerance)
            << names[i];
        EXPECT_EQ(gpu[i].to_floats(), again[i].to_floats())
            << names[i] << " is not bitwise repeatable";
      }
    }
  }
}

TEST(LinearSmMargin, RejectsANegativeMargin) {
  test::expect_one_line_error([] { GemmSmMargin leave(-1); }, {"SM margin of -1", ">= 0"});
}

INSTANTIATE_TEST_SUITE_P(Dtypes, LinearGpu, testing::Values(DType::f32, DType::bf16),
                         [](const testing::TestParamInfo<DType>& info) {
                           return std::string(dtype_name(info.param));
                         });

}  // namespace
}  // namespace flashmoe
