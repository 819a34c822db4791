"""The iLLaDA / LLaDA transformer in MLX: a Llama-style stack used as a bidirectional encoder.

No causal mask, no timestep input, position i's logits predict token i. The model knows nothing of
diffusion: the sampler (decode.py) drives it, optionally with a `BlockCache` (cache.py) and `offset`
to run only a window of the canvas against cached keys/values of the rest.
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .cache import BlockCache
from .config import IlladaError, ModelArgs
from .shard import VocabSharded, shard_model


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d, hd = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, hd
        self.scale = 1.0 / math.sqrt(hd)
        bias = args.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=bias)
        self.rope = nn.RoPE(hd, traditional=False, base=args.rope_theta, scale=args.rope_scale)

    def __call__(self, x, mask, cache: Optional[BlockCache], layer: int, offset: int):
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if isinstance(offset, mx.array):  # scattered positions (B, L): the cache holds every other one
            q, k = rope_at(self.rope, q, offset), rope_at(self.rope, k, offset)
            k, v = cache.update_at(layer, k, v, offset)
        else:
            q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
            if cache is not None:
                k, v = cache.update(layer, k, v, offset)
        # GQA: K/V keep n_kv_heads, the kernel broadcasts them (no repeat in memory)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))


def rope_at(rope: nn.RoPE, x: mx.array, positions: mx.array) -> mx.array:
    """RoPE of x (B, H, L, D) at per-token positions (B, L): each token is its own row of mx.fast.rope,
    whose offset takes one position per row."""
    B, H, L, D = x.shape
    y = x.transpose(0, 2, 1, 3).reshape(B * L, H, 1, D)
    y = mx.fast.rope(
        y, rope.dims, traditional=rope.traditional, base=rope.base, scale=rope.scale, offset=positions.reshape(-1)
    )
    return y.reshape(B, L, H, D).transpose(0, 2, 1, 3)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d, f, b = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj, self.up_proj, self.down_proj = (
            nn.Linear(d, f, bias=b),
            nn.Linear(d, f, bias=b),
            nn.Linear(f, d, bias=b),
        )

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


def make_norm(args: ModelArgs):
    if args.layer_norm_eps is not None:
        return nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps, bias=False)
    return nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)  # mx.fast.rms_norm, fp32 accumulation


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn, self.mlp = Attention(args), MLP(args)
        self.input_layernorm, self.post_attention_layernorm = make_norm(args), make_norm(args)

    def __call__(self, x, mask, cache, layer, offset):
        h = x + self.self_attn(self.input_layernorm(x), mask, cache, layer, offset)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Block(args) for _ in range(args.num_hidden_layers)]
        self.norm = make_norm(args)


def attention_mask_for(key_valid: Optional[mx.array], offset, length: int) -> Optional[mx.array]:
    """Boolean (B, 1, Lq, Lk) mask from a (B, Lk) key-validity mask (1 = real token, 0 = padding); the
    queries are the window [offset, offset + length) or the positions `offset` (B, Lq).

    Padded keys are hidden; a padded *query* row sees every key instead, so it stays finite and never
    feeds NaN into later layers (its output is ignored anyway).
    """
    if key_valid is None:
        return None
    kv = key_valid.astype(mx.bool_)
    if isinstance(offset, mx.array):
        qv = mx.take_along_axis(kv, offset, axis=1)
    else:
        qv = kv[:, offset : offset + length]
    return kv[:, None, None, :] | ~qv[:, None, :, None]


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.group = None  # the tensor-parallel group after `shard`

    def __call__(
        self,
        ids: mx.array,
        attention_mask: Optional[mx.array] = None,
        logits_at: Optional[mx.array] = None,
        cache: Optional[BlockCache] = None,
        offset=0,
    ) -> mx.array:
        """Logits (B, L, V) for `ids` (B, L), or (B, K, V) at the window positions `logits_at`.

        attention_mask: (B, L_total) 1/0 over the whole canvas (the cache's keys included).
        logits_at: (K,) or (B, K) positions inside `ids`: the LM head runs only on those.
        cache/offset: `ids` is the window [offset, offset + L) of a canvas whose other keys/values the
        cache holds (see cache.py); or offset is (B, L), the canvas position of each of `ids` (any order,
        repeats allowed), whose keys/values are written over the cache's.
        """
        h = self.model.embed_tokens(ids)
        mask = attention_mask_for(attention_mask, offset, ids.shape[1])
        for i, layer in enumerate(self.model.layers):
            h = layer(h, mask, cache, i, offset)
        if logits_at is not None:
            h = h[:, logits_at] if logits_at.ndim == 1 else mx.take_along_axis(h, logits_at[..., None], axis=1)
        h = self.model.norm(h)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        head = self.lm_head
        return head.as_linear(h) if isinstance(head, VocabSharded) else head(h)

    def shard(self, group) -> None:
        """Tensor parallel in mlx-lm's way (shard.py): each rank keeps 1/N of every layer's heads and FFN and
        of the vocabulary rows. Call before the weights are evaluated: only each rank's slice is then
        materialized."""
        if self.group is not None:
            raise IlladaError("this model is already sharded")
        shard_model(self, group)
        self.group = group

    @property
    def layers(self):
        return self.model.layers
