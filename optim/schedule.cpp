#include "optim/schedule.h"

namespace flashmoe {

LrSchedule make_lr_schedule(const OptimConfig& optim, int64_t total_steps) {
  FLASHMOE_CHECK(total_steps >= 1, "schedule over " << total_steps << " steps, expected >= 1");
  FLASHMOE_CHECK(optim.warmup >= 0, "optim.warmup is " << optim.warmup << ", expected >= 0");
  FLASHMOE_CHECK(optim.min_lr_ratio >= 0 && optim.min_lr_ratio <= 1,
                 "optim.min_lr_ratio is " << optim.min_lr_ratio << ", expected in [0, 1]");
  return LrSchedule{optim.schedule, optim.warmup, total_steps, optim.min_lr_ratio};
}

double scheduled_lr(const OptimConfig& optim, int64_t total_steps, int64_t step) {
  FLASHMOE_CHECK(step >= 0, "learning rate of update " << step << " asked, expected >= 0");
  return optim.lr * lr_factor(make_lr_schedule(optim, total_steps), step);
}

}  // namespace flashmoe
