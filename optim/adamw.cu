#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

#include "kernels/elementwise.cuh"
#include "kernels/elementwise.h"
#include "kernels/warp.cuh"
#include "optim/adamw.h"

namespace flashmoe {

namespace {

// The fixed layout in which a gradient's squares are summed: its flat elements cut into
// `count` chunks of `length` elements (the last one shorter), between 1 and
// kMaxNormChunks of them and at least kMinNormChunk long where there are enough elements.
constexpr int kMaxNormChunks = 256;
constexpr int64_t kMinNormChunk = 4096;
constexpr double kClipEpsilon = 1e-6;

struct NormChunks {
  int64_t count, length;
};

FLASHMOE_HD NormChunks norm_chunks(int64_t numel) {
  int64_t count = (numel + kMinNormChunk - 1) / kMinNormChunk;
  count = count < 1 ? 1 : (count > kMaxNormChunks ? kMaxNormChunks : count);
  return {count, (numel + count - 1) / count};
}

// Slots of the per-step scalar buffer (AdamW::scalars_).
enum ScalarSlot : int {
  kExpertSquares,      // sum of ||G||² over the expert tables (all ranks after the all-reduce)
  kReplicatedSquares,  // sum of ||G||² over the replicated parameters
  kGradNorm,           // pre-clip global norm of grad * grad_scale
  kGradFactor,         // grad_scale * clip factor
  kLr,                 // scheduled lr of the replicated parameters
  kExpertLr,           // scheduled lr of the expert tables
  kInvBias1,           // 1 / (1 - b1^t)
  kInvBias2,           // 1 / (1 - b2^t)
  kScalarCount
};

FLASHMOE_HD bool valid_row(int32_t row, int64_t table_rows) { return row >= 0 && row < table_rows; }

// G² of flat gradient element e; 0 in row-sparse slots that update nothing.
struct GradSquare {
  const float* grad;
  const int32_t* rows;  // null: dense
  int64_t numel, row_size, table_rows;
  FLASHMOE_HD double operator()(int64_t e) const {
    if (rows != nullptr && !valid_row(rows[e / row_size], table_rows)) return 0;
    const double g = grad[e];
    return g * g;
  }
};

// Sums the parameters' squared norms, in parameter order, into the two totals.
struct SplitSquares {
  const double* param_squares;
  const int32_t* is_expert;
  int64_t count;
  double* scalars;
  FLASHMOE_HD void operator()() const {
    double expert = 0, replicated = 0;
    for (int64_t i = 0; i < count; ++i) {
      if (is_expert[i]) {
        expert += param_squares[i];
      } else {
        replicated += param_squares[i];
      }
    }
    scalars[kExpertSquares] = expert;
    scalars[kReplicatedSquares] = replicated;
  }
};

// Advances the step counter and writes this step's norm, gradient factor, learning rates
// and bias corrections (the math in adamw.h).
struct PrepareStep {
  LrSchedule schedule;
  double lr, expert_lr, beta1, beta2, clip, grad_scale;
  int64_t* step;
  double* scalars;
  FLASHMOE_HD void operator()() const {
    const int64_t t = *step + 1;
    *step = t;
    const double norm = grad_scale * sqrt(scalars[kExpertSquares] + scalars[kReplicatedSquares]);
    const double clip_factor = clip > 0 ? fmin(1.0, clip / (norm + kClipEpsilon)) : 1.0;
    const double factor = lr_factor(schedule, t - 1);
    scalars[kGradNorm] = norm;
    scalars[kGradFactor] = grad_scale * clip_factor;
    scalars[kLr] = lr * factor;
    scalars[kExpertLr] = expert_lr * factor;
    scalars[kInvBias1] = 1.0 / (1.0 - pow(beta1, double(t)));
    scalars[kInvBias2] = 1.0 / (1.0 - pow(beta2, double(t)));
  }
};

template <class F>
__global__ void single_thread_kernel(F f) {
  f();
}

// f() on the host, or in one device thread on the current stream.
template <class F>
void run_single_thread(Device device, const F& f, const char* name) {
  if (device == Device::cpu) {
    f();
    return;
  }
  single_thread_kernel<<<1, 1, 0, current_stream()>>>(f);
  CUDA_CHECK_LAUNCH(name);
}

// The run constants shared by every parameter's update.
struct UpdateConstants {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
};

// This step's coefficients, read from the scalar buffer once per thread.
struct StepCoefficients {
  float grad_factor, lr, inv_bias1, inv_bias2;
};

FLASHMOE_HD StepCoefficients load_coefficients(const double* scalars, int lr_slot) {
  return {float(scalars[kGradFactor]), float(scalars[lr_slot]), float(scalars[kInvBias1]),
          float(scalars[kInvBias2])};
}

// One parameter's update: its tensors and its own constants.
struct ParamTensors {
  void* value;  // fp32, or bf16 where bf16_value
  float* master;
  float* m;
  float* v;
  const float* grad;
  const int32_t* rows;  // null: dense, grad element i updates element i
  int64_t numel;        // of grad
  int64_t row_size;     // D of a row-sparse table
  int64_t table_rows;   // E of a row-sparse table
  float weight_decay;   // 0 where the parameter has no weight decay
  int lr_slot;          // kLr or kExpertLr
  bool bf16_value;
};

// The AdamW update of the element that gradient element i belongs to.
FLASHMOE_HD void update_element(const ParamTensors& p, const UpdateConstants& c,
                                const StepCoefficients& k, int64_t i) {
  int64_t target = i;
  if (p.rows != nullptr) {
    const int32_t row = p.rows[i / p.row_size];
    if (!valid_row(row, p.table_rows)) return;
    target = int64_t(row) * p.row_size + i % p.row_size;
  }
  const float g = p.grad[i] * k.grad_factor;
  const float m = c.beta1 * p.m[target] + c.one_minus_beta1 * g;
  const float v = c.beta2 * p.v[target] + c.one_minus_beta2 * (g * g);
  const float m_hat = m * k.inv_bias1;
  const float v_hat = v * k.inv_bias2;
  const float w = p.master[target];
  const float updated = w - k.lr * (m_hat / (sqrtf(v_hat) + c.eps) + p.weight_decay * w);
  p.m[target] = m;
  p.v[target] = v;
  p.master[target] = updated;
  if (p.bf16_value) {
    store_float(static_cast<bf16*>(p.value), target, updated);
  } else {
    store_float(static_cast<float*>(p.value), target, updated);
  }
}

// Multi-tensor launches: the per-parameter work of up to kGroupTensors parameters runs as
// one kernel whose blocks are dealt out to the parameters in order, parameter k taking
// blocks [first_block[k], first_block[k + 1]). The items travel in the kernel's
// arguments (5.9 KB for the update's; sm_70 and later take up to 32 KB), so a step
// launches a few kernels rather than a few per parameter, and a captured step keeps the
// buffers it was captured with.
constexpr int kGroupTensors = 64;
constexpr int kThreads = 256;
constexpr int64_t kUpdateBlockElements = 4 * kThreads;
static_assert(kMaxNormChunks == kThreads, "a block has a thread for each chunk slot");

template <class Item>
struct TensorGroup {
  Item items[kGroupTensors];
  int first_block[kGroupTensors + 1];
  int first_param;  // index of items[0] among the optimizer's parameters
  int count;
  __device__ int item_of_block() const {
    int k = 0;
    while (int(blockIdx.x) >= first_block[k + 1]) ++k;
    return k;
  }
};

// One launch of kernel(group, args...) per group of kGroupTensors items; item k takes
// blocks[k] blocks of kThreads threads.
template <class Item, class... KernelArgs, class... Args>
void launch_groups(void (*kernel)(TensorGroup<Item>, KernelArgs...), const char* name,
                   const std::vector<Item>& items, const std::vector<int64_t>& blocks,
                   Args... args) {
  for (size_t begin = 0; begin < items.size(); begin += kGroupTensors) {
    TensorGroup<Item> group{};
    group.first_param = static_cast<int>(begin);
    group.count = static_cast<int>(std::min<size_t>(kGroupTensors, items.size() - begin));
    int64_t total = 0;
    for (int k = 0; k < group.count; ++k) {
      group.items[k] = items[begin + k];
      group.first_block[k] = static_cast<int>(total);
      total += blocks[begin + k];
      FLASHMOE_CHECK(total <= std::numeric_limits<int>::max(),
                     name << " needs " << total << " blocks, expected at most 2^31 - 1");
    }
    group.first_block[group.count] = static_cast<int>(total);
    if (total == 0) continue;
    kernel<<<static_cast<unsigned>(total), kThreads, 0, current_stream()>>>(group, args...);
    CUDA_CHECK_LAUNCH(name);
  }
}

// The sum of v over the block's kThreads threads, in a fixed order, in every thread.
__device__ double block_sum(double v) {
  __shared__ double warp_sums[kThreads / 32];
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  double sum = 0;
  for (int w = 0; w < kThreads / 32; ++w) sum += warp_sums[w];
  return sum;
}

// Block b of a gradient sums its chunk b into chunk_squares[param, b]; the first block also
// zeroes the slots past the gradient's chunks, so that every parameter's sum reads all
// kMaxNormChunks slots.
__global__ void __launch_bounds__(kThreads)
    chunk_squares_kernel(const __grid_constant__ TensorGroup<GradSquare> group,
                         double* chunk_squares) {
  const int k = group.item_of_block();
  const GradSquare f = group.items[k];
  const NormChunks chunks = norm_chunks(f.numel);
  const int64_t chunk = blockIdx.x - group.first_block[k];
  const int64_t begin = chunk * chunks.length;
  const int64_t end = std::min(begin + chunks.length, f.numel);
  double sum = 0;
  for (int64_t e = begin + threadIdx.x; e < end; e += kThreads) sum += f(e);
  sum = block_sum(sum);
  double* slots = chunk_squares + int64_t(group.first_param + k) * kMaxNormChunks;
  if (threadIdx.x == 0) slots[chunk] = sum;
  if (chunk == 0 && threadIdx.x >= chunks.count) slots[threadIdx.x] = 0;
}

// Block i: param_squares[i] = the sum of parameter i's kMaxNormChunks slots.
__global__ void __launch_bounds__(kThreads)
    param_squares_kernel(const double* chunk_squares, double* param_squares) {
  const double sum = block_sum(chunk_squares[int64_t(blockIdx.x) * kMaxNormChunks + threadIdx.x]);
  if (threadIdx.x == 0) param_squares[blockIdx.x] = sum;
}

__global__ void __launch_bounds__(kThreads)
    adamw_update_kernel(const __grid_constant__ TensorGroup<ParamTensors> group, UpdateConstants c,
                        const double* scalars) {
  const int k = group.item_of_block();
  const ParamTensors p = group.items[k];
  const StepCoefficients coefficients = load_coefficients(scalars, p.lr_slot);
  const int64_t begin = int64_t(blockIdx.x - group.first_block[k]) * kUpdateBlockElements;
  const int64_t end = std::min(begin + kUpdateBlockElements, p.numel);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    update_element(p, c, coefficients, i);
  }
}

}  // namespace

AdamW::AdamW(const OptimConfig& config, int64_t total_steps, std::vector<Parameter*> params)
    : config_(config),
      schedule_(make_lr_schedule(config, total_steps)),
      params_(std::move(params)) {
  for (double beta : config_.betas) {
    FLASHMOE_CHECK(beta >= 0 && beta < 1, "optim.betas holds " << beta << ", expected [0, 1)");
  }
  FLASHMOE_CHECK(config_.eps > 0, "optim.eps is " << config_.eps << ", expected > 0");
  FLASHMOE_CHECK(!params_.empty(), "AdamW got no parameters, expected at least one");
  FLASHMOE_CHECK(params_[0] != nullptr, "AdamW got a null parameter");
  device_ = params_[0]->value.device();
  std::set<std::string> names;
  std::vector<int32_t> is_expert;
  for (Parameter* p : params_) {
    FLASHMOE_CHECK(p != nullptr, "AdamW got a null parameter");
    FLASHMOE_CHECK(names.insert(p->name).second,
                   "parameter name " << p->name << " appears twice, expected unique names");
    const std::string what = "parameter " + p->name;
    FLASHMOE_CHECK(p->value.defined(), what << " has no value");
    expect_float(p->value, what.c_str());
    expect_device(p->value, device_, what.c_str());
    Moments s;
    s.master = Tensor::empty(p->value.shape(), DType::f32, device_);
    convert(p->value, s.master);
    s.m = Tensor::zeros(p->value.shape(), DType::f32, device_);
    s.v = Tensor::zeros(p->value.shape(), DType::f32, device_);
    moments_.push_back(std::move(s));
    is_expert.push_back(p->expert_table ? 1 : 0);
  }
  const int64_t count = int64_t(params_.size());
  step_ = Tensor::zeros({1}, DType::i64, device_);
  scalars_ = Tensor::zeros({kScalarCount}, DType::f64, device_);
  is_expert_ = Tensor::from_vector(is_expert, {count}, device_);
  chunk_squares_ = Tensor::empty({count, kMaxNormChunks}, DType::f64, device_);
  param_squares_ = Tensor::empty({count}, DType::f64, device_);
}

void AdamW::check_gradient(const Parameter& p, const Moments& s) const {
  const std::string what = "gradient of " + p.name;
  expect_shape(p.value, s.master.shape(), ("parameter " + p.name).c_str());
  FLASHMOE_CHECK(p.grad.defined(), what << " is undefined, expected an fp32 tensor");
  expect_dtype(p.grad, DType::f32, what.c_str());
  expect_device(p.grad, device_, what.c_str());
  if (!p.rows.defined()) {
    expect_shape(p.grad, p.value.shape(), what.c_str());
    return;
  }
  FLASHMOE_CHECK(p.value.rank() == 2, "parameter "
                                          << p.name << " has row-sparse gradients and shape "
                                          << shape_string(p.value.shape()) << ", expected [E, D]");
  const int64_t table_rows = p.value.size(0), row_size = p.value.size(1);
  FLASHMOE_CHECK(p.grad.rank() == 2 && p.grad.size(1) == row_size,
                 what << " has shape " << shape_string(p.grad.shape()) << ", expected [R, "
                      << row_size << "]");
  const std::string rows_what = "gradient rows of " + p.name;
  expect_shape(p.rows, {p.grad.size(0)}, rows_what.c_str());
  expect_dtype(p.rows, DType::i32, rows_what.c_str());
  expect_device(p.rows, device_, rows_what.c_str());
  if (device_ != Device::cpu) return;
  std::vector<bool> listed(static_cast<size_t>(table_rows), false);
  const int32_t* rows = p.rows.data<int32_t>();
  for (int64_t r = 0; r < p.rows.numel(); ++r) {
    if (rows[r] == -1) continue;
    FLASHMOE_CHECK(valid_row(rows[r], table_rows), rows_what << " holds " << rows[r] << " at slot "
                                                             << r << ", expected -1 or [0, "
                                                             << table_rows << ")");
    FLASHMOE_CHECK(!listed[static_cast<size_t>(rows[r])],
                   rows_what << " lists row " << rows[r] << " twice, expected distinct rows");
    listed[static_cast<size_t>(rows[r])] = true;
  }
}

void AdamW::accumulate_squared_norms() {
  std::vector<GradSquare> terms;
  std::vector<int64_t> blocks;
  for (const Parameter* p : params_) {
    const bool sparse = p->rows.defined();
    terms.push_back({p->grad.data<float>(), sparse ? p->rows.data<int32_t>() : nullptr,
                     p->grad.numel(), sparse ? p->value.size(1) : 1,
                     sparse ? p->value.size(0) : 0});
    blocks.push_back(norm_chunks(terms.back().numel).count);
  }
  double* chunk_squares = chunk_squares_.data<double>();
  double* param_squares = param_squares_.data<double>();
  const int64_t count = int64_t(params_.size());
  if (device_ == Device::cpu) {
    for (int64_t i = 0; i < count; ++i) {
      const GradSquare& f = terms[i];
      const NormChunks chunks = norm_chunks(f.numel);
      double* slots = chunk_squares + i * kMaxNormChunks;
      param_squares[i] = 0;
      for (int64_t chunk = 0; chunk < chunks.count; ++chunk) {
        const int64_t begin = chunk * chunks.length;
        slots[chunk] = 0;
        for (int64_t e = begin; e < std::min(begin + chunks.length, f.numel); ++e) {
          slots[chunk] += f(e);
        }
        param_squares[i] += slots[chunk];
      }
    }
  } else {
    launch_groups(chunk_squares_kernel, "chunk_squares_kernel", terms, blocks, chunk_squares);
    param_squares_kernel<<<static_cast<unsigned>(count), kThreads, 0, current_stream()>>>(
        chunk_squares, param_squares);
    CUDA_CHECK_LAUNCH("param_squares_kernel");
  }
  run_single_thread(
      device_,
      SplitSquares{param_squares, is_expert_.data<int32_t>(), count, scalars_.data<double>()},
      "split_squares");
}

void AdamW::update_all() {
  const double beta1 = config_.betas[0], beta2 = config_.betas[1];
  const UpdateConstants c{float(beta1), float(1.0 - beta1), float(beta2), float(1.0 - beta2),
                          float(config_.eps)};
  std::vector<ParamTensors> targets;
  std::vector<int64_t> blocks;
  for (size_t i = 0; i < params_.size(); ++i) {
    const Parameter& p = *params_[i];
    const Moments& s = moments_[i];
    const bool sparse = p.rows.defined();
    targets.push_back({p.value.raw(), s.master.data<float>(), s.m.data<float>(), s.v.data<float>(),
                       p.grad.data<float>(), sparse ? p.rows.data<int32_t>() : nullptr,
                       p.grad.numel(), sparse ? p.value.size(1) : 1, sparse ? p.value.size(0) : 0,
                       p.weight_decay ? float(config_.weight_decay) : 0.0f,
                       p.expert_table ? kExpertLr : kLr, p.value.dtype() == DType::bf16});
    blocks.push_back((p.grad.numel() + kUpdateBlockElements - 1) / kUpdateBlockElements);
  }
  if (device_ == Device::cuda) {
    launch_groups(adamw_update_kernel, "adamw_update_kernel", targets, blocks, c,
                  static_cast<const double*>(scalars_.data<double>()));
    return;
  }
  for (const ParamTensors& p : targets) {
    const StepCoefficients k = load_coefficients(scalars_.data<double>(), p.lr_slot);
    for (int64_t i = 0; i < p.numel; ++i) update_element(p, c, k, i);
  }
}

void AdamW::step(Communicator& comm, double grad_scale) {
  FLASHMOE_CHECK(std::isfinite(grad_scale) && grad_scale > 0,
                 "grad_scale is " << grad_scale << ", expected a finite value > 0");
  for (size_t i = 0; i < params_.size(); ++i) check_gradient(*params_[i], moments_[i]);
  accumulate_squared_norms();
  Tensor expert_squares = scalars_.rows(kExpertSquares, kExpertSquares + 1);
  comm.all_reduce_sum(expert_squares);
  run_single_thread(
      device_,
      PrepareStep{schedule_, config_.lr, config_.expert_lr, config_.betas[0], config_.betas[1],
                  config_.clip, grad_scale, step_.data<int64_t>(), scalars_.data<double>()},
      "prepare_step");
  update_all();
}

double AdamW::grad_norm() const {
  return scalars_.rows(kGradNorm, kGradNorm + 1).to_vector<double>()[0];
}

int64_t AdamW::step_count() const { return step_.to_vector<int64_t>()[0]; }

std::vector<OptimizerTensor> AdamW::state() const {
  std::vector<OptimizerTensor> out;
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& name = params_[i]->name;
    out.push_back({name + ".master", moments_[i].master});
    out.push_back({name + ".m", moments_[i].m});
    out.push_back({name + ".v", moments_[i].v});
  }
  out.push_back({"optimizer.step", step_});
  return out;
}

}  // namespace flashmoe
