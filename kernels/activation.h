// Expert and SwiGLU activations, value and derivative, for host and device.
//   silu(h) = h * sigmoid(h)              silu'(h) = s * (1 + h * (1 - s)),  s = sigmoid(h)
//   gelu(h) = h * Phi(h) (exact, erf)     gelu'(h) = Phi(h) + h * phi(h)
//   relu(h) = max(h, 0)                   relu'(h) = [h > 0]
#pragma once

#include <cmath>

#include "core/bf16.h"

namespace flashmoe {

enum class Activation : int { silu = 0, gelu = 1, relu = 2 };

template <class Real>
FLASHMOE_HD Real activate(Activation act, Real h) {
  using std::erf, std::exp;
  switch (act) {
    case Activation::silu: return h / (Real(1) + exp(-h));
    case Activation::gelu: return Real(0.5) * h * (Real(1) + erf(h * Real(0.70710678118654752440)));
    case Activation::relu: return h > Real(0) ? h : Real(0);
  }
  return h;
}

template <class Real>
FLASHMOE_HD Real activate_grad(Activation act, Real h) {
  using std::erf, std::exp;
  switch (act) {
    case Activation::silu: {
      Real s = Real(1) / (Real(1) + exp(-h));
      return s * (Real(1) + h * (Real(1) - s));
    }
    case Activation::gelu: {
      Real cdf = Real(0.5) * (Real(1) + erf(h * Real(0.70710678118654752440)));
      Real pdf = Real(0.39894228040143267794) * exp(Real(-0.5) * h * h);
      return cdf + h * pdf;
    }
    case Activation::relu: return h > Real(0) ? Real(1) : Real(0);
  }
  return Real(1);
}

}  // namespace flashmoe
