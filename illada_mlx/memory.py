"""Memory checks before a model is loaded: its resident size estimated from the files' headers, compared
with what the machine allows, and the compute dtype chosen to fit.

The estimate is exact for the weights (every tensor's bytes from the safetensors headers, float tensors at
the compute dtype); activations and the KV cache come on top. The limit is the machine's total memory, on
a Mac also Metal's recommended working set (`max_recommended_working_set_size`), whichever is smaller.
A model over the limit is refused with the fix (quantize, or a smaller recipe); one over WARN_FRACTION of
it, or over the memory available now, gets a warning. An unconverted HF checkpoint is read whole into
memory: past HF_NOTICE_BYTES a note says what converting it would save.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx

from .errors import IlladaError
from .progress import format_bytes

WARN_FRACTION = 0.8  # warn above this share of the limit
HF_NOTICE_BYTES = 1_000_000_000  # an HF checkpoint this big gets the "convert it" note
Q4_BITS_PER_WEIGHT = 4.5  # affine 4-bit, group 64, a bfloat16 scale and bias per group (convert -q)
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "U8": 1, "F64": 8}


@dataclass
class Footprint:
    """A model's weights: bytes as stored, floats (castable) apart, and its parameter count."""

    stored_bytes: int = 0
    float_bytes: int = 0  # the float tensors' share of stored_bytes (norms, float layers, scales, biases)
    float_elements: int = 0
    parameters: int = 0  # elements of the float weights (quantized weights counted unpacked)

    def resident(self, dtype: Optional[mx.Dtype]) -> int:
        """Bytes in memory once the float tensors are cast to `dtype` (None: as stored)."""
        if dtype is None:
            return self.stored_bytes
        return self.stored_bytes - self.float_bytes + self.float_elements * dtype.size


def footprint(headers: dict[str, dict]) -> Footprint:
    """The footprint of a set of safetensors header entries ({name: {"dtype", "shape", ...}})."""
    fp = Footprint()
    for name, t in headers.items():
        n = 1
        for d in t["shape"]:
            n *= d
        size = n * _ITEMSIZE.get(t["dtype"], 4)
        fp.stored_bytes += size
        if t["dtype"] in ("F32", "F16", "BF16"):
            fp.float_bytes += size
            fp.float_elements += n
            if not name.endswith((".scales", ".biases")):
                fp.parameters += n
        elif t["dtype"] == "U32" and name.endswith(".weight"):
            fp.parameters += n * 32 // _packed_bits(headers, name)
    return fp


def _packed_bits(headers: dict, name: str) -> int:
    """Bits per weight of a packed quantized weight, from its scales' shape (one scale per group)."""
    base = name[: -len(".weight")]
    scales = headers.get(f"{base}.scales")
    if not scales:
        return 32
    groups, packed = scales["shape"][-1], headers[name]["shape"][-1]
    for bits in (2, 3, 4, 5, 6, 8):  # packed columns = in_features * bits / 32, groups = in_features / group
        for group in (16, 32, 64, 128):
            if groups * group * bits == packed * 32:
                return bits
    return 4


@dataclass
class Limit:
    bytes: int
    what: str  # "total memory" or "Metal's recommended working set"
    available: Optional[int] = None  # memory free now (None when unknown)


def memory_limit() -> Limit:
    """What this machine allows a model: total memory, or Metal's working set where smaller."""
    total, available = _system_memory()
    limit = Limit(total, "this machine's total memory", available)
    try:
        if mx.metal.is_available():
            ws = int(mx.device_info().get("max_recommended_working_set_size", 0))
            if 0 < ws < total:
                limit = Limit(ws, "Metal's recommended working set", available)
    except AttributeError:
        pass
    return limit


def _system_memory() -> tuple[int, Optional[int]]:
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    except ImportError:
        pass
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return total, int(line.split()[1]) * 1024
    except OSError:
        pass
    return total, None


@dataclass
class Plan:
    """What loading will do: the compute dtype (None: as stored), the bytes it needs, notes to show."""

    dtype: Optional[mx.Dtype]
    need_bytes: int
    notes: list = field(default_factory=list)


def plan_load(
    fp: Footprint, preferred: Optional[mx.Dtype], source: str, ranks: int = 1, limit: Optional[Limit] = None
) -> Plan:
    """The compute dtype that fits (the preferred one, else the stored one, with a note), refused when
    even that does not fit; a warning when close. `source` names the model directory."""
    limit = limit or memory_limit()
    share = lambda n: n // max(1, ranks)  # noqa: E731  (tensor parallel: each rank holds about 1/ranks)
    dtype, need = preferred, share(fp.resident(preferred))
    notes = []
    if preferred is not None and need > limit.bytes and share(fp.stored_bytes) < need:
        stored = share(fp.stored_bytes)
        name = str(preferred).rsplit(".", 1)[-1]
        notes.append(
            f"computing in the dtype the files store: {name} would need {format_bytes(need)} of "
            f"{format_bytes(limit.bytes)} ({limit.what}); quantize the model "
            f"(`illada-mlx convert -q`) for a fast float32 compute on the CPU"
        )
        dtype, need = None, stored
    if need > limit.bytes:
        raise IlladaError(
            f"{source} needs {format_bytes(need)} in memory, more than {limit.what} "
            f"({format_bytes(limit.bytes)}); quantize it (`illada-mlx convert -q`) or choose a "
            "smaller recipe (--q-bits 3, --q-recipe mixed_3_6)"
        )
    if need > WARN_FRACTION * limit.bytes or (limit.available is not None and need > limit.available):
        free = f", {format_bytes(limit.available)} free now" if limit.available is not None else ""
        notes.append(
            f"{source} needs {format_bytes(need)} in memory, close to {limit.what} "
            f"({format_bytes(limit.bytes)}{free}); it may swap: quantize it or use a smaller recipe"
        )
    return Plan(dtype, need, notes)


def hf_note(fp: Footprint, source: Path, need: int) -> Optional[str]:
    """For an unconverted HF checkpoint past HF_NOTICE_BYTES: what converting it to 4-bit would save."""
    if need < HF_NOTICE_BYTES:
        return None
    q4 = int(fp.parameters * Q4_BITS_PER_WEIGHT / 8)
    src = shlex.quote(str(source))
    dst = shlex.quote(f"{str(source).rstrip('/')}-4bit")
    cast = f" ({format_bytes(need)} once cast for compute)" if need != fp.stored_bytes else ""
    return (
        f"{source} is an unconverted HF checkpoint: loading reads all {format_bytes(fp.stored_bytes)} into "
        f"memory{cast}; `illada-mlx convert --hf-path {src} --mlx-path {dst} "
        f"-q` makes a ~{format_bytes(q4)} model that loads memory-mapped (saves "
        f"~{format_bytes(max(0, need - q4))})"
    )
