#include "core/stream.h"

#include "core/error.h"

namespace flashmoe {

namespace {
// Created on first use as a blocking stream: work on the legacy default stream
// (synchronous cudaMemcpy of host data) stays ordered with it.
cudaStream_t process_stream() {
  static cudaStream_t stream = [] {
    cudaStream_t s = nullptr;
    CUDA_CHECK(cudaStreamCreate(&s));
    return s;
  }();
  return stream;
}

thread_local cudaStream_t t_redirect = nullptr;
}  // namespace

cudaStream_t current_stream() { return t_redirect ? t_redirect : process_stream(); }

void synchronize_stream() { CUDA_CHECK(cudaStreamSynchronize(current_stream())); }

StreamScope::StreamScope(cudaStream_t stream) : previous_(t_redirect) { t_redirect = stream; }

StreamScope::~StreamScope() { t_redirect = previous_; }

SideStream::SideStream() {
  CUDA_CHECK(cudaStreamCreate(&stream_));
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
}

void SideStream::join() {
  CUDA_CHECK(cudaEventRecord(joined_, stream_));
  CUDA_CHECK(cudaStreamWaitEvent(current_stream(), joined_, 0));
}

}  // namespace flashmoe
