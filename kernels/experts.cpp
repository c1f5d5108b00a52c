#include "kernels/experts.h"

#include <algorithm>

#include "kernels/backends.h"

namespace flashmoe {

namespace {
void check_inputs(const ExpertInputs& in) {
  FLASHMOE_CHECK(in.x.defined() && in.x.rank() == 2,
                 "x has shape " << shape_string(in.x.shape()) << ", expected [T, D]");
  FLASHMOE_CHECK(
      in.down_embed.defined() && in.down_embed.rank() == 2,
      "down_embed has shape " << shape_string(in.down_embed.shape()) << ", expected [E, D]");
  FLASHMOE_CHECK(in.ids.defined() && in.ids.rank() == 2,
                 "expert ids have shape " << shape_string(in.ids.shape()) << ", expected [T, S]");
  const int64_t T = in.x.size(0), D = in.x.size(1), E = in.down_embed.size(0);
  const int64_t S = in.ids.size(1);
  FLASHMOE_CHECK(D >= 1 && E >= 1, "x is " << shape_string(in.x.shape()) << " and down_embed is "
                                           << shape_string(in.down_embed.shape())
                                           << ", expected D >= 1 and E >= 1");
  expect_shape(in.down_embed, {E, D}, "down_embed");
  expect_shape(in.up_embed, {E, D}, "up_embed");
  expect_shape(in.ids, {T, S}, "expert ids");
  expect_shape(in.gates, {T, S}, "gates");
  expect_float(in.x, "x");
  expect_dtype(in.down_embed, in.x.dtype(), "down_embed");
  expect_dtype(in.up_embed, in.x.dtype(), "up_embed");
  expect_dtype(in.ids, DType::i32, "expert ids");
  expect_dtype(in.gates, DType::f32, "gates");
  const Device device = in.x.device();
  expect_device(in.down_embed, device, "down_embed");
  expect_device(in.up_embed, device, "up_embed");
  expect_device(in.ids, device, "expert ids");
  expect_device(in.gates, device, "gates");
}
}  // namespace

void experts_forward(const ExpertInputs& in, Tensor& y, Tensor& h) {
  check_inputs(in);
  ensure(y, in.x.shape(), in.x.dtype(), in.x.device());
  ensure(h, in.ids.shape(), DType::f32, in.x.device());
  if (in.x.device() == Device::cpu) {
    detail::experts_forward_cpu(in, y, h);
  } else {
    detail::experts_forward_cuda(in, y, h);
  }
}

ExpertInputs ExpertInputs::tokens(int64_t begin, int64_t end) const {
  ExpertInputs part = *this;
  part.x = x.rows(begin, end);
  part.ids = ids.rows(begin, end);
  part.gates = gates.rows(begin, end);
  return part;
}

namespace {
void allocate_rows_phase(const ExpertInputs& in, ExpertGrads& grads) {
  const Device device = in.x.device();
  ensure(grads.dx, in.x.shape(), in.x.dtype(), device);
  ensure(grads.dgates, in.ids.shape(), DType::f32, device);
  ensure(grads.slot_dh, in.ids.shape(), DType::f32, device);
  ensure(grads.slot_a, in.ids.shape(), DType::f32, device);
}
}  // namespace

ExpertGrads ExpertGrads::tokens(const ExpertInputs& in, int64_t begin, int64_t end) {
  allocate_rows_phase(in, *this);
  ExpertGrads part;
  part.dx = dx.rows(begin, end);
  part.dgates = dgates.rows(begin, end);
  part.slot_dh = slot_dh.rows(begin, end);
  part.slot_a = slot_a.rows(begin, end);
  return part;
}

void experts_backward_rows(const ExpertInputs& in, const Tensor& h, const Tensor& dy,
                           ExpertGrads& grads) {
  check_inputs(in);
  expect_tensor(h, in.ids.shape(), DType::f32, in.x.device(), "h");
  expect_tensor(dy, in.x.shape(), in.x.dtype(), in.x.device(), "dy");
  allocate_rows_phase(in, grads);
  if (in.x.device() == Device::cpu) {
    detail::experts_backward_rows_cpu(in, h, dy, grads);
  } else {
    detail::experts_backward_rows_cuda(in, h, dy, grads);
  }
}

void experts_backward_tables(const ExpertInputs& in, const Tensor& dy, GradLayout layout,
                             ExpertGrads& grads) {
  check_inputs(in);
  const Device device = in.x.device();
  expect_tensor(dy, in.x.shape(), in.x.dtype(), device, "dy");
  expect_tensor(grads.slot_dh, in.ids.shape(), DType::f32, device, "slot dh");
  expect_tensor(grads.slot_a, in.ids.shape(), DType::f32, device, "slot a");
  const int64_t E = in.down_embed.size(0), D = in.x.size(1);
  if (layout == GradLayout::dense) {
    ensure(grads.d_down, {E, D}, DType::f32, device);
    ensure(grads.d_up, {E, D}, DType::f32, device);
  } else {
    const int64_t R = std::min(E, in.ids.numel());
    ensure(grads.rows, {R}, DType::i32, device);
    ensure(grads.d_down, {R, D}, DType::f32, device);
    ensure(grads.d_up, {R, D}, DType::f32, device);
  }
  if (device == Device::cpu) {
    detail::experts_backward_tables_cpu(in, dy, layout, grads);
  } else {
    detail::experts_backward_tables_cuda(in, dy, layout, grads);
  }
}

void experts_backward(const ExpertInputs& in, const Tensor& h, const Tensor& dy, GradLayout layout,
                      ExpertGrads& grads) {
  experts_backward_rows(in, h, dy, grads);
  ExpertInputs checked = in;
  checked.validate_ids = false;  // the rows phase has checked them
  experts_backward_tables(checked, dy, layout, grads);
}

}  // namespace flashmoe
