"""A small PyTorch iLLaDA written from the spec (§1), with iLLaDA's tensor names: used to train the demo
model and as the "what users run today" baseline of `bench` (with the official decoding loop).
Needs the optional `train`/`bench` extra (torch)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope(x, theta):  # x (B, H, L, D), half-split
    L, D = x.shape[-2], x.shape[-1]
    inv = theta ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    ang = torch.arange(L, device=x.device, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class Attn(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, self.h, self.kv, self.hd, self.theta = (
            c["hidden_size"],
            c["num_attention_heads"],
            c["num_key_value_heads"],
            c["hidden_size"] // c["num_attention_heads"],
            c["rope_theta"],
        )
        self.q_proj = nn.Linear(d, self.h * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.h * self.hd, d, bias=False)

    def forward(self, x, mask):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.kv, self.hd).transpose(1, 2)
        q, k = rope(q, self.theta), rope(k, self.theta)
        rep = self.h // self.kv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # bidirectional
        return self.o_proj(o.transpose(1, 2).reshape(B, L, -1))


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, f, eps = c["hidden_size"], c["intermediate_size"], c["rms_norm_eps"]
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(d, eps), RMSNorm(d, eps)
        self.self_attn = Attn(c)
        self.mlp = nn.Module()
        self.mlp.gate_proj, self.mlp.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.mlp.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x, mask):
        x = x + self.self_attn(self.input_layernorm(x), mask)
        h = self.post_attention_layernorm(x)
        return x + self.mlp.down_proj(F.silu(self.mlp.gate_proj(h)) * self.mlp.up_proj(h))


class TorchIllada(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.config = c
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.model.layers = nn.ModuleList([Layer(c) for _ in range(c["num_hidden_layers"])])
        self.model.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])

    def forward(self, ids, attention_mask=None):
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :] | ~attention_mask.bool()[:, None, :, None]
        h = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            h = layer(h, mask)
        return self.model.norm(h) @ self.model.embed_tokens.weight.T  # tied head


# ------------------------------------------------------------------ the official decoding loop (LLaDA generate.py)
def get_num_transfer_tokens(mask_index, steps):
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base, remainder = mask_num // steps, mask_num % steps
    out = torch.zeros(mask_num.size(0), steps, dtype=torch.int64, device=mask_index.device) + base
    for i in range(mask_num.size(0)):
        out[i, : remainder[i]] += 1
    return out


@torch.no_grad()
def official_generate(model, prompt, steps=128, gen_length=128, block_length=128, mask_id=5):
    """The official fixed-canvas algorithm at temperature 0, low-confidence remasking (batch of rows)."""
    x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, : prompt.shape[1]] = prompt
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    nfe = 0
    for b in range(num_blocks):
        lo, hi = prompt.shape[1] + b * block_length, prompt.shape[1] + (b + 1) * block_length
        counts = get_num_transfer_tokens(x[:, lo:hi] == mask_id, steps)
        for i in range(steps):
            mask_index = x == mask_id
            logits = model(x)
            nfe += 1
            x0 = logits.argmax(-1)
            p = F.softmax(logits.float(), dim=-1)
            x0_p = torch.gather(p, -1, x0[..., None])[..., 0]
            x0_p[:, hi:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, x0_p, torch.tensor(-np.inf, device=x.device))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(conf.shape[0]):
                _, sel = torch.topk(conf[j], k=int(counts[j, i]))
                transfer[j, sel] = True
            x[transfer] = x0[transfer]
    return x, nfe


def init_weights(model: TorchIllada, seed: int):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 2:
            std = 0.02 if "embed" in name else 1 / math.sqrt(p.shape[1])
            if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                std /= math.sqrt(2 * model.config["num_hidden_layers"])
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def from_mlx(model) -> TorchIllada:
    """The same weights as an MLX Model (iLLaDA layout, tied head, float) in the torch reference."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    a = model.args
    cfg = {
        "hidden_size": a.hidden_size,
        "num_hidden_layers": a.num_hidden_layers,
        "num_attention_heads": a.num_attention_heads,
        "num_key_value_heads": a.num_key_value_heads,
        "intermediate_size": a.intermediate_size,
        "vocab_size": a.vocab_size,
        "rope_theta": a.rope_theta,
        "rms_norm_eps": a.rms_norm_eps,
    }
    t = TorchIllada(cfg)
    sd = {k: torch.from_numpy(np.array(v.astype(mx.float32))) for k, v in tree_flatten(model.parameters())}
    t.load_state_dict(sd, strict=True)
    return t.eval()
