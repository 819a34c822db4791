"""illada-mlx: iLLaDA / LLaDA masked-diffusion language models on MLX."""

from .config import IlladaError, ModelArgs
from .decode import generate, var_generate
from .engine import Response, build_prompt, generate_text, stream_generate
from .load import load
from .model import Model
from .spec import PRESETS, DecodeSpec, make_spec

__all__ = [
    "DecodeSpec",
    "IlladaError",
    "Model",
    "ModelArgs",
    "PRESETS",
    "Response",
    "build_prompt",
    "generate",
    "generate_text",
    "load",
    "make_spec",
    "stream_generate",
    "var_generate",
]
