"""Tiny HF checkpoints in both layouts, written from scratch (random weights, real key names).

The canonical parameters (`params`, float64 numpy, PyTorch [out, in] layout) go to the numpy oracle; the
writer stores them under each layout's real tensor names, independently of illada_mlx.weights.
LLaDA's config/tokenizer settings are the real LLaDA-8B-Instruct ones (tests/data), shrunk.
"""

from __future__ import annotations

import copy
import json
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"

# iLLaDA-style specials: <[MASK]> = 5, EOS = 2 like the real model
ILLADA_SPECIALS = {
    "<unk>": 0,
    "<s>": 1,
    "</s>": 2,
    "<|im_start|>": 3,
    "<|im_end|>": 4,
    "<[MASK]>": 5,
    "<think>": 6,
    "</think>": 7,
}
ILLADA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set sys = m['content'] %}{% else %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# LLaDA's specials with shrunk ids (the real ones are 126080, 126081, 126336, 126346-8)
LLADA_SPECIALS = {
    "<|startoftext|>": 256,
    "<|endoftext|>": 257,
    "<|mdm_mask|>": 258,
    "<|start_header_id|>": 259,
    "<|end_header_id|>": 260,
    "<|eot_id|>": 261,
}


def build_tokenizer(out: Path, specials: dict[str, int], template: str, bos: str, eos: str, pad: str):
    """A byte-level BPE (no merges: one token per byte) with the specials at fixed ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab, i = dict(specials), 0
    taken = set(specials.values())
    for ch in alphabet:
        while i in taken:
            i += 1
        vocab[ch] = i
        taken.add(i)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.save(str(out / "tokenizer.json"))
    tc = {
        "add_bos_token": False,
        "add_eos_token": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(v): {
                "content": k,
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
            for k, v in specials.items()
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    return max(vocab.values()) + 1


@dataclass
class Spec:
    layout: str = "illada"
    d: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 128
    vocab: int = 288
    tied: bool = True
    theta: float = 10000.0
    eps: float = 1e-5
    bias: bool = False
    shards: int = 2
    dtype: str = "float32"  # or bfloat16
    seed: int = 0


def make_params(s: Spec) -> dict:
    rng = np.random.default_rng(s.seed)
    hd = s.d // s.heads

    def lin(o, i):
        return rng.normal(0, 1 / np.sqrt(i), (o, i))

    p = {"embed": rng.normal(0, 1, (s.vocab, s.d)), "norm": 1 + 0.1 * rng.normal(size=s.d), "layers": []}
    for _ in range(s.layers):
        layer = {
            "attn_norm": 1 + 0.1 * rng.normal(size=s.d),
            "ffn_norm": 1 + 0.1 * rng.normal(size=s.d),
            "wq": lin(s.heads * hd, s.d),
            "wk": lin(s.kv_heads * hd, s.d),
            "wv": lin(s.kv_heads * hd, s.d),
            "wo": lin(s.d, s.heads * hd),
            "w_gate": lin(s.ffn, s.d),
            "w_up": lin(s.ffn, s.d),
            "w_down": lin(s.d, s.ffn),
        }
        if s.bias:
            for k, n in (("bq", s.heads * hd), ("bk", s.kv_heads * hd), ("bv", s.kv_heads * hd), ("bo", s.d)):
                layer[k] = 0.1 * rng.normal(size=n)
        p["layers"].append(layer)
    p["head"] = p["embed"] if s.tied else rng.normal(0, 1, (s.vocab, s.d)) / np.sqrt(s.d) * 4
    # like a trained model, never predict the mask token (its logit stays near 0)
    mask = 5 if s.layout == "illada" else LLADA_SPECIALS["<|mdm_mask|>"]
    if mask < s.vocab:
        p["embed"][mask] *= 0.05
        if not s.tied:
            p["head"][mask] *= 0.05
    return p


def _tensors(p: dict, s: Spec) -> dict[str, np.ndarray]:
    t = {}
    if s.layout == "illada":
        t["model.embed_tokens.weight"] = p["embed"]
        t["model.norm.weight"] = p["norm"]
        if not s.tied:
            t["lm_head.weight"] = p["head"]
        for i, L in enumerate(p["layers"]):
            b = f"model.layers.{i}."
            t[b + "input_layernorm.weight"] = L["attn_norm"]
            t[b + "post_attention_layernorm.weight"] = L["ffn_norm"]
            for n in "qkvo":
                t[b + f"self_attn.{n}_proj.weight"] = L["w" + n]
                if s.bias:
                    t[b + f"self_attn.{n}_proj.bias"] = L["b" + n]
            t[b + "mlp.gate_proj.weight"], t[b + "mlp.up_proj.weight"], t[b + "mlp.down_proj.weight"] = (
                L["w_gate"],
                L["w_up"],
                L["w_down"],
            )
    else:
        t["model.transformer.wte.weight"] = p["embed"]
        t["model.transformer.ln_f.weight"] = p["norm"]
        if not s.tied:
            t["model.transformer.ff_out.weight"] = p["head"]  # the LM head
        for i, L in enumerate(p["layers"]):
            b = f"model.transformer.blocks.{i}."
            t[b + "attn_norm.weight"], t[b + "ff_norm.weight"] = L["attn_norm"], L["ffn_norm"]
            t[b + "q_proj.weight"], t[b + "k_proj.weight"], t[b + "v_proj.weight"] = L["wq"], L["wk"], L["wv"]
            t[b + "attn_out.weight"] = L["wo"]
            t[b + "ff_proj.weight"], t[b + "up_proj.weight"] = L["w_gate"], L["w_up"]
            t[b + "ff_out.weight"] = L["w_down"]  # the block's DOWN projection
    return t


def _config(s: Spec) -> dict:
    if s.layout == "illada":
        return {
            "architectures": ["ILLaDAForCausalLM"],
            "model_type": "illada",
            "hidden_size": s.d,
            "num_hidden_layers": s.layers,
            "num_attention_heads": s.heads,
            "num_key_value_heads": s.kv_heads,
            "intermediate_size": s.ffn,
            "vocab_size": s.vocab,
            "max_position_embeddings": 512,
            "rms_norm_eps": s.eps,
            "rope_theta": s.theta,
            "rope_scaling": None,
            "hidden_act": "silu",
            "tie_word_embeddings": s.tied,
            "attention_bias": s.bias,
            "mlp_bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 2,
            "torch_dtype": s.dtype,
        }
    cfg = json.loads((DATA / "llada_config.json").read_text())  # the real LLaDA-8B config, shrunk
    cfg.update(
        d_model=s.d,
        n_heads=s.heads,
        n_kv_heads=s.kv_heads,
        n_layers=s.layers,
        mlp_hidden_size=s.ffn,
        vocab_size=s.vocab,
        embedding_size=s.vocab,
        rope_theta=s.theta,
        rms_norm_eps=s.eps,
        weight_tying=s.tied,
        max_sequence_length=512,
        mask_token_id=LLADA_SPECIALS["<|mdm_mask|>"],
        eos_token_id=LLADA_SPECIALS["<|endoftext|>"],
        pad_token_id=LLADA_SPECIALS["<|endoftext|>"],
    )
    return cfg


def round_to(p: dict, dtype: str) -> dict:
    """The parameters as the checkpoint stores them (bf16 rounding), back in float64."""
    if dtype == "float32":
        return tree_map(p, lambda a: a.astype(np.float32).astype(np.float64))
    import mlx.core as mx

    return tree_map(
        p, lambda a: np.array(mx.array(a.astype(np.float32)).astype(mx.bfloat16).astype(mx.float32), dtype=np.float64)
    )


def tree_map(p, f):
    if isinstance(p, dict):
        return {k: tree_map(v, f) for k, v in p.items()}
    if isinstance(p, list):
        return [tree_map(v, f) for v in p]
    return f(p)


def write_checkpoint(out: Path, s: Spec, params: dict | None = None) -> dict:
    """Write an HF checkpoint dir; returns the params as stored (float64) for the oracle."""
    import mlx.core as mx

    out.mkdir(parents=True, exist_ok=True)
    params = params if params is not None else make_params(s)
    stored = round_to(params, s.dtype)
    tensors = _tensors(params, s)
    names = sorted(tensors)
    dt = mx.bfloat16 if s.dtype == "bfloat16" else mx.float32
    weight_map = {}
    for k in range(s.shards):
        shard = f"model-{k + 1:05d}-of-{s.shards:05d}.safetensors"
        part = {n: mx.array(tensors[n].astype(np.float32)).astype(dt) for n in names[k :: s.shards]}
        mx.save_safetensors(str(out / shard), part, metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(_config(s), indent=2))
    if s.layout == "illada":
        build_tokenizer(out, ILLADA_SPECIALS, ILLADA_TEMPLATE, "<s>", "</s>", "</s>")
    else:
        tc = json.loads((DATA / "llada_tokenizer_config.json").read_text())
        build_tokenizer(out, LLADA_SPECIALS, tc["chat_template"], "<|startoftext|>", "<|endoftext|>", "<|endoftext|>")
    return stored


def spec_ids(s: Spec) -> dict:
    if s.layout == "illada":
        return {"mask": 5, "eos": 2, "bos": 1}
    return {
        "mask": LLADA_SPECIALS["<|mdm_mask|>"],
        "eos": LLADA_SPECIALS["<|endoftext|>"],
        "eot": LLADA_SPECIALS["<|eot_id|>"],
        "bos": LLADA_SPECIALS["<|startoftext|>"],
    }


def copy_spec(s: Spec, **kw) -> Spec:
    s = copy.copy(s)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def reply(model, tok, prompt, **settings):
    """(text, tokens, last Response) of one reply through the engine."""
    from illada_mlx.engine import stream_generate

    text, tokens, r = "", [], None
    for r in stream_generate(model, tok, prompt, **settings):
        text += r.text
        tokens += r.tokens
    return text, tokens, r


@contextmanager
def deadline(seconds: int):
    """Fail with TimeoutError instead of hanging (SIGALRM; the main thread only)."""

    def fail(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
