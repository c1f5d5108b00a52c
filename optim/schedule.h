// Learning-rate schedule (SPEC section 5): linear warmup, then cosine decay or constant.
//
// The factor that multiplies a peak learning rate L (optim.lr, optim.expert_lr) for the
// update with 0-based index s (s updates have been applied before it), with W = warmup,
// S = total steps, r = min_lr_ratio:
//   s <  W:  f = (s + 1) / W          linear ramp from 0 (at s = -1): the first update is
//                                     not wasted at lr 0, update W - 1 runs at L
//   s >= W:  p = (s - W) / (S - W), clamped to [0, 1] (p = 1 when S <= W)
//            cosine:   f = r + (1 - r) (1 + cos(pi p)) / 2     L at s = W, L·r at s = S
//            constant: f = 1
// lr_factor is a pure function usable on the host and on the device (the optimizer
// evaluates it in a kernel from its device step counter; see optim/adamw.h).
#pragma once

#include <cmath>
#include <cstdint>

#include "core/bf16.h"  // FLASHMOE_HD
#include "core/config.h"

namespace flashmoe {

struct LrSchedule {
  Schedule kind = Schedule::cosine;
  int64_t warmup = 0;
  int64_t total_steps = 1;
  double min_lr_ratio = 0;
};

FLASHMOE_HD double lr_factor(const LrSchedule& schedule, int64_t step) {
  if (step < schedule.warmup) return double(step + 1) / double(schedule.warmup);
  if (schedule.kind == Schedule::constant) return 1.0;
  const int64_t decay_steps = schedule.total_steps - schedule.warmup;
  double progress = decay_steps > 0 ? double(step - schedule.warmup) / double(decay_steps) : 1.0;
  progress = progress < 1.0 ? progress : 1.0;
  constexpr double kPi = 3.14159265358979323846;
  const double r = schedule.min_lr_ratio;
  return r + (1.0 - r) * 0.5 * (1.0 + cos(kPi * progress));
}

// The schedule of a run of `total_steps` optimizer updates; checks its arguments.
LrSchedule make_lr_schedule(const OptimConfig& optim, int64_t total_steps);

// optim.lr * lr_factor: the learning rate of the non-expert parameters at update `step`
// (0-based), for logs.
double scheduled_lr(const OptimConfig& optim, int64_t total_steps, int64_t step);

}  // namespace flashmoe
