// PLACEHOLDER: replaced by the CUDA router implementation.
#include "kernels/backends.h"
namespace flashmoe::detail {
void router_forward_cuda(const Tensor&, int, bool, RouterOutputs&) { FLASHMOE_FAIL("todo"); }
void router_backward_cuda(const Tensor&, const RouterOutputs&, const Tensor&, bool, Tensor&) {
  FLASHMOE_FAIL("todo");
}
}  // namespace flashmoe::detail
