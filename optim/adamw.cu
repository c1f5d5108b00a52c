#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

#include "kernels/column_sum.cuh"
#include "kernels/elementwise.cuh"
#include "kernels/elementwise.h"
#include "optim/adamw.h"

namespace flashmoe {

namespace {

// Width of the fixed layout in which a gradient's squares are summed: flat element e sits
// at row e / kNormColumns, column e % kNormColumns.
constexpr int64_t kNormColumns = 256;
constexpr double kClipEpsilon = 1e-6;

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

// G² of flat gradient element e = m * kNormColumns + d; 0 past the end and in row-sparse
// slots that update nothing.
struct GradSquare {
  const float* grad;
  const int32_t* rows;  // null: dense
  int64_t numel, row_size, table_rows;
  FLASHMOE_HD double operator()(int64_t m, int64_t d) const {
    const int64_t e = m * kNormColumns + d;
    if (e >= numel) return 0;
    if (rows != nullptr && !valid_row(rows[e / row_size], table_rows)) return 0;
    const double g = grad[e];
    return g * g;
  }
};

// The column sums of parameter d are rows m < kNormColumns of column d.
struct ParamColumnSquare {
  const double* column_squares;  // [P, kNormColumns]
  FLASHMOE_HD double operator()(int64_t m, int64_t d) const {
    return column_squares[d * kNormColumns + m];
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

// The run constants of one parameter's update.
struct UpdateConstants {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay;
  int lr_slot;  // kLr or kExpertLr
};

// This step's coefficients, read from the scalar buffer once per thread.
struct StepCoefficients {
  float grad_factor, lr, inv_bias1, inv_bias2;
};

FLASHMOE_HD StepCoefficients load_coefficients(const double* scalars, int lr_slot) {
  return {float(scalars[kGradFactor]), float(scalars[lr_slot]), float(scalars[kInvBias1]),
          float(scalars[kInvBias2])};
}

template <class T>
struct ParamTensors {
  T* value;
  float* master;
  float* m;
  float* v;
  const float* grad;
  const int32_t* rows;  // null: dense, grad element i updates element i
  int64_t numel;        // of grad
  int64_t row_size;     // D of a row-sparse table
  int64_t table_rows;   // E of a row-sparse table
};

// The AdamW update of the element that gradient element i belongs to.
template <class T>
FLASHMOE_HD void update_element(const ParamTensors<T>& p, const UpdateConstants& c,
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
  const float updated = w - k.lr * (m_hat / (sqrtf(v_hat) + c.eps) + c.weight_decay * w);
  p.m[target] = m;
  p.v[target] = v;
  p.master[target] = updated;
  store_float(p.value, target, updated);
}

template <class T>
__global__ void adamw_update_kernel(ParamTensors<T> p, UpdateConstants c, const double* scalars) {
  const StepCoefficients k = load_coefficients(scalars, c.lr_slot);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < p.numel;
       i += int64_t(gridDim.x) * blockDim.x) {
    update_element(p, c, k, i);
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
  column_squares_ = Tensor::empty({count, kNormColumns}, DType::f64, device_);
  param_squares_ = Tensor::empty({count}, DType::f64, device_);
  if (device_ == Device::cuda) {
    // The largest workspace column_sum asks for: its chunk count is capped, its widths are
    // kNormColumns and the parameter count. Allocated here so that step() never allocates.
    const int max_chunks = column_sum_chunks(std::numeric_limits<int64_t>::max() / 2);
    column_workspace_ =
        Tensor::empty({max_chunks * std::max(kNormColumns, count)}, DType::f64, device_);
  }
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
  double* column_squares = column_squares_.data<double>();
  for (size_t i = 0; i < params_.size(); ++i) {
    const Parameter& p = *params_[i];
    const bool sparse = p.rows.defined();
    const int64_t numel = p.grad.numel();
    const GradSquare term{p.grad.data<float>(), sparse ? p.rows.data<int32_t>() : nullptr, numel,
                          sparse ? p.value.size(1) : 1, sparse ? p.value.size(0) : 0};
    column_sum<double>(device_, term, (numel + kNormColumns - 1) / kNormColumns, kNormColumns,
                       column_squares + int64_t(i) * kNormColumns, column_workspace_);
  }
  const int64_t count = int64_t(params_.size());
  column_sum<double>(device_, ParamColumnSquare{column_squares}, kNormColumns, count,
                     param_squares_.data<double>(), column_workspace_);
  run_single_thread(device_,
                    SplitSquares{param_squares_.data<double>(), is_expert_.data<int32_t>(), count,
                                 scalars_.data<double>()},
                    "split_squares");
}

void AdamW::update(size_t index) {
  const Parameter& p = *params_[index];
  const Moments& s = moments_[index];
  const bool sparse = p.rows.defined();
  const double beta1 = config_.betas[0], beta2 = config_.betas[1];
  const UpdateConstants c{float(beta1),
                          float(1.0 - beta1),
                          float(beta2),
                          float(1.0 - beta2),
                          float(config_.eps),
                          p.weight_decay ? float(config_.weight_decay) : 0.0f,
                          p.expert_table ? kExpertLr : kLr};
  auto run = [&](auto* value) {
    using T = std::remove_pointer_t<decltype(value)>;
    const ParamTensors<T> tensors{value,
                                  s.master.data<float>(),
                                  s.m.data<float>(),
                                  s.v.data<float>(),
                                  p.grad.data<float>(),
                                  sparse ? p.rows.data<int32_t>() : nullptr,
                                  p.grad.numel(),
                                  sparse ? p.value.size(1) : 1,
                                  sparse ? p.value.size(0) : 0};
    if (device_ == Device::cpu) {
      const StepCoefficients k = load_coefficients(scalars_.data<double>(), c.lr_slot);
      for (int64_t i = 0; i < tensors.numel; ++i) update_element(tensors, c, k, i);
      return;
    }
    adamw_update_kernel<<<grid_for(tensors.numel, 256), 256, 0, current_stream()>>>(
        tensors, c, scalars_.data<double>());
    CUDA_CHECK_LAUNCH("adamw_update_kernel");
  };
  if (p.value.dtype() == DType::f32) {
    run(p.value.data<float>());
  } else {
    run(p.value.data<bf16>());
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
  for (size_t i = 0; i < params_.size(); ++i) update(i);
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
