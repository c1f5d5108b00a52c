"""The FlashMoE layer and the smoke-config model written in plain PyTorch, timed on the
same shapes as flashmoe-bench so docs/benchmarks.md can show both from one run.

  python3 bench/torch_reference.py layer [--case quickstart|peer-1m|heavy] [--compile]
  python3 bench/torch_reference.py model --config configs/smoke.yaml [--steps 30]

The layer follows SPEC section 1 the way a PyTorch user would write it: top-K of each
half, the K x K candidate sums, a top-K over those, gathered expert rows (materialised
[T, S, D]), and the shared SwiGLU branch. Times are CUDA-event medians after warm-up;
peak memory is torch.cuda.max_memory_allocated over one forward+backward.
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

LAYER_CASES = {  # T, D, I, E, K, H (SPEC section 11; heavy = the original project's largest)
    "quickstart": (4096, 1024, 4096, 16384, 64, 1),
    "peer-1m": (4096, 1024, 4096, 1048576, 16, 8),
    "heavy": (8192, 1024, 1024, 102400, 512, 1),
}


class FlashMoETorch(nn.Module):
    def __init__(self, dim, intermediate, experts, top_k, heads):
        super().__init__()
        self.keys = math.isqrt(experts)
        assert self.keys * self.keys == experts, "experts must be a square"
        self.top_k, self.heads = top_k, heads
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.router = nn.Linear(dim, heads * 2 * self.keys, bias=False)
        self.down_embed = nn.Embedding(experts, dim)
        self.up_embed = nn.Embedding(experts, dim)
        self.intermediate = intermediate
        if intermediate:
            self.gate = nn.Linear(dim, intermediate, bias=False)
            self.up = nn.Linear(dim, intermediate, bias=False)
            self.down = nn.Linear(intermediate, dim, bias=False)

    def forward(self, x):  # x [T, D]
        T = x.shape[0]
        q = self.router(self.norm(x)).view(T, self.heads, 2, self.keys).float()
        logp = q.log_softmax(-1)
        keep = min(self.top_k, self.keys)
        s0, i0 = logp[:, :, 0].topk(keep, dim=-1)
        s1, i1 = logp[:, :, 1].topk(keep, dim=-1)
        scores = (s0[..., :, None] + s1[..., None, :]).flatten(-2)
        ids = (i0[..., :, None] * self.keys + i1[..., None, :]).flatten(-2)
        top, pos = scores.topk(self.top_k, dim=-1)
        ids = ids.gather(-1, pos).view(T, -1)
        gates = top.exp().view(T, -1)
        h = torch.einsum("td,tsd->ts", x, self.down_embed(ids))
        a = (F.silu(h.float()) * gates).to(x.dtype)
        y = torch.einsum("ts,tsd->td", a, self.up_embed(ids))
        if self.intermediate:
            y = y + self.down(F.silu(self.gate(x)) * self.up(x))
        return y


def median_ms(fn, reps=20, warmup=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def bench_layer(case, compiled):
    T, D, I, E, K, H = LAYER_CASES[case]
    torch.manual_seed(0)
    layer = FlashMoETorch(D, I, E, K, H).cuda().to(torch.bfloat16)
    run = torch.compile(layer) if compiled else layer
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)

    def fwd():
        with torch.no_grad():
            run(x)

    def fwd_bwd():
        run(x).backward(dy)

    fwd_bwd()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    peak_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
    result = {
        "case": case,
        "impl": "torch.compile" if compiled else "eager",
        "fwd_ms": median_ms(fwd),
        "fwd_bwd_ms": median_ms(fwd_bwd),
        "peak_gib_above_params": peak_gib,
        "gpu": torch.cuda.get_device_name(),
    }
    print(json.dumps(result))


class Block(nn.Module):
    def __init__(self, cfg, moe):
        super().__init__()
        d, heads = cfg["d_model"], cfg["n_heads"]
        self.heads = heads
        self.attn_norm = nn.RMSNorm(d, eps=1e-5)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.ffn_norm = nn.RMSNorm(d, eps=1e-5)
        self.ffn = FlashMoETorch(d, moe["shared_intermediate"], moe["num_experts"], moe["top_k"],
                                 moe.get("heads", 1))

    def forward(self, x, cos, sin):
        B, L, D = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(B, L, 3, self.heads, -1).unbind(2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(B, L, D))
        return x + self.ffn(self.ffn_norm(x).view(B * L, D)).view(B, L, D)


def rope(x, cos, sin):  # x [B, L, H, hd]
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)


class LanguageModel(nn.Module):
    def __init__(self, cfg, moe):
        super().__init__()
        self.embed = nn.Embedding(cfg["vocab"], cfg["d_model"])
        self.blocks = nn.ModuleList(Block(cfg, moe) for _ in range(cfg["n_layers"]))
        self.norm = nn.RMSNorm(cfg["d_model"], eps=1e-5)
        hd = cfg["d_model"] // cfg["n_heads"]
        inv = 1.0 / (cfg.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2) / hd))
        ang = torch.arange(cfg["seq_len"])[:, None] * inv[None]
        self.register_buffer("cos", ang.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin", ang.sin()[None, :, None, :], persistent=False)

    def forward(self, tokens):
        x = self.embed(tokens[:, :-1])
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        logits = self.norm(x) @ self.embed.weight.T
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


def bench_model(config_path, steps):
    import yaml

    cfg = yaml.safe_load(open(config_path))
    model_cfg, moe, train = cfg["model"], cfg["moe"], cfg["train"]
    torch.manual_seed(0)
    model = LanguageModel(model_cfg, moe).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    seqs = train["batch_tokens"] // model_cfg["seq_len"]
    tokens = torch.randint(0, model_cfg["vocab"], (seqs, model_cfg["seq_len"] + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(json.dumps({"config": config_path, "impl": "eager, autocast bf16, fp32 params",
                      "tokens_per_second": steps * train["batch_tokens"] / seconds,
                      "gpu": torch.cuda.get_device_name()}))


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    layer = sub.add_parser("layer")
    layer.add_argument("--case", choices=sorted(LAYER_CASES), action="append")
    layer.add_argument("--compile", action="store_true")
    model = sub.add_parser("model")
    model.add_argument("--config", required=True)
    model.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    if args.what == "layer":
        for case in args.case or ["quickstart", "peer-1m"]:
            bench_layer(case, args.compile)
    else:
        bench_model(args.config, args.steps)


if __name__ == "__main__":
    main()
