"""The decode settings a person chooses, each declared once: its type, range, help and where it is asked
for (a CLI flag, a request field, an lm-eval model arg, a model's diffusion_config.json).

The faces are built from this registry: `cli.common.sampler_options` makes its click options from it, the API's
`diffusion` object and sampling fields are read with `Setting.check`, lm-eval's model args are typed and
checked with `Setting.parse`, `DecodeSpec.check` checks every ranged field with it and `/v1/illada/defaults`
publishes it for the web page. A setting's default is the mode's and the model's (spec.py), not here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from .cache import CACHES, REFRESHES
from .config import IlladaError
from .rules import RULES

SEED_MAX = 2**32 - 1
MODES = ("exact", "variable", "fast", "fast_fixed")  # spec.PRESETS holds what each one sets


@dataclass(frozen=True)
class Setting:
    name: str  # the DecodeSpec field (make_spec keyword)
    kind: type  # int, float, str (one of `choices`) or bool
    help: str
    lo: Optional[float] = None  # numbers: the least value (None: unbounded)
    hi: Optional[float] = None  # numbers: the greatest value (None: unbounded)
    lo_open: bool = False  # the least value itself is refused
    choices: tuple = ()
    flags: tuple = ()  # the CLI's option names (none: not on the CLI)
    request: Optional[str] = None  # where a request carries it: "body" (OpenAI's field) or "diffusion"
    model_file: bool = False  # a model's diffusion_config.json may set it (spec.TUNABLE)
    default: str = ""  # the default in words (it comes from the mode and the model: spec.make_spec)

    def usage(self, accepts: bool = True) -> str:
        """One help line: what it does, what it accepts (unless a CLI shows the range itself), its default."""
        return (
            f"{self.help[0].upper()}{self.help[1:]}"
            + (f": {self.describe()}." if accepts else ".")
            + (f" Default: {self.default}." if self.default else "")
        )

    def describe(self) -> str:
        """What the setting accepts, for messages: 'a number in (0, 1]', 'one of a, b', ..."""
        if self.kind is bool:
            return "true or false"
        if self.kind is str:
            return "one of " + ", ".join(self.choices)
        what = "an integer" if self.kind is int else "a number"
        if self.lo is None and self.hi is None:
            return what
        if self.hi is None:
            return f"{what} {'>' if self.lo_open else '≥'} {_num(self.lo)}"
        return f"{what} in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}]"

    def check(self, value: Any, label: Optional[str] = None) -> Any:
        """The value, typed, if the setting accepts it; else IlladaError naming `label` (default: the name)."""
        if self.accepts(value):
            return float(value) if self.kind is float else value
        raise IlladaError(f"{label or self.name} must be {self.describe()}, not {value!r}")

    def accepts(self, value: Any) -> bool:
        if self.kind is bool:
            return isinstance(value, bool)
        if self.kind is str:
            return isinstance(value, str) and value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else int):
            return False
        if not math.isfinite(value):
            return False
        low = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        return low and (self.hi is None or value <= self.hi)

    def parse(self, text: str, label: Optional[str] = None) -> Any:
        """A value written as text (an lm-eval model arg, a query string), typed and checked."""
        value: Any = text
        try:
            if self.kind is int:
                value = int(text)
            elif self.kind is float:
                value = float(text)
            elif self.kind is bool:
                value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[text.lower()]
        except (ValueError, KeyError):
            pass
        return self.check(value, label)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


SETTINGS = (
    Setting(
        "mode",
        str,
        "decoding mode (spec.PRESETS)",
        choices=MODES,
        flags=("--mode",),
        request="diffusion",
        default="the model's own (its diffusion_config.json), else fast",
    ),
    Setting(
        "max_tokens",
        int,
        "the budget: the growing canvas's most tokens, the fixed canvas's length",
        lo=1,
        flags=("-m", "--max-tokens"),
        request="body",
        default="a fixed canvas 128 tokens (the official one); the growing canvas 1024 (base) / 2048 (chat model), cut to the context (a given budget that does not fit is refused)",
    ),
    Setting(
        "block_length",
        int,
        "tokens per block",
        lo=1,
        hi=1024,
        flags=("--block-length",),
        request="diffusion",
        default="32",
    ),
    Setting(
        "steps_per_block",
        int,
        "denoising steps per block (the adaptive rules: at most)",
        lo=1,
        hi=1024,
        flags=("--steps-per-block",),
        request="diffusion",
        default="32",
    ),
    Setting(
        "temperature",
        float,
        "sampling temperature (0: greedy)",
        lo=0,
        hi=2,
        flags=("--temperature", "--temp"),
        request="body",
        default="0",
    ),
    Setting(
        "top_p",
        float,
        "at temperature > 0: sample from the smallest set of candidates with this mass",
        lo=0,
        hi=1,
        lo_open=True,
        flags=("--top-p",),
        request="body",
        default="1",
    ),
    Setting(
        "top_k",
        int,
        "at temperature > 0: sample from the k most likely candidates (0: all)",
        lo=0,
        hi=2**31 - 1,
        flags=("--top-k",),
        request="body",
        default="0",
    ),
    Setting(
        "min_p",
        float,
        "at temperature > 0: drop candidates below this fraction of the most likely",
        lo=0,
        hi=1,
        flags=("--min-p",),
        request="body",
        default="0",
    ),
    Setting(
        "rule",
        str,
        "the adaptive modes' commit rule",
        choices=RULES,
        flags=("--rule",),
        request="diffusion",
        model_file=True,
        default="the model's, else threshold",
    ),
    Setting(
        "threshold",
        float,
        "threshold rule: commit the tokens with confidence ≥ τ (giving it asks for that rule)",
        lo=0,
        hi=1,
        lo_open=True,
        flags=("--threshold",),
        request="diffusion",
        model_file=True,
        default="the model's, else 0.9",
    ),
    Setting(
        "error_bound",
        float,
        "error rule: commit the most confident tokens while Σ (1 − confidence) ≤ ε (giving it asks for that rule)",
        lo=0,
        hi=32,
        lo_open=True,
        flags=("--error-bound",),
        request="diffusion",
        model_file=True,
        default="the model's, else 0.05",
    ),
    Setting(
        "stable_threshold",
        float,
        "adaptive rules: also commit a token the block's previous step predicted the same, at confidence ≥ this (0: off)",
        lo=0,
        hi=1,
        flags=("--stable-threshold",),
        request="diffusion",
        model_file=True,
        default="the model's, else 0 (off)",
    ),
    Setting(
        "factor",
        float,
        "factor rule: the longest prefix of the sorted confidences with (n + 1)(1 − c) < f",
        lo=0,
        model_file=True,
        default="1",
    ),
    Setting(
        "entropy_gamma",
        float,
        "entropy rule: commit by increasing entropy while Σ − the largest ≤ γ",
        lo=0,
        model_file=True,
        default="0.1",
    ),
    Setting(
        "cache",
        str,
        "the block KV cache",
        choices=CACHES,
        flags=("--cache",),
        request="diffusion",
        default="the mode's: fast prefix, fast_fixed dual, else none",
    ),
    Setting(
        "block_refresh",
        str,
        "what a cached mode recomputes at a block start",
        choices=REFRESHES,
        flags=("--block-refresh",),
        request="diffusion",
        default="the mode's: fast drift, else window",
    ),
    Setting(
        "drift_threshold",
        float,
        "drift refresh: the probes' key drift (1 − cosine) above which the canvas is recomputed",
        lo=0,
        hi=2,
        flags=("--drift-threshold",),
        request="diffusion",
        model_file=True,
        default="the model's, else 0.05",
    ),
    Setting(
        "drift_probes",
        int,
        "drift refresh: probes spread over the positions before the window",
        lo=1,
        hi=256,
        model_file=True,
        default="16",
    ),
    Setting(
        "refresh_every",
        int,
        "also recompute the whole canvas every this many steps of a block (0: never)",
        lo=0,
        hi=1024,
        request="diffusion",
        default="0",
    ),
    Setting(
        "full_refresh_every",
        int,
        "under the window refresh: the whole canvas every this many blocks (0: never)",
        lo=0,
        hi=1024,
        default="0",
    ),
    Setting(
        "seed", int, "the sampler's random seed", lo=0, hi=SEED_MAX, flags=("--seed",), request="body", default="random"
    ),
)
BY_NAME = {s.name: s for s in SETTINGS}


def setting(name: str) -> Setting:
    return BY_NAME[name]


def request_settings(where: str) -> tuple[Setting, ...]:
    """The settings a request carries at `where` ("body" or "diffusion")."""
    return tuple(s for s in SETTINGS if s.request == where)


def as_json() -> list[dict]:
    """The registry for clients (the web page's settings panel): name, type, range or choices, help."""
    out = []
    for s in SETTINGS:
        d = {"name": s.name, "type": s.kind.__name__, "help": s.help, "accepts": s.describe()}
        if s.kind in (int, float):
            d.update(min=s.lo, max=s.hi, min_open=s.lo_open)
        if s.choices:
            d["choices"] = list(s.choices)
        if s.request:
            d["request"] = s.request
        out.append(d)
    return out
