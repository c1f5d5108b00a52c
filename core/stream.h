// The CUDA stream every op launches on. One process-wide stream (not the legacy
// default stream) so that a whole training step can be captured in a CUDA graph
// and replayed: capture needs every launch and copy of the step on one stream, or
// on streams forked from it and joined back with events.
#pragma once

#include <cuda_runtime.h>

namespace flashmoe {

// The stream ops launch on now: the process-wide stream, unless a StreamScope of
// this thread has redirected it.
cudaStream_t current_stream();

// Waits for everything queued on the current stream.
void synchronize_stream();

// An attribute of the current device (its multiprocessor count, its L2 size, ...).
int current_device_attribute(cudaDeviceAttr attribute);

// Redirects this thread's ops to `stream` for the scope's lifetime (a side branch
// that runs concurrently with the main one).
class StreamScope {
 public:
  explicit StreamScope(cudaStream_t stream);
  ~StreamScope();
  StreamScope(const StreamScope&) = delete;
  StreamScope& operator=(const StreamScope&) = delete;

 private:
  cudaStream_t previous_;
};

// How a side stream's blocks are scheduled against the main stream's: `low` fills
// what the main branch leaves (compute that overlaps compute), `high` goes first
// (communication, whose few blocks should start the moment they are queued).
enum class StreamPriority { low, high };

// A second stream for work that may overlap the current stream's: fork() makes it
// wait for what is queued on the current stream so far, join() makes the current
// stream wait for what was queued on it. Both are graph-capture safe. Work is queued
// on it only after a fork(), so a join() with no fork() since the last one has nothing
// to wait for and queues nothing (a cross-stream wait costs the GPU a few µs even on a
// finished stream).
class SideStream {
 public:
  explicit SideStream(StreamPriority priority = StreamPriority::low);
  ~SideStream();
  SideStream(const SideStream&) = delete;
  SideStream& operator=(const SideStream&) = delete;
  void fork();
  void join();
  cudaStream_t stream() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
  cudaEvent_t forked_ = nullptr, joined_ = nullptr;
  bool pending_ = false;  // forked since the last join
};

// Queues `work` on `side`, after what the current stream has queued so far; without a
// side stream (the CPU backend) runs it here and now.
template <class Work>
void run_beside(SideStream* side, Work&& work) {
  if (!side) {
    work();
    return;
  }
  side->fork();
  StreamScope on_side(side->stream());
  work();
}

}  // namespace flashmoe
