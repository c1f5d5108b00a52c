#include "kernels/router.h"

#include <cmath>

#include "kernels/backends.h"

namespace flashmoe {

int num_keys_for(int64_t num_experts) {
  FLASHMOE_CHECK(num_experts >= 1, "num_experts is " << num_experts << ", expected >= 1");
  auto n = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(num_experts))));
  while (n * n > num_experts) --n;
  while ((n + 1) * (n + 1) <= num_experts) ++n;
  FLASHMOE_CHECK(n * n == num_experts, "num_experts is " << num_experts
                                                         << ", expected a perfect square N^2 "
                                                            "(product-key routing), e.g. "
                                                         << n * n << " or " << (n + 1) * (n + 1));
  return static_cast<int>(n);
}

namespace {
void check_logits(const Tensor& logits) {
  FLASHMOE_CHECK(
      logits.defined() && logits.rank() == 4 && logits.size(2) == 2,
      "router logits have shape " << shape_string(logits.shape()) << ", expected [T, H, 2, N]");
  expect_float(logits, "router logits");
  FLASHMOE_CHECK(logits.size(0) >= 1 && logits.size(1) >= 1 && logits.size(3) >= 1,
                 "router logits have shape " << shape_string(logits.shape())
                                             << ", expected every dimension >= 1");
}
}  // namespace

void router_forward(const Tensor& logits, int top_k, bool norm_topk_prob, RouterOutputs& out) {
  check_logits(logits);
  const int64_t T = logits.size(0), H = logits.size(1), N = logits.size(3);
  FLASHMOE_CHECK(top_k >= 1 && top_k <= N * N,
                 "top_k is " << top_k << ", expected 1 <= top_k <= N^2 = " << N * N);
  ensure(out.expert_ids, {T, H, top_k}, DType::i32, logits.device());
  ensure(out.gates, {T, H, top_k}, DType::f32, logits.device());
  ensure(out.logsumexp, {T, H, 2}, DType::f32, logits.device());
  if (logits.device() == Device::cpu) {
    detail::router_forward_cpu(logits, top_k, norm_topk_prob, out);
  } else {
    detail::router_forward_cuda(logits, top_k, norm_topk_prob, out);
  }
}

void router_backward(const Tensor& logits, const RouterOutputs& saved, const Tensor& dgates,
                     bool norm_topk_prob, Tensor& dlogits) {
  check_logits(logits);
  const int64_t T = logits.size(0), H = logits.size(1);
  const Device device = logits.device();
  FLASHMOE_CHECK(saved.gates.defined() && saved.gates.rank() == 3,
                 "router_backward needs the outputs of router_forward");
  const int64_t K = saved.gates.size(2);
  expect_shape(saved.expert_ids, {T, H, K}, "expert_ids");
  expect_shape(saved.gates, {T, H, K}, "gates");
  expect_shape(saved.logsumexp, {T, H, 2}, "logsumexp");
  expect_shape(dgates, {T, H, K}, "dgates");
  expect_dtype(dgates, DType::f32, "dgates");
  expect_shape(dlogits, logits.shape(), "dlogits");
  expect_dtype(dlogits, DType::f32, "dlogits");
  for (const Tensor* t : {&saved.expert_ids, &saved.gates, &saved.logsumexp, &dgates,
                          static_cast<const Tensor*>(&dlogits)}) {
    expect_device(*t, device, "router_backward argument");
  }
  if (device == Device::cpu) {
    detail::router_backward_cpu(logits, saved, dgates, norm_topk_prob, dlogits);
  } else {
    detail::router_backward_cuda(logits, saved, dgates, norm_topk_prob, dlogits);
  }
}

}  // namespace flashmoe
