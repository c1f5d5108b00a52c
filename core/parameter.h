// A trainable tensor with its gradient, as the optimizer, the checkpoints and the
// data-parallel all-reduce see it.
#pragma once

#include <string>

#include "core/tensor.h"

namespace flashmoe {

struct Parameter {
  std::string name;
  Tensor value;  // storage dtype (fp32 or bf16)
  // fp32. Dense: the shape of value. Row-sparse (expert tables of a large E): [R, D]
  // holding the gradients of the rows listed in `rows` (-1: unused slot).
  Tensor grad;
  Tensor rows;
  bool expert_table = false;  // sharded across ranks; its own learning rate
  bool weight_decay = true;   // false for norms and gains
};

}  // namespace flashmoe
