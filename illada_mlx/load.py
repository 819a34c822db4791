"""`load(path) -> (model, tokenizer)` for MLX model dirs (ours) and, for small models, HF dirs; `resolve_source`
turns a local dir or a hub repo id into a directory (the converter uses it too)."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Optional

import mlx.core as mx

from .checkpoint import inspect_checkpoint, iter_shards
from .config import IlladaError, ModelArgs, args_from_config, load_config, resolve_special_ids
from .model import Model
from .quant import apply_quantization

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
SIDE_FILES = (*TOKENIZER_FILES, "generation_config.json")  # what a model dir holds beside config and weights
HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", *SIDE_FILES]


def resolve_source(src: str) -> Path:
    """A local directory, or a hub repo id downloaded with huggingface_hub (only HUB_PATTERNS' files)."""
    p = Path(src).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise IlladaError(f"{src} is a file; pass a model directory or a hub repo id")
    if src.startswith((".", "/", "~")) or src.count("/") != 1:
        raise IlladaError(f"{src}: no such directory; pass a model directory or a hub repo id "
                          "like GSAI-ML/iLLaDA-8B-Base")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src, allow_patterns=HUB_PATTERNS))
    except Exception as e:
        raise IlladaError(f"could not download {src} from the hub ({type(e).__name__}); check the repo id, "
                          "your network, or download it yourself and pass the directory")


def _build(args: ModelArgs, weights: dict[str, mx.array]) -> Model:
    model = Model(args)
    if args.quantization:
        apply_quantization(model, args.quantization, weights.keys())
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise IlladaError(f"weights do not match config.json ({str(e).splitlines()[0]}); re-convert the model")
    mx.eval(model.parameters())
    model.eval()
    return model


def load_model(path: Path, mask_id: Optional[int] = None) -> Model:
    """The model in an MLX dir (memory-mapped) or an HF dir (read whole into memory through the checkpoint
    reader: fine for small models, `illada-mlx convert` for big ones)."""
    path = Path(path)
    cfg = load_config(path)
    if cfg.get("illada_mlx_format"):
        args = args_from_config(cfg)
        if mask_id is not None:
            args.mask_token_id = mask_id
        files = sorted(glob.glob(str(path / "*.safetensors")))
        if not files:
            raise IlladaError(f"{path}: no *.safetensors; the conversion is incomplete, run convert again")
        weights = {}
        for f in files:
            try:
                weights.update(mx.load(f))  # memory-mapped, read lazily
            except Exception as e:
                raise IlladaError(f"{Path(f).name}: cannot be read ({e}); the file is corrupt, convert again")
        return _build(args, weights)
    args = resolve_special_ids(args_from_config(cfg), path, mask_id)
    weights = {}
    for _, tensors in iter_shards(inspect_checkpoint(path, args)):
        weights.update({k: v for k, v in tensors.items() if k != "lm_head.weight(tied)"})
    return _build(args, weights)


def load_tokenizer(path: Path, args: ModelArgs):
    """mlx-lm's TokenizerWrapper (chat template, streaming detokenizer), EOS/EoT registered as stops.

    The fast tokenizer class is loaded directly rather than through AutoTokenizer, which would read
    LLaDA's `auto_map` and ask (on stdin) to run the repository's remote code.
    """
    import json

    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, NaiveStreamingDetokenizer, TokenizerWrapper
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    path = Path(path)
    if not (path / "tokenizer.json").exists():
        raise IlladaError(f"{path}: no tokenizer.json; copy the model's tokenizer files into this directory")
    hf_logging.set_verbosity_error()
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
        decoder = json.loads((path / "tokenizer.json").read_text()).get("decoder") or {}
    except Exception as e:
        raise IlladaError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    detok = BPEStreamingDetokenizer if decoder.get("type") == "ByteLevel" else NaiveStreamingDetokenizer
    eos = [i for i in (args.eos_token_id, args.eot_token_id) if i is not None]
    return TokenizerWrapper(tok, detok, eos_token_ids=eos or None)


def load(path: Optional[str] = None, mask_id: Optional[int] = None):
    """Load (model, tokenizer) from an MLX dir, an HF dir or a hub id. No path: the bundled demo model's HF
    checkpoint, read in memory."""
    if path is None:
        from .demo import bundled

        root = bundled()
    else:
        root = resolve_source(str(path))
    model = load_model(root, mask_id)
    return model, load_tokenizer(root, model.args)
