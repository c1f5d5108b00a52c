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

// A slot as the owner of experts [first_expert, first_expert + local_experts) keeps
// it: the local id and the gate where it owns the expert, else an empty slot (-1, 0).
// An empty slot (id < 0) stays empty, since first_expert >= 0.
FLASHMOE_HD void own_slot(int64_t id, float gate, int64_t first_expert, int64_t local_experts,
                          int32_t& local_id, float& local_gate) {
  const int64_t local = id - first_expert;
  const bool mine = local >= 0 && local < local_experts;
  local_id = mine ? static_cast<int32_t>(local) : -1;
  local_gate = mine ? gate : 0.0f;
}

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
    const int64_t at = i / S * stride + i % S;
    own_slot(ids_in[at], gate_value(gates_in[at]), first_expert, local_experts, ids[i], gates[i]);
  }
};

// Slot i of this rank's routing as every owner sees it: owner p gets the local id and the
// gate where it owns the expert, else an empty slot, at ids[p] + i (block `own` at
// own_ids + i instead).
struct SplitRouting {
  const int32_t* global_ids;
  const float* global_gates;
  int64_t slots, local_experts;
  int owners, own;
  int32_t* ids;
  float* gates;
  int32_t* own_ids;
  float* own_gates;
  FLASHMOE_HD void operator()(int64_t i) const {
    const int32_t id = global_ids[i];  // read once: the stores below may alias it
    const float gate = global_gates[i];
    for (int p = 0; p < owners; ++p) {
      int32_t* id_out = p == own ? own_ids : ids + p * slots;
      float* gate_out = p == own ? own_gates : gates + p * slots;
      own_slot(id, gate, p * local_experts, local_experts, id_out[i], gate_out[i]);
    }
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

// out = the sum over p < blocks of block p [n] of the inbox, or `own_block` for p = own,
// in that order, in fp32.
template <class T>
struct SumBlocks {
  const T* inbox;
  const T* own_block;
  int64_t n;
  int blocks, own;
  T* out;
  template <int W>
  FLASHMOE_HD void operator()(int64_t i) const {
    float sum[W] = {};
    for (int p = 0; p < blocks; ++p) {
      const Lanes<W, T> v = load_lanes<W>(p == own ? own_block : inbox + p * n, i);
      for (int k = 0; k < W; ++k) sum[k] += load_float(v.v, k);
    }
    Lanes<W, T> r;
    for (int k = 0; k < W; ++k) store_float(r.v, k, sum[k]);
    store_lanes<W>(out, i, r);
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
  expect_tensor(global_gates, global_ids.shape(), DType::f32, global_ids.device(), "gates");
  const int64_t S = global_ids.size(1);
  own_slots(global_ids.device(),
            OwnRouting<float>{global_ids.data<int32_t>(), global_gates.data<float>(), S, S,
                              first_expert, local_experts},
            global_ids.size(0), ids, gates);
}

void split_routing(const Tensor& global_ids, const Tensor& global_gates, int owners,
                   int64_t local_experts, int own, Tensor& ids, Tensor& gates, Tensor& own_ids,
                   Tensor& own_gates) {
  expect_dtype(global_ids, DType::i32, "expert ids");
  FLASHMOE_CHECK(
      global_ids.rank() == 2 && owners >= 1 && own >= 0 && own < owners && local_experts >= 1,
      "routing split of ids " << shape_string(global_ids.shape()) << " over " << owners
                              << " owners of " << local_experts << " experts, own " << own
                              << ", expected ids [T, S] and 0 <= own < owners");
  expect_tensor(global_gates, global_ids.shape(), DType::f32, global_ids.device(), "gates");
  const int64_t T = global_ids.size(0), S = global_ids.size(1);
  const Device device = global_ids.device();
  ensure(ids, {owners * T, S}, DType::i32, device);
  ensure(gates, {owners * T, S}, DType::f32, device);
  expect_tensor(own_ids, {T, S}, DType::i32, device, "own ids");
  expect_tensor(own_gates, {T, S}, DType::f32, device, "own gates");
  for_each_index(device, T * S,
                 SplitRouting{global_ids.data<int32_t>(), global_gates.data<float>(), T * S,
                              local_experts, owners, own, ids.data<int32_t>(), gates.data<float>(),
                              own_ids.data<int32_t>(), own_gates.data<float>()},
                 "split_routing");
}

void sum_blocks(const Tensor& inbox, const Tensor& own_block, int own, Tensor& out) {
  if (own_block.defined() && own_block.numel() == 0) {
    ensure(out, own_block.shape(), own_block.dtype(), own_block.device());
    return;
  }
  FLASHMOE_CHECK(own_block.defined() && own_block.rank() >= 1 && inbox.defined() &&
                     inbox.size(0) % own_block.size(0) == 0 &&
                     inbox.numel() / inbox.size(0) == own_block.numel() / own_block.size(0) &&
                     own >= 0 && own < inbox.size(0) / own_block.size(0),
                 "sum of blocks: inbox " << shape_string(inbox.shape()) << ", own block "
                                         << shape_string(own_block.shape()) << " at " << own
                                         << ", expected an inbox of whole blocks that holds block "
                                         << own);
  const int blocks = static_cast<int>(inbox.size(0) / own_block.size(0));
  expect_dtype(inbox, own_block.dtype(), "inbox");
  expect_device(inbox, own_block.device(), "inbox");
  ensure(out, own_block.shape(), own_block.dtype(), own_block.device());
  with_storage_type(own_block.dtype(), [&]<class T>() {
    const SumBlocks<T> op{inbox.data<T>(), own_block.data<T>(), own_block.numel(), blocks, own,
                          out.data<T>()};
    for_each_pack(own_block.device(), own_block.numel(), op, "sum_blocks",
                  {op.inbox, op.own_block, op.out});
  });
}

void count_filled(const Tensor& ids, Tensor& count, Tensor& workspace) {
  expect_dtype(ids, DType::i32, "expert ids");
  ensure(count, {1}, DType::f64, ids.device());
  column_sum<double>(ids.device(), FilledSlot{ids.data<int32_t>()}, ids.numel(), 1,
                     count.data<double>(), workspace);
}

}  // namespace flashmoe::detail
