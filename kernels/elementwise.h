// Small element-wise ops shared by the layer and the model, CPU and CUDA side by
// side in elementwise.cu:
//   add:          out = a + b                (fp32, bf16 or fp64, one dtype)
//   add_into:     out += a                   (fp32, bf16 or fp64 in any mix)
// fp32 arithmetic for fp32 and bf16, fp64 when both operands are fp64.
//   convert:      dst = src                  (fp32 <-> bf16, bf16 rounds to nearest even)
//   init_uniform: t[i] = U(-bound, bound) from Philox(seed, stream, offset + i): the same
//                 bits on every backend, and a shard starting at element `offset` of a
//                 larger tensor gets exactly that tensor's values.
#pragma once

#include <cstdint>

#include "core/parameter.h"
#include "core/tensor.h"

namespace flashmoe {

void add(const Tensor& a, const Tensor& b, Tensor& out);
void add_into(const Tensor& a, Tensor& out);
void convert(const Tensor& src, Tensor& dst);
void init_uniform(Tensor& t, uint64_t seed, uint64_t stream, float bound, int64_t offset = 0);

// 1/sqrt(fan_in), the bound of PyTorch's default linear initialisation; 0 for fan_in 0.
float fan_in_bound(int64_t fan_in);

// A parameter of `shape` drawn by init_uniform with bound fan_in_bound(fan_in), and a
// zero fp32 gradient of the same shape.
Parameter uniform_parameter(std::string name, Shape shape, DType dtype, Device device,
                            uint64_t seed, uint64_t stream, int64_t fan_in);

}  // namespace flashmoe
