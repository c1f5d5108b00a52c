// Row and batch normalisations: the router's query norm (SPEC section 1, step 1)
// and the model's RMSNorm. fp32 or bf16 activations; statistics in fp32
// (RMSNorm) or fp64 (batch statistics); CPU and CUDA side by side in norm.cu.
//
// RMSNorm over the D features of each row m, optional gain g [D] (fp32):
//   r[m] = 1 / sqrt(mean_d x[m][d]^2 + eps),   y[m][d] = x[m][d] * r[m] * g[d]
//   dx[m][d] = r[m] * (g[d] dy[m][d] - x[m][d] r[m]^2 * mean_d(g dy x)[m])
//   dg[d]    = sum_m dy[m][d] x[m][d] r[m]
//
// BatchNorm without affine, per feature d over the n rows of the (global) batch:
//   training: mean = S1/n, var = S2/n - mean^2 from the partial sums
//             S1 = sum x, S2 = sum x^2; running_mean += momentum (mean - running_mean),
//             running_var += momentum (var * n/(n-1) - running_var)   (PyTorch's rule)
//   eval:     mean, var = running statistics
//   y = (x - mean) * invstd,  invstd = 1 / sqrt(var + eps)
//   backward (training): dx = invstd * (dy - B1/n - xhat * B2/n), B1 = sum dy,
//             B2 = sum dy * xhat; (eval): dx = invstd * dy.
// The sums are fp64 partials [2D + 1] (the last element counts the rows). Under data
// parallelism a hook sums them across ranks before they are used, which makes the
// statistics those of the global batch.
#pragma once

#include <functional>

#include "core/tensor.h"

namespace flashmoe {

void rmsnorm_forward(const Tensor& x, const Tensor& gain, float eps, Tensor& y, Tensor& rstd);
// dgain is written only when gain is defined (overwritten, fp32 [D]).
void rmsnorm_backward(const Tensor& x, const Tensor& gain, const Tensor& rstd, const Tensor& dy,
                      Tensor& dx, Tensor& dgain);

// Sums fp64 partials [2D + 1] across data-parallel ranks in place; empty = one rank.
using PartialSumHook = std::function<void(Tensor& partial_sums)>;

struct BatchNorm {
  Tensor running_mean, running_var;  // [D] fp32, on the activations' device
  float momentum = 0.1f, eps = 1e-5f;
  PartialSumHook sync;
  Tensor sums, workspace;  // reused buffers
};

struct BatchNormSaved {
  Tensor mean, invstd;  // [D] fp32
  bool training = false;
};

void batchnorm_forward(BatchNorm& bn, const Tensor& x, bool training, Tensor& y,
                       BatchNormSaved& saved);
void batchnorm_backward(BatchNorm& bn, const Tensor& x, const BatchNormSaved& saved,
                        const Tensor& dy, Tensor& dx);

}  // namespace flashmoe
