// Captures what `body` queues on the op stream into an instantiated CUDA graph.
// If body throws mid-capture, the capture is ended before the exception leaves, so
// one failing test does not leave the stream capturing for every test after it.
#pragma once

#include <cuda_runtime.h>

#include <functional>

#include "core/error.h"
#include "core/stream.h"

namespace flashmoe {

class CapturedGraph {
 public:
  explicit CapturedGraph(const std::function<void()>& body) {
    CUDA_CHECK(cudaStreamBeginCapture(current_stream(), cudaStreamCaptureModeThreadLocal));
    try {
      body();
    } catch (...) {
      cudaGraph_t partial = nullptr;
      cudaStreamEndCapture(current_stream(), &partial);
      if (partial) cudaGraphDestroy(partial);
      throw;
    }
    CUDA_CHECK(cudaStreamEndCapture(current_stream(), &graph_));
    CUDA_CHECK(cudaGraphInstantiate(&exec_, graph_, 0));
  }
  ~CapturedGraph() {
    if (exec_) cudaGraphExecDestroy(exec_);
    if (graph_) cudaGraphDestroy(graph_);
  }
  CapturedGraph(const CapturedGraph&) = delete;
  CapturedGraph& operator=(const CapturedGraph&) = delete;

  void replay() { CUDA_CHECK(cudaGraphLaunch(exec_, current_stream())); }

 private:
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
};

}  // namespace flashmoe
