// Router statistics for logging (SPEC section 1: the logits feed statistics):
//   fraction_used = |{ids}| / E                  experts selected by at least one token
//   gate_entropy  = mean over (t, h) of -sum_k p_k log p_k,  p = g / sum_k g
// Computed on demand; reading them back synchronises, so call at log intervals only.
#pragma once

#include "core/tensor.h"

namespace flashmoe {

struct RouterStats {
  double fraction_used = 0;
  double gate_entropy = 0;
  // Expert parallelism (FlashMoELayer::stats): the busiest rank's share of the filled
  // expert slots over the mean share (ExpertExchange::load_imbalance); 1 on one rank.
  double shard_imbalance = 1;
};

// ids, gates [T, H, K]; E experts. `workspace` is reused between calls.
RouterStats router_stats(const Tensor& ids, const Tensor& gates, int64_t num_experts,
                         Tensor& workspace);

}  // namespace flashmoe
