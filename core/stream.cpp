#include "core/stream.h"

#include "core/error.h"

namespace flashmoe {

namespace {
// Created on first use as a blocking stream: work on the legacy default stream
// (synchronous cudaMemcpy of host data) stays ordered with it. It has the highest
// priority, and compute side streams the lowest: when a side branch overlaps the main
// one, the main branch's blocks are scheduled first as SMs free up, and the side
// branch fills what is left.
cudaStream_t process_stream() {
  static cudaStream_t stream = [] {
    int least = 0, greatest = 0;
    CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    cudaStream_t s = nullptr;
    CUDA_CHECK(cudaStreamCreateWithPriority(&s, cudaStreamDefault, greatest));
    return s;
  }();
  return stream;
}

thread_local cudaStream_t t_redirect = nullptr;
}  // namespace

cudaStream_t current_stream() { return t_redirect ? t_redirect : process_stream(); }

void synchronize_stream() { CUDA_CHECK(cudaStreamSynchronize(current_stream())); }

int current_device_attribute(cudaDeviceAttr attribute) {
  int device = 0, value = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

StreamScope::StreamScope(cudaStream_t stream) : previous_(t_redirect) { t_redirect = stream; }

StreamScope::~StreamScope() { t_redirect = previous_; }

SideStream::SideStream(StreamPriority priority) {
  int least = 0, greatest = 0;
  CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  CUDA_CHECK(cudaStreamCreateWithPriority(&stream_, cudaStreamDefault,
                                          priority == StreamPriority::high ? greatest : least));
  CUDA_CHECK(cudaEventCreateWithFlags(&forked_, cudaEventDisableTiming));
  CUDA_CHECK(cudaEventCreateWithFlags(&joined_, cudaEventDisableTiming));
}

SideStream::~SideStream() {
  cudaEventDestroy(forked_);
  cudaEventDestroy(joined_);
  cudaStreamDestroy(stream_);
}

void SideStream::fork() {
  CUDA_CHECK(cudaEventRecord(forked_, current_stream()));
  CUDA_CHECK(cudaStreamWaitEvent(stream_, forked_, 0));
  pending_ = true;
}

void SideStream::join() {
  if (!pending_) return;
  pending_ = false;
  CUDA_CHECK(cudaEventRecord(joined_, stream_));
  CUDA_CHECK(cudaStreamWaitEvent(current_stream(), joined_, 0));
}

}  // namespace flashmoe
