"""Model arguments from either checkpoint layout's config.json, and the special-token ids.

Two layouts exist (see the spec): iLLaDA's Llama-style HF keys and LLaDA's OLMo-style keys. Both are
read into one `ModelArgs`; our MLX directories store the iLLaDA-style keys plus the resolved ids.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from .errors import ContextError as ContextError  # re-exported: where callers have always found it
from .errors import IlladaError, one_line
from .files import read_bytes, read_json_object
from .quant import check_record

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
        check_args(self)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

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
        return {"model_type": ILLADA, "architectures": ["ILLaDAForCausalLM"], **extra, **d, "illada_mlx_format": 1}


# bounds of the integer fields: far beyond any real model, small enough that nothing is allocated for nonsense
INT_BOUNDS = {
    "hidden_size": 1 << 16,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "intermediate_size": 1 << 20,
    "vocab_size": 1 << 24,
    "max_position_embeddings": 1 << 24,
    "head_dim": 4096,
}
FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias")
ID_FIELDS = ("mask_token_id", "eos_token_id", "bos_token_id", "pad_token_id", "eot_token_id")


def _bad(name: str, value, want: str) -> IlladaError:
    return IlladaError(f"config.json: {name} must be {want}, not {reprlib.repr(value)}; fix config.json")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    """A finite number (not a bool; an int too large for a float is not one)."""
    try:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:
        return False


def check_rope_scaling(rs) -> None:
    """None, or {"type"|"rope_type": "linear", "factor": > 0} ("default" or no type: no scaling)."""
    if rs is None:
        return
    if not isinstance(rs, dict):
        raise _bad("rope_scaling", rs, 'null or an object like {"type": "linear", "factor": 2.0}')
    kind = rs.get("type", rs.get("rope_type"))
    if kind not in ("linear", "default", None):
        raise IlladaError(
            f"config: rope_scaling type {kind!r} is not supported (only linear); remove rope_scaling or open an issue"
        )
    if kind == "linear" and not (_is_real(rs.get("factor")) and 0 < rs["factor"] <= 1e6):
        raise _bad("rope_scaling.factor", rs.get("factor"), "a number above 0 (linear scaling)")


def check_args(a: "ModelArgs") -> None:
    """Every field the model uses has its type and sane bounds; refused with the field's name otherwise."""
    for name, top in INT_BOUNDS.items():
        v = getattr(a, name)
        if name == "head_dim" and v is None:
            continue
        if not _is_int(v) or not 1 <= v <= top:
            raise _bad(name, v, f"a whole number from 1 to {top}")
    if a.num_key_value_heads > a.num_attention_heads or a.num_attention_heads % a.num_key_value_heads:
        raise IlladaError(
            f"config: num_attention_heads={a.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={a.num_key_value_heads}; fix config.json"
        )
    if a.head_dim is None and a.hidden_size % a.num_attention_heads:
        raise IlladaError(
            f"config: hidden_size={a.hidden_size} is not a multiple of num_attention_heads="
            f"{a.num_attention_heads} and no head_dim is given; fix config.json"
        )
    if (a.head_dim or a.hidden_size // a.num_attention_heads) % 2:
        raise IlladaError(
            f"config: the head dimension {a.head_dim or a.hidden_size // a.num_attention_heads} "
            "is odd; rotary embeddings need an even one, fix config.json"
        )
    for name in ("rms_norm_eps", "layer_norm_eps"):
        v = getattr(a, name)
        if (v is not None or name == "rms_norm_eps") and not (_is_real(v) and 0 < v < 1):
            raise _bad(name, v, "a number between 0 and 1 (exclusive)")
    if not (_is_real(a.rope_theta) and a.rope_theta > 0):
        raise _bad("rope_theta", a.rope_theta, "a number above 0")
    check_rope_scaling(a.rope_scaling)
    if a.hidden_act not in ("silu", "swiglu"):
        raise IlladaError(f"config: hidden_act={a.hidden_act!r} is not supported (only silu/SwiGLU)")
    for name in FLAGS:
        if not isinstance(getattr(a, name), bool):
            raise _bad(name, getattr(a, name), "true or false")
    for name in ID_FIELDS:
        v = getattr(a, name)
        if v is not None and not (_is_int(v) and v >= 0):
            raise _bad(name, v, "a token id (a whole number from 0)")
    if a.quantization is not None:
        check_record(a.quantization)
    if a.source_layout not in (ILLADA, LLADA):
        raise _bad("source_layout", a.source_layout, f"{ILLADA!r} or {LLADA!r}")


def check_special_ids(args: "ModelArgs") -> None:
    """Every special id set lies inside the vocabulary, and the mask id is none of the ids that end or pad a
    text (a decode would commit masks as EOS, or never see a mask at all)."""
    for attr in ID_FIELDS:
        v = getattr(args, attr)
        if v is not None and not 0 <= v < args.vocab_size:
            raise IlladaError(
                f"{attr}={v} is outside the vocabulary (size {args.vocab_size}); the tokenizer does not "
                "match this model, or pass the right --mask-id"
            )
    mask = args.mask_token_id
    for attr in ID_FIELDS[1:]:
        if mask is not None and getattr(args, attr) == mask:
            raise IlladaError(
                f"mask token id {mask} is also the model's {attr} (a decode would write garbage); "
                "pass the model's own mask token as --mask-id (iLLaDA uses 5)"
            )


def detect_layout(cfg: dict) -> str:
    archs = cfg.get("architectures")
    archs = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    mt = cfg.get("model_type", "")
    mt = mt if isinstance(mt, str) else ""
    if "d_model" in cfg or mt == LLADA or any("LLaDA" in a and "ILLaDA" not in a for a in archs):
        return LLADA
    if "hidden_size" in cfg and mt in (ILLADA, "llama", "") or any("ILLaDA" in a for a in archs):
        return ILLADA
    raise IlladaError(
        f"config.json: unknown architecture (model_type={reprlib.repr(mt)}, "
        f"architectures={reprlib.repr(archs)}); "
        "expected an iLLaDA (ILLaDAForCausalLM) or LLaDA (LLaDAModelLM) checkpoint"
    )


def _req(cfg: dict, key: str):
    if cfg.get(key) is None:
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
            tie_word_embeddings=_flag(cfg, "weight_tying"),
            attention_bias=_flag(cfg, "include_bias") or _flag(cfg, "include_qkv_bias"),
            mlp_bias=_flag(cfg, "include_bias"),
            mask_token_id=cfg.get("mask_token_id"),
            eos_token_id=_first(cfg.get("eos_token_id")),
            bos_token_id=_first(cfg.get("bos_token_id")),
            pad_token_id=_first(cfg.get("pad_token_id")),
            source_layout=LLADA,
        )
    # a quantization record is ours (mlx-lm's format) only in an illada-mlx directory
    skip = ("extra", "source_layout") + (() if cfg.get("illada_mlx_format") else ("quantization",))
    keys = {f for f in ModelArgs.__dataclass_fields__ if f not in skip}
    kwargs = {k: cfg[k] for k in keys if k in cfg and cfg[k] is not None}
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        _req(cfg, k)
    kwargs.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    for k in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if k in kwargs:
            kwargs[k] = _first(kwargs[k])
    return ModelArgs(**kwargs, source_layout=layout or ILLADA)


def _flag(cfg: dict, key: str) -> bool:
    v = cfg.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _bad(key, v, "true or false")
    return v


def _first(v):
    return v[0] if isinstance(v, (list, tuple)) and v else v


def load_config(path: Path) -> dict:
    """config.json of a model directory, as a JSON object (read through `files`' checks)."""
    f = Path(path) / "config.json"
    if not f.exists() and not f.is_symlink():
        raise IlladaError(f"{path}: no config.json; point at a model directory (HF checkpoint or illada-mlx output)")
    return read_json_object(Path(path), "config.json")


# ---------------------------------------------------------------------------------------------
# special ids
def _tokenizer_vocab(path: Path) -> dict[str, int]:
    """token -> id from tokenizer.json (vocab + added tokens) and tokenizer_config's added tokens."""
    vocab: dict[str, int] = {}
    tj = path / "tokenizer.json"
    if tj.exists() or tj.is_symlink():
        from tokenizers import Tokenizer

        data = read_bytes(path, tj)
        try:
            tok = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # the tokenizers library's errors: Exception with a message
            raise IlladaError(f"{tj}: not a tokenizer file ({one_line(e) or type(e).__name__}); re-download it")
        vocab.update(tok.get_vocab(with_added_tokens=True))
    tc = path / "tokenizer_config.json"
    if tc.exists() or tc.is_symlink():
        added = read_json_object(path, tc.name).get("added_tokens_decoder") or {}
        if not isinstance(added, dict):
            raise IlladaError(f"{tc}: added_tokens_decoder is not an object; re-download the file")
        for i, t in added.items():
            if not (isinstance(t, dict) and isinstance(t.get("content"), str) and i.isdigit()):
                raise IlladaError(f"{tc}: added token {i!r} is malformed; re-download the file")
            vocab.setdefault(t["content"], int(i))
    return vocab


def _tokenizer_special(path: Path, name: str) -> Optional[str]:
    for fname in ("tokenizer_config.json", "special_tokens_map.json"):
        f = path / fname
        if f.exists() or f.is_symlink():
            v = read_json_object(path, fname).get(name)
            if isinstance(v, dict):
                v = v.get("content")
            if v and isinstance(v, str):
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
    if not (isinstance(mask_id, int) and not isinstance(mask_id, bool)):
        raise IlladaError(f"mask token id {mask_id!r} is not a whole number; pass --mask-id (iLLaDA uses 5)")
    args.mask_token_id = int(mask_id)
    for attr, special in (("eos_token_id", "eos_token"), ("bos_token_id", "bos_token"), ("pad_token_id", "pad_token")):
        tok = _tokenizer_special(Path(tokenizer_dir), special)
        if tok is not None and tok in vocab:
            setattr(args, attr, vocab[tok])
    if args.eot_token_id is None:
        args.eot_token_id = next((vocab[n] for n in EOT_TOKEN_NAMES if n in vocab), None)
    check_special_ids(args)
    return args
