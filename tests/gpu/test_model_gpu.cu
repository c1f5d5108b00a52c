// The language model's ops and one whole training step on the GPU against the CPU
// backend (fp32), bitwise determinism, CUDA-graph replay, and bad ids without a host
// check.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>

#include "core/graph.h"
#include "core/philox.h"
#include "core/stream.h"
#include "kernels/attention.h"
#include "kernels/cross_entropy.h"
#include "kernels/elementwise.h"
#include "kernels/embedding.h"
#include "tests/test_util.h"
#include "trainer/model.h"

namespace flashmoe {
namespace {

using test::relative_error;

Tensor random_values(Shape shape, DType dtype, Device device, uint64_t seed, float bound = 1.0f) {
  Tensor t = Tensor::empty(std::move(shape), dtype, device);
  init_uniform(t, seed, 13, bound);
  return t;
}

Tensor random_ids(Shape shape, int64_t limit, uint64_t seed, Device device) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::vector<int32_t> ids(n);
  for (int64_t i = 0; i < n; ++i) ids[i] = int32_t(philox_u32(seed, 17, i) % limit);
  return Tensor::from_vector(ids, shape, device);
}

// ---- Attention ----

struct AttentionCase {
  int64_t batch, seq_len, heads, head_dim;
  bool rope;
};

const AttentionCase kAttentionCases[] = {{2, 37, 3, 16, true},
                                         {3, 64, 2, 32, false},
                                         {1, 1, 4, 8, true},
                                         {2, 200, 2, 64, true},
                                         {1, 1024, 2, 128, true}};

TEST(AttentionGpu, Fp32MatchesCpu) {
  FLASHMOE_REQUIRE_GPU();
  for (const AttentionCase& c : kAttentionCases) {
    SCOPED_TRACE(testing::Message() << "B=" << c.batch << " L=" << c.seq_len << " H=" << c.heads
                                    << " d=" << c.head_dim << " rope=" << c.rope);
    const int64_t T = c.batch * c.seq_len, D = c.heads * c.head_dim;
    const Tensor qkv = random_values({T, 3 * D}, DType::f32, Device::cpu, 1, 2.0f);
    const Tensor dout = random_values({T, D}, DType::f32, Device::cpu, 2);
    std::vector<std::vector<double>> results[2];
    for (Device device : {Device::cpu, Device::cuda}) {
      RopeTable rope =
          c.rope ? make_rope_table(c.seq_len, c.head_dim, 10000.0, device) : RopeTable{};
      CausalSelfAttention attention(c.heads, c.head_dim, rope);
      AttentionWorkspace workspace;
      results[int(device)].push_back(
          attention.forward(qkv.to(device), c.batch, workspace).to_doubles());
      results[int(device)].push_back(attention.backward(dout.to(device), workspace).to_doubles());
    }
    EXPECT_LT(relative_error(results[1][0], results[0][0]), 1e-4) << "out";
    EXPECT_LT(relative_error(results[1][1], results[0][1]), 1e-4) << "dqkv";
  }
}

TEST(AttentionGpu, Bf16CloseToFp32) {
  FLASHMOE_REQUIRE_GPU();
  const AttentionCase c{2, 100, 4, 64, true};
  const int64_t T = c.batch * c.seq_len, D = c.heads * c.head_dim;
  const Tensor qkv = random_values({T, 3 * D}, DType::bf16, Device::cuda, 3);
  const Tensor dout = random_values({T, D}, DType::bf16, Device::cuda, 4);
  RopeTable rope = make_rope_table(c.seq_len, c.head_dim, 10000.0, Device::cuda);
  CausalSelfAttention bf16_attention(c.heads, c.head_dim, rope),
      fp32_attention(c.heads, c.head_dim, rope);
  AttentionWorkspace workspace;
  EXPECT_LT(
      relative_error(bf16_attention.forward(qkv, c.batch, workspace).to_doubles(),
                     fp32_attention.forward(qkv.to(DType::f32), c.batch, workspace).to_doubles()),
      2e-2);
  EXPECT_LT(relative_error(bf16_attention.backward(dout, workspace).to_doubles(),
                           fp32_attention.backward(dout.to(DType::f32), workspace).to_doubles()),
            3e-2);
}

TEST(AttentionGpu, BitwiseDeterministic) {
  FLASHMOE_REQUIRE_GPU();
  const AttentionCase c{4, 256, 4, 64, true};
  const int64_t T = c.batch * c.seq_len, D = c.heads * c.head_dim;
  for (DType dtype : {DType::f32, DType::bf16}) {
    const Tensor qkv = random_values({T, 3 * D}, dtype, Device::cuda, 5);
    const Tensor dout = random_values({T, D}, dtype, Device::cuda, 6);
    RopeTable rope = make_rope_table(c.seq_len, c.head_dim, 10000.0, Device::cuda);
    CausalSelfAttention a(c.heads, c.head_dim, rope), b(c.heads, c.head_dim, rope);
    AttentionWorkspace workspace;
    EXPECT_EQ(a.forward(qkv, c.batch, workspace).to_floats(),
              b.forward(qkv, c.batch, workspace).to_floats());
    EXPECT_EQ(a.backward(dout, workspace).to_floats(), b.backward(dout, workspace).to_floats());
  }
}

// ---- Cross-entropy and embeddings ----

TEST(ModelGpuOps, CrossEntropyMatchesCpu) {
  FLASHMOE_REQUIRE_GPU();
  for (int64_t V : {7, 300, 5000}) {
    SCOPED_TRACE(testing::Message() << "V=" << V);
    const int64_t T = 333;
    const Tensor logits = random_values({T, V}, DType::f32, Device::cpu, 7, 6.0f);
    const Tensor targets = random_ids({T}, V, 8, Device::cpu);
    const Tensor mask = random_ids({T}, 2, 9, Device::cpu);
    std::vector<double> loss[2], dlogits[2], sums[2];
    for (Device device : {Device::cpu, Device::cuda}) {
      CrossEntropyBuffers buffers;
      Tensor l, dl, s;
      cross_entropy_forward_backward(logits.to(device), targets.to(device), 1.0 / T, buffers, l,
                                     dl);
      cross_entropy_evaluate(logits.to(device), targets.to(device), mask.to(device), buffers, s);
      loss[int(device)] = l.to_doubles();
      dlogits[int(device)] = dl.to_doubles();
      sums[int(device)] = s.to_doubles();
    }
    EXPECT_LT(relative_error(loss[1], loss[0]), 1e-5);
    EXPECT_LT(relative_error(dlogits[1], dlogits[0]), 1e-5);
    EXPECT_NEAR(sums[1][0], sums[0][0], 1e-5 * sums[0][0]);
    EXPECT_EQ(sums[1][1], sums[0][1]) << "argmax-correct count";
    EXPECT_EQ(sums[1][2], sums[0][2]) << "masked count";
  }
}

TEST(ModelGpuOps, OutOfRangeIdsGiveNanLossAndFiniteRows) {
  FLASHMOE_REQUIRE_GPU();
  Tensor inputs, targets;
  split_next_token(Tensor::from_vector<int32_t>({1, 7, 2, 3, 4, 5, -2, 6}, {2, 4}, Device::cuda), 7,
                   inputs, targets);
  EXPECT_EQ(inputs.to_vector<int32_t>(), (std::vector<int32_t>{1, -1, 2, 4, 5, -1}));
  EXPECT_EQ(targets.to_vector<int32_t>(), (std::vector<int32_t>{-1, -1, 3, 5, -1, -1}));

  CrossEntropyBuffers buffers;
  Tensor loss, dlogits, x;
  const Tensor logits = random_values({3, 5}, DType::f32, Device::cuda, 10);
  cross_entropy_forward_backward(logits, Tensor::from_vector<int32_t>({1, 5, 2}, {3}, Device::cuda),
                                 1.0, buffers, loss, dlogits);
  EXPECT_TRUE(std::isnan(loss.to_floats()[0]));
  for (float g : dlogits.to_floats()) EXPECT_TRUE(std::isfinite(g));

  const Tensor table = random_values({5, 4}, DType::f32, Device::cuda, 11);
  embedding_forward(Tensor::from_vector<int32_t>({0, -1, 4, 5}, {4}, Device::cuda), table, Tensor(),
                    4, x);
  const std::vector<float> rows = x.to_floats(), e = table.to_floats();
  EXPECT_EQ(rows[0], e[0]);
  EXPECT_EQ(rows[4], 0.0f);
  EXPECT_EQ(rows[8], e[16]);
  EXPECT_EQ(rows[12], 0.0f);
}

TEST(ModelGpuOps, EmbeddingMatchesCpu) {
  FLASHMOE_REQUIRE_GPU();
  struct Case {
    int64_t V, D, L, B, distinct;
    DType dtype;
  };
  // Many repeats of each id (runs of one chunk of the GPU's sum); ~28 rows an id, so
  // runs of one and of two chunks; then thousands of rows on 3 ids, over two column tiles
  // of the GPU's sum (the second one partial), in bf16.
  for (const Case c :
       {Case{1000, 96, 50, 7, 40, DType::f32}, Case{300, 64, 129, 33, 150, DType::f32},
        Case{64, 300, 100, 50, 3, DType::bf16}}) {
    SCOPED_TRACE("D " + std::to_string(c.D));
    const int64_t V = c.V, D = c.D, L = c.L, T = c.B * L;
    const Tensor ids = random_ids({T}, c.distinct, 12, Device::cpu);
    const Tensor table = random_values({V, D}, c.dtype, Device::cpu, 13);
    const Tensor positions = random_values({L + 3, D}, c.dtype, Device::cpu, 14);
    const Tensor dx = random_values({T, D}, c.dtype, Device::cpu, 15);
    const Tensor head_grad = random_values({V, D}, DType::f32, Device::cpu, 16);
    std::vector<double> x[2], dtable[2], dpositions[2];
    for (Device device : {Device::cpu, Device::cuda}) {
      Tensor out, dpos = Tensor::empty({L + 3, D}, DType::f32, device);
      Tensor dt = head_grad.to(device);
      EmbeddingGradWorkspace workspace;
      embedding_forward(ids.to(device), table.to(device), positions.to(device), L, out);
      embedding_backward(ids.to(device), dx.to(device), workspace, dt);
      position_backward(dx.to(device), L, workspace, dpos);
      x[int(device)] = out.to_doubles();
      dtable[int(device)] = dt.to_doubles();
      dpositions[int(device)] = dpos.to_doubles();
      if (device == Device::cuda) {  // again: the same bits
        Tensor again = head_grad.to(device);
        embedding_backward(ids.to(device), dx.to(device), workspace, again);
        EXPECT_EQ(again.to_doubles(), dtable[1]);
      }
    }
    EXPECT_EQ(x[1], x[0]) << "a lookup plus one addition is exact on both";
    EXPECT_LT(relative_error(dtable[1], dtable[0]), 1e-5);
    EXPECT_LT(relative_error(dpositions[1], dpositions[0]), 1e-5);
  }
}

// ---- The model ----

struct ModelCase {
  const char* name;
  PosEmbedding pos;
  std::vector<int64_t> moe_layers;
};

const ModelCase kModelCases[] = {{"rope, moe in block 1", PosEmbedding::rope, {1}},
                                 {"learned, dense", PosEmbedding::learned, {}},
                                 {"rope, moe everywhere", PosEmbedding::rope, {0, 1}}};

ModelConfig small_model(const ModelCase& c) {
  ModelConfig m;
  m.vocab = 300;
  m.d_model = 64;
  m.n_layers = 2;
  m.n_heads = 4;
  m.seq_len = 48;
  m.moe_layers = c.moe_layers;
  m.pos_embedding = c.pos;
  return m;
}

MoeConfig small_moe() {
  MoeConfig m;
  m.num_experts = 64;
  m.top_k = 4;
  m.shared_intermediate = 96;
  return m;
}

std::vector<std::vector<float>> gradients(Model& model) {
  std::vector<std::vector<float>> out;
  for (Parameter* p : model.parameters()) out.push_back(p->grad.to_floats());
  return out;
}

TEST(ModelGpu, StepMatchesCpu) {
  FLASHMOE_REQUIRE_GPU();
  for (const ModelCase& c : kModelCases) {
    SCOPED_TRACE(c.name);
    Model cpu(small_model(c), small_moe(), Device::cpu, DType::f32, 21);
    Model gpu(small_model(c), small_moe(), Device::cuda, DType::f32, 21);
    std::vector<Parameter*> pc = cpu.parameters(), pg = gpu.parameters();
    ASSERT_EQ(pc.size(), pg.size());
    for (size_t i = 0; i < pc.size(); ++i) {
      EXPECT_EQ(pc[i]->value.to_floats(), pg[i]->value.to_floats())
          << pc[i]->name << ": initial values differ";
    }
    const Tensor tokens = random_ids({3, 49}, 300, 22, Device::cpu);
    const double scale = mean_loss_scale(tokens);
    const double loss_cpu = cpu.forward_backward(tokens, scale).to_doubles()[0];
    const double loss_gpu = gpu.forward_backward(tokens.to(Device::cuda), scale).to_doubles()[0];
    EXPECT_NEAR(loss_gpu, loss_cpu, 1e-4 * loss_cpu);
    for (size_t i = 0; i < pc.size(); ++i) {
      EXPECT_LT(relative_error(pg[i]->grad, pc[i]->grad), 1e-4) << pc[i]->name;
    }
    const Tensor mask = random_ids({3, 48}, 2, 23, Device::cpu);
    const std::vector<double> eval_cpu = cpu.evaluate(tokens, mask).to_doubles();
    const std::vector<double> eval_gpu =
        gpu.evaluate(tokens.to(Device::cuda), mask.to(Device::cuda)).to_doubles();
    EXPECT_NEAR(eval_gpu[0], eval_cpu[0], 1e-4 * eval_cpu[0]);
    EXPECT_EQ(eval_gpu[2], eval_cpu[2]);
  }
}

TEST(ModelGpu, AccumulationMatchesCpu) {
  FLASHMOE_REQUIRE_GPU();
  const ModelCase& c = kModelCases[0];
  Model cpu(small_model(c), small_moe(), Device::cpu, DType::f32, 24);
  Model gpu(small_model(c), small_moe(), Device::cuda, DType::f32, 24);
  const Tensor a = random_ids({2, 49}, 300, 25, Device::cpu),
               b = random_ids({2, 49}, 300, 26, Device::cpu);
  cpu.forward_backward(a, 0.01);
  cpu.forward_backward(b, 0.01, /*accumulate=*/true);
  gpu.forward_backward(a.to(Device::cuda), 0.01);
  gpu.forward_backward(b.to(Device::cuda), 0.01, /*accumulate=*/true);
  std::vector<Parameter*> pc = cpu.parameters(), pg = gpu.parameters();
  for (size_t i = 0; i < pc.size(); ++i) {
    EXPECT_LT(relative_error(pg[i]->grad, pc[i]->grad), 1e-4) << pc[i]->name;
  }
}

TEST(ModelGpu, Bf16StepCloseToFp32) {
  FLASHMOE_REQUIRE_GPU();
  const ModelCase& c = kModelCases[2];
  Model bf16_model(small_model(c), small_moe(), Device::cuda, DType::bf16, 27);
  Model fp32_model(small_model(c), small_moe(), Device::cuda, DType::f32, 27);
  const Tensor tokens = random_ids({4, 49}, 300, 28, Device::cuda);
  const double bf16_loss = bf16_model.forward_backward(tokens, 0.005).to_doubles()[0];
  const double fp32_loss = fp32_model.forward_backward(tokens, 0.005).to_doubles()[0];
  EXPECT_TRUE(std::isfinite(bf16_loss));
  EXPECT_NEAR(bf16_loss, fp32_loss, 2e-2 * fp32_loss);
}

TEST(ModelGpu, BitwiseDeterministic) {
  FLASHMOE_REQUIRE_GPU();
  const ModelCase& c = kModelCases[0];
  ModelConfig config = small_model(c);
  config.seq_len = 256;
  for (DType dtype : {DType::f32, DType::bf16}) {
    SCOPED_TRACE(dtype_name(dtype));
    Model a(config, small_moe(), Device::cuda, dtype, 29);
    Model b(config, small_moe(), Device::cuda, dtype, 29);
    const Tensor tokens = random_ids({8, 257}, 300, 30, Device::cuda);
    const std::vector<float> loss_a = a.forward_backward(tokens, 1e-3).to_floats();
    const std::vector<float> loss_b = b.forward_backward(tokens, 1e-3).to_floats();
    EXPECT_EQ(loss_a, loss_b);
    EXPECT_EQ(gradients(a), gradients(b));
    EXPECT_EQ(a.forward_backward(tokens, 1e-3).to_floats(), loss_a) << "the same model twice";
  }
}

TEST(ModelGpu, CudaGraphReplayEqualsEager) {
  FLASHMOE_REQUIRE_GPU();
  const ModelCase& c = kModelCases[0];
  Model eager(small_model(c), small_moe(), Device::cuda, DType::bf16, 31);
  Model graphed(small_model(c), small_moe(), Device::cuda, DType::bf16, 31);
  const Tensor x = random_ids({4, 49}, 300, 32, Device::cuda);
  const Tensor x2 = random_ids({4, 49}, 300, 33, Device::cuda);
  std::vector<float> want_loss[2];
  std::vector<std::vector<float>> want_grads[2];
  for (int k = 0; k < 2; ++k) {
    want_loss[k] = eager.forward_backward(k == 0 ? x : x2, 0.01).to_floats();
    want_grads[k] = gradients(eager);
  }

  Tensor tokens_in = Tensor::empty({4, 49}, DType::i32, Device::cuda);
  tokens_in.copy_from(x);
  graphed.forward_backward(tokens_in, 0.01);  // the first call allocates every buffer
  Tensor loss;                                // shares storage with the model's loss buffer
  CapturedGraph graph([&] { loss = graphed.forward_backward(tokens_in, 0.01); });
  for (int k : {1, 0}) {
    tokens_in.copy_from(k == 0 ? x : x2);
    graph.replay();
    synchronize_stream();
    EXPECT_EQ(loss.to_floats(), want_loss[k]) << "replay " << k;
    EXPECT_EQ(gradients(graphed), want_grads[k]) << "replay " << k;
  }
}

TEST(ModelGpu, OutOfRangeTokenGivesNanLoss) {
  FLASHMOE_REQUIRE_GPU();
  Model model(small_model(kModelCases[0]), small_moe(), Device::cuda, DType::f32, 34);
  for (int64_t bad_at : {0, 17, 48}) {  // only an input, both, only a target
    SCOPED_TRACE(testing::Message() << "bad token at " << bad_at);
    std::vector<int32_t> ids(2 * 49, 3);
    ids[bad_at] = bad_at == 17 ? -5 : 300;
    const Tensor tokens = Tensor::from_vector(ids, {2, 49}, Device::cuda);
    EXPECT_TRUE(std::isnan(model.forward_backward(tokens, 0.01).to_floats()[0]));
    for (Parameter* p : model.parameters()) {
      for (float g : p->grad.to_floats()) ASSERT_TRUE(std::isfinite(g)) << p->name;
    }
  }
}

}  // namespace
}  // namespace flashmoe
