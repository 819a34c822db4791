"""Reading an HF checkpoint (iLLaDA or LLaDA layout) safely, one shard at a time.

Used by the loader (small HF dirs are read in memory) and by the converter (`illada_mlx_convert`).

`inspect_checkpoint` validates every shard's header (sizes, names, shapes) before any tensor is read, so
a truncated or corrupt file, a tensor the model doesn't have, or a shape that disagrees with the config is
refused up front. `iter_shards` then yields our-named tensors shard by shard (safetensors are mapped
lazily by `mx.load`; PyTorch `.bin` shards only through `torch.load(weights_only=True)`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import mlx.core as mx

from .config import IlladaError, ModelArgs
from .files import check_file, check_name, parse_json_object, read_bytes
from .weights import expected_shapes, map_name

_ST_DTYPES = {
    "BF16": 2,
    "F16": 2,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "I32": 4,
    "U32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
FLOAT_DTYPES = ("F16", "BF16", "F32")  # the weight dtypes a checkpoint may store (what MLX converts)
MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit


@dataclass
class Checkpoint:
    root: Path
    shards: list[Path]
    kind: str  # "safetensors" | "torch"
    names: dict[str, str] = field(default_factory=dict)  # source name -> our name (None-dropped excluded)
    sizes: dict[Path, int] = field(default_factory=dict)


def _entry_ok(t) -> bool:
    """A header entry: {"dtype": known, "shape": [whole numbers >= 0], "data_offsets": [a, b]} with
    b - a the shape's byte count."""
    if not isinstance(t, dict) or not isinstance(t.get("dtype"), str) or t["dtype"] not in _ST_DTYPES:
        return False
    shape, offsets = t.get("shape"), t.get("data_offsets")

    def ints(xs) -> bool:
        return isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)

    if not (ints(shape) and ints(offsets) and len(shape) <= 8 and len(offsets) == 2):
        return False
    numel = 1
    for n in shape:
        numel *= n
    return offsets[1] - offsets[0] == numel * _ST_DTYPES[t["dtype"]]


def safetensors_header(root: Path, path: Path) -> dict:
    """The tensor entries of a safetensors file, every one checked (types, sizes, offsets within the file);
    nothing beyond the header is read."""
    check_file(root, path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        if n <= 0 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise IlladaError(f"{path.name}: truncated or corrupt safetensors header; re-download this shard")
        data = f.read(n)
    try:
        header = parse_json_object(data, path)
    except IlladaError:
        raise IlladaError(f"{path.name}: truncated or corrupt safetensors header; re-download this shard")
    header.pop("__metadata__", None)
    end = 0
    for name, t in header.items():
        if not _entry_ok(t):
            raise IlladaError(f"{path.name}: corrupt entry for tensor {name!r}; re-download this shard")
        end = max(end, t["data_offsets"][1])
    if 8 + n + end != size:
        raise IlladaError(
            f"{path.name}: truncated or corrupt shard (header promises {8 + n + end} bytes, file has {size}); "
            "re-download this shard"
        )
    return header


def check_float_dtype(shard: Path, name: str, dtype: str) -> None:
    """Only float16 / bfloat16 / float32 weights are converted."""
    if dtype in FLOAT_DTYPES:
        return
    fix = "cast it to float32 first" if dtype == "F64" else "a checkpoint stores float weights, this is not one"
    raise IlladaError(
        f"{shard.name}: tensor {name!r} has dtype {dtype}; only F16, BF16 and F32 weights can be converted: {fix}"
    )


def find_shards(root: Path) -> tuple[list[Path], str]:
    """The weight files of a checkpoint dir and their kind ("safetensors" or "torch"), from the index when
    there is one, else by name."""
    for index_name, kind in (
        ("model.safetensors.index.json", "safetensors"),
        ("pytorch_model.bin.index.json", "torch"),
    ):
        index = root / index_name
        if index.exists() or index.is_symlink():
            files = sorted(set(_weight_map(root, index).values()))
            paths = [check_name(root, f, index_name) for f in files]
            missing = [f for f, p in zip(files, paths) if not p.exists() and not p.is_symlink()]
            if missing:
                raise IlladaError(f"{root}: shard {missing[0]} named in {index_name} is missing; download all shards")
            return [check_file(root, p) for p in paths], kind
    st = sorted(root.glob("*.safetensors"))
    if st:
        return [check_file(root, p) for p in st], "safetensors"
    pt = sorted(root.glob("pytorch_model*.bin"))
    if pt:
        return [check_file(root, p) for p in pt], "torch"
    raise IlladaError(f"{root}: no weights found (*.safetensors or pytorch_model*.bin); is this the model directory?")


def _weight_map(root: Path, index: Path) -> dict:
    """An index's weight_map: tensor name -> shard file name, both strings."""
    wm = parse_json_object(read_bytes(root, index), index).get("weight_map")
    if not isinstance(wm, dict) or not wm or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise IlladaError(f"{index}: no weight_map of tensor names to shard files; re-download the index")
    return wm


def _torch():
    try:
        import torch
    except ImportError:
        raise IlladaError(
            "this checkpoint has PyTorch .bin shards: install torch (pip install 'illada-mlx[torch]') "
            "or use its safetensors version"
        )
    return torch


def _torch_names(path: Path) -> dict:
    torch = _torch()
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle errors, truncation, unsafe objects refused by weights_only
        raise IlladaError(
            f"{path.name}: cannot be read safely as a weights-only PyTorch file ({type(e).__name__}); "
            "re-download it or use safetensors"
        )
    if not isinstance(sd, dict):
        raise IlladaError(f"{path.name}: not a state dict of tensors; re-download it or use safetensors")
    if not all(hasattr(v, "shape") and hasattr(v, "dtype") for v in sd.values()):
        raise IlladaError(f"{path.name}: holds values that are not tensors; re-download it or use safetensors")
    names = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
    return {k: {"shape": list(v.shape), "dtype": names.get(v.dtype, str(v.dtype))} for k, v in sd.items()}


def inspect_checkpoint(root: Path, args: ModelArgs) -> Checkpoint:
    """Validate every shard's header against the config and map each source name to ours; nothing is read
    beyond the headers (PyTorch shards are memory-mapped to list their tensors)."""
    shards, kind = find_shards(root)
    ck = Checkpoint(root=root, shards=shards, kind=kind)
    want = expected_shapes(args)
    seen: dict[str, tuple] = {}
    for shard in shards:
        header = safetensors_header(root, shard) if kind == "safetensors" else _torch_names(shard)
        for name, t in header.items():
            try:
                ours = map_name(name, args.source_layout)
            except KeyError:
                raise IlladaError(
                    f"{shard.name}: tensor {name!r} is not part of a {args.source_layout} model; "
                    "wrong architecture in config.json?"
                )
            if ours is None:
                continue
            check_float_dtype(shard, name, t["dtype"])
            shape = tuple(t["shape"])
            if ours == "lm_head.weight" and args.tie_word_embeddings:
                ours = "lm_head.weight(tied)"
            elif ours not in want:
                raise IlladaError(
                    f"{shard.name}: tensor {name!r} does not fit the config "
                    f"({args.num_hidden_layers} layers, biases={args.attention_bias}); fix config.json"
                )
            elif shape != want[ours]:
                raise IlladaError(
                    f"{shard.name}: {name} has shape {list(shape)} but config.json implies "
                    f"{list(want[ours])}; the config does not match the weights"
                )
            ck.names[name] = ours
            seen[ours] = shape
        ck.sizes[shard] = shard.stat().st_size
    missing = [n for n in want if n not in seen]
    if missing:
        raise IlladaError(
            f"{root}: tensor {missing[0]} (ours) is missing from the shards "
            f"({len(missing)} missing); incomplete download or wrong config"
        )
    return ck


def iter_shards(ck: Checkpoint) -> Iterator[tuple[Path, dict[str, mx.array]]]:
    """Yield (shard, {our name: array}) one source shard at a time. The tied head (if stored) comes
    as 'lm_head.weight(tied)' so the caller can check it equals the embedding and drop it."""
    for shard in ck.shards:
        if ck.kind == "safetensors":
            raw = mx.load(str(shard))
        else:
            torch = _torch()
            sd = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
            dt = {torch.bfloat16: mx.bfloat16, torch.float16: mx.float16}
            raw = {k: mx.array(v.float().numpy()).astype(dt.get(v.dtype, mx.float32)) for k, v in sd.items()}
        yield shard, {ck.names[k]: v for k, v in raw.items() if k in ck.names}
