"""The dtype a model computes in, chosen per backend.

On MLX's CPU backend a quantized matmul with bfloat16 activations (and bfloat16 scales) runs ~10× slower
than the same matmul in float32 (bench/compute_dtype.py measures it), and float matmuls in bfloat16 gain
nothing there either. So on the CPU a model computes in float32: its float parameters (norms, unquantized
layers, the quantized layers' scales and biases) are cast once at load, which makes the activations
float32 too. On a GPU (Metal, CUDA) the stored dtype is kept. A model whose float32 copy would not fit the
memory the machine allows keeps its stored dtype (memory.py decides).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .errors import IlladaError

COMPUTE_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def on_cpu() -> bool:
    """The default device is the CPU (no Metal / CUDA device in use)."""
    return mx.default_device().type == mx.DeviceType.cpu


def backend_name() -> str:
    """'cpu', or the GPU backend MLX runs on ('metal' / 'cuda')."""
    if on_cpu():
        return "cpu"
    try:
        if mx.metal.is_available():
            return "metal"
    except AttributeError:
        pass
    return "cuda" if getattr(mx, "cuda", None) is not None and mx.cuda.is_available() else "gpu"


def preferred_dtype(requested: Optional[str] = None) -> Optional[mx.Dtype]:
    """The compute dtype asked for ('float32', 'bfloat16', 'float16'; 'stored': None, as the files store
    it), or for 'auto' / None the backend's: float32 on the CPU, None (as stored) on a GPU."""
    if requested == "stored":
        return None
    if requested not in (None, "auto"):
        if requested not in COMPUTE_DTYPES:
            raise IlladaError(
                f"compute dtype {requested!r} is not one of auto, stored, {', '.join(COMPUTE_DTYPES)}; "
                "choose one of those"
            )
        return COMPUTE_DTYPES[requested]
    return mx.float32 if on_cpu() else None


def cast_floats(module: nn.Module, dtype: mx.Dtype) -> None:
    """Cast every float parameter of `module` (lazily) to `dtype`; packed quantized weights stay."""
    if dtype is not None:
        module.set_dtype(dtype, predicate=lambda d: mx.issubdtype(d, mx.floating))


def compute_dtype(model) -> str:
    """The dtype the model's activations have: that of its final norm's weight (norms stay float)."""
    return str(model.model.norm.weight.dtype).rsplit(".", 1)[-1]
