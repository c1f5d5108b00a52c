// Element-wise ops and the batch norm on the GPU against the same ops on the CPU, over
// shapes that take both the packed (8 elements per access) and the element-wise
// path: widths that are and are not multiples of 8, odd row counts, and row views
// whose data is not 16-byte aligned. Outputs start poisoned (NaN bytes), so an
// element the GPU leaves unwritten fails the comparison.
#include <gtest/gtest.h>

#include "kernels/elementwise.h"
#include "kernels/norm.h"
#include "kernels/swiglu.h"
#include "parallel/expert_parallel.h"
#include "tests/test_util.h"

namespace flashmoe {
namespace {

using test::bytes_of;
using test::poisoned;
using test::relative_error;

struct Shape2 {
  int64_t M, D;
};
const Shape2 kShapes[] = {{1, 1}, {7, 13}, {33, 40}, {5, 8}, {1000, 1024}, {4097, 96}, {3, 2056}};

Tensor random_tensor(int64_t M, int64_t D, DType dtype, Device device, uint64_t seed) {
  return Tensor::from_floats(test::uniforms(M * D, seed, 7, -2.0f, 3.0f), {M, D}, dtype, device);
}

// fp32 results may differ from the CPU's by contraction and libm ulps; bf16 by one
// rounding of the stored value.
double tolerance(DType dtype) { return dtype == DType::f32 ? 1e-6 : 1e-2; }

class OpsGpu : public testing::TestWithParam<DType> {};

TEST_P(OpsGpu, SwigluMatchesCpu) {
  FLASHMOE_REQUIRE_GPU();
  const DType dtype = GetParam();
  for (const Shape2& s : kShapes) {
    SCOPED_TRACE(testing::Message() << "M=" << s.M << " I=" << s.D);
    const Tensor gate_up = random_tensor(s.M, 2 * s.D, dtype, Device::cpu, 1),
                 dhidden = random_tensor(s.M, s.D, dtype, Device::cpu, 2);
    Tensor hidden, dgate_up;
    swiglu_forward(gate_up, Activation::silu, hidden);
    swiglu_backward(gate_up, dhidden, Activation::silu, dgate_up);
    const Tensor gate_up_gpu = gate_up.to(Device::cuda), dhidden_gpu = dhidden.to(Device::cuda);
    for (int run = 0; run < 2; ++run) {
      Tensor hidden_gpu = poisoned({s.M, s.D}, dtype),
             dgate_up_gpu = poisoned({s.M, 2 * s.D}, dtype);
      swiglu_forward(gate_up_gpu, Activation::silu, hidden_gpu);
      swiglu_backward(gate_up_gpu, dhidden_gpu, Activation::silu, dgate_up_gpu);
      EXPECT_LT(relative_error(hidden_gpu, hidden), tolerance(dtype));
      EXPECT_LT(relative_error(dgate_up_gpu, dgate_up), tolerance(dtype));
    }
  }
}

TEST_P(OpsGpu, BatchnormMatchesCpuAndRepeats) {
  FLASHMOE_REQUIRE_GPU();
  const DType dtype = GetParam();
  for (const Shape2& s : kShapes) {
    SCOPED_TRACE(testing::Message() << "M=" << s.M << " D=" << s.D);
    const Tensor x = random_tensor(s.M, s.D, dtype, Device::cpu, 3),
                 dy = random_tensor(s.M, s.D, dtype, Device::cpu, 4);
    auto run = [&](Device device) {
      BatchNorm bn;
      bn.running_mean = Tensor::zeros({s.D}, DType::f32, device);
      bn.running_var = Tensor::empty({s.D}, DType::f32, device);
      bn.running_var.fill(1.0f);
      BatchNormSaved saved;
      Tensor y, dx;
      if (device == Device::cuda) y = poisoned({s.M, s.D}, dtype), dx = poisoned({s.M, s.D}, dtype);
      batchnorm_forward(bn, x.to(device), true, y, saved);
      batchnorm_backward(bn, x.to(device), saved, dy.to(device), dx);
      return std::vector<Tensor>{y.to(Device::cpu), dx.to(Device::cpu),
                                 bn.running_mean.to(Device::cpu), bn.running_var.to(Device::cpu)};
    };
    const std::vector<Tensor> cpu = run(Device::cpu), gpu = run(Device::cuda),
                              again = run(Device::cuda);
    const char* names[] = {"y", "dx", "running_mean", "running_var"};
    for (size_t i = 0; i < cpu.size(); ++i) {
      EXPECT_LT(relative_error(gpu[i], cpu[i]), tolerance(dtype)) << names[i];
      EXPECT_EQ(gpu[i].to_floats(), again[i].to_floats())
          << names[i] << " is not bitwise repeatable";
    }
  }
}

TEST_P(OpsGpu, AddAndConvertMatchCpuOnUnalignedViews) {
  FLASHMOE_REQUIRE_GPU();
  const DType dtype = GetParam();
  for (const Shape2& s : kShapes) {
    for (int64_t first_row : {0, 1}) {
      SCOPED_TRACE(testing::Message() << "M=" << s.M << " D=" << s.D << " from row " << first_row);
      const Tensor a_full = random_tensor(s.M + 1, s.D, dtype, Device::cpu, 5),
                   a_full_gpu = a_full.to(Device::cuda),
                   b = random_tensor(s.M, s.D, dtype, Device::cpu, 6), b_gpu = b.to(Device::cuda);
      const Tensor a = a_full.rows(first_row, first_row + s.M),
                   a_gpu = a_full_gpu.rows(first_row, first_row + s.M);
      Tensor sum, accumulated = Tensor::zeros({s.M, s.D}, DType::f32, Device::cpu),
                  converted = Tensor::empty({s.M, s.D}, DType::f32, Device::cpu);
      add(a, b, sum);
      add_into(a, accumulated);
      convert(a, converted);
      Tensor sum_gpu = poisoned({s.M, s.D}, dtype),
             converted_gpu = poisoned({s.M, s.D}, DType::f32),
             accumulated_gpu = Tensor::zeros({s.M, s.D}, DType::f32, Device::cuda);
      add(a_gpu, b_gpu, sum_gpu);
      add_into(a_gpu, accumulated_gpu);
      convert(a_gpu, converted_gpu);
      // Additions and conversions round identically on both backends.
      EXPECT_EQ(sum_gpu.to_floats(), sum.to_floats());
      EXPECT_EQ(accumulated_gpu.to_floats(), accumulated.to_floats());
      EXPECT_EQ(converted_gpu.to_floats(), converted.to_floats());
    }
  }
}

// The expert exchange's sum of the owners' partials: the same bytes as the CPU's, run
// after run, for 1 to 5 blocks with the own block at the start, middle and end.
TEST_P(OpsGpu, SumBlocksMatchesCpuBitwise) {
  FLASHMOE_REQUIRE_GPU();
  const DType dtype = GetParam();
  for (const Shape2& s : kShapes) {
    for (int blocks : {1, 2, 3, 5}) {
      for (int own : {0, blocks / 2, blocks - 1}) {
        SCOPED_TRACE(testing::Message()
                     << "M=" << s.M << " D=" << s.D << " blocks=" << blocks << " own=" << own);
        const Tensor inbox = random_tensor(blocks * s.M, s.D, dtype, Device::cpu, 3),
                     own_block = random_tensor(s.M, s.D, dtype, Device::cpu, 4);
        Tensor sum;
        detail::sum_blocks(inbox, own_block, own, sum);
        const Tensor inbox_gpu = inbox.to(Device::cuda), own_gpu = own_block.to(Device::cuda);
        for (int run = 0; run < 2; ++run) {
          Tensor sum_gpu = poisoned({s.M, s.D}, dtype);
          detail::sum_blocks(inbox_gpu, own_gpu, own, sum_gpu);
          ASSERT_EQ(sum_gpu.to_floats(), sum.to_floats());
        }
      }
    }
  }
}

// The peer-copy dispatch's routing split: the CPU's bytes, run after run, and block
// `own` of the split left as it was (poisoned), since the own buffers take it.
TEST(ExchangeOpsGpu, SplitRoutingMatchesCpuBitwise) {
  FLASHMOE_REQUIRE_GPU();
  const int64_t local_experts = 5;
  for (const Shape2& s : {Shape2{1, 1}, Shape2{7, 16}, Shape2{333, 13}, Shape2{4097, 16}}) {
    for (int owners : {1, 2, 3, 4}) {
      for (int own : {0, owners - 1}) {
        SCOPED_TRACE(testing::Message()
                     << "T=" << s.M << " S=" << s.D << " owners=" << owners << " own=" << own);
        const Tensor ids =
            Tensor::from_vector(test::ids_with_empties(s.M * s.D, owners * local_experts, owners),
                                {s.M, s.D}, Device::cpu);
        const Tensor gates = random_tensor(s.M, s.D, DType::f32, Device::cpu, 8);
        Tensor split_ids, split_gates,
            own_ids = Tensor::empty({s.M, s.D}, DType::i32, Device::cpu),
            own_gates = Tensor::empty({s.M, s.D}, DType::f32, Device::cpu);
        detail::split_routing(ids, gates, owners, local_experts, own, split_ids, split_gates,
                              own_ids, own_gates);
        const Tensor ids_gpu = ids.to(Device::cuda), gates_gpu = gates.to(Device::cuda);
        for (int run = 0; run < 2; ++run) {
          Tensor split_ids_gpu = poisoned({owners * s.M, s.D}, DType::i32),
                 split_gates_gpu = poisoned({owners * s.M, s.D}, DType::f32),
                 own_ids_gpu = poisoned({s.M, s.D}, DType::i32),
                 own_gates_gpu = poisoned({s.M, s.D}, DType::f32);
          detail::split_routing(ids_gpu, gates_gpu, owners, local_experts, own, split_ids_gpu,
                                split_gates_gpu, own_ids_gpu, own_gates_gpu);
          ASSERT_EQ(bytes_of(own_ids_gpu), bytes_of(own_ids));
          ASSERT_EQ(bytes_of(own_gates_gpu), bytes_of(own_gates));
          for (int p = 0; p < owners; ++p) {
            const int64_t begin = p * s.M, end = begin + s.M;
            for (const auto& [gpu, cpu] : {std::pair{&split_ids_gpu, &split_ids},
                                           std::pair{&split_gates_gpu, &split_gates}}) {
              const std::vector<uint8_t> got = bytes_of(gpu->rows(begin, end));
              if (p == own) {  // untouched: every byte still 0xFF
                EXPECT_EQ(got, std::vector<uint8_t>(got.size(), 0xFF)) << "owner " << p;
              } else {
                ASSERT_EQ(got, bytes_of(cpu->rows(begin, end))) << "owner " << p;
              }
            }
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, OpsGpu, testing::Values(DType::f32, DType::bf16),
                         [](const testing::TestParamInfo<DType>& info) {
                           return std::string(dtype_name(info.param));
                         });

}  // namespace
}  // namespace flashmoe
