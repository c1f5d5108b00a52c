// cuBLASLt matrix products for linear.h. One handle and one workspace per stream for the
// process; the algorithm for each shape is chosen once by the heuristic and
// cached, so a given shape always runs the same algorithm (bitwise repeatable).
#include <cublasLt.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "core/stream.h"
#include "kernels/linear.h"

namespace flashmoe::detail {

namespace {
constexpr size_t kWorkspaceBytes = size_t(32) << 20;

cudaDataType_t cuda_type(DType dtype) {
  switch (dtype) {
    case DType::f32: return CUDA_R_32F;
    case DType::bf16: return CUDA_R_16BF;
    default: FLASHMOE_FAIL("gemm operands are " << dtype_name(dtype) << ", expected fp32 or bf16");
  }
}

struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

using ShapeKey =
    std::tuple<bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, int, bool>;
using BatchKey = std::tuple<int64_t, int64_t, int64_t, int64_t>;
// The shape, the batch and the multiprocessors a product leaves free (GemmSmMargin).
using PlanKey = std::tuple<ShapeKey, BatchKey, int>;

thread_local int t_sm_margin = 0;

// A batch of one keeps cuBLASLt's default (unbatched) layouts.
void set_batch(cublasLtMatrixLayout_t layout, int64_t count, int64_t stride) {
  if (count == 1) return;
  const int32_t batch_count = static_cast<int32_t>(count);
  CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                                                &batch_count, sizeof batch_count));
  CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                                &stride, sizeof stride));
}

class GemmContext {
 public:
  GemmContext() { CUBLAS_CHECK(cublasLtCreate(&handle_)); }

  const Plan& plan(const GemmArgs& g, const GemmBatch& batch, int sm_margin) {
    const PlanKey key{{g.trans_a, g.trans_b, g.m, g.n, g.k, g.lda, g.ldb, g.ldc, int(g.in),
                       int(g.out), g.beta != 0.0f},
                      {batch.count, batch.stride_a, batch.stride_b, batch.stride_c},
                      sm_margin};
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = plans_.find(key);
    if (it == plans_.end()) it = plans_.emplace(key, make_plan(g, batch, sm_margin)).first;
    return it->second;
  }

  cublasLtHandle_t handle() const { return handle_; }

  // One workspace per stream: products on concurrent streams must not share one.
  void* workspace(cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    Tensor& w = workspaces_[stream];
    if (!w.defined()) w = Tensor::empty({int64_t(kWorkspaceBytes / 8)}, DType::f64, Device::cuda);
    return w.raw();
  }

 private:
  Plan make_plan(const GemmArgs& g, const GemmBatch& batch, int sm_margin) {
    Plan p;
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    if (sm_margin > 0) {
      const int sms = current_device_attribute(cudaDevAttrMultiProcessorCount);
      const int sm_target = std::max(1, sms - sm_margin);
      CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET,
                                                  &sm_target, sizeof sm_target));
    }
    const cublasOperation_t ta = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t tb = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    // Stored shapes: op(A) is m x k, op(B) is k x n, C is m x n (column-major).
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.a, cuda_type(g.in), g.trans_a ? g.k : g.m,
                                            g.trans_a ? g.m : g.k, g.lda));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.b, cuda_type(g.in), g.trans_b ? g.n : g.k,
                                            g.trans_b ? g.k : g.n, g.ldb));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.c, cuda_type(g.out), g.m, g.n, g.ldc));
    set_batch(p.a, batch.count, batch.stride_a);
    set_batch(p.b, batch.count, batch.stride_b);
    set_batch(p.c, batch.count, batch.stride_c);
    cublasLtMatmulPreference_t pref;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &kWorkspaceBytes, sizeof kWorkspaceBytes));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(handle_, p.desc, p.a, p.b, p.c, p.c, pref, 1,
                                                &result, &found));
    CUBLAS_CHECK(cublasLtMatmulPreferenceDestroy(pref));
    FLASHMOE_CHECK(found > 0, "cuBLASLt has no algorithm for a " << g.m << "x" << g.n << "x" << g.k
                                                                 << " " << dtype_name(g.in)
                                                                 << " product");
    p.algo = result.algo;
    return p;
  }

  cublasLtHandle_t handle_ = nullptr;
  std::map<cudaStream_t, Tensor> workspaces_;
  std::mutex mutex_;
  std::map<PlanKey, Plan> plans_;
};

GemmContext& context() {
  static GemmContext* ctx = new GemmContext();  // lives for the process: no teardown order issues
  return *ctx;
}
}  // namespace

void gemm_cuda(const GemmArgs& g) { gemm_cuda_batched(g, GemmBatch{}); }

void gemm_cuda_batched(const GemmArgs& g, const GemmBatch& batch) {
  if (g.m == 0 || g.n == 0 || batch.count == 0) return;
  FLASHMOE_CHECK(batch.count >= 1 && batch.count <= INT32_MAX,
                 "gemm batch count is " << batch.count << ", expected 1 to 2^31 - 1");
  GemmContext& ctx = context();
  if (g.k == 0) {
    // An empty sum: C = beta * C; only beta 0 (overwrite) needs work.
    FLASHMOE_CHECK(g.beta == 0.0f || g.beta == 1.0f, "gemm with k = 0 needs beta 0 or 1");
    FLASHMOE_CHECK(batch.count == 1, "batched gemm with k = 0 is not supported");
    if (g.beta == 0.0f) {
      CUDA_CHECK(cudaMemset2DAsync(g.c, g.ldc * dtype_size(g.out), 0, g.m * dtype_size(g.out), g.n,
                                   current_stream()));
    }
    return;
  }
  const Plan& p = ctx.plan(g, batch, t_sm_margin);
  const float alpha = 1.0f;
  cudaStream_t stream = current_stream();
  CUBLAS_CHECK(cublasLtMatmul(ctx.handle(), p.desc, &alpha, g.a, p.a, g.b, p.b, &g.beta, g.c, p.c,
                              g.c, p.c, &p.algo, ctx.workspace(stream), kWorkspaceBytes, stream));
}

}  // namespace flashmoe::detail

namespace flashmoe {

GemmSmMargin::GemmSmMargin(int sms) : previous_(detail::t_sm_margin) {
  FLASHMOE_CHECK(sms >= 0, "GEMM SM margin of " << sms << " multiprocessors, expected >= 0");
  detail::t_sm_margin = sms;
}

GemmSmMargin::~GemmSmMargin() { detail::t_sm_margin = previous_; }

}  // namespace flashmoe
