// The CPU backend of the router and expert ops: the float reference on host
// tensors. bf16 inputs are widened to float, and bf16 outputs rounded back.
#include <algorithm>
#include <cstring>

#include "kernels/backends.h"
#include "kernels/reference.h"

namespace flashmoe::detail {

namespace {
std::vector<float> floats(const Tensor& t) { return t.to_floats(); }

// Writes float values into a host tensor of dtype fp32 or bf16.
void store(const std::vector<float>& values, Tensor& out) {
  out.copy_from(Tensor::from_floats(values, out.shape(), out.dtype(), Device::cpu));
}

ref::RouterShape router_shape(const Tensor& logits, int top_k) {
  return {logits.size(0), static_cast<int>(logits.size(1)), static_cast<int>(logits.size(3)),
          top_k};
}

ref::ExpertShape expert_shape(const ExpertInputs& in) {
  return {in.x.size(0), in.x.size(1), in.down_embed.size(0), in.ids.size(1)};
}

void check_ids(const ExpertInputs& in) {
  const int64_t E = in.down_embed.size(0);
  const int32_t* ids = in.ids.data<int32_t>();
  for (int64_t i = 0; i < in.ids.numel(); ++i) {
    FLASHMOE_CHECK(ids[i] < E, "expert id " << ids[i] << " at position " << i
                                            << ", expected 0 <= id < E = " << E
                                            << " (or id < 0: an empty slot)");
  }
}
}  // namespace

void router_forward_cpu(const Tensor& logits, int top_k, bool norm_topk_prob, RouterOutputs& out) {
  ref::router_forward(router_shape(logits, top_k), floats(logits).data(), norm_topk_prob,
                      out.expert_ids.data<int32_t>(), out.gates.data<float>(),
                      out.logsumexp.data<float>());
}

void router_backward_cpu(const Tensor& logits, const RouterOutputs& saved, const Tensor& dgates,
                         bool norm_topk_prob, Tensor& dlogits) {
  ref::router_backward(router_shape(logits, static_cast<int>(saved.gates.size(2))),
                       floats(logits).data(), saved.expert_ids.data<int32_t>(),
                       saved.gates.data<float>(), saved.logsumexp.data<float>(),
                       dgates.data<float>(), norm_topk_prob, dlogits.data<float>());
}

void experts_forward_cpu(const ExpertInputs& in, Tensor& y, Tensor& h) {
  if (in.validate_ids) check_ids(in);
  std::vector<float> y_values(y.numel());
  ref::experts_forward(expert_shape(in), in.act, floats(in.x).data(), floats(in.down_embed).data(),
                       floats(in.up_embed).data(), in.ids.data<int32_t>(), in.gates.data<float>(),
                       y_values.data(), h.data<float>());
  store(y_values, y);
}

void experts_backward_rows_cpu(const ExpertInputs& in, const Tensor& h, const Tensor& dy,
                               ExpertGrads& grads) {
  if (in.validate_ids) check_ids(in);
  std::vector<float> dx(in.x.numel());
  ref::experts_backward_rows(
      expert_shape(in), in.act, floats(in.down_embed).data(), floats(in.up_embed).data(),
      in.ids.data<int32_t>(), in.gates.data<float>(), h.data<float>(), floats(dy).data(), dx.data(),
      grads.dgates.data<float>(), grads.slot_dh.data<float>(), grads.slot_a.data<float>());
  store(dx, grads.dx);
}

void experts_backward_tables_cpu(const ExpertInputs& in, const Tensor& dy, GradLayout layout,
                                 ExpertGrads& grads) {
  if (in.validate_ids) check_ids(in);
  const ref::ExpertShape shape = expert_shape(in);
  const int64_t D = shape.dim;
  std::vector<float> d_down(shape.num_experts * D), d_up(shape.num_experts * D);
  ref::experts_backward_tables(shape, floats(in.x).data(), in.ids.data<int32_t>(),
                               grads.slot_dh.data<float>(), grads.slot_a.data<float>(),
                               floats(dy).data(), d_down.data(), d_up.data());
  if (layout == GradLayout::dense) {
    store(d_down, grads.d_down);
    store(d_up, grads.d_up);
    return;
  }
  const std::vector<int32_t> touched = ref::touched_experts(in.ids.data<int32_t>(), in.ids.numel());
  int32_t* rows = grads.rows.data<int32_t>();
  std::fill(rows, rows + grads.rows.numel(), -1);
  grads.d_down.fill_bytes(0);
  grads.d_up.fill_bytes(0);
  for (size_t r = 0; r < touched.size(); ++r) {
    rows[r] = touched[r];
    std::memcpy(grads.d_down.data<float>() + r * D, d_down.data() + touched[r] * D,
                D * sizeof(float));
    std::memcpy(grads.d_up.data<float>() + r * D, d_up.data() + touched[r] * D, D * sizeof(float));
  }
}

}  // namespace flashmoe::detail
