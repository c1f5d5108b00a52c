// The language model's ops (attention, cross-entropy, embeddings) against float64
// references and finite differences, and the whole model on the CPU backend: its
// gradients against finite differences, accumulation, evaluation and determinism.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <string>

#include "core/philox.h"
#include "kernels/attention.h"
#include "kernels/attention_reference.h"
#include "kernels/cross_entropy.h"
#include "kernels/embedding.h"
#include "tests/test_util.h"
#include "trainer/model.h"

namespace flashmoe {
namespace {

using test::relative_error;

std::vector<double> uniform_values(int64_t n, uint64_t seed, double bound = 1.0) {
  std::vector<double> v(n);
  for (int64_t i = 0; i < n; ++i) {
    v[i] = philox_uniform(seed, 5, i, -float(bound), float(bound));
  }
  return v;
}

std::vector<float> to_float_vector(const std::vector<double>& v) {
  return std::vector<float>(v.begin(), v.end());
}

Tensor random_tokens(int64_t batch, int64_t length, int64_t vocab, uint64_t seed, Device device) {
  std::vector<int32_t> ids(batch * length);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = int32_t(philox_u32(seed, 7, i) % vocab);
  return Tensor::from_vector(ids, {batch, length}, device);
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  return std::inner_product(a.begin(), a.end(), b.begin(), 0.0);
}

// ---- Attention ----

struct AttentionCase {
  int64_t batch, seq_len, heads, head_dim;
  double rope_theta;  // 0: no RoPE
};

const AttentionCase kAttentionCases[] = {
    {2, 5, 2, 4, 10000.0}, {1, 7, 3, 6, 0.0}, {3, 4, 1, 8, 500.0}, {1, 1, 2, 2, 10000.0}};

ref::AttentionConfig ref_config(const AttentionCase& c) {
  return {c.batch, c.seq_len, c.heads, c.head_dim, c.rope_theta};
}

TEST(AttentionReference, GradientMatchesFiniteDifferences) {
  for (const AttentionCase& c : kAttentionCases) {
    SCOPED_TRACE(testing::Message() << "L=" << c.seq_len << " H=" << c.heads << " d=" << c.head_dim
                                    << " theta=" << c.rope_theta);
    const ref::AttentionConfig cfg = ref_config(c);
    const int64_t T = c.batch * c.seq_len, D = c.heads * c.head_dim;
    std::vector<double> qkv = uniform_values(T * 3 * D, 1, 2.0);
    const std::vector<double> dout = uniform_values(T * D, 2);
    const std::vector<double> grad = ref::attention_backward(cfg, qkv, dout);
    // d/dqkv of <dout, out(qkv)>, by central differences.
    std::vector<double> numeric(qkv.size());
    const double eps = 1e-6;
    for (size_t i = 0; i < qkv.size(); ++i) {
      const double saved = qkv[i];
      qkv[i] = saved + eps;
      const double plus = dot(dout, ref::attention_forward(cfg, qkv));
      qkv[i] = saved - eps;
      const double minus = dot(dout, ref::attention_forward(cfg, qkv));
      qkv[i] = saved;
      numeric[i] = (plus - minus) / (2 * eps);
    }
    EXPECT_LT(relative_error(grad, numeric), 1e-6);
  }
}

TEST(AttentionReference, FirstPositionCopiesItsValue) {
  // Position 0 attends only to itself: o_0 = v_0, whatever q and k are.
  const ref::AttentionConfig cfg{1, 3, 2, 4, 10000.0};
  const std::vector<double> qkv = uniform_values(3 * 3 * 8, 3);
  const std::vector<double> out = ref::attention_forward(cfg, qkv);
  for (int64_t c = 0; c < 8; ++c) EXPECT_DOUBLE_EQ(out[c], qkv[16 + c]);
}

TEST(AttentionCpu, Fp32MatchesReference) {
  for (const AttentionCase& c : kAttentionCases) {
    SCOPED_TRACE(testing::Message() << "L=" << c.seq_len << " H=" << c.heads << " d=" << c.head_dim
                                    << " theta=" << c.rope_theta);
    const int64_t T = c.batch * c.seq_len, D = c.heads * c.head_dim;
    const std::vector<double> qkv = uniform_values(T * 3 * D, 4, 2.0);
    const std::vector<double> dout = uniform_values(T * D, 5);
    RopeTable rope;
    if (c.rope_theta != 0)
      rope = make_rope_table(c.seq_len + 3, c.head_dim, c.rope_theta, Device::cpu);
    CausalSelfAttention attention(c.heads, c.head_dim, rope);
    AttentionWorkspace workspace;
    const Tensor qkv_t =
        Tensor::from_floats(to_float_vector(qkv), {T, 3 * D}, DType::f32, Device::cpu);
    const Tensor dout_t =
        Tensor::from_floats(to_float_vector(dout), {T, D}, DType::f32, Device::cpu);
    // The reference sees the fp32-rounded inputs the op sees.
    const std::vector<double> qkv_f = qkv_t.to_doubles(), dout_f = dout_t.to_doubles();
    EXPECT_LT(relative_error(attention.forward(qkv_t, c.batch, workspace).to_doubles(),
                             ref::attention_forward(ref_config(c), qkv_f)),
              1e-5);
    EXPECT_LT(relative_error(attention.backward(dout_t, workspace).to_doubles(),
                             ref::attention_backward(ref_config(c), qkv_f, dout_f)),
              1e-5);
  }
}

TEST(AttentionCpu, Bf16CloseToReference) {
  const AttentionCase c{2, 6, 2, 8, 10000.0};
  const int64_t T = c.batch * c.seq_len, D = c.heads * c.head_dim;
  const Tensor qkv = Tensor::from_floats(to_float_vector(uniform_values(T * 3 * D, 6)), {T, 3 * D},
                                         DType::bf16, Device::cpu);
  const Tensor dout = Tensor::from_floats(to_float_vector(uniform_values(T * D, 7)), {T, D},
                                          DType::bf16, Device::cpu);
  CausalSelfAttention attention(c.heads, c.head_dim,
                                make_rope_table(c.seq_len, c.head_dim, c.rope_theta, Device::cpu));
  AttentionWorkspace workspace;
  EXPECT_LT(relative_error(attention.forward(qkv, c.batch, workspace).to_doubles(),
                           ref::attention_forward(ref_config(c), qkv.to_doubles())),
            2e-2);
  EXPECT_LT(
      relative_error(attention.backward(dout, workspace).to_doubles(),
                     ref::attention_backward(ref_config(c), qkv.to_doubles(), dout.to_doubles())),
      3e-2);
}

TEST(AttentionCpu, RejectsBadShapes) {
  CausalSelfAttention attention(2, 4, make_rope_table(8, 4, 10000.0, Device::cpu));
  AttentionWorkspace workspace;
  EXPECT_THROW(attention.forward(Tensor::zeros({6, 20}, DType::f32, Device::cpu), 2, workspace),
               Error);
  EXPECT_THROW(attention.forward(Tensor::zeros({6, 24}, DType::f32, Device::cpu), 4, workspace),
               Error);
  EXPECT_THROW(attention.forward(Tensor::zeros({18, 24}, DType::f32, Device::cpu), 1, workspace),
               Error)
      << "longer than the RoPE table";
  EXPECT_THROW(attention.backward(Tensor::zeros({6, 8}, DType::f32, Device::cpu), workspace), Error)
      << "backward before forward";
  EXPECT_THROW(make_rope_table(8, 5, 10000.0, Device::cpu), Error) << "odd head width";
}

// ---- Cross-entropy ----

struct CrossEntropyReference {
  double loss = 0;
  std::vector<double> dlogits;
  double eval_nll = 0, eval_correct = 0, eval_count = 0;
};

CrossEntropyReference cross_entropy_reference(const std::vector<double>& z,
                                              const std::vector<int32_t>& y,
                                              const std::vector<int32_t>& mask, int64_t V,
                                              double scale) {
  CrossEntropyReference r;
  r.dlogits.resize(z.size());
  for (size_t t = 0; t < y.size(); ++t) {
    const double* row = z.data() + t * V;
    double max = row[0], sum = 0;
    int64_t argmax = 0;
    for (int64_t v = 1; v < V; ++v) {
      if (row[v] > max) max = row[v], argmax = v;
    }
    for (int64_t v = 0; v < V; ++v) sum += std::exp(row[v] - max);
    const double lse = max + std::log(sum), nll = lse - row[y[t]];
    r.loss += scale * nll;
    for (int64_t v = 0; v < V; ++v) {
      r.dlogits[t * V + v] = scale * (std::exp(row[v] - lse) - (v == y[t] ? 1.0 : 0.0));
    }
    if (mask[t]) {
      r.eval_nll += nll;
      r.eval_correct += argmax == y[t];
      r.eval_count += 1;
    }
  }
  return r;
}

TEST(CrossEntropyCpu, MatchesReference) {
  const int64_t T = 9, V = 37;
  std::vector<double> z = uniform_values(T * V, 8, 4.0);
  z[3 * V + 5] = z[3 * V + 9] = 10.0;  // a tie for the argmax: the smaller id wins
  std::vector<int32_t> y(T), mask(T);
  for (int64_t t = 0; t < T; ++t) y[t] = int32_t(philox_u32(9, 1, t) % V), mask[t] = t % 3 != 1;
  y[3] = 5;
  const Tensor logits = Tensor::from_floats(to_float_vector(z), {T, V}, DType::f32, Device::cpu);
  const Tensor targets = Tensor::from_vector(y, {T}, Device::cpu);
  const double scale = 1.0 / 7.0;
  const CrossEntropyReference want =
      cross_entropy_reference(logits.to_doubles(), y, mask, V, scale);

  CrossEntropyBuffers buffers;
  Tensor loss, dlogits, sums;
  cross_entropy_forward_backward(logits, targets, scale, buffers, loss, dlogits);
  EXPECT_EQ(loss.numel(), 1);
  EXPECT_NEAR(loss.to_doubles()[0], want.loss, 1e-6 * want.loss);
  EXPECT_LT(relative_error(dlogits.to_doubles(), want.dlogits), 1e-6);

  cross_entropy_evaluate(logits, targets, Tensor::from_vector(mask, {T}, Device::cpu), buffers,
                         sums);
  const std::vector<double> got = sums.to_doubles();
  EXPECT_NEAR(got[0], want.eval_nll, 1e-6 * want.eval_nll);
  EXPECT_EQ(got[1], want.eval_correct);
  EXPECT_EQ(got[2], want.eval_count);
}

TEST(CrossEntropyCpu, RejectsOutOfRangeTargets) {
  CrossEntropyBuffers buffers;
  Tensor loss, dlogits;
  const Tensor logits = Tensor::zeros({2, 4}, DType::f32, Device::cpu);
  EXPECT_THROW(
      cross_entropy_forward_backward(logits, Tensor::from_vector<int32_t>({1, 4}, {2}, Device::cpu),
                                     1.0, buffers, loss, dlogits),
      Error);
  EXPECT_THROW(cross_entropy_forward_backward(
                   logits, Tensor::from_vector<int32_t>({1, 2, 3}, {3}, Device::cpu), 1.0, buffers,
                   loss, dlogits),
               Error);
}

// ---- Embeddings ----

TEST(ModelOps, SplitNextTokenShiftsTargets) {
  const Tensor tokens = Tensor::from_vector<int32_t>({1, 2, 3, 4, 5, 6, 7, 8}, {2, 4}, Device::cpu);
  Tensor inputs, targets;
  split_next_token(tokens, 9, inputs, targets);
  EXPECT_EQ(inputs.to_vector<int32_t>(), (std::vector<int32_t>{1, 2, 3, 5, 6, 7}));
  EXPECT_EQ(targets.to_vector<int32_t>(), (std::vector<int32_t>{2, 3, 4, 6, 7, 8}));
  EXPECT_THROW(split_next_token(tokens, 8, inputs, targets), Error) << "token 8 of vocab 8";
}

TEST(ModelOps, EmbeddingMatchesReference) {
  const int64_t V = 6, D = 5, L = 4, B = 3, T = B * L;
  const std::vector<int32_t> ids = {3, 0, 3, 5, 1, 3, 0, 0, 2, 5, 3, 1};
  const Tensor ids_t = Tensor::from_vector(ids, {T}, Device::cpu);
  const Tensor table = Tensor::from_floats(to_float_vector(uniform_values(V * D, 10)), {V, D},
                                           DType::f32, Device::cpu);
  const Tensor positions = Tensor::from_floats(to_float_vector(uniform_values((L + 2) * D, 11)),
                                               {L + 2, D}, DType::f32, Device::cpu);
  const Tensor dx = Tensor::from_floats(to_float_vector(uniform_values(T * D, 12)), {T, D},
                                        DType::f32, Device::cpu);
  const std::vector<double> e = table.to_doubles(), p = positions.to_doubles(), g = dx.to_doubles();
  std::vector<double> want_x(T * D), want_de(V * D, 0.5), want_dp((L + 2) * D, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t c = 0; c < D; ++c) {
      want_x[t * D + c] = e[ids[t] * D + c] + p[(t % L) * D + c];
      want_de[ids[t] * D + c] += g[t * D + c];
      want_dp[(t % L) * D + c] += g[t * D + c];
    }
  }
  Tensor x;
  embedding_forward(ids_t, table, positions, L, x);
  EXPECT_LT(relative_error(x.to_doubles(), want_x), 1e-7);

  Tensor dtable = Tensor::empty({V, D}, DType::f32, Device::cpu);
  dtable.fill(0.5f);  // the backward adds to what the head's gradient left there
  EmbeddingGradWorkspace workspace;
  embedding_backward(ids_t, dx, workspace, dtable);
  EXPECT_LT(relative_error(dtable.to_doubles(), want_de), 1e-6);

  Tensor dpositions = Tensor::empty({L + 2, D}, DType::f32, Device::cpu);
  dpositions.fill(9.0f);  // overwritten, rows past L zeroed
  position_backward(dx, L, workspace, dpositions);
  EXPECT_LT(relative_error(dpositions.to_doubles(), want_dp), 1e-6);

  EXPECT_THROW(embedding_forward(Tensor::from_vector<int32_t>({0, 6, 1, 2}, {4}, Device::cpu),
                                 table, Tensor(), L, x),
               Error)
      << "id out of range";
}

// ---- The model ----

struct ModelCase {
  const char* name;
  PosEmbedding pos;
  std::vector<int64_t> moe_layers;
  int64_t n_layers;
};

ModelConfig tiny_model(const ModelCase& c) {
  ModelConfig m;
  m.vocab = 23;
  m.d_model = 16;
  m.n_layers = c.n_layers;
  m.n_heads = 2;
  m.seq_len = 8;
  m.moe_layers = c.moe_layers;
  m.pos_embedding = c.pos;
  return m;
}

MoeConfig tiny_moe() {
  MoeConfig m;
  m.num_experts = 16;
  m.top_k = 2;
  m.heads = 1;
  m.shared_intermediate = 24;
  return m;
}

const ModelCase kModelCases[] = {
    {"rope, dense", PosEmbedding::rope, {}, 2},
    {"learned, dense", PosEmbedding::learned, {}, 1},
    {"rope, moe in block 1", PosEmbedding::rope, {1}, 2},
    {"learned, moe everywhere", PosEmbedding::learned, {0, 1}, 2},
};

std::vector<std::vector<float>> gradients(Model& model) {
  std::vector<std::vector<float>> out;
  for (Parameter* p : model.parameters()) out.push_back(p->grad.to_floats());
  return out;
}

double step_loss(Model& model, const Tensor& tokens) {
  return model.forward_backward(tokens, mean_loss_scale(tokens)).to_doubles()[0];
}

// The mean loss in evaluation mode, summed in fp64 over the fp32 row losses: finer than
// the fp32 training loss (whose rounding step near 3 is 2.4e-7).
double eval_loss(Model& model, const Tensor& tokens) {
  const int64_t B = tokens.size(0), L = tokens.size(1) - 1;
  const Tensor all = Tensor::from_vector(std::vector<int32_t>(B * L, 1), {B, L}, Device::cpu);
  return model.evaluate(tokens, all).to_doubles()[0] / double(B * L);
}

// Central differences in fp32 along each parameter's own gradient direction: the change
// of the loss between theta - eps u and theta + eps u against g . (theta+ - theta-),
// where theta+- are the fp32 values actually used. One directional derivative per tensor
// sums over all its entries, so the fp32 rounding noise of the loss (about 1e-7 of it,
// averaged over the rows) stays far below the signal; the truncation error is O(eps^2).
// A wrong gradient formula is off by O(1) in some tensor, far above the tolerance.
// The loss is evaluated in evaluation mode, which is the training function when the
// router norm is not batchnorm (batchnorm's gradient has its own tests in the layer's
// suites). Every token selects all E = K = 4 experts, so no selection can flip between
// theta- and theta+ (a flip is a jump of the loss); the gates still carry the router's
// gradient.
TEST(ModelCpu, GradientsMatchFiniteDifferences) {
  MoeConfig moe = tiny_moe();
  moe.router_norm = RouterNorm::rmsnorm;
  moe.num_experts = moe.top_k = 4;
  for (const ModelCase& c : kModelCases) {
    SCOPED_TRACE(c.name);
    Model model(tiny_model(c), moe, Device::cpu, DType::f32, 3);
    const Tensor tokens = random_tokens(3, 9, 23, 4, Device::cpu);
    step_loss(model, tokens);
    const std::vector<std::vector<float>> grads = gradients(model);
    std::vector<Parameter*> params = model.parameters();
    for (size_t i = 0; i < params.size(); ++i) {
      SCOPED_TRACE(params[i]->name);
      float* value = params[i]->value.data<float>();
      const std::vector<float> saved = params[i]->value.to_floats();
      double norm = 0;
      for (float g : grads[i]) norm += double(g) * g;
      norm = std::sqrt(norm);
      ASSERT_GT(norm, 0) << "no gradient";
      const double eps = 1e-3;
      std::vector<double> plus(saved.size()), minus(saved.size());
      for (size_t k = 0; k < saved.size(); ++k) {
        plus[k] = value[k] = float(saved[k] + eps * grads[i][k] / norm);
      }
      const double loss_plus = eval_loss(model, tokens);
      for (size_t k = 0; k < saved.size(); ++k) {
        minus[k] = value[k] = float(saved[k] - eps * grads[i][k] / norm);
      }
      const double loss_minus = eval_loss(model, tokens);
      std::copy(saved.begin(), saved.end(), value);
      double predicted = 0;
      for (size_t k = 0; k < saved.size(); ++k) predicted += grads[i][k] * (plus[k] - minus[k]);
      EXPECT_NEAR(loss_plus - loss_minus, predicted, 2e-3 * std::abs(predicted) + 1e-7);
    }
  }
}

TEST(ModelCpu, InitialLossIsNearUniform) {
  Model model(tiny_model(kModelCases[2]), tiny_moe(), Device::cpu, DType::f32, 3);
  const double loss = step_loss(model, random_tokens(4, 9, 23, 5, Device::cpu));
  EXPECT_NEAR(loss, std::log(23.0), 0.5);
}

TEST(ModelCpu, ParametersAreNamedAndGainsSkipWeightDecay) {
  Model model(tiny_model(kModelCases[3]), tiny_moe(), Device::cpu, DType::bf16, 3);
  std::vector<std::string> names;
  for (Parameter* p : model.parameters()) {
    names.push_back(p->name);
    const bool gain = p->name.ends_with(".gain");
    EXPECT_EQ(p->weight_decay, !gain && !p->expert_table) << p->name;
    EXPECT_EQ(p->value.dtype(), gain ? DType::f32 : DType::bf16) << p->name;
    EXPECT_EQ(p->grad.dtype(), DType::f32) << p->name;
    EXPECT_EQ(p->grad.shape(), p->value.shape()) << p->name;
  }
  const std::vector<std::string> want = {"embed",
                                         "pos_embed",
                                         "blocks.0.attn_norm.gain",
                                         "blocks.0.attn.w_qkv",
                                         "blocks.0.attn.w_o",
                                         "blocks.0.ffn_norm.gain",
                                         "blocks.0.moe.w_gate_up",
                                         "blocks.0.moe.w_down",
                                         "blocks.0.moe.w_router",
                                         "blocks.0.moe.down_embed",
                                         "blocks.0.moe.up_embed",
                                         "blocks.1.attn_norm.gain",
                                         "blocks.1.attn.w_qkv",
                                         "blocks.1.attn.w_o",
                                         "blocks.1.ffn_norm.gain",
                                         "blocks.1.moe.w_gate_up",
                                         "blocks.1.moe.w_down",
                                         "blocks.1.moe.w_router",
                                         "blocks.1.moe.down_embed",
                                         "blocks.1.moe.up_embed",
                                         "final_norm.gain"};
  EXPECT_EQ(names, want);
  EXPECT_EQ(model.moe_layers().size(), 2u);

  Model dense(tiny_model(kModelCases[0]), tiny_moe(), Device::cpu, DType::f32, 3);
  std::vector<Parameter*> p = dense.parameters();
  EXPECT_EQ(p[1]->name, "blocks.0.attn_norm.gain") << "no pos_embed with RoPE";
  EXPECT_EQ(p[5]->name, "blocks.0.mlp.w_gate_up");
  EXPECT_EQ(p[5]->value.shape(), (Shape{48, 16})) << "F = moe.shared_intermediate";
  EXPECT_TRUE(dense.moe_layers().empty());
}

TEST(ModelCpu, AccumulateAddsMicroBatchGradients) {
  for (const ModelCase& c : kModelCases) {
    SCOPED_TRACE(c.name);
    Model model(tiny_model(c), tiny_moe(), Device::cpu, DType::f32, 3);
    const Tensor a = random_tokens(2, 9, 23, 6, Device::cpu),
                 b = random_tokens(2, 9, 23, 7, Device::cpu);
    model.forward_backward(a, 0.25);
    const std::vector<std::vector<float>> ga = gradients(model);
    model.forward_backward(b, 0.25);
    const std::vector<std::vector<float>> gb = gradients(model);
    model.forward_backward(a, 0.25);
    model.forward_backward(b, 0.25, /*accumulate=*/true);
    const std::vector<std::vector<float>> sum = gradients(model);
    for (size_t i = 0; i < sum.size(); ++i) {
      std::vector<double> want(sum[i].size()), got(sum[i].begin(), sum[i].end());
      for (size_t k = 0; k < want.size(); ++k) want[k] = double(ga[i][k]) + gb[i][k];
      EXPECT_LT(relative_error(got, want), 1e-6) << model.parameters()[i]->name;
    }
  }
}

TEST(ModelCpu, EvaluateMatchesTrainingLossOnAllTargets) {
  // Dense blocks: evaluation and training compute the same function.
  Model model(tiny_model(kModelCases[1]), tiny_moe(), Device::cpu, DType::f32, 3);
  const Tensor tokens = random_tokens(3, 9, 23, 8, Device::cpu);
  const double mean = step_loss(model, tokens);
  std::vector<int32_t> mask(3 * 8, 1);
  mask[5] = mask[17] = 0;
  const Tensor mask_all = Tensor::from_vector(std::vector<int32_t>(24, 1), {3, 8}, Device::cpu);
  std::vector<double> sums = model.evaluate(tokens, mask_all).to_doubles();
  EXPECT_NEAR(sums[0] / 24, mean, 1e-6);
  EXPECT_EQ(sums[2], 24);
  EXPECT_GE(sums[1], 0);
  EXPECT_LE(sums[1], 24);
  sums = model.evaluate(tokens, Tensor::from_vector(mask, {3, 8}, Device::cpu)).to_doubles();
  EXPECT_EQ(sums[2], 22);
  EXPECT_LT(sums[0], 24 * mean);
}

TEST(ModelCpu, DeterministicAndSeeded) {
  const ModelCase& c = kModelCases[3];
  const Tensor tokens = random_tokens(2, 9, 23, 9, Device::cpu);
  Model a(tiny_model(c), tiny_moe(), Device::cpu, DType::f32, 11);
  Model b(tiny_model(c), tiny_moe(), Device::cpu, DType::f32, 11);
  Model other(tiny_model(c), tiny_moe(), Device::cpu, DType::f32, 12);
  const double loss_a = step_loss(a, tokens);
  EXPECT_EQ(loss_a, step_loss(b, tokens));
  EXPECT_EQ(gradients(a), gradients(b));
  EXPECT_EQ(loss_a, step_loss(a, tokens)) << "the same model twice";
  EXPECT_NE(a.parameters()[0]->value.to_floats(), other.parameters()[0]->value.to_floats());
}

TEST(ModelCpu, Bf16StepCloseToFp32) {
  const ModelCase& c = kModelCases[2];
  Model bf16_model(tiny_model(c), tiny_moe(), Device::cpu, DType::bf16, 13);
  Model fp32_model(tiny_model(c), tiny_moe(), Device::cpu, DType::f32, 13);
  const Tensor tokens = random_tokens(4, 9, 23, 10, Device::cpu);
  const double bf16_loss = step_loss(bf16_model, tokens), fp32_loss = step_loss(fp32_model, tokens);
  EXPECT_TRUE(std::isfinite(bf16_loss));
  EXPECT_NEAR(bf16_loss, fp32_loss, 2e-2 * fp32_loss);
  EXPECT_LT(relative_error(bf16_model.parameters()[0]->grad, fp32_model.parameters()[0]->grad),
            0.1);
}

TEST(ModelCpu, RejectsBadInputs) {
  Model model(tiny_model(kModelCases[0]), tiny_moe(), Device::cpu, DType::f32, 3);
  EXPECT_THROW(model.forward_backward(random_tokens(2, 10, 23, 1, Device::cpu), 0.1), Error)
      << "longer than seq_len";
  EXPECT_THROW(model.forward_backward(random_tokens(2, 1, 23, 1, Device::cpu), 0.1), Error)
      << "no target";
  EXPECT_THROW(model.forward_backward(random_tokens(2, 9, 30, 1, Device::cpu), 0.1), Error)
      << "token out of range";
  EXPECT_THROW(model.forward_backward(random_tokens(2, 9, 23, 1, Device::cpu), 0.0), Error)
      << "loss scale";
  EXPECT_THROW(model.evaluate(random_tokens(2, 9, 23, 1, Device::cpu),
                              Tensor::zeros({2, 9}, DType::i32, Device::cpu)),
               Error)
      << "mask shape";
  ModelConfig bad = tiny_model(kModelCases[0]);
  bad.n_heads = 3;
  EXPECT_THROW(Model(bad, tiny_moe(), Device::cpu, DType::f32, 3), Error);
  bad = tiny_model(kModelCases[0]);
  bad.moe_layers = {2};
  EXPECT_THROW(Model(bad, tiny_moe(), Device::cpu, DType::f32, 3), Error);
}

}  // namespace
}  // namespace flashmoe
