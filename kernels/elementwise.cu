#include <cmath>

#include "core/philox.h"
#include "kernels/elementwise.h"
#include "kernels/op_utils.cuh"

namespace flashmoe {

namespace {

template <class A, class B, class Out>
struct AddOp {
  const A* a;
  const B* b;
  Out* out;
  template <int W>
  FLASHMOE_HD void operator()(int64_t i) const {
    const Lanes<W, A> x = load_lanes<W>(a, i);
    const Lanes<W, B> y = load_lanes<W>(b, i);
    Lanes<W, Out> sum;
    for (int k = 0; k < W; ++k) store_float(sum.v, k, load_float(x.v, k) + load_float(y.v, k));
    store_lanes(out, i, sum);
  }
};

template <class Src, class Dst>
struct ConvertOp {
  const Src* src;
  Dst* dst;
  template <int W>
  FLASHMOE_HD void operator()(int64_t i) const {
    const Lanes<W, Src> x = load_lanes<W>(src, i);
    Lanes<W, Dst> y;
    for (int k = 0; k < W; ++k) store_float(y.v, k, load_float(x.v, k));
    store_lanes(dst, i, y);
  }
};

template <class T>
struct UniformOp {
  T* out;
  uint64_t seed, stream;
  float bound;
  int64_t offset;
  FLASHMOE_HD void operator()(int64_t i) const {
    store_float(out, i, philox_uniform(seed, stream, offset + i, -bound, bound));
  }
};

// Calls f(p) with p a typed pointer to t's fp32, bf16 or fp64 data.
template <class F>
void with_float_data(const Tensor& t, F f) {
  switch (t.dtype()) {
    case DType::f32: f(t.data<float>()); break;
    case DType::bf16: f(t.data<bf16>()); break;
    case DType::f64: f(t.data<double>()); break;
    default:
      FLASHMOE_FAIL("tensor has dtype " << dtype_name(t.dtype())
                                        << ", expected fp32, bf16 or fp64");
  }
}

}  // namespace

void add(const Tensor& a, const Tensor& b, Tensor& out) {
  expect_tensor(b, a.shape(), a.dtype(), a.device(), "add operand b");
  ensure(out, a.shape(), a.dtype(), a.device());
  with_float_data(a, [&](auto* pa) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(pa)>>;
    for_each_pack(a.device(), a.numel(), AddOp<T, T, T>{pa, b.data<T>(), out.data<T>()}, "add",
                  {pa, b.raw(), out.raw()});
  });
}

void add_into(const Tensor& a, Tensor& out) {
  expect_shape(a, out.shape(), "add_into operand");
  expect_device(a, out.device(), "add_into operand");
  with_float_data(a, [&](auto* pa) {
    with_float_data(out, [&](auto* po) {
      using A = std::remove_pointer_t<decltype(pa)>;
      using O = std::remove_pointer_t<decltype(po)>;
      for_each_pack(a.device(), a.numel(), AddOp<O, A, O>{po, pa, po}, "add_into", {pa, po});
    });
  });
}

void convert(const Tensor& src, Tensor& dst) {
  expect_shape(dst, src.shape(), "convert destination");
  expect_device(dst, src.device(), "convert destination");
  with_float_data(src, [&](auto* ps) {
    with_float_data(dst, [&](auto* pd) {
      using S = std::remove_pointer_t<decltype(ps)>;
      using D = std::remove_pointer_t<decltype(pd)>;
      for_each_pack(src.device(), src.numel(), ConvertOp<S, D>{ps, pd}, "convert", {ps, pd});
    });
  });
}

void init_uniform(Tensor& t, uint64_t seed, uint64_t stream, float bound, int64_t offset) {
  with_float_data(t, [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    for_each_index(t.device(), t.numel(), UniformOp<T>{p, seed, stream, bound, offset},
                   "init_uniform");
  });
}

float fan_in_bound(int64_t fan_in) {
  return fan_in > 0 ? 1.0f / std::sqrt(static_cast<float>(fan_in)) : 0.0f;
}

Parameter uniform_parameter(std::string name, Shape shape, DType dtype, Device device,
                            uint64_t seed, uint64_t stream, int64_t fan_in) {
  Parameter p;
  p.name = std::move(name);
  p.value = Tensor::empty(shape, dtype, device);
  init_uniform(p.value, seed, stream, fan_in_bound(fan_in));
  p.grad = Tensor::zeros(shape, DType::f32, device);
  return p;
}

}  // namespace flashmoe
