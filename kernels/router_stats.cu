#include <cmath>

#include "kernels/column_sum.cuh"
#include "kernels/op_utils.cuh"
#include "kernels/router_stats.h"

namespace flashmoe {

namespace {

// Entropy of one (token, head)'s normalised gates.
FLASHMOE_HD double gate_row_entropy(const float* g, int64_t K) {
  double sum = 0, entropy = 0;
  for (int64_t k = 0; k < K; ++k) sum += g[k];
  for (int64_t k = 0; k < K; ++k) {
    const double p = g[k] / sum;
    if (p > 0) entropy -= p * log(p);
  }
  return entropy;
}

struct EntropyTerm {
  const float* gates;
  int64_t K;
  FLASHMOE_HD double operator()(int64_t row, int64_t) const {
    return gate_row_entropy(gates + row * K, K);
  }
};

struct UsedTerm {
  const int32_t* used;
  FLASHMOE_HD double operator()(int64_t e, int64_t) const { return used[e]; }
};

// The same value from every writer: the order of the writes does not matter.
struct MarkUsed {
  const int32_t* ids;
  int32_t* used;
  FLASHMOE_HD void operator()(int64_t i) const { used[ids[i]] = 1; }
};

}  // namespace

RouterStats router_stats(const Tensor& ids, const Tensor& gates, int64_t num_experts,
                         Tensor& workspace) {
  FLASHMOE_CHECK(ids.rank() == 3,
                 "expert ids have shape " << shape_string(ids.shape()) << ", expected [T, H, K]");
  expect_shape(gates, ids.shape(), "gates");
  expect_dtype(ids, DType::i32, "expert ids");
  expect_dtype(gates, DType::f32, "gates");
  const Device device = ids.device();
  const int64_t rows = ids.size(0) * ids.size(1), K = ids.size(2);
  Tensor used = Tensor::zeros({num_experts}, DType::i32, device);
  Tensor sums = Tensor::empty({2}, DType::f64, device);
  for_each_index(device, ids.numel(), MarkUsed{ids.data<int32_t>(), used.data<int32_t>()},
                 "mark_used");
  column_sum<double>(device, UsedTerm{used.data<int32_t>()}, num_experts, 1, sums.data<double>(),
                     workspace);
  column_sum<double>(device, EntropyTerm{gates.data<float>(), K}, rows, 1, sums.data<double>() + 1,
                     workspace);
  const std::vector<double> host = sums.to_vector<double>();
  return {host[0] / double(num_experts), rows ? host[1] / double(rows) : 0.0};
}

}  // namespace flashmoe
