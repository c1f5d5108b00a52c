// Tensor: a shape, a dtype and a device over reference-counted storage. Always
// contiguous (row-major); a view shares the storage of its parent at an element
// offset. Allocation happens only in the factories, so a layer that allocates
// its workspaces once never allocates again.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "core/bf16.h"
#include "core/error.h"

namespace flashmoe {

enum class DType : uint8_t { f32, bf16, i32, i64, f64 };
enum class Device : uint8_t { cpu, cuda };

size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);
const char* device_name(Device device);

template <class T>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<float>() {
  return DType::f32;
}
template <>
constexpr DType dtype_of<bf16>() {
  return DType::bf16;
}
template <>
constexpr DType dtype_of<double>() {
  return DType::f64;
}
template <>
constexpr DType dtype_of<int32_t>() {
  return DType::i32;
}
template <>
constexpr DType dtype_of<int64_t>() {
  return DType::i64;
}

using Shape = std::vector<int64_t>;
std::string shape_string(const Shape& shape);

class Tensor {
 public:
  Tensor() = default;

  static Tensor empty(Shape shape, DType dtype, Device device);
  static Tensor zeros(Shape shape, DType dtype, Device device);
  // Host values converted to `dtype` (bf16 rounds to nearest even), placed on `device`.
  static Tensor from_floats(const std::vector<float>& values, Shape shape, DType dtype,
                            Device device);
  template <class T>
  static Tensor from_vector(const std::vector<T>& values, Shape shape, Device device);
  // A tensor over memory that the caller owns and keeps alive while the tensor (and the
  // work queued on it) is in use, e.g. a peer's buffer mapped into this process.
  static Tensor borrow(void* data, Shape shape, DType dtype, Device device);

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t size(int dim) const;
  int64_t numel() const;
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }

  void* raw() const;
  template <class T>
  T* data() const {
    FLASHMOE_CHECK(dtype_of<T>() == dtype_, "tensor holds " << dtype_name(dtype_)
                                                            << ", accessed as "
                                                            << dtype_name(dtype_of<T>()));
    return static_cast<T*>(raw());
  }

  // Same storage, new shape with the same element count.
  Tensor view(Shape shape) const;
  // Rows [begin, end) along dimension 0, sharing storage.
  Tensor rows(int64_t begin, int64_t end) const;

  // A copy on `device` (or with `dtype`), always new storage.
  Tensor to(Device device) const;
  Tensor to(DType dtype) const;
  // Element-wise copy of equal shape and dtype, across devices.
  void copy_from(const Tensor& src);
  // Every element set to the byte pattern `byte` (poisoning in tests, zeroing).
  void fill_bytes(uint8_t byte);
  // Every element set to `value` converted to this tensor's dtype.
  void fill(float value);

  std::vector<float> to_floats() const;
  std::vector<double> to_doubles() const;
  template <class T>
  std::vector<T> to_vector() const;

 private:
  // A tensor over the start of `storage`, which holds at least its bytes.
  static Tensor over(std::shared_ptr<uint8_t> storage, Shape shape, DType dtype, Device device);

  std::shared_ptr<uint8_t> storage_;
  size_t offset_bytes_ = 0;
  Shape shape_;
  DType dtype_ = DType::f32;
  Device device_ = Device::cpu;
};

// Makes `t` a tensor of this shape, dtype and device, allocating only when it is not
// one already: workspaces and outputs allocated once are reused call after call.
void ensure(Tensor& t, const Shape& shape, DType dtype, Device device);

// Argument checks shared by every op: the error names the argument and what was expected.
void expect_shape(const Tensor& t, const Shape& shape, const char* name);
void expect_dtype(const Tensor& t, DType dtype, const char* name);
void expect_device(const Tensor& t, Device device, const char* name);
void expect_float(const Tensor& t, const char* name);  // f32 or bf16
// All three of shape, dtype and device, in that order.
void expect_tensor(const Tensor& t, const Shape& shape, DType dtype, Device device,
                   const char* name);

// Bytes of device memory held by tensors now, and the most held since the last reset
// (the benchmarks' peak-memory figure; library workspaces are tensors too).
int64_t device_bytes_in_use();
int64_t device_bytes_peak();
void reset_device_bytes_peak();

// True when a CUDA device can be used by this process.
bool cuda_available();

}  // namespace flashmoe
