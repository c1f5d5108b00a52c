// Helpers for ops that keep their CPU and CUDA bodies side by side:
//   for_each_index(device, n, op, name): op(i) for every i < n, as a loop on the CPU
//       or a grid-stride kernel on the current stream. `op` is a small copyable
//       functor with a FLASHMOE_HD call operator, so one body serves both backends.
//   for_each_pack(device, n, row_width, op, name, pointers): op.template operator()<W>(i)
//       for i = 0, W, 2W, ... < n, where op handles elements [i, i + W) (load_lanes,
//       store_lanes). W = kPack on the GPU when n and row_width are multiples of it
//       and every pointer is 16-byte aligned (packs never straddle a row), else 1.
//       Without row_width, the array is one row.
//   for_each_element(device, rows, width, op, name): op(r, c) for every r < rows and
//       c < width; on the CPU as nested loops, so that whatever op derives from r alone
//       is hoisted out of the inner loop.
//   with_storage_type(dtype, f): f.template operator()<T>() with T = float or bf16.
//   check_ids_in_range(ids, limit, name): on the CPU, every int32 id in [0, limit) or a
//       one-line error naming the first one that is not (GPU ops handle bad ids
//       without a host sync instead, see each op).
#pragma once

#include <cstdint>
#include <initializer_list>

#include "core/divide.h"
#include "core/error.h"
#include "core/tensor.h"
#include "kernels/elementwise.cuh"
#include "kernels/warp.cuh"

namespace flashmoe {

template <class Op>
__global__ void for_each_index_kernel(Op op, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    op(i);
  }
}

template <class Op>
void for_each_index(Device device, int64_t n, Op op, const char* name) {
  if (device == Device::cpu) {
    for (int64_t i = 0; i < n; ++i) op(i);
    return;
  }
  if (n == 0) return;
  for_each_index_kernel<<<grid_for(n, 256), 256, 0, current_stream()>>>(op, n);
  CUDA_CHECK_LAUNCH(name);
}

template <int W, class Op>
__global__ void for_each_pack_kernel(Op op, int64_t packs) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < packs;
       i += int64_t(gridDim.x) * blockDim.x) {
    op.template operator()<W>(i * W);
  }
}

// Elements per pack: 16 bytes of bf16, two 16-byte accesses of fp32.
constexpr int kPack = 8;

// Whether kPack-element packs can serve arrays of these extents (all multiples of
// kPack, so no pack straddles a row) at these pointers (all 16-byte aligned).
inline bool packable(std::initializer_list<int64_t> extents,
                     std::initializer_list<const void*> pointers) {
  for (int64_t e : extents) {
    if (e % kPack != 0) return false;
  }
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

template <class Op>
void for_each_pack(Device device, int64_t n, int64_t row_width, Op op, const char* name,
                   std::initializer_list<const void*> pointers) {
  if (device == Device::cpu) {
    for (int64_t i = 0; i < n; ++i) op.template operator()<1>(i);
    return;
  }
  if (n == 0) return;
  if (packable({n, row_width}, pointers)) {
    for_each_pack_kernel<kPack>
        <<<grid_for(n / kPack, 256), 256, 0, current_stream()>>>(op, n / kPack);
  } else {
    for_each_pack_kernel<1><<<grid_for(n, 256), 256, 0, current_stream()>>>(op, n);
  }
  CUDA_CHECK_LAUNCH(name);
}

// The same over a flat array: packs need only n to be a multiple of kPack.
template <class Op>
void for_each_pack(Device device, int64_t n, Op op, const char* name,
                   std::initializer_list<const void*> pointers) {
  for_each_pack(device, n, n, op, name, pointers);
}

template <class Op>
struct RowColumnOp {
  Op op;
  int64_t width;
  FLASHMOE_HD void operator()(int64_t i) const {
    const auto [row, column] = divide(i, width);
    op(row, column);
  }
};

template <class Op>
void for_each_element(Device device, int64_t rows, int64_t width, Op op, const char* name) {
  if (device == Device::cpu) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < width; ++c) op(r, c);
    }
    return;
  }
  for_each_index(device, rows * width, RowColumnOp<Op>{op, width}, name);
}

template <class F>
void with_storage_type(DType dtype, F f) {
  FLASHMOE_CHECK(dtype == DType::f32 || dtype == DType::bf16,
                 "storage dtype is " << dtype_name(dtype) << ", expected fp32 or bf16");
  if (dtype == DType::f32) {
    f.template operator()<float>();
  } else {
    f.template operator()<bf16>();
  }
}

inline void check_ids_in_range(const Tensor& ids, int64_t limit, const char* name) {
  const int32_t* p = ids.data<int32_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    FLASHMOE_CHECK(p[i] >= 0 && p[i] < limit, name << " " << p[i] << " at position " << i
                                                   << " is out of range, expected [0, " << limit
                                                   << ")");
  }
}

}  // namespace flashmoe
