"""`load(path) -> (model, tokenizer)` for MLX model dirs (ours) and, for small models, HF dirs; `resolve_source`
turns a local dir or a hub repo id into a directory (the converter uses it too)."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from .backend import cast_floats, preferred_dtype
from .checkpoint import FLOAT_DTYPES, Checkpoint, find_shards, inspect_checkpoint, iter_shards, safetensors_header
from .config import (
    IlladaError,
    ModelArgs,
    args_from_config,
    check_special_ids,
    load_config,
    one_line,
    resolve_special_ids,
)
from .distributed import all_objects, check_same
from .errors import IlladaWarning
from .files import check_file
from .memory import Footprint, footprint, hf_note, plan_load
from .model import Model
from .progress import Progress
from .quant import apply_quantization
from .spec import DIFFUSION_CONFIG, model_defaults
from .workdirs import sweep

NONFINITE_KEY = "illada_mlx_allow_nonfinite"  # config.json: written by `convert --allow-nonfinite`

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)
SIDE_FILES = (
    *TOKENIZER_FILES,
    "generation_config.json",
    DIFFUSION_CONFIG,
)  # what a model dir holds beside config and weights
CONVERTED_FILES = (
    "config.json",
    "README.md",
    "model.safetensors.index.json",
    *SIDE_FILES,
)  # convert writes them beside the shards
HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", *SIDE_FILES]


def resolve_source(src: str) -> Path:
    """A local directory, or a hub repo id downloaded with huggingface_hub (only HUB_PATTERNS' files)."""
    p = Path(src).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise IlladaError(f"{src} is a file; pass a model directory or a hub repo id")
    if src.startswith((".", "/", "~")) or src.count("/") != 1:
        raise IlladaError(
            f"{src}: no such directory; pass a model directory or a hub repo id like GSAI-ML/iLLaDA-8B-Base"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src, allow_patterns=HUB_PATTERNS))
    except Exception as e:
        raise IlladaError(
            f"could not download {src} from the hub ({type(e).__name__}); check the repo id, "
            "your network, or download it yourself and pass the directory"
        )


def _names(text: str) -> list[str]:
    return [n for n in re.split(r"[\s,]+", text.strip().rstrip(".")) if n]


def describe_mismatch(e: ValueError) -> str:
    """MLX's load_weights error in one line naming at most three parameters."""
    text = str(e)
    for pattern, what in (
        (r"Received (\d+) parameters not in model:(.*)", "not in the model"),
        (r"Missing (\d+) parameters:(.*)", "missing from the weights"),
    ):
        m = re.match(pattern, text, re.S)
        if m:
            names = _names(m.group(2))
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            return f"{m.group(1)} parameters {what}: {', '.join(names[:3])}{more}"
    return one_line(text)


def check_finite(weights: dict[str, mx.array], group=None) -> None:
    """Refuse NaN or infinity in any float weight (reads every weight once); with a group, each rank checks
    its own slices and every rank refuses what any rank found."""
    floats = [(k, v) for k, v in weights.items() if mx.issubdtype(v.dtype, mx.floating)]
    ok = mx.stack([mx.all(mx.isfinite(v)) for _, v in floats]).tolist() if floats else []
    bad = [k for (k, _), good in zip(floats, ok) if not good]
    if group is not None and group.size() > 1:
        bad = list(dict.fromkeys(k for part in all_objects(group, bad) for k in part))
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise IlladaError(
            f"NaN or infinite values in {', '.join(bad[:3])}{more}: the weights are corrupt; "
            "re-download or re-convert the model"
        )


@dataclass
class WeightGroup:
    """The (lazy) tensors of one weight file, with the file's name and bytes (progress is by file)."""

    name: str
    nbytes: int
    tensors: dict


@dataclass
class BuildOptions:
    dtype: Optional[mx.Dtype] = None  # the compute dtype (None: as stored)
    allow_nonfinite: bool = False
    group: object = None  # the tensor-parallel group
    progress: Optional[Progress] = None


def _build(args: ModelArgs, groups: list[WeightGroup], opts: BuildOptions) -> Model:
    group = opts.group
    sharded = group is not None and group.size() > 1
    model = Model(args)
    if args.quantization:
        names = [k for g in groups for k in g.tensors]
        apply_quantization(model, args.quantization, names)
    try:
        model.load_weights([kv for g in groups for kv in g.tensors.items()], strict=True)
    except ValueError as e:
        raise IlladaError(f"weights do not match config.json ({describe_mismatch(e)}); re-convert the model")
    files = [(g.name, g.nbytes, list(g.tensors)) for g in groups]
    for g in groups:
        g.tensors.clear()  # the model holds the only references to the (lazy) tensors now
    if sharded:
        model.shard(group)
        cast_floats(model, opts.dtype)
        for part in (model.model.embed_tokens, *model.layers, model):  # one layer's whole tensors at a time
            mx.eval(part.parameters())
        if not opts.allow_nonfinite:
            check_finite(dict(tree_flatten(model.parameters())), group)
    else:
        cast_floats(model, opts.dtype)
        _read_by_file(model, files, opts)
    mx.eval(model.parameters())
    model.eval()
    return model


def _read_by_file(model: Model, files: list[tuple], opts: BuildOptions) -> None:
    """Read (and cast) the model's tensors one weight file at a time, each checked finite, the progress
    moving by the file's bytes."""
    params = dict(tree_flatten(model.parameters()))
    for _, nbytes, names in files:
        arrays = {n: params[n] for n in names if n in params}
        mx.eval(arrays)
        if not opts.allow_nonfinite:
            check_finite(arrays)
        if opts.progress is not None:
            opts.progress.update(nbytes)


def check_mlx_dtypes(headers: dict[str, dict]) -> None:
    """An MLX directory's dtypes: float weights, uint32 packed weights of quantized layers (those with
    `.scales`) and uint8 scales (the mx/nv float formats)."""
    for name, t in headers.items():
        dtype = t["dtype"]
        base = name.rsplit(".", 1)[0]
        if (
            dtype in FLOAT_DTYPES
            or (dtype == "U32" and name.endswith(".weight") and f"{base}.scales" in headers)
            or (dtype == "U8" and name.endswith(".scales"))
        ):
            continue
        raise IlladaError(f"tensor {name!r} has dtype {dtype}, which no converted model stores; re-convert the model")


def mlx_weight_files(path: Path) -> list[Path]:
    """The weight files of an MLX directory: the index's, else every *.safetensors, each checked."""
    index = path / "model.safetensors.index.json"
    if index.exists() or index.is_symlink():
        shards, _ = find_shards(path)
        return shards
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise IlladaError(f"{path}: no *.safetensors; the conversion is incomplete, run convert again")
    return [check_file(path, f) for f in files]


def load_mlx_weights(path: Path) -> tuple[list[WeightGroup], dict]:
    """The (memory-mapped) weights of an MLX directory, one group per file, and every file's header
    entries (all checked before any tensor is read)."""
    files = mlx_weight_files(path)
    headers = {}
    for f in files:
        headers.update(safetensors_header(path, f))
    check_mlx_dtypes(headers)
    groups = []
    for f in files:
        try:
            groups.append(WeightGroup(f.name, f.stat().st_size, mx.load(str(f))))  # memory-mapped, read lazily
        except Exception as e:  # MLX reports a bad file as RuntimeError / ValueError
            raise IlladaError(f"{f.name}: cannot be read ({one_line(e)}); the file is corrupt, convert again")
    return groups, headers


def hf_footprint(ck: Checkpoint) -> Footprint:
    """An HF checkpoint's footprint: from the safetensors headers, or a PyTorch checkpoint's file sizes."""
    if ck.kind == "safetensors":
        headers = {}
        for shard in ck.shards:
            headers.update(safetensors_header(ck.root, shard))
        return footprint(headers)
    total = sum(ck.sizes.values())
    return Footprint(stored_bytes=total, float_bytes=total, float_elements=total // 2, parameters=total // 2)


def hf_weights(ck: Checkpoint) -> list[WeightGroup]:
    """An HF checkpoint's weights, one group per shard (the tied head's copy dropped); safetensors lazily,
    PyTorch shards read."""
    return [
        WeightGroup(shard.name, ck.sizes[shard], {k: v for k, v in tensors.items() if k != "lm_head.weight(tied)"})
        for shard, tensors in iter_shards(ck)
    ]


@dataclass
class LoadOptions:
    """How a model is loaded: the compute dtype ("auto": float32 on the CPU, as stored on a GPU; "stored";
    or "float32" / "bfloat16" / "float16"), a progress display on stderr, and where warnings go (default:
    Python's warnings, as IlladaWarning)."""

    compute_dtype: str = "auto"
    progress: bool = False
    notice: Optional[Callable[[str], None]] = None


def _notify(opts: LoadOptions, msg: str) -> None:
    if opts.notice is not None:
        opts.notice(msg)
    else:
        warnings.warn(msg, IlladaWarning, stacklevel=4)


def load_model(path: Path, mask_id: Optional[int] = None, group=None, opts: Optional[LoadOptions] = None) -> Model:
    """The model in an MLX dir (memory-mapped) or an HF dir (read whole into memory through the checkpoint
    reader: fine for small models, `illada-mlx convert` for big ones). Config, headers and dtypes are
    checked, and the resident size estimated against the machine's memory (memory.py), before anything is
    read; NaN or infinite weights are refused (unless the MLX dir's config.json says `convert
    --allow-nonfinite` made it)."""
    path, opts = Path(path), opts or LoadOptions()
    cfg = load_config(path)
    mlx_dir = bool(cfg.get("illada_mlx_format"))
    if mlx_dir:
        args = args_from_config(cfg)
        if mask_id is not None:
            args.mask_token_id = mask_id
        check_special_ids(args)
        groups, headers = load_mlx_weights(path)
        fp = footprint(headers)
    else:
        args = resolve_special_ids(args_from_config(cfg), path, mask_id)
        ck = inspect_checkpoint(path, args)
        fp = hf_footprint(ck)
    ranks = group.size() if group is not None else 1
    plan = plan_load(fp, preferred_dtype(opts.compute_dtype), str(path), ranks)
    groups = groups if mlx_dir else hf_weights(ck)  # (a PyTorch checkpoint is read here: after the check)
    note = None if mlx_dir else hf_note(fp, path, plan.need_bytes)
    for msg in plan.notes + ([note] if note else []):
        _notify(opts, msg)
    build = BuildOptions(dtype=plan.dtype, allow_nonfinite=mlx_dir and cfg.get(NONFINITE_KEY) is True, group=group)
    total = sum(g.nbytes for g in groups)
    with Progress("loading", total, f"{path} ({len(groups)} file(s))", enabled=opts.progress) as bar:
        build.progress = bar
        return _build(args, groups, build)


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
    tj = path / "tokenizer.json"
    if not (tj.exists() or tj.is_symlink()):
        raise IlladaError(f"{path}: no tokenizer.json; copy the model's tokenizer files into this directory")
    for name in (*TOKENIZER_FILES, "added_tokens.json"):  # what the tokenizer may read: regular files inside only
        if (path / name).exists() or (path / name).is_symlink():
            check_file(path, path / name)
    hf_logging.set_verbosity_error()
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
        decoder = json.loads(tj.read_bytes().decode("utf-8")).get("decoder") or {}
        decoder = decoder if isinstance(decoder, dict) else {}
    except Exception as e:  # the tokenizer's files can fail in many ways: one line naming the cause
        raise IlladaError(
            f"{path}: cannot load the tokenizer ({type(e).__name__}: {one_line(e)}); re-download the tokenizer files"
        )
    detok = BPEStreamingDetokenizer if decoder.get("type") == "ByteLevel" else NaiveStreamingDetokenizer
    eos = [i for i in (args.eos_token_id, args.eot_token_id) if i is not None]
    return TokenizerWrapper(tok, detok, eos_token_ids=eos or None)


def model_files(path: Path) -> dict[str, bytes]:
    """What every rank must agree on: config.json's bytes and the names and sizes of the model's files."""
    files = sorted(
        [f.name, f.stat().st_size]
        for f in path.iterdir()
        if f.is_file() and (f.suffix == ".safetensors" or f.name in SIDE_FILES)
    )
    return {
        "config.json": (path / "config.json").read_bytes(),
        "the list of files (names, sizes)": repr(files).encode(),
    }


def load(
    path: Optional[str] = None,
    mask_id: Optional[int] = None,
    group=None,
    compute_dtype: str = "auto",
    progress: bool = False,
    notice: Optional[Callable[[str], None]] = None,
):
    """Load (model, tokenizer) from an MLX dir, an HF dir or a hub id. No path: the bundled demo model's HF
    checkpoint, read in memory. With a `group` of several ranks (mlx.launch) the model is tensor-parallel
    (Model.shard): every rank checks that the others load the same files, then keeps its slice only.
    compute_dtype, progress, notice: see LoadOptions. Loading a local directory removes what a killed
    `convert` left beside it (workdirs.sweep: only its own marked work dirs whose run is dead), with a notice."""
    if path is None:
        from .demo import bundled

        root = bundled()
    else:
        root = resolve_source(str(path))
    opts = LoadOptions(compute_dtype, progress, notice)
    if path is not None and Path(path).expanduser().is_dir():  # a killed conversion's leftovers beside it go
        sweep(root.parent, CONVERTED_FILES, lambda msg: _notify(opts, msg))
    if group is not None and group.size() > 1:
        check_same(group, model_files(root), "model")
    model = load_model(root, mask_id, group, opts)
    model.decode_defaults = model_defaults(root)
    return model, load_tokenizer(root, model.args)
