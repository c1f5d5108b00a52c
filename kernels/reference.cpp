#include "kernels/reference.h"

#include <algorithm>
#include <cmath>
#include <iterator>
#include <numeric>

namespace flashmoe::ref {

template <class Real>
std::vector<int> top_indices(const Real* v, int N, int K) {
  std::vector<int> order(N);
  std::iota(order.begin(), order.end(), 0);
  const int keep = std::min(K, N);
  std::partial_sort(order.begin(), order.begin() + keep, order.end(),
                    [&](int a, int b) { return v[a] > v[b] || (v[a] == v[b] && a < b); });
  order.resize(keep);
  return order;
}

template <class Real>
void topk_product(const Real* l0, const Real* l1, int N, int K, int32_t* ids, Real* scores) {
  const std::vector<int> rows = top_indices(l0, N, K);
  const std::vector<int> cols = top_indices(l1, N, K);
  struct Candidate {
    Real score;
    int32_t id;
  };
  std::vector<Candidate> candidates;
  // Ranks are 1-based in the a*b <= K rule: (a+1)*(b+1) <= K for 0-based a, b.
  for (int a = 0; a < static_cast<int>(rows.size()); ++a) {
    for (int b = 0; b < static_cast<int>(cols.size()) && (a + 1) * (b + 1) <= K; ++b) {
      candidates.push_back({l0[rows[a]] + l1[cols[b]], rows[a] * N + cols[b]});
    }
  }
  std::sort(candidates.begin(), candidates.end(), [](const Candidate& p, const Candidate& q) {
    return p.score > q.score || (p.score == q.score && p.id < q.id);
  });
  for (int k = 0; k < K; ++k) {
    ids[k] = candidates[k].id;
    scores[k] = candidates[k].score;
  }
}

template <class Real>
Real log_softmax(const Real* q, int N, Real* l) {
  Real max = q[0];
  for (int n = 1; n < N; ++n) max = std::max(max, q[n]);
  Real sum = 0;
  for (int n = 0; n < N; ++n) sum += std::exp(q[n] - max);
  const Real lse = max + std::log(sum);
  for (int n = 0; n < N; ++n) l[n] = q[n] - lse;
  return lse;
}

template <class Real>
void router_gates(const RouterShape& shape, const Real* logits, const int32_t* ids,
                  bool norm_topk_prob, Real* gates, Real* logsumexp) {
  const int N = shape.num_keys, K = shape.top_k;
  std::vector<Real> l0(N), l1(N);
  for (int64_t th = 0; th < shape.tokens * shape.heads; ++th) {
    const Real* q = logits + th * 2 * N;
    logsumexp[2 * th] = log_softmax(q, N, l0.data());
    logsumexp[2 * th + 1] = log_softmax(q + N, N, l1.data());
    const int32_t* id = ids + th * K;
    Real* g = gates + th * K;
    Real sum = 0;
    for (int k = 0; k < K; ++k) sum += g[k] = std::exp(l0[id[k] / N] + l1[id[k] % N]);
    if (norm_topk_prob) {
      for (int k = 0; k < K; ++k) g[k] /= sum;
    }
  }
}

template <class Real>
void router_forward(const RouterShape& shape, const Real* logits, bool norm_topk_prob, int32_t* ids,
                    Real* gates, Real* logsumexp) {
  const int N = shape.num_keys, K = shape.top_k;
  std::vector<Real> l0(N), l1(N), scores(K);
  for (int64_t th = 0; th < shape.tokens * shape.heads; ++th) {
    const Real* q = logits + th * 2 * N;
    log_softmax(q, N, l0.data());
    log_softmax(q + N, N, l1.data());
    topk_product(l0.data(), l1.data(), N, K, ids + th * K, scores.data());
  }
  router_gates(shape, logits, ids, norm_topk_prob, gates, logsumexp);
}

template <class Real>
void router_backward(const RouterShape& shape, const Real* logits, const int32_t* ids,
                     const Real* gates, const Real* logsumexp, const Real* dgates,
                     bool norm_topk_prob, Real* dlogits) {
  const int N = shape.num_keys, K = shape.top_k;
  for (int64_t th = 0; th < shape.tokens * shape.heads; ++th) {
    const Real* g = gates + th * K;
    const Real* dg = dgates + th * K;
    const int32_t* id = ids + th * K;
    Real* dq = dlogits + th * 2 * N;
    std::fill(dq, dq + 2 * N, Real(0));
    Real weighted = 0;  // sum_m g_m * dg_m, the normalisation's share
    if (norm_topk_prob) {
      for (int k = 0; k < K; ++k) weighted += g[k] * dg[k];
    }
    // dq first holds dl, the gradient of the log-probabilities.
    for (int k = 0; k < K; ++k) {
      const Real ds = g[k] * (dg[k] - weighted);
      dq[id[k] / N] += ds;
      dq[N + id[k] % N] += ds;
    }
    for (int c = 0; c < 2; ++c) {
      const Real* q = logits + th * 2 * N + c * N;
      Real* d = dq + c * N;
      Real sum = 0;
      for (int n = 0; n < N; ++n) sum += d[n];
      for (int n = 0; n < N; ++n) d[n] -= std::exp(q[n] - logsumexp[2 * th + c]) * sum;
    }
  }
}

template <class Real>
void experts_forward(const ExpertShape& shape, Activation act, const Real* x,
                     const Real* down_embed, const Real* up_embed, const int32_t* ids,
                     const Real* gates, Real* y, Real* h) {
  const int64_t D = shape.dim, S = shape.slots;
  for (int64_t t = 0; t < shape.tokens; ++t) {
    Real* yt = y + t * D;
    std::fill(yt, yt + D, Real(0));
    for (int64_t s = 0; s < S; ++s) {
      const int64_t e = ids[t * S + s];
      if (e < 0) {  // an empty slot
        h[t * S + s] = 0;
        continue;
      }
      Real dot = 0;
      for (int64_t d = 0; d < D; ++d) dot += x[t * D + d] * down_embed[e * D + d];
      h[t * S + s] = dot;
      const Real a = activate(act, dot) * gates[t * S + s];
      for (int64_t d = 0; d < D; ++d) yt[d] += a * up_embed[e * D + d];
    }
  }
}

template <class Real>
void experts_backward_rows(const ExpertShape& shape, Activation act, const Real* down_embed,
                           const Real* up_embed, const int32_t* ids, const Real* gates,
                           const Real* h, const Real* dy, Real* dx, Real* dgates, Real* dh,
                           Real* a) {
  const int64_t D = shape.dim, S = shape.slots;
  std::fill(dx, dx + shape.tokens * D, Real(0));
  for (int64_t t = 0; t < shape.tokens; ++t) {
    for (int64_t s = 0; s < S; ++s) {
      const int64_t ts = t * S + s, e = ids[ts];
      if (e < 0) {  // an empty slot
        dgates[ts] = dh[ts] = a[ts] = 0;
        continue;
      }
      Real z = 0;
      for (int64_t d = 0; d < D; ++d) z += dy[t * D + d] * up_embed[e * D + d];
      dgates[ts] = activate(act, h[ts]) * z;
      a[ts] = activate(act, h[ts]) * gates[ts];
      dh[ts] = z * gates[ts] * activate_grad(act, h[ts]);
      for (int64_t d = 0; d < D; ++d) dx[t * D + d] += dh[ts] * down_embed[e * D + d];
    }
  }
}

template <class Real>
void experts_backward_tables(const ExpertShape& shape, const Real* x, const int32_t* ids,
                             const Real* dh, const Real* a, const Real* dy, Real* d_down,
                             Real* d_up) {
  const int64_t D = shape.dim, S = shape.slots;
  std::fill(d_down, d_down + shape.num_experts * D, Real(0));
  std::fill(d_up, d_up + shape.num_experts * D, Real(0));
  for (int64_t ts = 0; ts < shape.tokens * S; ++ts) {
    const int64_t t = ts / S, e = ids[ts];
    if (e < 0) continue;
    for (int64_t d = 0; d < D; ++d) {
      d_up[e * D + d] += a[ts] * dy[t * D + d];
      d_down[e * D + d] += dh[ts] * x[t * D + d];
    }
  }
}

template <class Real>
void experts_backward(const ExpertShape& shape, Activation act, const Real* x,
                      const Real* down_embed, const Real* up_embed, const int32_t* ids,
                      const Real* gates, const Real* h, const Real* dy, Real* dx, Real* dgates,
                      Real* d_down, Real* d_up) {
  std::vector<Real> dh(shape.tokens * shape.slots), a(dh.size());
  experts_backward_rows(shape, act, down_embed, up_embed, ids, gates, h, dy, dx, dgates, dh.data(),
                        a.data());
  experts_backward_tables(shape, x, ids, dh.data(), a.data(), dy, d_down, d_up);
}

std::vector<int32_t> touched_experts(const int32_t* ids, int64_t count) {
  std::vector<int32_t> rows;
  std::copy_if(ids, ids + count, std::back_inserter(rows), [](int32_t id) { return id >= 0; });
  std::sort(rows.begin(), rows.end());
  rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
  return rows;
}

#define FLASHMOE_INSTANTIATE_REFERENCE(Real)                                                       \
  template std::vector<int> top_indices(const Real*, int, int);                                    \
  template void topk_product(const Real*, const Real*, int, int, int32_t*, Real*);                 \
  template Real log_softmax(const Real*, int, Real*);                                              \
  template void router_forward(const RouterShape&, const Real*, bool, int32_t*, Real*, Real*);     \
  template void router_gates(const RouterShape&, const Real*, const int32_t*, bool, Real*, Real*); \
  template void router_backward(const RouterShape&, const Real*, const int32_t*, const Real*,      \
                                const Real*, const Real*, bool, Real*);                            \
  template void experts_forward(const ExpertShape&, Activation, const Real*, const Real*,          \
                                const Real*, const int32_t*, const Real*, Real*, Real*);           \
  template void experts_backward(const ExpertShape&, Activation, const Real*, const Real*,         \
                                 const Real*, const int32_t*, const Real*, const Real*,            \
                                 const Real*, Real*, Real*, Real*, Real*);                         \
  template void experts_backward_rows(const ExpertShape&, Activation, const Real*, const Real*,    \
                                      const int32_t*, const Real*, const Real*, const Real*,       \
                                      Real*, Real*, Real*, Real*);                                 \
  template void experts_backward_tables(const ExpertShape&, const Real*, const int32_t*,           \
                                        const Real*, const Real*, const Real*, Real*, Real*);

FLASHMOE_INSTANTIATE_REFERENCE(float)
FLASHMOE_INSTANTIATE_REFERENCE(double)

}  // namespace flashmoe::ref
