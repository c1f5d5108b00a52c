// The routing's packing for the expert-parallel dispatch (parallel/expert_parallel.h),
// one body for the CPU and the GPU.
#include "core/bf16.h"
#include "kernels/column_sum.cuh"
#include "kernels/op_utils.cuh"
#include "parallel/expert_parallel.h"

namespace flashmoe::detail {

namespace {

struct PackRouting {
  const int32_t* ids;
  const float* gates;
  int64_t S;
  int32_t* routing;
  FLASHMOE_HD void operator()(int64_t i) const {
    const int64_t t = i / S, s = i % S;
    routing[t * 2 * S + s] = ids[i];
    routing[t * 2 * S + S + s] = static_cast<int32_t>(float_bits(gates[i]));
  }
};

struct OwnRouting {
  const int32_t* routing;
  int64_t S, first_expert, local_experts;
  int32_t* ids;
  float* gates;
  FLASHMOE_HD void operator()(int64_t i) const {
    // An empty slot (id < 0) lands below 0 too, since first_expert >= 0.
    const int32_t* row = routing + i / S * 2 * S;
    const int64_t s = i % S, local = int64_t(row[s]) - first_expert;
    const bool mine = local >= 0 && local < local_experts;
    ids[i] = mine ? static_cast<int32_t>(local) : -1;
    gates[i] = mine ? bits_float(static_cast<uint32_t>(row[S + s])) : 0.0f;
  }
};

struct FilledSlot {
  const int32_t* ids;
  FLASHMOE_HD double operator()(int64_t i, int64_t) const { return ids[i] >= 0 ? 1.0 : 0.0; }
};

}  // namespace

void pack_routing(const Tensor& ids, const Tensor& gates, Tensor& routing) {
  expect_dtype(ids, DType::i32, "expert ids");
  expect_shape(gates, ids.shape(), "gates");
  expect_dtype(gates, DType::f32, "gates");
  const int64_t T = ids.size(0), S = ids.size(1);
  ensure(routing, {T, 2 * S}, DType::i32, ids.device());
  for_each_index(ids.device(), T * S,
                 PackRouting{ids.data<int32_t>(), gates.data<float>(), S, routing.data<int32_t>()},
                 "pack_routing");
}

void own_routing(const Tensor& gathered, int64_t first_expert, int64_t local_experts, Tensor& ids,
                 Tensor& gates) {
  const int64_t R = gathered.size(0), S = gathered.size(1) / 2;
  ensure(ids, {R, S}, DType::i32, gathered.device());
  ensure(gates, {R, S}, DType::f32, gathered.device());
  for_each_index(gathered.device(), R * S,
                 OwnRouting{gathered.data<int32_t>(), S, first_expert, local_experts,
                            ids.data<int32_t>(), gates.data<float>()},
                 "own_routing");
}

void count_filled(const Tensor& ids, Tensor& count, Tensor& workspace) {
  expect_dtype(ids, DType::i32, "expert ids");
  ensure(count, {1}, DType::f64, ids.device());
  column_sum<double>(ids.device(), FilledSlot{ids.data<int32_t>()}, ids.numel(), 1,
                     count.data<double>(), workspace);
}

}  // namespace flashmoe::detail
