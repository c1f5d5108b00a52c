// Routes a few random tokens through a small FlashMoE layer on the CPU backend and
// prints the experts each token picked: the smallest program that uses the library.
#include <cstdio>

#include "core/philox.h"
#include "kernels/flashmoe_layer.h"

int main() {
  using namespace flashmoe;
  MoeConfig moe;
  moe.num_experts = 64;
  moe.top_k = 4;
  moe.shared_intermediate = 32;
  const int64_t tokens = 3, dim = 16;
  FlashMoELayer layer(dim, moe, Device::cpu, DType::f32, /*seed=*/1, /*stream_base=*/0);
  std::vector<float> x(tokens * dim);
  for (size_t i = 0; i < x.size(); ++i) x[i] = philox_uniform(2, 0, i, -1.0f, 1.0f);
  layer.forward(Tensor::from_floats(x, {tokens, dim}, DType::f32, Device::cpu), /*training=*/true);
  std::vector<int32_t> ids = layer.routing().expert_ids.to_vector<int32_t>();
  std::vector<float> gates = layer.routing().gates.to_floats();
  for (int64_t t = 0; t < tokens; ++t) {
    std::printf("token %ld:", static_cast<long>(t));
    for (int64_t k = 0; k < moe.top_k; ++k) {
      std::printf(" %d (%.3f)", ids[t * moe.top_k + k], gates[t * moe.top_k + k]);
    }
    std::printf("\n");
  }
  return 0;
}
