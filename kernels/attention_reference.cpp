#include "kernels/attention_reference.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace flashmoe::ref {

namespace {

using Matrix = std::vector<std::vector<double>>;  // [L][d] or [L][L]

// Rotates x (position i) by +angle (sign 1) or -angle (sign -1), rotate-half pairs.
std::vector<double> rotate(const AttentionConfig& cfg, const std::vector<double>& x, int64_t i,
                           double sign) {
  if (cfg.rope_theta == 0) return x;
  const int64_t d = cfg.head_dim, half = d / 2;
  std::vector<double> y(d);
  for (int64_t c = 0; c < half; ++c) {
    const double angle = double(i) * std::pow(cfg.rope_theta, -2.0 * double(c) / double(d));
    const double cs = std::cos(angle), sn = sign * std::sin(angle);
    y[c] = x[c] * cs - x[c + half] * sn;
    y[c + half] = x[c + half] * cs + x[c] * sn;
  }
  return y;
}

int64_t width(const AttentionConfig& cfg) { return cfg.heads * cfg.head_dim; }

// Part `part` (q 0, k 1, v 2) of head h of sequence b, [L][d], RoPE applied to q and k.
Matrix head_part(const AttentionConfig& cfg, const std::vector<double>& qkv, int64_t b, int64_t h,
                 int64_t part) {
  const int64_t L = cfg.seq_len, d = cfg.head_dim, D = width(cfg);
  Matrix m(L);
  for (int64_t i = 0; i < L; ++i) {
    const double* src = qkv.data() + (b * L + i) * 3 * D + part * D + h * d;
    m[i] = std::vector<double>(src, src + d);
    if (part < 2) m[i] = rotate(cfg, m[i], i, 1.0);
  }
  return m;
}

Matrix causal_probabilities(const Matrix& q, const Matrix& k, double scale) {
  const int64_t L = static_cast<int64_t>(q.size());
  Matrix p(L, std::vector<double>(L, 0.0));
  for (int64_t i = 0; i < L; ++i) {
    double max = -INFINITY, sum = 0;
    for (int64_t j = 0; j <= i; ++j) {
      double s = 0;
      for (size_t c = 0; c < q[i].size(); ++c) s += q[i][c] * k[j][c];
      p[i][j] = s * scale;
      max = std::max(max, p[i][j]);
    }
    for (int64_t j = 0; j <= i; ++j) sum += (p[i][j] = std::exp(p[i][j] - max));
    for (int64_t j = 0; j <= i; ++j) p[i][j] /= sum;
  }
  return p;
}

// out[i] = sum_j w(i, j) v[j] over all i, j < L.
template <class W>
Matrix weighted_rows(const Matrix& v, W w) {
  const int64_t L = static_cast<int64_t>(v.size());
  Matrix out(L, std::vector<double>(v[0].size(), 0.0));
  for (int64_t i = 0; i < L; ++i) {
    for (int64_t j = 0; j < L; ++j) {
      for (size_t c = 0; c < v[j].size(); ++c) out[i][c] += w(i, j) * v[j][c];
    }
  }
  return out;
}

void check_sizes(const AttentionConfig& cfg, const std::vector<double>& qkv) {
  FLASHMOE_CHECK(cfg.batch >= 1 && cfg.seq_len >= 1 && cfg.heads >= 1 && cfg.head_dim >= 1,
                 "reference attention needs positive sizes");
  FLASHMOE_CHECK(cfg.rope_theta == 0 || cfg.head_dim % 2 == 0,
                 "reference RoPE needs an even head width, got " << cfg.head_dim);
  FLASHMOE_CHECK(int64_t(qkv.size()) == cfg.batch * cfg.seq_len * 3 * width(cfg),
                 "reference attention qkv has " << qkv.size() << " values, expected B L 3 D");
}

}  // namespace

std::vector<double> attention_forward(const AttentionConfig& cfg, const std::vector<double>& qkv) {
  check_sizes(cfg, qkv);
  const int64_t L = cfg.seq_len, d = cfg.head_dim, D = width(cfg);
  const double scale = 1.0 / std::sqrt(double(d));
  std::vector<double> out(cfg.batch * L * D);
  for (int64_t b = 0; b < cfg.batch; ++b) {
    for (int64_t h = 0; h < cfg.heads; ++h) {
      const Matrix p =
          causal_probabilities(head_part(cfg, qkv, b, h, 0), head_part(cfg, qkv, b, h, 1), scale);
      const Matrix o = weighted_rows(head_part(cfg, qkv, b, h, 2),
                                     [&](int64_t i, int64_t j) { return p[i][j]; });
      for (int64_t i = 0; i < L; ++i) {
        for (int64_t c = 0; c < d; ++c) out[(b * L + i) * D + h * d + c] = o[i][c];
      }
    }
  }
  return out;
}

std::vector<double> attention_backward(const AttentionConfig& cfg, const std::vector<double>& qkv,
                                       const std::vector<double>& dout) {
  check_sizes(cfg, qkv);
  const int64_t L = cfg.seq_len, d = cfg.head_dim, D = width(cfg);
  FLASHMOE_CHECK(int64_t(dout.size()) == cfg.batch * L * D,
                 "reference attention dout has " << dout.size() << " values, expected B L D");
  const double scale = 1.0 / std::sqrt(double(d));
  std::vector<double> dqkv(qkv.size());
  for (int64_t b = 0; b < cfg.batch; ++b) {
    for (int64_t h = 0; h < cfg.heads; ++h) {
      const Matrix q = head_part(cfg, qkv, b, h, 0), k = head_part(cfg, qkv, b, h, 1),
                   v = head_part(cfg, qkv, b, h, 2);
      const Matrix p = causal_probabilities(q, k, scale);
      Matrix dout_h(L);
      for (int64_t i = 0; i < L; ++i) {
        const double* src = dout.data() + (b * L + i) * D + h * d;
        dout_h[i] = std::vector<double>(src, src + d);
      }
      // ds_ij = scale p_ij (dp_ij - sum_j' p_ij' dp_ij'), dp_ij = <do_i, v_j>.
      Matrix ds(L, std::vector<double>(L, 0.0));
      for (int64_t i = 0; i < L; ++i) {
        double delta = 0;
        for (int64_t j = 0; j <= i; ++j) {
          for (int64_t c = 0; c < d; ++c) ds[i][j] += dout_h[i][c] * v[j][c];
          delta += p[i][j] * ds[i][j];
        }
        for (int64_t j = 0; j <= i; ++j) ds[i][j] = scale * p[i][j] * (ds[i][j] - delta);
      }
      const Matrix dq = weighted_rows(k, [&](int64_t i, int64_t j) { return ds[i][j]; });
      const Matrix dk = weighted_rows(q, [&](int64_t j, int64_t i) { return ds[i][j]; });
      const Matrix dv = weighted_rows(dout_h, [&](int64_t j, int64_t i) { return p[i][j]; });
      const Matrix* grads[3] = {&dq, &dk, &dv};
      for (int64_t part = 0; part < 3; ++part) {
        for (int64_t i = 0; i < L; ++i) {
          const std::vector<double> g =
              part < 2 ? rotate(cfg, (*grads[part])[i], i, -1.0) : (*grads[part])[i];
          for (int64_t c = 0; c < d; ++c) dqkv[(b * L + i) * 3 * D + part * D + h * d + c] = g[c];
        }
      }
    }
  }
  return dqkv;
}

}  // namespace flashmoe::ref
