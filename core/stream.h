// The CUDA stream every op launches on. One process-wide stream (not the legacy
// default stream) so that a whole training step can be captured in a CUDA graph
// and replayed: capture needs every launch and copy of the step on one stream.
#pragma once

#include <cuda_runtime.h>

namespace flashmoe {

// Created on first use as a blocking stream: work on the legacy default stream
// (synchronous cudaMemcpy of host data) stays ordered with it.
cudaStream_t current_stream();

// Waits for everything queued on the current stream.
void synchronize_stream();

}  // namespace flashmoe
