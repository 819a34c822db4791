"""Quantization: which layers get which (bits, group size, mode), recorded mlx-lm style.

The record written to config.json is {"group_size", "bits", "mode", "<module path>": {...}} where a
per-path entry overrides the defaults. A module is quantized on load iff its `.scales` tensor exists,
so layers too narrow for the group size simply stay in float.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from .errors import IlladaError

# quantization mode (q_mode; the record's "mode" key) -> (allowed bits, allowed group sizes)
QUANT_MODES = {
    "affine": ((2, 3, 4, 5, 6, 8), (32, 64, 128)),
    "mxfp4": ((4,), (32,)),
    "mxfp8": ((8,), (32,)),
    "nvfp4": ((4,), (16,)),
}
_EMBED = re.compile(r"^(model\.embed_tokens|lm_head)$")
_LINEAR = re.compile(r"^model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")


def check_params(bits: Optional[int], group_size: Optional[int], q_mode: str) -> dict:
    """The (bits, group size, mode) record, the q_mode's defaults filling what is None; refused if unsupported."""
    if q_mode not in QUANT_MODES:
        raise IlladaError(f"unsupported quantization mode {q_mode!r}; choose one of {', '.join(QUANT_MODES)}")
    ok_bits, ok_groups = QUANT_MODES[q_mode]
    # not given: 4 bits in groups of 64 where the mode allows them (affine), else the mode's only value
    # (mlx-lm's defaults: mxfp4 g32, nvfp4 g16, mxfp8 8-bit g32)
    bits = (4 if 4 in ok_bits else ok_bits[0]) if bits is None else bits
    group_size = (64 if 64 in ok_groups else ok_groups[0]) if group_size is None else group_size
    if bits not in ok_bits or group_size not in ok_groups:
        raise IlladaError(
            f"{q_mode} quantization supports bits {list(ok_bits)} with group size {list(ok_groups)}, "
            f"not bits={bits} group={group_size}; change --q-bits/--q-group-size"
        )
    return {"group_size": group_size, "bits": bits, "mode": q_mode}


def check_record(record: dict) -> None:
    """A quantization record from config.json: its defaults and every per-layer entry supported."""

    def params(d, where):
        if not isinstance(d, dict):
            raise IlladaError(f"config.json: quantization{where} is not an object; re-convert the model")
        bits, group, q_mode = d.get("bits"), d.get("group_size"), d.get("mode", "affine")
        ok = q_mode in QUANT_MODES if isinstance(q_mode, str) else False
        if not (
            ok
            and bits in QUANT_MODES[q_mode][0]
            and group in QUANT_MODES[q_mode][1]
            and not isinstance(bits, bool)
            and not isinstance(group, bool)
        ):
            raise IlladaError(
                f"config.json: quantization{where} (bits {bits!r}, group size {group!r}, mode "
                f"{q_mode!r}) is not one this package writes; re-convert the model"
            )

    params(record, "")
    for k, v in record.items():
        if k not in ("group_size", "bits", "mode") and v is not False:
            params(v, f"[{k!r}]")


def _recipe_mixed(body_bits: int, high_bits: int, sensitive: bool) -> Callable:
    """Body at `body_bits`, embedding/head at `high_bits`; with `sensitive`, also v_proj and down_proj
    of the first and last eighth of the layers and every other layer's down_proj (llama.cpp's K_M idea)."""

    def rule(path: str, n_layers: int, default: dict) -> Optional[dict]:
        high = {"group_size": 64, "bits": high_bits, "mode": "affine"}
        if _EMBED.match(path):
            return high
        m = _LINEAR.match(path)
        if not m:
            return None
        i, name = int(m.group(1)), m.group(2)
        edge = i < max(1, n_layers // 8) or i >= n_layers - max(1, n_layers // 8)
        if (
            sensitive
            and (name.endswith("v_proj") or name.endswith("down_proj"))
            and (edge or i % 2 == 0 and name.endswith("down_proj"))
        ):
            return high
        return {**default, "bits": body_bits} if default["mode"] == "affine" else default

    return rule


RECIPES = {
    "mixed_4_6": _recipe_mixed(4, 6, False),
    "mixed_4_8": _recipe_mixed(4, 8, False),
    "mixed_3_6": _recipe_mixed(3, 6, True),
    "mixed_2_6": _recipe_mixed(2, 6, True),
}


def layer_params(path: str, n_layers: int, default: dict, recipe: Optional[str]) -> Optional[dict]:
    """Quantization params for a module path, or None to keep it in float (norms, unknown modules)."""
    if recipe is None:
        return default if (_EMBED.match(path) or _LINEAR.match(path)) else None
    if recipe not in RECIPES:
        raise IlladaError(f"unknown quantization recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[recipe](path, n_layers, default)


def quantize_tensor(w: mx.array, params: dict) -> Optional[dict]:
    """{"weight", "scales"[, "biases"]} for a 2-D weight, or None when the rows don't fit the group size."""
    if w.ndim != 2 or w.shape[-1] % params["group_size"]:
        return None
    out = mx.quantize(w, group_size=params["group_size"], bits=params["bits"], mode=params["mode"])
    names = ("weight", "scales", "biases")
    return dict(zip(names, out))


def apply_quantization(model: nn.Module, record: dict, weight_names) -> None:
    """Swap in quantized layers for every module whose `.scales` is stored, with the recorded params."""
    default = {k: record[k] for k in ("group_size", "bits", "mode") if k in record}
    default.setdefault("mode", "affine")
    names = set(weight_names)

    def predicate(path, module):
        if f"{path}.scales" not in names or not hasattr(module, "to_quantized"):
            return False
        return record.get(path, default)

    nn.quantize(
        model,
        group_size=default.get("group_size"),
        bits=default.get("bits"),
        mode=default["mode"],
        class_predicate=predicate,
    )
