"""`illada-mlx convert`: an HF checkpoint (iLLaDA or LLaDA layout) -> an MLX model directory.

Streams: one source shard is read, cast / quantized and appended to an output shard, which is written as
soon as it reaches `max_shard_bytes`; peak memory stays near one source shard plus one output shard.
Everything (weights in mlx-lm's file names, index, config, tokenizer and generation config, model card) is
written into a temporary directory beside the destination, renamed into place at the end (`output.py`: the
destination's rules, the temp dirs, the sweep of a killed run's leftovers); an optional upload to the hub
follows. Every weight is checked for NaN / infinity (after the cast) unless `allow_nonfinite`.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

from illada_mlx.checkpoint import inspect_checkpoint, iter_shards, safetensors_header
from illada_mlx.config import IlladaError, args_from_config, load_config, one_line, resolve_special_ids
from illada_mlx.files import check_file
from illada_mlx.load import NONFINITE_KEY, SIDE_FILES, resolve_source
from illada_mlx.progress import Progress
from illada_mlx.quant import check_params, layer_params, quantize_tensor
from illada_mlx.spec import DIFFUSION_CONFIG, FALLBACK_DEFAULTS

from .card import describe_quantization, model_card
from .hub import check_repo_id, upload_to_hub
from .output import (
    WorkDir,
    check_apart_from_source,
    check_destination,
    check_replaceable,
    signals_as_interrupts,
    stderr_notice,
    stop_hook,
    swap_in,
    sweep,
)

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
    max_shard_bytes: int = 2_000_000_000,
    progress: bool = True,
    upload_repo: Optional[str] = None,
    allow_nonfinite: bool = False,
    notice: Optional[Callable[[str], None]] = None,
) -> dict:
    """Convert, then upload to `upload_repo` if given; returns a summary (paths, sizes, parameter count, bits per
    weight, peak memory, the upload's URL). `notice` (default: stderr) gets one line when a killed run's
    leftovers beside the destination are cleaned up."""
    rss_at_start = peak_rss_bytes()
    dst = check_destination(mlx_path)
    sweep(dst.parent, notice or stderr_notice)
    check_replaceable(dst, force)
    if dtype is not None and dtype not in DTYPES:
        raise IlladaError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not (isinstance(max_shard_bytes, int) and max_shard_bytes > 0):
        raise IlladaError(f"the output shard size must be a positive number of bytes, not {max_shard_bytes!r}")
    default_q = check_params(q_bits, q_group_size, q_mode) if quantize or q_recipe else None
    if upload_repo is not None:
        check_repo_id(upload_repo)
    src = resolve_source(hf_path)
    check_apart_from_source(dst, src)
    cfg = load_config(src)
    args = resolve_special_ids(args_from_config(cfg), src, mask_id)
    if not (src / "tokenizer.json").exists():  # the loader needs it: refused before anything is written
        raise IlladaError(
            f"{src}: no tokenizer.json, without which the converted model cannot be loaded; put the "
            "model's tokenizer files in the source directory (or convert from the hub id)"
        )
    ck = inspect_checkpoint(src, args)  # validates every header before anything is written
    side = [check_file(src, src / n) for n in SIDE_FILES if (src / n).exists() or (src / n).is_symlink()]
    target = DTYPES[dtype] if dtype else None

    dst.parent.mkdir(parents=True, exist_ok=True)
    with signals_as_interrupts():
        tmp = WorkDir(dst, "tmp")
        try:
            out = tmp.path
            summary = _write(ck, args, out, target, default_q, q_recipe, max_shard_bytes, progress, allow_nonfinite)
            for f in side:
                shutil.copyfile(f, out / f.name)
            if not (out / DIFFUSION_CONFIG).exists():  # the decode defaults a user can read and edit
                (out / DIFFUSION_CONFIG).write_text(json.dumps(FALLBACK_DEFAULTS, indent=2) + "\n")
            config = args.to_config()
            if default_q:
                config["quantization"] = summary.pop("quantization")
                config["quantization_config"] = config["quantization"]
            if allow_nonfinite:
                config[NONFINITE_KEY] = True
            (out / "config.json").write_text(json.dumps(config, indent=2))
            hub_source = not Path(hf_path).expanduser().is_dir()  # resolve_source took it as a repo id
            quantization = describe_quantization(config.get("quantization"), q_recipe)
            (out / "README.md").write_text(
                model_card(
                    name=upload_repo or dst.name,
                    ref=upload_repo or str(dst),
                    source=hf_path if hub_source else src.name,
                    hub_source=hub_source,
                    layout=args.source_layout,
                    quantization=quantization,
                    bits_per_weight=summary["bits_per_weight"],
                    size_bytes=summary["output_bytes"],
                )
            )
            os.chmod(out, 0o777 & ~_umask())  # mkdtemp made it 0700; the result is an ordinary directory
            stop_hook("written")
            swap_in(tmp, dst)
        finally:
            tmp.close()
            shutil.rmtree(tmp.path, ignore_errors=True)  # gone already when it became dst
    summary.update(
        path=str(dst),
        source=str(src),
        layout=args.source_layout,
        source_bytes=sum(ck.sizes.values()),
        largest_source_shard=max(ck.sizes.values()),
        peak_rss_bytes=peak_rss_bytes(),
        rss_growth_bytes=peak_rss_bytes() - rss_at_start,
        mlx_peak_bytes=mx.get_peak_memory(),
    )
    if upload_repo is not None:
        summary["uploaded"] = upload_to_hub(dst, upload_repo)
    return summary


def _check_finite(name: str, w: mx.array, source: mx.array) -> None:
    """NaN or infinity in a weight after the cast: the source's, or the cast's overflow."""
    if bool(mx.all(mx.isfinite(w))):
        return
    if w is not source and bool(mx.all(mx.isfinite(source))):
        raise IlladaError(
            f"{name}: values overflow {w.dtype} (infinite after the cast); choose another --dtype (bfloat16 or float32)"
        )
    raise IlladaError(
        f"{name}: NaN or infinite values in the checkpoint; re-download it, or pass "
        "--allow-nonfinite to convert them as they are"
    )


def _save(out: Path, name: str, arrays: dict) -> None:
    """Write one shard and read its header back (a full disk shows as a short file)."""
    try:
        mx.save_safetensors(str(out / name), arrays, metadata={"format": "mlx"})
        safetensors_header(out, out / name)
    except (RuntimeError, ValueError, IlladaError) as e:
        raise IlladaError(
            f"could not write {name} in {out.parent} ({one_line(e)}); free some space or choose another --mlx-path"
        )


def _write(ck, args, out: Path, target, default_q, recipe, max_shard_bytes, progress, allow_nonfinite) -> dict:
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
            _save(out, name, buf)
            shards.append({k: name for k in buf})
            buf = {}
            stop_hook("shard")

    bar = Progress("converting", sum(ck.sizes.values()), f"{ck.root} ({len(ck.names)} tensors)", enabled=progress)
    with bar:  # moves by each tensor's source bytes (a shard's header with its last tensor)
        for shard, tensors in iter_shards(ck):
            left = ck.sizes[shard]
            for name in sorted(tensors):
                w = tensors[name]
                left -= w.nbytes
                if name == "lm_head.weight(tied)":
                    head_fp = _fingerprint(w)
                    bar.update(w.nbytes)
                    continue
                if name == "model.embed_tokens.weight" and args.tie_word_embeddings:
                    embed_fp = _fingerprint(w)
                source, w = w, w.astype(target) if target is not None else w
                if not allow_nonfinite:
                    _check_finite(name, w, source)
                params = (
                    layer_params(name[: -len(".weight")], args.num_hidden_layers, default_q, recipe)
                    if default_q and name.endswith(".weight")
                    else None
                )
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
                bar.update(source.nbytes)
                if sum(v.nbytes for v in buf.values()) >= max_shard_bytes:
                    flush()
            del tensors
            bar.update(left)
        flush()
        if (
            head_fp is not None
            and embed_fp is not None
            and not all(abs(a - b) <= 1e-3 * max(1.0, abs(b)) for a, b in zip(head_fp, embed_fp))
        ):
            raise IlladaError(
                "lm_head differs from the embedding but config.json says the head is tied; "
                "set tie_word_embeddings to false"
            )
    n = len(shards)
    weight_map = {}
    for i, s in enumerate(shards):
        final = shard_name(i, n)
        os.replace(out / next(iter(s.values())), out / final)
        weight_map.update({k: final for k in s})
    index = {
        "metadata": {"total_size": total, "total_parameters": parameters},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {
        "output_bytes": total,
        "output_shards": n,
        "parameters": parameters,
        "bits_per_weight": total * 8 / parameters,
        "quantization": record,
    }


def shard_name(i: int, n: int) -> str:
    """mlx-lm's name for output shard i (from 0) of n: `model.safetensors` when it is the only one."""
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
