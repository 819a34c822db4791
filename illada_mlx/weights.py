"""The one mapping from either checkpoint layout's tensor names to ours (mlx-lm's Llama names).

Shared by the converter and the direct HF loader. LLaDA's trap: a block's `ff_out` is the FFN down
projection, the top-level `model.transformer.ff_out` is the LM head.
"""

from __future__ import annotations

import re
from typing import Optional

from .config import LLADA, ModelArgs

_LLADA_BLOCK = {
    "attn_norm": "input_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_norm": "post_attention_layernorm",
    "ff_proj": "mlp.gate_proj",  # the gate: silu is applied to it
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",  # block-level ff_out is the DOWN projection
}
_LLADA_TOP = {
    "model.transformer.wte.weight": "model.embed_tokens.weight",
    "model.transformer.ln_f.weight": "model.norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",  # top-level ff_out is the LM head
}
_LLADA_RE = re.compile(r"^model\.transformer\.blocks\.(\d+)\.(\w+)\.(weight|bias)$")
_ILLADA_RE = re.compile(
    r"^(model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight|"
    r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight|"
    r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.(weight|bias)|"
    r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.(weight|bias))$"
)
# buffers some exporters store that carry no weights
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.rope\.|_extra_state)$")


def map_name(name: str, layout: str) -> Optional[str]:
    """Our name for a source tensor, None for a tensor to drop, KeyError for an unknown one."""
    if _IGNORED.search(name):
        return None
    if layout == LLADA:
        if name in _LLADA_TOP:
            return _LLADA_TOP[name]
        m = _LLADA_RE.match(name)
        if m and m.group(2) in _LLADA_BLOCK:
            return f"model.layers.{m.group(1)}.{_LLADA_BLOCK[m.group(2)]}.{m.group(3)}"
    elif _ILLADA_RE.match(name):
        return name
    raise KeyError(name)


def expected_shapes(args: ModelArgs) -> dict[str, tuple]:
    """Every tensor our model needs (float layout, PyTorch [out, in] = MLX Linear layout)."""
    d, hd, V = args.hidden_size, args.head_dim, args.vocab_size
    q, kv, f = args.num_attention_heads * hd, args.num_key_value_heads * hd, args.intermediate_size
    shapes = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,)}
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, d)
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (q, d),
                p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.o_proj.weight": (d, q),
                p + "mlp.gate_proj.weight": (f, d),
                p + "mlp.up_proj.weight": (f, d),
                p + "mlp.down_proj.weight": (d, f),
            }
        )
        if args.attention_bias:
            shapes.update(
                {
                    p + "self_attn.q_proj.bias": (q,),
                    p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,),
                    p + "self_attn.o_proj.bias": (d,),
                }
            )
        if args.mlp_bias:
            shapes.update({p + f"mlp.{n}_proj.bias": (f if n != "down" else d,) for n in ("gate", "up", "down")})
    return shapes
