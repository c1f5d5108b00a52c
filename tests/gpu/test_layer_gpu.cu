// The FlashMoE layer on the GPU against the float64 CPU reference, CUDA-graph
// capture and replay, and bitwise determinism.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "core/graph.h"
#include "core/philox.h"
#include "core/stream.h"
#include "kernels/elementwise.h"
#include "kernels/flashmoe_layer.h"
#include "kernels/layer_reference.h"
#include "tests/layer_compare.h"

namespace flashmoe {
namespace {

using test::kLayerCases;
using test::LayerCase;
using test::moe_config;
using test::random_input;

TEST(LayerGpu, Fp32MatchesReference) {
  FLASHMOE_REQUIRE_GPU();
  for (const LayerCase& c : kLayerCases) {
    SCOPED_TRACE(testing::Message()
                 << "T=" << c.T << " D=" << c.D << " E=" << c.E << " H=" << c.H << " K=" << c.K);
    test::compare_with_reference(c, Device::cuda, DType::f32, 11, 1e-5);
  }
}

TEST(LayerGpu, Bf16MatchesReference) {
  FLASHMOE_REQUIRE_GPU();
  for (const LayerCase& c : kLayerCases) {
    SCOPED_TRACE(testing::Message()
                 << "T=" << c.T << " D=" << c.D << " E=" << c.E << " H=" << c.H << " K=" << c.K);
    test::compare_with_reference(c, Device::cuda, DType::bf16, 21, 1e-2);
  }
}

// Bytes of every output of a forward and backward.
std::vector<std::vector<float>> step_outputs(FlashMoELayer& layer, const Tensor& x,
                                             const Tensor& dy) {
  std::vector<std::vector<float>> out{layer.forward(x, true).to_floats()};
  out.push_back(layer.backward(dy).to_floats());
  layer.finish_backward();
  for (Parameter* p : layer.parameters()) out.push_back(p->grad.to_floats());
  return out;
}

TEST(LayerGpu, BitwiseDeterministic) {
  FLASHMOE_REQUIRE_GPU();
  const LayerCase c{1000, 256, 512, 4096, 2, 16, Activation::silu, RouterNorm::batchnorm, false};
  for (DType dtype : {DType::f32, DType::bf16}) {
    FlashMoELayer a(c.D, moe_config(c), Device::cuda, dtype, 5, 0);
    FlashMoELayer b(c.D, moe_config(c), Device::cuda, dtype, 5, 0);
    Tensor x = random_input({c.T, c.D}, dtype, Device::cuda, 1),
           dy = random_input({c.T, c.D}, dtype, Device::cuda, 2);
    EXPECT_EQ(step_outputs(a, x, dy), step_outputs(b, x, dy)) << dtype_name(dtype);
  }
}

TEST(LayerGpu, CudaGraphReplayEqualsEager) {
  FLASHMOE_REQUIRE_GPU();
  const LayerCase c{512, 128, 256, 1024, 2, 8, Activation::silu, RouterNorm::rmsnorm, true};
  FlashMoELayer eager(c.D, moe_config(c), Device::cuda, DType::bf16, 5, 0);
  FlashMoELayer graphed(c.D, moe_config(c), Device::cuda, DType::bf16, 5, 0);
  Tensor x = random_input({c.T, c.D}, DType::bf16, Device::cuda, 1),
         dy = random_input({c.T, c.D}, DType::bf16, Device::cuda, 2);
  const std::vector<std::vector<float>> want = step_outputs(eager, x, dy);

  Tensor x2 = random_input({c.T, c.D}, DType::bf16, Device::cuda, 3);
  const std::vector<std::vector<float>> want2 = step_outputs(eager, x2, dy);

  Tensor x_in = Tensor::empty({c.T, c.D}, DType::bf16, Device::cuda);
  x_in.copy_from(x);
  step_outputs(graphed, x_in, dy);  // the first call allocates every buffer
  Tensor y, dx;                     // share storage with the layer's output buffers
  CapturedGraph graph([&] {
    y = graphed.forward(x_in, true);
    dx = graphed.backward(dy);
    graphed.finish_backward();
  });
  // Each replay reads the input buffer as it is then and reproduces the eager step.
  for (const auto& [input, expected] : {std::pair{&x2, &want2}, std::pair{&x, &want}}) {
    x_in.copy_from(*input);
    graph.replay();
    synchronize_stream();
    EXPECT_EQ(y.to_floats(), (*expected)[0]) << "y";
    EXPECT_EQ(dx.to_floats(), (*expected)[1]) << "dx";
    std::vector<Parameter*> p = graphed.parameters();
    for (size_t i = 0; i < p.size(); ++i) {
      EXPECT_EQ(p[i]->grad.to_floats(), (*expected)[2 + i]) << p[i]->name;
    }
  }
}

}  // namespace
}  // namespace flashmoe
