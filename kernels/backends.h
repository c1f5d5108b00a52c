// Backend entry points behind the public op interfaces (router.h, experts.h).
// The public functions validate arguments and allocate outputs, then call the
// backend of the tensors' device; backends may assume valid, allocated arguments.
#pragma once

#include "kernels/experts.h"
#include "kernels/router.h"

namespace flashmoe::detail {

void router_forward_cpu(const Tensor& logits, int top_k, bool norm_topk_prob, RouterOutputs& out);
void router_backward_cpu(const Tensor& logits, const RouterOutputs& saved, const Tensor& dgates,
                         bool norm_topk_prob, Tensor& dlogits);
void experts_forward_cpu(const ExpertInputs& in, Tensor& y, Tensor& h);
void experts_backward_rows_cpu(const ExpertInputs& in, const Tensor& h, const Tensor& dy,
                               ExpertGrads& grads);
void experts_backward_tables_cpu(const ExpertInputs& in, const Tensor& dy, GradLayout layout,
                                 ExpertGrads& grads);

void router_forward_cuda(const Tensor& logits, int top_k, bool norm_topk_prob, RouterOutputs& out);
void router_backward_cuda(const Tensor& logits, const RouterOutputs& saved, const Tensor& dgates,
                          bool norm_topk_prob, Tensor& dlogits);
void experts_forward_cuda(const ExpertInputs& in, Tensor& y, Tensor& h);
void experts_backward_rows_cuda(const ExpertInputs& in, const Tensor& h, const Tensor& dy,
                                ExpertGrads& grads);
void experts_backward_tables_cuda(const ExpertInputs& in, const Tensor& dy, GradLayout layout,
                                  ExpertGrads& grads);

}  // namespace flashmoe::detail
