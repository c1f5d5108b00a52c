#include <gtest/gtest.h>

#include "core/philox.h"
#include "core/stream.h"
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

// Sleeps about `milliseconds`, then sets *flag to 1.
__global__ void sleep_then_raise(int* flag, int milliseconds) {
  for (int i = 0; i < milliseconds * 10; ++i) __nanosleep(100000);
  *static_cast<volatile int*>(flag) = 1;
}

__global__ void copy_flag(const int* flag, int* out) {
  *out = *static_cast<const volatile int*>(flag);
}

// What the current stream sees of `flag` after side.join(), when the side stream raises
// it after a long sleep: forked says whether the sleep was queued after a fork().
int flag_seen_after_join(SideStream& side, bool forked) {
  Tensor flag = Tensor::zeros({1}, DType::i32, Device::cuda);
  Tensor seen = Tensor::zeros({1}, DType::i32, Device::cuda);
  CUDA_CHECK(cudaStreamSynchronize(side.stream()));
  synchronize_stream();
  if (forked) side.fork();
  sleep_then_raise<<<1, 1, 0, side.stream()>>>(flag.data<int>(), 200);
  CUDA_CHECK_LAUNCH("sleep_then_raise");
  side.join();
  copy_flag<<<1, 1, 0, current_stream()>>>(flag.data<int>(), seen.data<int>());
  CUDA_CHECK_LAUNCH("copy_flag");
  synchronize_stream();
  const int result = seen.to_vector<int32_t>()[0];
  CUDA_CHECK(cudaStreamSynchronize(side.stream()));
  return result;
}

// join() waits for the work queued after a fork(), and queues no wait when nothing was
// forked since the last join() (the layer joins its side streams often, mostly idle).
TEST(SideStreamGpu, JoinWaitsOnlyAfterAFork) {
  FLASHMOE_REQUIRE_GPU();
  SideStream side;
  EXPECT_EQ(flag_seen_after_join(side, /*forked=*/true), 1);
  // Work queued without a fork breaks the contract: the join does not wait for it.
  EXPECT_EQ(flag_seen_after_join(side, /*forked=*/false), 0);
}

}  // namespace
}  // namespace flashmoe
