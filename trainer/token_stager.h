// Moves host token batches to the device without stalling the host: each batch is
// copied into one of two pinned buffers and sent with an asynchronous copy on the op
// stream. Before a pinned buffer is reused, the host waits only for the copy issued
// from it two batches ago, so the host may run up to two micro-batches ahead.
#pragma once

#include <cuda_runtime.h>

#include <vector>

#include "core/tensor.h"

namespace flashmoe {

class TokenStager {
 public:
  explicit TokenStager(Device device) : device_(device) {}
  ~TokenStager();
  TokenStager(const TokenStager&) = delete;
  TokenStager& operator=(const TokenStager&) = delete;

  // values [rows, cols] int32 -> a tensor on the device, valid until the call after next.
  const Tensor& stage(const std::vector<int32_t>& values, int64_t rows, int64_t cols);

 private:
  struct Slot {
    int32_t* pinned = nullptr;
    size_t capacity = 0;
    cudaEvent_t copied = nullptr;
    Tensor device;  // the staged batch (on the host for the CPU backend)
  };
  Device device_;
  Slot slots_[2];
  int next_ = 0;
};

}  // namespace flashmoe
