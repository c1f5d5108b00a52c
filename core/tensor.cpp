#include "core/tensor.h"

#include <cuda_runtime.h>

#include <atomic>
#include <cstring>
#include <sstream>

#include "core/stream.h"

namespace flashmoe {

namespace {
std::atomic<int64_t> g_device_bytes{0}, g_device_peak{0};
}  // namespace

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::f32: return 4;
    case DType::bf16: return 2;
    case DType::i32: return 4;
    case DType::i64: return 8;
    case DType::f64: return 8;
  }
  FLASHMOE_FAIL("unknown dtype " << static_cast<int>(dtype));
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32: return "fp32";
    case DType::bf16: return "bf16";
    case DType::i32: return "int32";
    case DType::i64: return "int64";
    case DType::f64: return "fp64";
  }
  return "unknown";
}

const char* device_name(Device device) { return device == Device::cpu ? "cpu" : "cuda"; }

std::string shape_string(const Shape& shape) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << "]";
  return os.str();
}

int64_t device_bytes_in_use() { return g_device_bytes.load(); }
int64_t device_bytes_peak() { return g_device_peak.load(); }
void reset_device_bytes_peak() { g_device_peak.store(g_device_bytes.load()); }

bool cuda_available() {
  static const bool available = [] {
    int count = 0;
    return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
  }();
  return available;
}

namespace {

void count_device_bytes(int64_t delta) {
  const int64_t now = g_device_bytes.fetch_add(delta) + delta;
  int64_t peak = g_device_peak.load();
  while (now > peak && !g_device_peak.compare_exchange_weak(peak, now)) {
  }
}

std::shared_ptr<uint8_t> allocate(size_t bytes, Device device) {
  if (bytes == 0) bytes = 1;  // a valid pointer even for empty tensors
  if (device == Device::cpu) {
    auto* p = static_cast<uint8_t*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64));
    FLASHMOE_CHECK(p, "host allocation of " << bytes << " bytes failed");
    return std::shared_ptr<uint8_t>(p, [](uint8_t* q) { std::free(q); });
  }
  FLASHMOE_CHECK(cuda_available(), "a cuda tensor was requested but no CUDA device is available");
  void* p = nullptr;
  CUDA_CHECK(cudaMalloc(&p, bytes));
  count_device_bytes(static_cast<int64_t>(bytes));
  return std::shared_ptr<uint8_t>(static_cast<uint8_t*>(p), [bytes](uint8_t* q) {
    cudaFree(q);
    count_device_bytes(-static_cast<int64_t>(bytes));
  });
}

int64_t checked_numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    FLASHMOE_CHECK(d >= 0, "shape " << shape_string(shape) << " has a negative dimension");
    n *= d;
  }
  return n;
}
}  // namespace

Tensor Tensor::over(std::shared_ptr<uint8_t> storage, Shape shape, DType dtype, Device device) {
  Tensor t;
  t.storage_ = std::move(storage);
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.device_ = device;
  return t;
}

Tensor Tensor::empty(Shape shape, DType dtype, Device device) {
  const int64_t n = checked_numel(shape);
  return over(allocate(static_cast<size_t>(n) * dtype_size(dtype), device), std::move(shape), dtype,
              device);
}

Tensor Tensor::borrow(void* data, Shape shape, DType dtype, Device device) {
  FLASHMOE_CHECK(data != nullptr, "borrowed tensor of shape " << shape_string(shape)
                                                              << " has no memory, expected a "
                                                                 "valid pointer");
  checked_numel(shape);
  return over(std::shared_ptr<uint8_t>(static_cast<uint8_t*>(data), [](uint8_t*) {}),
              std::move(shape), dtype, device);
}

Tensor Tensor::zeros(Shape shape, DType dtype, Device device) {
  Tensor t = empty(std::move(shape), dtype, device);
  t.fill_bytes(0);
  return t;
}

Tensor Tensor::from_floats(const std::vector<float>& values, Shape shape, DType dtype,
                           Device device) {
  FLASHMOE_CHECK(static_cast<int64_t>(values.size()) == checked_numel(shape),
                 values.size() << " values given for shape " << shape_string(shape));
  FLASHMOE_CHECK(dtype == DType::f32 || dtype == DType::bf16,
                 "from_floats needs fp32 or bf16, got " << dtype_name(dtype));
  Tensor host = empty(shape, dtype, Device::cpu);
  if (dtype == DType::f32) {
    std::memcpy(host.raw(), values.data(), values.size() * sizeof(float));
  } else {
    bf16* out = host.data<bf16>();
    for (size_t i = 0; i < values.size(); ++i) out[i] = to_bf16(values[i]);
  }
  return device == Device::cpu ? host : host.to(device);
}

template <class T>
Tensor Tensor::from_vector(const std::vector<T>& values, Shape shape, Device device) {
  FLASHMOE_CHECK(static_cast<int64_t>(values.size()) == checked_numel(shape),
                 values.size() << " values given for shape " << shape_string(shape));
  Tensor host = empty(std::move(shape), dtype_of<T>(), Device::cpu);
  std::memcpy(host.raw(), values.data(), values.size() * sizeof(T));
  return device == Device::cpu ? host : host.to(device);
}

int64_t Tensor::size(int dim) const {
  FLASHMOE_CHECK(dim >= 0 && dim < rank(),
                 "dimension " << dim << " requested of a rank-" << rank() << " tensor");
  return shape_[dim];
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape_) n *= d;
  return n;
}

void* Tensor::raw() const {
  FLASHMOE_CHECK(defined(), "access to an undefined tensor");
  return storage_.get() + offset_bytes_;
}

Tensor Tensor::view(Shape shape) const {
  FLASHMOE_CHECK(checked_numel(shape) == numel(), "cannot view a tensor of shape "
                                                      << shape_string(shape_) << " as "
                                                      << shape_string(shape));
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::rows(int64_t begin, int64_t end) const {
  FLASHMOE_CHECK(
      rank() >= 1 && 0 <= begin && begin <= end && end <= shape_[0],
      "rows [" << begin << ", " << end << ") of a tensor of shape " << shape_string(shape_));
  Tensor t = *this;
  t.shape_[0] = end - begin;
  int64_t row_elems = shape_[0] ? numel() / shape_[0] : 0;
  t.offset_bytes_ += static_cast<size_t>(begin * row_elems) * dtype_size(dtype_);
  return t;
}

Tensor Tensor::to(Device device) const {
  Tensor t = empty(shape_, dtype_, device);
  t.copy_from(*this);
  return t;
}

Tensor Tensor::to(DType dtype) const {
  FLASHMOE_CHECK((dtype_ == DType::f32 || dtype_ == DType::bf16) &&
                     (dtype == DType::f32 || dtype == DType::bf16),
                 "conversion " << dtype_name(dtype_) << " -> " << dtype_name(dtype)
                               << " is not supported, expected fp32 <-> bf16");
  return from_floats(to_floats(), shape_, dtype, device_);
}

void Tensor::copy_from(const Tensor& src) {
  FLASHMOE_CHECK(src.shape_ == shape_ && src.dtype_ == dtype_,
                 "copy of a " << dtype_name(src.dtype_) << " tensor of shape "
                              << shape_string(src.shape_) << " into a " << dtype_name(dtype_)
                              << " tensor of shape " << shape_string(shape_));
  if (nbytes() == 0) return;
  if (device_ == Device::cpu && src.device_ == Device::cpu) {
    std::memcpy(raw(), src.raw(), nbytes());
  } else if (device_ == Device::cuda && src.device_ == Device::cuda) {
    CUDA_CHECK(
        cudaMemcpyAsync(raw(), src.raw(), nbytes(), cudaMemcpyDeviceToDevice, current_stream()));
  } else {
    CUDA_CHECK(cudaMemcpy(raw(), src.raw(), nbytes(), cudaMemcpyDefault));
  }
}

void Tensor::fill_bytes(uint8_t byte) {
  if (nbytes() == 0) return;
  if (device_ == Device::cpu) {
    std::memset(raw(), byte, nbytes());
  } else {
    CUDA_CHECK(cudaMemsetAsync(raw(), byte, nbytes(), current_stream()));
  }
}

void Tensor::fill(float value) {
  FLASHMOE_CHECK(dtype_ == DType::f32 || dtype_ == DType::bf16,
                 "fill needs an fp32 or bf16 tensor, got " << dtype_name(dtype_));
  copy_from(from_floats(std::vector<float>(numel(), value), shape_, dtype_, Device::cpu));
}

std::vector<float> Tensor::to_floats() const {
  std::vector<float> out(numel());
  Tensor host = device_ == Device::cpu ? *this : to(Device::cpu);
  switch (dtype_) {
    case DType::f32: std::memcpy(out.data(), host.raw(), nbytes()); break;
    case DType::bf16:
      for (size_t i = 0; i < out.size(); ++i) out[i] = to_float(host.data<bf16>()[i]);
      break;
    case DType::i32:
      for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(host.data<int32_t>()[i]);
      break;
    case DType::i64:
      for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(host.data<int64_t>()[i]);
      break;
    case DType::f64:
      for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(host.data<double>()[i]);
      break;
  }
  return out;
}

std::vector<double> Tensor::to_doubles() const {
  if (dtype_ == DType::f64) return to_vector<double>();
  std::vector<float> f = to_floats();
  return std::vector<double>(f.begin(), f.end());
}

template <class T>
std::vector<T> Tensor::to_vector() const {
  Tensor host = device_ == Device::cpu ? *this : to(Device::cpu);
  const T* p = host.data<T>();
  return std::vector<T>(p, p + numel());
}

template Tensor Tensor::from_vector(const std::vector<float>&, Shape, Device);
template Tensor Tensor::from_vector(const std::vector<double>&, Shape, Device);
template Tensor Tensor::from_vector(const std::vector<bf16>&, Shape, Device);
template Tensor Tensor::from_vector(const std::vector<int32_t>&, Shape, Device);
template Tensor Tensor::from_vector(const std::vector<int64_t>&, Shape, Device);
template std::vector<float> Tensor::to_vector() const;
template std::vector<double> Tensor::to_vector() const;
template std::vector<bf16> Tensor::to_vector() const;
template std::vector<int32_t> Tensor::to_vector() const;
template std::vector<int64_t> Tensor::to_vector() const;

void ensure(Tensor& t, const Shape& shape, DType dtype, Device device) {
  if (t.defined() && t.shape() == shape && t.dtype() == dtype && t.device() == device) return;
  t = Tensor::empty(shape, dtype, device);
}

void expect_shape(const Tensor& t, const Shape& shape, const char* name) {
  FLASHMOE_CHECK(t.defined(), name << " is undefined, expected shape " << shape_string(shape));
  FLASHMOE_CHECK(t.shape() == shape, name << " has shape " << shape_string(t.shape())
                                          << ", expected " << shape_string(shape));
}

void expect_dtype(const Tensor& t, DType dtype, const char* name) {
  FLASHMOE_CHECK(t.dtype() == dtype, name << " has dtype " << dtype_name(t.dtype()) << ", expected "
                                          << dtype_name(dtype));
}

void expect_device(const Tensor& t, Device device, const char* name) {
  FLASHMOE_CHECK(t.device() == device, name << " is on " << device_name(t.device()) << ", expected "
                                            << device_name(device));
}

void expect_tensor(const Tensor& t, const Shape& shape, DType dtype, Device device,
                   const char* name) {
  expect_shape(t, shape, name);
  expect_dtype(t, dtype, name);
  expect_device(t, device, name);
}

void expect_float(const Tensor& t, const char* name) {
  FLASHMOE_CHECK(t.dtype() == DType::f32 || t.dtype() == DType::bf16,
                 name << " has dtype " << dtype_name(t.dtype()) << ", expected fp32 or bf16");
}

}  // namespace flashmoe
