"""illada-mlx: iLLaDA / LLaDA masked-diffusion language models on MLX."""

from .config import IlladaError, ModelArgs
from .load import load
from .model import Model

__all__ = ["IlladaError", "Model", "ModelArgs", "load"]
