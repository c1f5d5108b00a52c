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

// A gate as the routing holds it: a float, or its bits packed beside the ids.
FLASHMOE_HD float gate_value(float gate) { return gate; }
FLASHMOE_HD float gate_value(int32_t bits) { return bits_float(static_cast<uint32_t>(bits)); }

// Row t of the routing: S global ids at ids_in + t * stride, their gates at
// gates_in + t * stride.
template <class Gate>
struct OwnRouting {
  const int32_t* ids_in;
  const Gate* gates_in;
  int64_t stride, S, first_expert, local_experts;
  int32_t* ids = nullptr;
  float* gates = nullptr;
  FLASHMOE_HD void operator()(int64_t i) const {
    // An empty slot (id < 0) lands below 0 too, since first_expert >= 0.
    const int64_t at = i / S * stride + i % S, local = int64_t(ids_in[at]) - first_expert;
    const bool mine = local >= 0 && local < local_experts;
    ids[i] = mine ? static_cast<int32_t>(local) : -1;
    gates[i] = mine ? gate_value(gates_in[at]) : 0.0f;
  }
};

template <class Gate>
void own_slots(Device device, OwnRouting<Gate> op, int64_t rows, Tensor& ids, Tensor& gates) {
  ensure(ids, {rows, op.S}, DType::i32, device);
  ensure(gates, {rows, op.S}, DType::f32, device);
  op.ids = ids.data<int32_t>();
  op.gates = gates.data<float>();
  for_each_index(device, rows * op.S, op, "own_routing");
}

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
  expect_dtype(gathered, DType::i32, "gathered routing");
  const int64_t S = gathered.size(1) / 2;
  const int32_t* routing = gathered.data<int32_t>();
  own_slots(gathered.device(),
            OwnRouting<int32_t>{routing, routing + S, 2 * S, S, first_expert, local_experts},
            gathered.size(0), ids, gates);
}

void own_routing(const Tensor& global_ids, const Tensor& global_gates, int64_t first_expert,
                 int64_t local_experts, Tensor& ids, Tensor& gates) {
  expect_dtype(global_ids, DType::i32, "expert ids");
  expect_shape(global_gates, global_ids.shape(), "gates");
  expect_dtype(global_gates, DType::f32, "gates");
  const int64_t S = global_ids.size(1);
  own_slots(global_ids.device(),
            OwnRouting<float>{global_ids.data<int32_t>(), global_gates.data<float>(), S, S,
                              first_expert, local_experts},
            global_ids.size(0), ids, gates);
}

void count_filled(const Tensor& ids, Tensor& count, Tensor& workspace) {
  expect_dtype(ids, DType::i32, "expert ids");
  ensure(count, {1}, DType::f64, ids.device());
  column_sum<double>(ids.device(), FilledSlot{ids.data<int32_t>()}, ids.numel(), 1,
                     count.data<double>(), workspace);
}

}  // namespace flashmoe::detail
