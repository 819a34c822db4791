"""Model arguments from either checkpoint layout's config.json, and the special-token ids.

Two layouts exist (see the spec): iLLaDA's Llama-style HF keys and LLaDA's OLMo-style keys. Both are
read into one `ModelArgs`; our MLX directories store the iLLaDA-style keys plus the resolved ids.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional


class IlladaError(Exception):
    """A user-facing problem: the message is one line that names the problem and the fix."""


@contextmanager
def one_line_errors():
    """For commands: a user-facing failure is one line on stderr and exit code 1 (Ctrl-C: 130), never a
    traceback."""
    try:
        yield
    except IlladaError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


class ContextError(IlladaError):
    """The prompt and the generation do not fit the model's positions (the server's context_length_exceeded)."""


ILLADA = "illada"
LLADA = "llada"
MASK_TOKEN_NAMES = ("<[MASK]>", "<|mdm_mask|>")
EOT_TOKEN_NAMES = ("<|eot_id|>", "<|im_end|>", "<|end_of_turn|>")
THINK_END_TEXT = "</think>"


@dataclass
class ModelArgs:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    layer_norm_eps: Optional[float] = None  # if set, LayerNorm instead of RMSNorm
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    head_dim: Optional[int] = None
    hidden_act: str = "silu"
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    # special ids (resolved from the tokenizer where possible, see `resolve_special_ids`)
    mask_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    eot_token_id: Optional[int] = None
    # mlx-lm style quantization record: {"group_size", "bits", "mode", "<layer path>": {...}}
    quantization: Optional[dict] = None
    source_layout: str = ILLADA
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise IlladaError(
                f"config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; fix config.json"
            )
        if self.hidden_act not in ("silu", "swiglu"):
            raise IlladaError(f"config: hidden_act={self.hidden_act!r} is not supported (only silu/SwiGLU)")
        if self.rope_scaling:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ("linear", "default", None):
                raise IlladaError(
                    f"config: rope_scaling type {kind!r} is not supported (only linear); "
                    "remove rope_scaling or open an issue"
                )

    @property
    def rope_scale(self) -> float:
        if self.rope_scaling and self.rope_scaling.get("type", self.rope_scaling.get("rope_type")) == "linear":
            return 1.0 / float(self.rope_scaling["factor"])
        return 1.0

    def to_config(self) -> dict:
        """The config.json we write into MLX model dirs (iLLaDA keys + resolved ids)."""
        d = asdict(self)
        extra = d.pop("extra")
        d = {k: v for k, v in d.items() if v is not None}
        return {"model_type": ILLADA, "architectures": ["ILLaDAForCausalLM"], **extra, **d,
                "illada_mlx_format": 1}


def detect_layout(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    mt = cfg.get("model_type", "")
    if "d_model" in cfg or mt == LLADA or any("LLaDA" in a and "ILLaDA" not in a for a in archs):
        return LLADA
    if "hidden_size" in cfg and mt in (ILLADA, "llama", "") or any("ILLaDA" in a for a in archs):
        return ILLADA
    raise IlladaError(
        f"config.json: unknown architecture (model_type={mt!r}, architectures={archs}); "
        "expected an iLLaDA (ILLaDAForCausalLM) or LLaDA (LLaDAModelLM) checkpoint"
    )


def _req(cfg: dict, key: str):
    if key not in cfg:
        raise IlladaError(f"config.json: missing required key {key!r}; the checkpoint's config is incomplete")
    return cfg[key]


def args_from_config(cfg: dict) -> ModelArgs:
    """Build ModelArgs from an iLLaDA, LLaDA or illada-mlx config dict."""
    layout = cfg.get("source_layout") if cfg.get("illada_mlx_format") else detect_layout(cfg)
    if layout == LLADA and "d_model" in cfg:
        if cfg.get("layer_norm_type", "rms") != "rms":
            raise IlladaError(f"config.json: layer_norm_type={cfg['layer_norm_type']!r} is not supported (rms only)")
        vocab = cfg.get("embedding_size") or _req(cfg, "vocab_size")
        return ModelArgs(
            hidden_size=_req(cfg, "d_model"),
            num_hidden_layers=_req(cfg, "n_layers"),
            num_attention_heads=_req(cfg, "n_heads"),
            num_key_value_heads=cfg.get("n_kv_heads") or cfg["n_heads"],
            intermediate_size=_req(cfg, "mlp_hidden_size"),
            vocab_size=vocab,
            max_position_embeddings=cfg.get("max_sequence_length", 4096),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta", 10000.0),
            hidden_act=cfg.get("activation_type", "silu"),
            tie_word_embeddings=bool(cfg.get("weight_tying", False)),
            attention_bias=bool(cfg.get("include_bias", False) or cfg.get("include_qkv_bias", False)),
            mlp_bias=bool(cfg.get("include_bias", False)),
            mask_token_id=cfg.get("mask_token_id"),
            eos_token_id=_first(cfg.get("eos_token_id")),
            bos_token_id=_first(cfg.get("bos_token_id")),
            pad_token_id=_first(cfg.get("pad_token_id")),
            source_layout=LLADA,
        )
    keys = {f for f in ModelArgs.__dataclass_fields__ if f not in ("extra", "source_layout")}
    kwargs = {k: cfg[k] for k in keys if k in cfg and cfg[k] is not None}
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        _req(cfg, k)
    kwargs.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    for k in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if k in kwargs:
            kwargs[k] = _first(kwargs[k])
    return ModelArgs(**kwargs, source_layout=layout or ILLADA)


def _first(v):
    return v[0] if isinstance(v, (list, tuple)) and v else v


def load_config(path: Path) -> dict:
    f = Path(path) / "config.json"
    if not f.exists():
        raise IlladaError(f"{path}: no config.json; point at a model directory (HF checkpoint or illada-mlx output)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise IlladaError(f"{f}: not valid JSON ({e.msg} at line {e.lineno}); re-download the file")


# ---------------------------------------------------------------------------------------------
# special ids
def _tokenizer_vocab(path: Path) -> dict[str, int]:
    """token -> id from tokenizer.json (vocab + added tokens) and tokenizer_config's added tokens."""
    vocab: dict[str, int] = {}
    tj = path / "tokenizer.json"
    if tj.exists():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tj))
        vocab.update(tok.get_vocab(with_added_tokens=True))
    tc = path / "tokenizer_config.json"
    if tc.exists():
        for i, t in (json.loads(tc.read_text()).get("added_tokens_decoder") or {}).items():
            vocab.setdefault(t["content"], int(i))
    return vocab


def _tokenizer_special(path: Path, name: str) -> Optional[str]:
    for fname in ("tokenizer_config.json", "special_tokens_map.json"):
        f = path / fname
        if f.exists():
            v = json.loads(f.read_text()).get(name)
            if isinstance(v, dict):
                v = v.get("content")
            if v:
                return v
    return None


def resolve_special_ids(args: ModelArgs, tokenizer_dir: Path, mask_id: Optional[int] = None) -> ModelArgs:
    """Resolve mask / EOS / BOS / EoT ids: an explicit flag, then the tokenizer, then the config.

    Refuses when no mask id can be found or an id is outside the vocabulary (iLLaDA's config has no
    mask_token_id and LLaDA's 126336 is an ordinary word in iLLaDA's vocabulary).
    """
    vocab = _tokenizer_vocab(Path(tokenizer_dir))
    if mask_id is None:
        mask_id = next((vocab[n] for n in MASK_TOKEN_NAMES if n in vocab), None)
    if mask_id is None:
        mask_id = args.mask_token_id
    if mask_id is None:
        raise IlladaError(
            "no mask token id: the tokenizer has no <[MASK]> or <|mdm_mask|> token and config.json has no "
            "mask_token_id; pass --mask-id (iLLaDA uses 5)"
        )
    args.mask_token_id = int(mask_id)
    for attr, special in (("eos_token_id", "eos_token"), ("bos_token_id", "bos_token"), ("pad_token_id", "pad_token")):
        tok = _tokenizer_special(Path(tokenizer_dir), special)
        if tok is not None and tok in vocab:
            setattr(args, attr, vocab[tok])
    if args.eot_token_id is None:
        args.eot_token_id = next((vocab[n] for n in EOT_TOKEN_NAMES if n in vocab), None)
    for attr in ("mask_token_id", "eos_token_id", "bos_token_id", "pad_token_id", "eot_token_id"):
        v = getattr(args, attr)
        if v is not None and not 0 <= v < args.vocab_size:
            raise IlladaError(
                f"{attr}={v} is outside the vocabulary (size {args.vocab_size}); the tokenizer does not "
                "match this model, or pass the right --mask-id"
            )
    return args
