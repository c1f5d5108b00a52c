// PLACEHOLDER: replaced by the CUDA expert implementation.
#include "kernels/backends.h"
namespace flashmoe::detail {
void experts_forward_cuda(const ExpertInputs&, Tensor&, Tensor&) { FLASHMOE_FAIL("todo"); }
void experts_backward_cuda(const ExpertInputs&, const Tensor&, const Tensor&, GradLayout,
                           ExpertGrads&) {
  FLASHMOE_FAIL("todo");
}
}  // namespace flashmoe::detail
