"""`illada-mlx convert`: an HF checkpoint (iLLaDA or LLaDA layout) -> an MLX model directory.

Streams: one source shard is read, cast / quantized and appended to an output shard, which is written as
soon as it reaches `max_shard_bytes`; peak memory stays near one source shard plus one output shard.
Everything (weights in mlx-lm's file names, index, config, tokenizer and generation config, model card) is
written into a temporary directory beside the destination, renamed into place at the end; an optional
upload to the hub follows.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import mlx.core as mx

from illada_mlx.checkpoint import inspect_checkpoint, iter_shards
from illada_mlx.config import IlladaError, args_from_config, load_config, resolve_special_ids
from illada_mlx.load import SIDE_FILES, resolve_source
from illada_mlx.quant import check_params, layer_params, quantize_tensor

from .card import describe_quantization, model_card
from .hub import check_repo_id, upload_to_hub

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def peak_rss_bytes() -> int:
    """This process's peak resident memory. On Linux VmHWM (ru_maxrss survives fork+exec, so a child
    would report its parent's peak); on macOS ru_maxrss (bytes there)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _fingerprint(w: mx.array) -> tuple[float, float]:
    w = w.reshape(-1)[:: max(1, w.size // 65536)].astype(mx.float32)
    return float(w.sum()), float(mx.abs(w).sum())


def _prepare_dest(dst: Path, force: bool) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not force:
        raise IlladaError(f"{dst} exists and is not empty; choose another --mlx-path or pass --force to replace it")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def convert(
    hf_path: str,
    mlx_path: str,
    dtype: Optional[str] = None,
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    q_mode: str = "affine",
    q_recipe: Optional[str] = None,
    mask_id: Optional[int] = None,
    force: bool = False,
    max_shard_bytes: int = 2 << 30,
    progress: bool = True,
    upload_repo: Optional[str] = None,
) -> dict:
    """Convert, then upload to `upload_repo` if given; returns a summary (paths, sizes, parameter count, bits per
    weight, peak memory, the upload's URL)."""
    rss_at_start = peak_rss_bytes()
    dst = Path(mlx_path).expanduser().resolve()
    _prepare_dest(dst, force)
    if dtype is not None and dtype not in DTYPES:
        raise IlladaError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    default_q = check_params(q_bits, q_group_size, q_mode) if quantize or q_recipe else None
    if upload_repo is not None:
        check_repo_id(upload_repo)
    src = resolve_source(hf_path)
    cfg = load_config(src)
    args = resolve_special_ids(args_from_config(cfg), src, mask_id)
    ck = inspect_checkpoint(src, args)  # validates every header before anything is written
    target = DTYPES[dtype] if dtype else None

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        summary = _write(ck, args, tmp, target, default_q, q_recipe, max_shard_bytes, progress)
        for name in SIDE_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
        config = args.to_config()
        if default_q:
            config["quantization"] = summary.pop("quantization")
            config["quantization_config"] = config["quantization"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        hub_source = not Path(hf_path).expanduser().is_dir()  # resolve_source took it as a repo id
        quantization = describe_quantization(config.get("quantization"), q_recipe)
        (tmp / "README.md").write_text(model_card(
            name=upload_repo or dst.name, ref=upload_repo or str(dst), source=hf_path if hub_source else src.name,
            hub_source=hub_source, layout=args.source_layout, quantization=quantization,
            bits_per_weight=summary["bits_per_weight"], size_bytes=summary["output_bytes"]))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp made it 0700; the result is an ordinary directory
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, old / "x")
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary.update(path=str(dst), source=str(src), layout=args.source_layout,
                   source_bytes=sum(ck.sizes.values()), largest_source_shard=max(ck.sizes.values()),
                   peak_rss_bytes=peak_rss_bytes(), rss_growth_bytes=peak_rss_bytes() - rss_at_start,
                   mlx_peak_bytes=mx.get_peak_memory())
    if upload_repo is not None:
        summary["uploaded"] = upload_to_hub(dst, upload_repo)
    return summary


def _write(ck, args, out: Path, target, default_q, recipe, max_shard_bytes, progress) -> dict:
    from tqdm import tqdm

    record = dict(default_q) if default_q else None
    buf: dict[str, mx.array] = {}
    shards: list[dict[str, str]] = []
    total = 0
    parameters = 0  # the weights' element counts before quantization (mlx-lm's parameter count)
    embed_fp = head_fp = None

    def flush():
        nonlocal buf
        if buf:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            mx.save_safetensors(str(out / name), buf, metadata={"format": "mlx"})
            shards.append({k: name for k in buf})
            buf = {}

    bar = tqdm(total=sum(ck.sizes.values()), unit="B", unit_scale=True, desc="converting",
               disable=not progress, file=sys.stderr)
    for shard, tensors in iter_shards(ck):
        for name in sorted(tensors):
            w = tensors[name]
            if name == "lm_head.weight(tied)":
                head_fp = _fingerprint(w)
                continue
            if name == "model.embed_tokens.weight" and args.tie_word_embeddings:
                embed_fp = _fingerprint(w)
            w = w.astype(target) if target is not None else w
            params = layer_params(name[: -len(".weight")], args.num_hidden_layers, default_q, recipe) \
                if default_q and name.endswith(".weight") else None
            q = quantize_tensor(w, params) if params else None
            if q is not None:
                base = name[: -len(".weight")]
                if params != default_q:
                    record[base] = params
                parts = {f"{base}.{k}": v for k, v in q.items()}
            else:
                parts = {name: w}
            parameters += w.size
            for k, v in parts.items():
                mx.eval(v)
                buf[k] = v
                total += v.nbytes
            if sum(v.nbytes for v in buf.values()) >= max_shard_bytes:
                flush()
        del tensors
        bar.update(ck.sizes[shard])
    flush()
    bar.close()
    if head_fp is not None and embed_fp is not None and not all(
            abs(a - b) <= 1e-3 * max(1.0, abs(b)) for a, b in zip(head_fp, embed_fp)):
        raise IlladaError("lm_head differs from the embedding but config.json says the head is tied; "
                          "set tie_word_embeddings to false")
    n = len(shards)
    weight_map = {}
    for i, s in enumerate(shards):
        final = shard_name(i, n)
        os.replace(out / next(iter(s.values())), out / final)
        weight_map.update({k: final for k in s})
    index = {"metadata": {"total_size": total, "total_parameters": parameters},
             "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"output_bytes": total, "output_shards": n, "parameters": parameters,
            "bits_per_weight": total * 8 / parameters, "quantization": record}


def shard_name(i: int, n: int) -> str:
    """mlx-lm's name for output shard i (from 0) of n: `model.safetensors` when it is the only one."""
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
