#include <gtest/gtest.h>

#include "core/philox.h"
#include "core/tensor.h"
#include "tests/test_util.h"

namespace flashmoe {
namespace {

__global__ void philox_fill(float* out, uint64_t n, uint64_t seed, uint64_t stream) {
  uint64_t i = blockIdx.x * uint64_t(blockDim.x) + threadIdx.x;
  if (i < n) out[i] = philox_uniform(seed, stream, i, -0.37f, 0.81f);
}

TEST(PhiloxGpu, BitwiseEqualToHost) {
  FLASHMOE_REQUIRE_GPU();
  const uint64_t n = 100003;
  Tensor dev = Tensor::empty({int64_t(n)}, DType::f32, Device::cuda);
  philox_fill<<<(n + 255) / 256, 256>>>(dev.data<float>(), n, 1234, 5);
  CUDA_CHECK_LAUNCH("philox_fill");
  std::vector<float> got = dev.to_floats();
  for (uint64_t i = 0; i < n; ++i) {
    float want = philox_uniform(1234, 5, i, -0.37f, 0.81f);
    ASSERT_EQ(float_bits(got[i]), float_bits(want)) << "element " << i;
  }
}

TEST(TensorGpu, RoundTripAndBf16) {
  FLASHMOE_REQUIRE_GPU();
  Tensor host = Tensor::from_floats({1.5f, -2.0f, 0.3f}, {3}, DType::bf16, Device::cpu);
  Tensor dev = host.to(Device::cuda);
  EXPECT_EQ(dev.device(), Device::cuda);
  EXPECT_EQ(dev.to_floats(), host.to_floats());
}

}  // namespace
}  // namespace flashmoe
