#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/attention.h"
#include "kernels/linear.h"
#include "kernels/op_utils.cuh"

namespace flashmoe {

namespace {

// ---- Layouts: rows [T, parts * H d] (qkv: parts 3, out: parts 1) <-> heads [B H, L, d].

struct HeadShape {
  int64_t batch, seq_len, heads, head_dim;
  FLASHMOE_HD int64_t width() const { return heads * head_dim; }
};

// The RoPE rotation of position i (sign +1) or its transpose (sign -1); no table: identity.
struct Rotation {
  const float* cos_table = nullptr;  // [L, d/2]
  const float* sin_table = nullptr;
  float sign = 1;

  // Elements [c, c + W) of vec rotated, W dividing d / 2 where there is a table (a pack
  // never straddles the two halves).
  template <int W, class T>
  FLASHMOE_HD Lanes<W, float> apply(const T* vec, int64_t c, int64_t d, int64_t i) const {
    const Lanes<W, T> x = load_lanes<W>(vec, c);
    Lanes<W, float> out;
    if (cos_table == nullptr) {
      for (int k = 0; k < W; ++k) out.v[k] = load_float(x.v, k);
      return out;
    }
    const int64_t half = d / 2;
    const bool first_half = c < half;
    const int64_t pair = first_half ? c : c - half;
    const Lanes<W, T> partner = load_lanes<W>(vec, first_half ? c + half : pair);
    const Lanes<W, float> cs = load_lanes<W>(cos_table, i * half + pair);
    const Lanes<W, float> sn = load_lanes<W>(sin_table, i * half + pair);
    for (int k = 0; k < W; ++k) {
      const float a = load_float(x.v, k), b = load_float(partner.v, k);
      out.v[k] = first_half ? a * cs.v[k] - sign * b * sn.v[k] : a * cs.v[k] + sign * b * sn.v[k];
    }
    return out;
  }
};

template <int W, class T>
FLASHMOE_HD void store_rounded(T* p, int64_t i, const Lanes<W, float>& values) {
  Lanes<W, T> out;
  for (int k = 0; k < W; ++k) store_float(out.v, k, values.v[k]);
  store_lanes(p, i, out);
}

// Elements [e, e + W) of heads, e = (n L + i) d + c with n = b H + h: elements c.. of
// head h in part `part` of row b L + i.
template <class T>
struct RowsToHeads {
  const T* rows;
  T* heads;
  HeadShape s;
  int64_t parts, part;
  Rotation rotation;
  template <int W>
  FLASHMOE_HD void operator()(int64_t e) const {
    const auto [r, c] = divide(e, s.head_dim);
    const auto [n, i] = divide(r, s.seq_len);
    const auto [b, h] = divide(n, s.heads);
    const T* vec =
        rows + (b * s.seq_len + i) * parts * s.width() + part * s.width() + h * s.head_dim;
    store_rounded(heads, e, rotation.apply<W>(vec, c, s.head_dim, i));
  }
};

// Elements [e, e + W) of part `part` of rows, e = (t H + h) d + c over t = b L + i: elements
// c.. of head h of row t, from heads[b H + h, i].
template <class T>
struct HeadsToRows {
  const T* heads;
  T* rows;
  HeadShape s;
  int64_t parts, part;
  Rotation rotation;
  template <int W>
  FLASHMOE_HD void operator()(int64_t e) const {
    const auto [r, c] = divide(e, s.head_dim);
    const auto [t, h] = divide(r, s.heads);
    const auto [b, i] = divide(t, s.seq_len);
    const T* vec = heads + ((b * s.heads + h) * s.seq_len + i) * s.head_dim;
    store_rounded(rows, t * parts * s.width() + part * s.width() + h * s.head_dim + c,
                  rotation.apply<W>(vec, c, s.head_dim, i));
  }
};

Rotation rotation_of(const RopeTable& rope, float sign) {
  if (!rope.defined()) return Rotation{};
  return Rotation{rope.cos.data<float>(), rope.sin.data<float>(), sign};
}

// A layout's packs: runs of W elements of one head's row, within one half where there
// is a rotation (for_each_pack takes packs only where d, and d / 2 with a rotation, are
// multiples of them).
template <class Op>
void for_each_head_pack(Device device, int64_t elements, const HeadShape& s,
                        const Rotation& rotation, Op op, const char* name, const void* from,
                        const void* to) {
  const int64_t run = rotation.cos_table ? s.head_dim / 2 : s.head_dim;
  for_each_pack(device, elements, run, op, name,
                {from, to, rotation.cos_table, rotation.sin_table});
}

void rows_to_heads(const Tensor& rows, const HeadShape& s, int64_t parts, int64_t part,
                   Rotation rotation, Tensor& heads) {
  ensure(heads, {s.batch * s.heads, s.seq_len, s.head_dim}, rows.dtype(), rows.device());
  with_storage_type(rows.dtype(), [&]<class T>() {
    for_each_head_pack(rows.device(), heads.numel(), s, rotation,
                       RowsToHeads<T>{rows.data<T>(), heads.data<T>(), s, parts, part, rotation},
                       "rows_to_heads", rows.raw(), heads.raw());
  });
}

// Writes part `part` of rows, which must already have its shape.
void heads_to_rows(const Tensor& heads, const HeadShape& s, int64_t parts, int64_t part,
                   Rotation rotation, Tensor& rows) {
  with_storage_type(heads.dtype(), [&]<class T>() {
    for_each_head_pack(heads.device(), heads.numel(), s, rotation,
                       HeadsToRows<T>{heads.data<T>(), rows.data<T>(), s, parts, part, rotation},
                       "heads_to_rows", heads.raw(), rows.raw());
  });
}

// ---- Products per (sequence, head) pair. a, b, v: [B H, L, d]; s, p: [B H, L, L].

// s[n][i][j] = <a[n][i], b[n][j]> in fp32 for j <= i (the GPU also fills j > i).
template <class T>
void scores_cpu(const T* a, const T* b, int64_t pairs, int64_t L, int64_t d, float* s) {
  for (int64_t n = 0; n < pairs; ++n) {
    const T* an = a + n * L * d;
    const T* bn = b + n * L * d;
    for (int64_t i = 0; i < L; ++i) {
      float* row = s + (n * L + i) * L;
      for (int64_t j = 0; j <= i; ++j) {
        float dot = 0;
        for (int64_t c = 0; c < d; ++c)
          dot += load_float(an, i * d + c) * load_float(bn, j * d + c);
        row[j] = dot;
      }
    }
  }
}

// out[n][i] = sum_{j <= i} p[n][i][j] v[n][j]            (transpose_p false)
// out[n][j] = sum_{i >= j} p[n][i][j] v[n][i]            (transpose_p true)
template <class T>
void mix_cpu(const T* p, const T* v, bool transpose_p, int64_t pairs, int64_t L, int64_t d,
             T* out) {
  std::vector<float> acc(L * d);
  for (int64_t n = 0; n < pairs; ++n) {
    const T* pn = p + n * L * L;
    const T* vn = v + n * L * d;
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t i = 0; i < L; ++i) {
      for (int64_t j = 0; j <= i; ++j) {
        const float w = load_float(pn, i * L + j);
        float* dst = acc.data() + (transpose_p ? j : i) * d;
        const int64_t src = (transpose_p ? i : j) * d;
        for (int64_t c = 0; c < d; ++c) dst[c] += w * load_float(vn, src + c);
      }
    }
    for (int64_t e = 0; e < L * d; ++e) store_float(out, n * L * d + e, acc[e]);
  }
}

// Column-major views for cuBLASLt: a row-major [L, d] matrix is a column-major [d, L] one.
void scores_product(const Tensor& a, const Tensor& b, Tensor& s) {
  const int64_t pairs = a.size(0), L = a.size(1), d = a.size(2);
  ensure(s, {pairs, L, L}, DType::f32, a.device());
  if (a.device() == Device::cuda) {
    // s^T (col-major [L, L]) = b · a^T with b^T, a^T stored as col-major [d, L].
    detail::gemm_cuda_batched(
        {true, false, L, L, d, b.raw(), d, a.raw(), d, s.raw(), L, a.dtype(), DType::f32, 0.0f},
        {pairs, L * d, L * d, L * L});
    return;
  }
  with_storage_type(a.dtype(), [&]<class T>() {
    scores_cpu(a.data<T>(), b.data<T>(), pairs, L, d, s.data<float>());
  });
}

void mix_product(const Tensor& p, const Tensor& v, bool transpose_p, Tensor& out) {
  const int64_t pairs = v.size(0), L = v.size(1), d = v.size(2);
  ensure(out, v.shape(), v.dtype(), v.device());
  if (v.device() == Device::cuda) {
    // out^T (col-major [d, L]) = v^T · p^T, or v^T · p when p is transposed.
    detail::gemm_cuda_batched({false, transpose_p, d, L, L, v.raw(), d, p.raw(), L, out.raw(), d,
                               v.dtype(), v.dtype(), 0.0f},
                              {pairs, L * d, L * L, L * d});
    return;
  }
  with_storage_type(v.dtype(), [&]<class T>() {
    mix_cpu(p.data<T>(), v.data<T>(), transpose_p, pairs, L, d, out.data<T>());
  });
}

// ---- Causal softmax over each row r = n L + i of s, and its backward.

template <class T>
void softmax_cpu(const float* s, int64_t rows, int64_t L, float scale, T* p) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r % L;
    const float* sr = s + r * L;
    float max = sr[0];
    for (int64_t j = 1; j <= i; ++j) max = std::max(max, sr[j]);
    float sum = 0;
    for (int64_t j = 0; j <= i; ++j) sum += std::exp(scale * (sr[j] - max));
    for (int64_t j = 0; j < L; ++j) {
      store_float(p, r * L + j, j <= i ? std::exp(scale * (sr[j] - max)) / sum : 0.0f);
    }
  }
}

template <class T>
void softmax_backward_cpu(const T* p, const float* dp, int64_t rows, int64_t L, float scale,
                          T* ds) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r % L;
    float delta = 0;
    for (int64_t j = 0; j <= i; ++j) delta += load_float(p, r * L + j) * dp[r * L + j];
    for (int64_t j = 0; j < L; ++j) {
      const float g = j <= i ? scale * load_float(p, r * L + j) * (dp[r * L + j] - delta) : 0.0f;
      store_float(ds, r * L + j, g);
    }
  }
}

constexpr int kWarpsPerBlock = 8;

unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

// One warp per row.
template <class T>
__global__ void softmax_kernel(const float* s, int64_t rows, int64_t L, float scale, T* p) {
  const int64_t r = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x & 31;
  const int64_t i = r % L;
  const float* sr = s + r * L;
  float max = -INFINITY;
  for (int64_t j = lane; j <= i; j += 32) max = fmaxf(max, sr[j]);
  max = warp_max(max);
  float sum = 0;
  for (int64_t j = lane; j <= i; j += 32) sum += expf(scale * (sr[j] - max));
  const float inv = 1.0f / warp_sum(sum);
  for (int64_t j = lane; j < L; j += 32) {
    store_float(p, r * L + j, j <= i ? expf(scale * (sr[j] - max)) * inv : 0.0f);
  }
}

template <class T>
__global__ void softmax_backward_kernel(const T* p, const float* dp, int64_t rows, int64_t L,
                                        float scale, T* ds) {
  const int64_t r = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x & 31;
  const int64_t i = r % L;
  float delta = 0;
  for (int64_t j = lane; j <= i; j += 32) delta += load_float(p, r * L + j) * dp[r * L + j];
  delta = warp_sum(delta);
  for (int64_t j = lane; j < L; j += 32) {
    const float g = j <= i ? scale * load_float(p, r * L + j) * (dp[r * L + j] - delta) : 0.0f;
    store_float(ds, r * L + j, g);
  }
}

// p (dtype `dtype`) = causal softmax of scale * s.
void causal_softmax(const Tensor& s, float scale, DType dtype, Tensor& p) {
  const int64_t L = s.size(2), rows = s.size(0) * L;
  ensure(p, s.shape(), dtype, s.device());
  with_storage_type(dtype, [&]<class T>() {
    if (s.device() == Device::cpu) {
      softmax_cpu(s.data<float>(), rows, L, scale, p.data<T>());
      return;
    }
    if (rows == 0) return;
    softmax_kernel<<<row_blocks(rows), 32 * kWarpsPerBlock, 0, current_stream()>>>(
        s.data<float>(), rows, L, scale, p.data<T>());
    CUDA_CHECK_LAUNCH("softmax_kernel");
  });
}

void causal_softmax_backward(const Tensor& p, const Tensor& dp, float scale, Tensor& ds) {
  const int64_t L = p.size(2), rows = p.size(0) * L;
  ensure(ds, p.shape(), p.dtype(), p.device());
  with_storage_type(p.dtype(), [&]<class T>() {
    if (p.device() == Device::cpu) {
      softmax_backward_cpu(p.data<T>(), dp.data<float>(), rows, L, scale, ds.data<T>());
      return;
    }
    if (rows == 0) return;
    softmax_backward_kernel<<<row_blocks(rows), 32 * kWarpsPerBlock, 0, current_stream()>>>(
        p.data<T>(), dp.data<float>(), rows, L, scale, ds.data<T>());
    CUDA_CHECK_LAUNCH("softmax_backward_kernel");
  });
}

float softmax_scale(int64_t head_dim) { return 1.0f / std::sqrt(static_cast<float>(head_dim)); }

void check_rows(const Tensor& t, int64_t width, const char* name) {
  FLASHMOE_CHECK(
      t.defined() && t.rank() == 2 && t.size(1) == width,
      name << " has shape " << shape_string(t.shape()) << ", expected [T, " << width << "]");
  expect_float(t, name);
}

}  // namespace

RopeTable make_rope_table(int64_t max_seq_len, int64_t head_dim, double theta, Device device) {
  FLASHMOE_CHECK(head_dim >= 2 && head_dim % 2 == 0,
                 "RoPE head width is " << head_dim << ", expected an even number >= 2");
  FLASHMOE_CHECK(max_seq_len >= 1, "RoPE sequence length is " << max_seq_len << ", expected >= 1");
  FLASHMOE_CHECK(theta > 1, "rope_theta is " << theta << ", expected > 1");
  const int64_t half = head_dim / 2;
  std::vector<float> cos(max_seq_len * half), sin(max_seq_len * half);
  for (int64_t i = 0; i < max_seq_len; ++i) {
    for (int64_t c = 0; c < half; ++c) {
      const double angle = double(i) * std::pow(theta, -2.0 * double(c) / double(head_dim));
      cos[i * half + c] = static_cast<float>(std::cos(angle));
      sin[i * half + c] = static_cast<float>(std::sin(angle));
    }
  }
  return {Tensor::from_floats(cos, {max_seq_len, half}, DType::f32, device),
          Tensor::from_floats(sin, {max_seq_len, half}, DType::f32, device)};
}

CausalSelfAttention::CausalSelfAttention(int64_t heads, int64_t head_dim, RopeTable rope)
    : heads_(heads), head_dim_(head_dim), rope_(std::move(rope)) {
  FLASHMOE_CHECK(heads >= 1 && head_dim >= 1,
                 "attention has " << heads << " heads of width " << head_dim << ", expected >= 1");
  FLASHMOE_CHECK(
      !rope_.defined() || rope_.cos.size(1) * 2 == head_dim,
      "RoPE table has " << rope_.cos.size(1) << " pairs, expected head_dim / 2 = " << head_dim / 2);
}

const Tensor& CausalSelfAttention::forward(const Tensor& qkv, int64_t batch,
                                           AttentionWorkspace& ws) {
  const int64_t D = heads_ * head_dim_;
  check_rows(qkv, 3 * D, "attention qkv");
  FLASHMOE_CHECK(batch >= 1 && qkv.size(0) % batch == 0 && qkv.size(0) > 0,
                 "attention qkv has " << qkv.size(0) << " rows, expected a positive multiple of "
                                      << batch << " sequences");
  batch_ = batch;
  seq_len_ = qkv.size(0) / batch;
  if (rope_.defined()) {
    expect_device(qkv, rope_.cos.device(), "attention qkv");
    FLASHMOE_CHECK(seq_len_ <= rope_.cos.size(0), "attention sequence length is "
                                                      << seq_len_
                                                      << ", expected <= " << rope_.cos.size(0)
                                                      << ", the length of the RoPE table");
  }
  const HeadShape s{batch_, seq_len_, heads_, head_dim_};
  const Rotation rotation = rotation_of(rope_, 1.0f);
  rows_to_heads(qkv, s, 3, 0, rotation, q_);
  rows_to_heads(qkv, s, 3, 1, rotation, k_);
  rows_to_heads(qkv, s, 3, 2, Rotation{}, v_);

  const float scale = softmax_scale(head_dim_);
  scores_product(q_, k_, ws.scores);
  causal_softmax(ws.scores, scale, qkv.dtype(), probs_);
  mix_product(probs_, v_, false, o_);
  ensure(out_, {qkv.size(0), D}, qkv.dtype(), qkv.device());
  heads_to_rows(o_, s, 1, 0, Rotation{}, out_);
  return out_;
}

const Tensor& CausalSelfAttention::backward(const Tensor& dout, AttentionWorkspace& ws) {
  FLASHMOE_CHECK(probs_.defined(), "attention backward called before forward");
  const int64_t D = heads_ * head_dim_;
  expect_tensor(dout, out_.shape(), out_.dtype(), out_.device(), "attention dout");
  const HeadShape s{batch_, seq_len_, heads_, head_dim_};
  rows_to_heads(dout, s, 1, 0, Rotation{}, do_);

  const float scale = softmax_scale(head_dim_);
  mix_product(probs_, do_, true, dv_);
  scores_product(do_, v_, ws.scores);
  causal_softmax_backward(probs_, ws.scores, scale, ws.dscores);
  mix_product(ws.dscores, k_, false, dq_);
  mix_product(ws.dscores, q_, true, dk_);

  const Rotation transposed = rotation_of(rope_, -1.0f);
  ensure(dqkv_, {dout.size(0), 3 * D}, dout.dtype(), dout.device());
  heads_to_rows(dq_, s, 3, 0, transposed, dqkv_);
  heads_to_rows(dk_, s, 3, 1, transposed, dqkv_);
  heads_to_rows(dv_, s, 3, 2, Rotation{}, dqkv_);
  return dqkv_;
}

}  // namespace flashmoe
