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

__global__ void round_pairs(const float* lo, const float* hi, int n, uint32_t* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = to_bf16x2(lo[i], hi[i]);
}

// to_bf16x2 on the device (one cvt for both halves, to_bf16's path for NaNs) against
// to_bf16 on the host: both signs of zeros, subnormals, ties to even, values that round
// up to infinity, infinities, quiet and signalling NaNs with payloads, and random bit
// patterns, each in the low and in the high half.
TEST(Bf16Gpu, PairRoundingMatchesHost) {
  FLASHMOE_REQUIRE_GPU();
  std::vector<uint32_t> bits = {0x00000000u, 0x00000001u, 0x00008000u, 0x00018000u, 0x007fffffu,
                                0x00800000u, 0x3f808000u, 0x3f818000u, 0x3f80ffffu, 0x3f807fffu,
                                0x7f7f7fffu, 0x7f7f8000u, 0x7f7fffffu, 0x7f800000u, 0x7f800001u,
                                0x7fa12345u, 0x7fc00000u, 0x7fffffffu};
  const size_t specials = bits.size();
  for (size_t i = 0; i < specials; ++i) bits.push_back(bits[i] | 0x80000000u);
  uint64_t state = 2026;
  while (bits.size() < 100003) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    bits.push_back(static_cast<uint32_t>(state >> 32));
  }
  const int n = static_cast<int>(bits.size());
  std::vector<int32_t> lo(n), hi(n);
  for (int i = 0; i < n; ++i) {
    lo[i] = static_cast<int32_t>(bits[i]);
    hi[i] = static_cast<int32_t>(bits[(int64_t(i) * 7 + 3) % n]);
  }
  const Tensor dev_lo = Tensor::from_vector(lo, {n}, Device::cuda);
  const Tensor dev_hi = Tensor::from_vector(hi, {n}, Device::cuda);
  Tensor out = Tensor::empty({n}, DType::i32, Device::cuda);
  round_pairs<<<(n + 255) / 256, 256>>>(reinterpret_cast<const float*>(dev_lo.data<int32_t>()),
                                        reinterpret_cast<const float*>(dev_hi.data<int32_t>()), n,
                                        reinterpret_cast<uint32_t*>(out.data<int32_t>()));
  CUDA_CHECK_LAUNCH("round_pairs");
  const std::vector<int32_t> got = out.to_vector<int32_t>();
  for (int i = 0; i < n; ++i) {
    const uint32_t want = uint32_t(to_bf16(bits_float(uint32_t(lo[i]))).bits) |
                          (uint32_t(to_bf16(bits_float(uint32_t(hi[i]))).bits) << 16);
    ASSERT_EQ(uint32_t(got[i]), want)
        << std::hex << "inputs 0x" << uint32_t(lo[i]) << ", 0x" << uint32_t(hi[i]);
  }
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
