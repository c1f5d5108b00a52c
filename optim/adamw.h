// AdamW with fp32 master weights and fp32 moments (SPEC sections 2 and 5). One interface
// for both backends: the device of the parameters' values picks the CPU loops or the CUDA
// kernels of adamw.cu, which share every formula.
//
// Update t = 1, 2, ... of a parameter with master weights w, moments m, v and raw gradient G:
//   norm  = grad_scale * sqrt(sum over all parameters of all ranks of ||G||²)   (pre-clip)
//   c     = clip > 0 ? min(1, clip / (norm + 1e-6)) : 1
//   g     = G * grad_scale * c                  (normalisation and clipping inside the
//                                                update kernel: no separate pass, and the
//                                                gradient tensors are left unchanged)
//   m     = b1 m + (1 - b1) g
//   v     = b2 v + (1 - b2) g²
//   m_hat = m / (1 - b1^t),  v_hat = v / (1 - b2^t)
//   lr_t  = (expert_table ? expert_lr : lr) * lr_factor(schedule, t - 1)   (optim/schedule.h)
//   w     = w - lr_t (m_hat / (sqrt(v_hat) + eps) + wd w)   decoupled decay; wd is
//                                                optim.weight_decay, 0 where the parameter's
//                                                weight_decay flag is false
//   value = w rounded to the storage dtype (bf16: nearest even)
// The element update runs in fp32 (the per-step coefficients are computed in fp64 and
// rounded to fp32 once); the norm accumulates in fp64.
//
// Row-sparse gradients (Parameter::rows defined; value [E, D], grad [R, D], rows [R]):
// slot r updates row rows[r] of the table; slots holding -1 are skipped. Rows not listed
// are not touched at all ("lazy" Adam): their m and v are not decayed, their weights get no
// weight decay, and their master and value stay bit for bit. A row listed at update t uses
// the global bias corrections 1 - b^t, whatever its own update count. The listed rows must
// be distinct: the expert backward produces one slot per touched row. The CPU path checks
// that each row is -1 or in [0, E) and distinct; the CUDA path skips rows outside [0, E)
// (it cannot report without a host synchronisation) and relies on distinctness.
//
// Global norm, deterministic and each shard counted once: every gradient (dense, or the
// valid slots of a row-sparse one) is viewed flat and cut into a fixed number of chunks
// that depends only on its size (1 to 256, of at least 4096 elements where it has that
// many); each chunk's squares are summed in fp64 in a fixed order, the chunks in a fixed
// order into the parameter's ||G||², and those in parameter order into two totals:
// expert tables and replicated parameters. Only the expert total is summed
// across ranks (Communicator::all_reduce_sum on a 1-element fp64 tensor of the parameters'
// device: expert shards are disjoint); the replicated total is added after, once, since
// the replicated gradients are already all-reduced and identical on every rank. Every rank
// therefore computes the same norm. A non-finite norm is reported as is (and c = 1 when it
// is NaN) so the trainer can detect it.
//
// Launches: the chunks' squares of up to 64 parameters run as one kernel, and so does
// their update (multi-tensor kernels, the parameters' pointers in the kernel arguments),
// so a step costs a handful of launches whatever the parameter count, not a few per
// parameter, each of which left the GPU idle for its launch gap.
//
// How the step count and learning rate reach the kernels: through device memory, so that
// one call of step() can be captured in a CUDA graph and replayed. A single-thread kernel
// at the start of each step increments the device step counter t, evaluates the schedule,
// the bias corrections, the norm and the clip factor, and writes them to a small fp64
// device buffer that the update kernels read. Kernel arguments carry only run constants
// (betas, eps, weight decay, clip, the schedule, grad_scale). A captured step thus replays
// with the right t and lr each time; grad_scale is fixed in a captured graph, so a
// trainer whose grad_scale varies from step to step must not replay one graph across
// those steps; a captured step also keeps the gradient (and rows) buffers it was captured
// with, so new gradients must be written into those. The workspaces are allocated in the
// constructor, never in step().
//
// Synchronisation: step() never waits for the device. grad_norm() and step_count() copy a
// scalar to the host and so wait for the queued work: call them at log or checkpoint
// boundaries. On the CPU everything is immediate.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/parameter.h"
#include "core/tensor.h"
#include "optim/schedule.h"
#include "parallel/communicator.h"

namespace flashmoe {

// A tensor of the optimizer state under its checkpoint name.
struct OptimizerTensor {
  std::string name;
  Tensor tensor;
};

class AdamW {
 public:
  // `params` all live on one device and outlive the optimizer; their names are unique.
  // Masters start as the parameters' values, moments at zero, the step count at 0.
  // `total_steps` is the run's number of updates, the length of the lr schedule.
  AdamW(const OptimConfig& config, int64_t total_steps, std::vector<Parameter*> params);

  // One update of every parameter from its gradient (fp32, on the parameters' device).
  // The gradient applied is grad * grad_scale (e.g. 1 / grad_accum, or 1 / global tokens
  // for summed gradients), clipped by the global norm. `comm` sums the expert tables'
  // squared norm across ranks; every rank calls step() together.
  void step(Communicator& comm, double grad_scale = 1.0);

  // The pre-clip global norm of grad * grad_scale at the last step (0 before the first).
  // Waits for the device.
  double grad_norm() const;
  // Updates applied so far (t of the last update). Waits for the device.
  int64_t step_count() const;

  // The state to checkpoint, sharing storage with the optimizer: for each parameter in
  // order "<name>.master", "<name>.m", "<name>.v" (fp32, the value's shape), then
  // "optimizer.step" (int64 [1]). Copying saved tensors into these (Tensor::copy_from),
  // together with the parameters' values, resumes training bit for bit.
  std::vector<OptimizerTensor> state() const;

 private:
  struct Moments {
    Tensor master, m, v;  // fp32, the value's shape
  };

  void check_gradient(const Parameter& p, const Moments& s) const;
  void accumulate_squared_norms();
  void update_all();

  OptimConfig config_;
  LrSchedule schedule_;
  Device device_ = Device::cpu;
  std::vector<Parameter*> params_;
  std::vector<Moments> moments_;
  Tensor step_;           // int64 [1]: updates applied
  Tensor scalars_;        // fp64: this step's squared norms, norm, grad factor, lrs, biases
  Tensor is_expert_;      // int32 [P]: 1 for expert tables
  Tensor chunk_squares_;  // fp64 [P, 256]: each gradient's squares, summed by chunk
  Tensor param_squares_;  // fp64 [P]: ||G||² of each parameter
};

}  // namespace flashmoe
