#include "trainer/model.h"

#include <cmath>
#include <string>

#include "kernels/elementwise.h"
#include "kernels/linear.h"
#include "kernels/norm.h"
#include "kernels/swiglu.h"

namespace flashmoe {

namespace {

constexpr uint64_t kFirstBlockStream = 16, kStreamsPerBlock = 16, kMoeStreamOffset = 8;

// An RMSNorm gain [D]: fp32 ones (RMSNorm takes its gain in fp32), no weight decay.
Parameter gain_parameter(std::string name, int64_t dim, Device device) {
  Parameter p;
  p.name = std::move(name);
  p.value = Tensor::empty({dim}, DType::f32, device);
  p.value.fill(1.0f);
  p.grad = Tensor::zeros({dim}, DType::f32, device);
  p.weight_decay = false;
  return p;
}

// rmsnorm_backward overwrites the gain gradient; accumulating routes it through `scratch`.
void rmsnorm_backward_into(const Tensor& x, Parameter& gain, const Tensor& rstd, const Tensor& dy,
                           Tensor& dx, Tensor& scratch, bool accumulate) {
  rmsnorm_backward(x, gain.value, rstd, dy, dx, accumulate ? scratch : gain.grad);
  if (accumulate) add_into(scratch, gain.grad);
}

void check_model_config(const ModelConfig& c) {
  FLASHMOE_CHECK(c.vocab >= 1 && c.d_model >= 1 && c.n_layers >= 0 && c.seq_len >= 1,
                 "model has vocab " << c.vocab << ", d_model " << c.d_model << ", n_layers "
                                    << c.n_layers << ", seq_len " << c.seq_len
                                    << "; expected positive sizes");
  FLASHMOE_CHECK(
      c.n_heads >= 1 && c.d_model % c.n_heads == 0,
      "model.n_heads is " << c.n_heads << ", expected a divisor of d_model = " << c.d_model);
  for (int64_t l : c.moe_layers) {
    FLASHMOE_CHECK(l >= 0 && l < c.n_layers,
                   "model.moe_layers names block " << l << ", expected [0, " << c.n_layers << ")");
  }
}

bool is_moe_block(const ModelConfig& c, int64_t l) {
  for (int64_t m : c.moe_layers) {
    if (m == l) return true;
  }
  return false;
}

}  // namespace

// One pre-norm block: attention sub-block, then the FFN sub-block (FlashMoE or dense SwiGLU).
struct Model::Block {
  Block(const ModelConfig& model, const MoeConfig& moe_config, int64_t index, Device device,
        DType dtype, uint64_t seed, Communicator* comm);

  const Tensor& forward(const Tensor& x, int64_t batch, bool training, AttentionWorkspace& ws);
  // dx for dout = d(block output); the block's forward input must still be alive.
  const Tensor& backward(const Tensor& dout, bool accumulate, AttentionWorkspace& ws);
  std::vector<Parameter*> parameters();

  float eps;
  Parameter attn_gain, w_qkv, w_o, ffn_gain, w_gate_up, w_down;  // w_gate_up, w_down: dense FFN
  std::unique_ptr<FlashMoELayer> moe;
  CausalSelfAttention attention;

 private:
  const Tensor& ffn_forward(bool training);
  const Tensor& ffn_backward(const Tensor& dout, bool accumulate);
  const Tensor& moe_backward(const Tensor& dout, bool accumulate);

  // Saved by forward, and reused buffers.
  Tensor x, attn_xn, attn_rstd, qkv, attn_out, attn_proj, mid, ffn_xn, ffn_rstd, gate_up, hidden,
      dense_out, out;
  Tensor dhidden, dgate_up, dffn_xn, dnorm, dmid, dattn, dattn_xn, dx, gain_scratch;
  std::vector<Tensor> moe_grad_sums;  // running gradient sums while accumulating
};

Model::Block::Block(const ModelConfig& model, const MoeConfig& moe_config, int64_t index,
                    Device device, DType dtype, uint64_t seed, Communicator* comm)
    : eps(static_cast<float>(model.norm_eps)),
      attention(model.n_heads, model.d_model / model.n_heads,
                model.pos_embedding == PosEmbedding::rope
                    ? make_rope_table(model.seq_len, model.d_model / model.n_heads,
                                      model.rope_theta, device)
                    : RopeTable{}) {
  const int64_t D = model.d_model;
  const uint64_t stream = kFirstBlockStream + kStreamsPerBlock * uint64_t(index);
  const std::string prefix = "blocks." + std::to_string(index) + ".";
  attn_gain = gain_parameter(prefix + "attn_norm.gain", D, device);
  w_qkv = uniform_parameter(prefix + "attn.w_qkv", {3 * D, D}, dtype, device, seed, stream, D);
  w_o = uniform_parameter(prefix + "attn.w_o", {D, D}, dtype, device, seed, stream + 1, D);
  ffn_gain = gain_parameter(prefix + "ffn_norm.gain", D, device);
  if (is_moe_block(model, index)) {
    moe = std::make_unique<FlashMoELayer>(D, moe_config, device, dtype, seed,
                                          stream + kMoeStreamOffset, comm);
    for (Parameter* p : moe->parameters()) p->name = prefix + "moe." + p->name;
    moe_grad_sums.resize(moe->parameters().size());
    return;
  }
  const int64_t F = moe_config.shared_intermediate > 0 ? moe_config.shared_intermediate : 4 * D;
  w_gate_up =
      uniform_parameter(prefix + "mlp.w_gate_up", {2 * F, D}, dtype, device, seed, stream + 2, D);
  w_down = uniform_parameter(prefix + "mlp.w_down", {D, F}, dtype, device, seed, stream + 3, F);
}

std::vector<Parameter*> Model::Block::parameters() {
  std::vector<Parameter*> out{&attn_gain, &w_qkv, &w_o, &ffn_gain};
  if (moe) {
    for (Parameter* p : moe->parameters()) out.push_back(p);
  } else {
    out.push_back(&w_gate_up);
    out.push_back(&w_down);
  }
  return out;
}

const Tensor& Model::Block::forward(const Tensor& input, int64_t batch, bool training,
                                    AttentionWorkspace& ws) {
  x = input;
  rmsnorm_forward(x, attn_gain.value, eps, attn_xn, attn_rstd);
  linear_forward(attn_xn, w_qkv.value, qkv);
  attn_out = attention.forward(qkv, batch, ws);
  linear_forward(attn_out, w_o.value, attn_proj);
  add(x, attn_proj, mid);
  rmsnorm_forward(mid, ffn_gain.value, eps, ffn_xn, ffn_rstd);
  add(mid, ffn_forward(training), out);
  return out;
}

const Tensor& Model::Block::ffn_forward(bool training) {
  if (moe) return moe->forward(ffn_xn, training);
  linear_forward(ffn_xn, w_gate_up.value, gate_up);
  swiglu_forward(gate_up, Activation::silu, hidden);
  linear_forward(hidden, w_down.value, dense_out);
  return dense_out;
}

const Tensor& Model::Block::backward(const Tensor& dout, bool accumulate, AttentionWorkspace& ws) {
  FLASHMOE_CHECK(x.defined(), "block backward called before forward");
  rmsnorm_backward_into(mid, ffn_gain, ffn_rstd, ffn_backward(dout, accumulate), dnorm,
                        gain_scratch, accumulate);
  add(dout, dnorm, dmid);
  linear_backward_weight(dmid, attn_out, w_o.grad, accumulate);
  linear_backward_input(dmid, w_o.value, dattn);
  const Tensor& dqkv = attention.backward(dattn, ws);
  linear_backward_weight(dqkv, attn_xn, w_qkv.grad, accumulate);
  linear_backward_input(dqkv, w_qkv.value, dattn_xn);
  rmsnorm_backward_into(x, attn_gain, attn_rstd, dattn_xn, dnorm, gain_scratch, accumulate);
  add(dmid, dnorm, dx);
  return dx;
}

const Tensor& Model::Block::ffn_backward(const Tensor& dout, bool accumulate) {
  if (moe) return moe_backward(dout, accumulate);
  linear_backward_weight(dout, hidden, w_down.grad, accumulate);
  linear_backward_input(dout, w_down.value, dhidden);
  swiglu_backward(gate_up, dhidden, Activation::silu, dgate_up);
  linear_backward_weight(dgate_up, ffn_xn, w_gate_up.grad, accumulate);
  linear_backward_input(dgate_up, w_gate_up.value, dffn_xn);
  return dffn_xn;
}

// FlashMoELayer::backward overwrites its gradients (and may point an expert table's
// gradient at its own buffer): accumulating copies the running sums aside first and
// adds them to the fresh gradients after.
const Tensor& Model::Block::moe_backward(const Tensor& dout, bool accumulate) {
  const std::vector<Parameter*> params = moe->parameters();
  for (size_t i = 0; accumulate && i < params.size(); ++i) {
    FLASHMOE_CHECK(!params[i]->rows.defined(),
                   "gradient accumulation over row-sparse expert gradients ("
                       << params[i]->name << ") is not supported; use grad_accum 1");
    ensure(moe_grad_sums[i], params[i]->grad.shape(), DType::f32, params[i]->grad.device());
    moe_grad_sums[i].copy_from(params[i]->grad);
  }
  const Tensor& dx_moe = moe->backward(dout);
  if (accumulate) moe->finish_backward();
  for (size_t i = 0; accumulate && i < params.size(); ++i) {
    add_into(moe_grad_sums[i], params[i]->grad);
  }
  return dx_moe;
}

Model::Model(const ModelConfig& model, const MoeConfig& moe, Device device, DType dtype,
             uint64_t seed, Communicator* comm)
    : config_(model), device_(device), dtype_(dtype) {
  check_model_config(model);
  FLASHMOE_CHECK(dtype == DType::f32 || dtype == DType::bf16,
                 "model dtype is " << dtype_name(dtype) << ", expected fp32 or bf16");
  const int64_t D = model.d_model;
  embed_ = uniform_parameter("embed", {model.vocab, D}, dtype, device, seed, 0, D);
  if (model.pos_embedding == PosEmbedding::learned) {
    pos_embed_ = uniform_parameter("pos_embed", {model.seq_len, D}, dtype, device, seed, 1, D);
  }
  for (int64_t l = 0; l < model.n_layers; ++l) {
    blocks_.push_back(std::make_unique<Block>(model, moe, l, device, dtype, seed, comm));
  }
  final_gain_ = gain_parameter("final_norm.gain", D, device);
}

Model::~Model() = default;

std::vector<Parameter*> Model::parameters() {
  std::vector<Parameter*> out{&embed_};
  if (pos_embed_.value.defined()) out.push_back(&pos_embed_);
  for (auto& block : blocks_) {
    for (Parameter* p : block->parameters()) out.push_back(p);
  }
  out.push_back(&final_gain_);
  return out;
}

std::vector<std::vector<Parameter*>> Model::gradient_groups() {
  std::vector<std::vector<Parameter*>> groups;
  std::vector<Parameter*> group{&final_gain_};
  for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
    for (Parameter* p : (*it)->parameters()) group.push_back(p);
    groups.push_back(std::move(group));
    group.clear();
  }
  group.push_back(&embed_);
  if (pos_embed_.value.defined()) group.push_back(&pos_embed_);
  groups.push_back(std::move(group));
  return groups;
}

std::vector<FlashMoELayer*> Model::moe_layers() {
  std::vector<FlashMoELayer*> out;
  for (auto& block : blocks_) {
    if (block->moe) out.push_back(block->moe.get());
  }
  return out;
}

const Tensor& Model::forward_logits(const Tensor& tokens, bool training) {
  FLASHMOE_CHECK(tokens.defined() && tokens.rank() == 2 && tokens.size(0) >= 1 &&
                     tokens.size(1) >= 2 && tokens.size(1) <= config_.seq_len + 1,
                 "tokens have shape "
                     << shape_string(tokens.shape()) << ", expected [B, L + 1]"
                     << " with B >= 1 and 1 <= L <= seq_len = " << config_.seq_len);
  expect_dtype(tokens, DType::i32, "tokens");
  expect_device(tokens, device_, "tokens");
  batch_ = tokens.size(0);
  seq_len_ = tokens.size(1) - 1;
  split_next_token(tokens, config_.vocab, inputs_, targets_);
  embedding_forward(inputs_, embed_.value, pos_embed_.value, seq_len_, embedded_);
  const Tensor* x = &embedded_;
  for (auto& block : blocks_) x = &block->forward(*x, batch_, training, attention_workspace_);
  final_input_ = *x;
  rmsnorm_forward(final_input_, final_gain_.value, static_cast<float>(config_.norm_eps), hidden_,
                  final_rstd_);
  linear_forward(hidden_, embed_.value, logits_);
  return logits_;
}

const Tensor& Model::forward_backward(const Tensor& tokens, double loss_scale, bool accumulate,
                                      const GradientsReady& ready) {
  FLASHMOE_CHECK(std::isfinite(loss_scale) && loss_scale > 0,
                 "loss_scale is " << loss_scale << ", expected a positive finite number");
  for (FlashMoELayer* layer : moe_layers()) layer->set_loss_scale(loss_scale);
  forward_logits(tokens, /*training=*/true);
  cross_entropy_forward_backward(logits_, targets_, loss_scale, cross_entropy_, loss_, dlogits_);
  // The tied table: first the head's gradient dlogits^T h, later the lookup's.
  linear_backward_weight(dlogits_, hidden_, embed_.grad, accumulate);
  linear_backward_input(dlogits_, embed_.value, dhidden_);
  rmsnorm_backward_into(final_input_, final_gain_, final_rstd_, dhidden_, dfinal_, gain_scratch_,
                        accumulate);
  const Tensor* d = &dfinal_;
  size_t group = 0;  // gradient_groups(): one per block, last block first, then the tables
  for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
    d = &(*it)->backward(*d, accumulate, attention_workspace_);
    if (ready) ready(group++);
  }
  embedding_backward(inputs_, *d, embedding_workspace_, embed_.grad);
  if (pos_embed_.value.defined()) {
    ensure(pos_scratch_, pos_embed_.grad.shape(), DType::f32, device_);
    position_backward(*d, seq_len_, embedding_workspace_,
                      accumulate ? pos_scratch_ : pos_embed_.grad);
    if (accumulate) add_into(pos_scratch_, pos_embed_.grad);
  }
  if (ready) ready(group);
  for (FlashMoELayer* layer : moe_layers()) {
    layer->finish_backward();
    if (layer->balance_loss().defined()) add_into(layer->balance_loss(), loss_);
  }
  return loss_;
}

const Tensor& Model::evaluate(const Tensor& tokens, const Tensor& target_mask) {
  forward_logits(tokens, /*training=*/false);
  expect_shape(target_mask, {batch_, seq_len_}, "target mask");
  cross_entropy_evaluate(logits_, targets_, target_mask.view({batch_ * seq_len_}), cross_entropy_,
                         eval_sums_);
  return eval_sums_;
}

double mean_loss_scale(const Tensor& tokens) {
  FLASHMOE_CHECK(tokens.defined() && tokens.rank() == 2 && tokens.size(1) >= 2,
                 "tokens have shape " << shape_string(tokens.shape()) << ", expected [B, L + 1]");
  return 1.0 / double(tokens.size(0) * (tokens.size(1) - 1));
}

}  // namespace flashmoe
