"""What a decode needs, in one place: the `DecodeSpec`, the mode presets, the budget rule, validation.

Every entry point (the CLI, the server, `bench`, `bench/quality.py`, Python callers) builds its spec with
`make_spec`: the model's defaults, then a preset from `PRESETS`, then the caller's overrides, then the
budget rule against the prompt's length, then one validation. The sampler (decode.py) takes the result
as it is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple, Optional

from .cache import CACHES, REFRESHES
from .config import THINK_END_TEXT, ContextError, IlladaError
from .rules import RULES
from .settings import MODES, SETTINGS, setting

CANVASES = ("fixed", "growing")
REMASKING = ("low_confidence", "random")
LOGITS_AT = ("block", "masked")
DEFAULT_MODE = "fast"  # for a model whose directory names none (diffusion_config.json)
DIFFUSION_CONFIG = "diffusion_config.json"  # a model dir's own decode defaults (`model_defaults`)
# what a model's diffusion_config.json may set: its default mode and the numbers of the adaptive modes that
# depend on the model (the official modes, `exact` and `variable`, take none of them)
TUNABLE = tuple(s.name for s in SETTINGS if s.model_file)
# written by the converter for a model without its own file: Fast-dLLM's published setting for LLaDA-8B
# (threshold commits at 0.9) with the fast mode's model-independent mechanisms
FALLBACK_DEFAULTS = {"mode": DEFAULT_MODE, "rule": "threshold", "threshold": 0.9}
FIXED_DEFAULT_TOKENS = 128  # the official fixed canvas (LLaDA's generate: 128 tokens in blocks of 32)
THINK_BOOST = (100.0, 3.0)  # iLLaDA-Instruct's end-of-thinking boost (scale, power)


class Preset(NamedTuple):
    about: str
    settings: dict


PRESETS = {
    "exact": Preset(
        "the official fixed canvas (prompt + max_tokens masks), the official schedule",
        dict(canvas="fixed", rule="schedule", cache="none"),
    ),
    "variable": Preset(
        "iLLaDA's growing canvas, one block at a time, stopping at EOS; the official schedule",
        dict(canvas="growing", rule="schedule", cache="none"),
    ),
    "fast": Preset(
        "the growing canvas, parallel commits (the model's commit rule: threshold, error bound), prefix "
        "cache (a step runs the block), a block start that recomputes the canvas when probes show drift "
        "(at most once each time the reply doubles), the EOS padding committed at once",
        dict(canvas="growing", rule="threshold", cache="prefix", block_refresh="drift", eos_fill=True),
    ),
    "fast_fixed": Preset(
        "the fixed canvas, threshold commits, dual cache (Fast-dLLM's LLaDA setting)",
        dict(canvas="fixed", rule="threshold", cache="dual"),
    ),
}
assert tuple(PRESETS) == MODES


@dataclass(frozen=True)
class DecodeSpec:
    """One decode, fully resolved. `max_tokens` is the fixed canvas's length (whole blocks) or the growing
    canvas's budget; `steps_per_block` is exact for the schedule and an upper bound for the adaptive rules."""

    mask_id: int
    canvas: str = "fixed"
    max_tokens: int = FIXED_DEFAULT_TOKENS
    block_length: int = 32
    steps_per_block: int = 32
    rule: str = "schedule"
    threshold: float = 0.9
    factor: float = 1.0
    entropy_gamma: float = 0.1
    error_bound: float = 0.05  # the error rule: Σ (1 − confidence) of one step's commits at most this
    stable_threshold: float = 0.0  # adaptive rules: rules.commit_stable's τ (0: off)
    cache: str = "none"
    refresh_every: int = 0  # also recompute the whole canvas every this many steps of a block (0: never)
    block_refresh: str = "window"  # what a block start recomputes (cache.REFRESHES)
    full_refresh_every: int = 0  # under "window": the whole canvas every this many blocks (0: never)
    drift_threshold: float = 0.05  # under "drift": recompute the canvas when a probe's keys moved more
    drift_probes: int = 16  # under "drift": probes spread over the positions before the window
    logits_at: str = "masked"
    eos_fill: bool = False  # adaptive rules: a committed EOS/EoT commits the block's masks after it as EOS
    temperature: float = 0.0
    top_p: float = 1.0  # at temperature > 0: sample from the smallest set of candidates with this much mass
    top_k: int = 0  # at temperature > 0: from the k most likely candidates (0: all)
    min_p: float = 0.0  # at temperature > 0: from the candidates at least this fraction of the most likely
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    stop: tuple = ()
    eos_id: Optional[int] = None
    eot_id: Optional[int] = None
    pad_id: Optional[int] = None
    think_token: Optional[int] = None
    think_boost: Optional[tuple] = None
    seed: Optional[int] = None
    mode: Optional[str] = None  # the preset it was made from (reports only)

    @property
    def growing(self) -> bool:
        return self.canvas == "growing"

    @property
    def stable(self) -> bool:
        """Whether stable commits (rules.commit_stable) run beside the rule: an adaptive rule and τs > 0."""
        return self.stable_threshold > 0 and self.rule != "schedule"

    @property
    def rule_number(self) -> Optional[float]:
        """The number the commit rule reads (threshold τ, error bound ε, ...); None for the schedule."""
        knob = {rule: knob for knob, rule in RULE_KNOBS.items()}.get(self.rule)
        return None if knob is None else getattr(self, knob)

    @property
    def pad(self) -> int:
        """The left-padding token: pad, else EOS, else 0 (padded keys are hidden from attention anyway)."""
        return self.pad_id if self.pad_id is not None else (self.eos_id if self.eos_id is not None else 0)

    def cut_at_stop(self, tokens: list[int]) -> tuple[list[int], bool]:
        """A block's tokens up to the first EOS/EoT, and whether one was there."""
        for i, t in enumerate(tokens):
            if t in (self.eos_id, self.eot_id):
                return tokens[:i], True
        return tokens, False

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.max_tokens / self.block_length)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DecodeSpec":
        """The spec `as_dict` gave, after a trip through JSON (its lists back to tuples)."""
        boost = d.get("think_boost")
        return cls(
            **{**d, "stop": tuple(d.get("stop", ())), "think_boost": tuple(boost) if boost is not None else None}
        )

    def check(self, vocab_size: int, positions: int, prompt_len: int) -> None:
        """Refuse anything invalid before any work (one line naming the problem and the fix)."""
        if self.mask_id is None:
            raise IlladaError(
                "no mask token id: pass mask_id (iLLaDA: 5, LLaDA: 126336) or load the model with its tokenizer"
            )
        if not 0 <= self.mask_id < vocab_size:
            raise IlladaError(f"mask_id {self.mask_id} is outside the vocabulary (size {vocab_size}); iLLaDA uses 5")
        for name, value, allowed in (
            ("canvas", self.canvas, CANVASES),
            ("remasking", self.remasking, REMASKING),
            ("commit rule", self.rule, RULES),
            ("cache", self.cache, CACHES),
            ("block_refresh", self.block_refresh, REFRESHES),
            ("logits_at", self.logits_at, LOGITS_AT),
        ):
            if value not in allowed:
                raise IlladaError(f"{name} {value!r}: use one of {', '.join(allowed)}")
        for ranged in SETTINGS:  # every setting's own range (settings.py)
            value = getattr(self, ranged.name)
            if value is not None or ranged.name not in ("mode", "seed"):
                ranged.check(value)
        if not self.growing and self.max_tokens % self.block_length:
            raise IlladaError(f"gen_length {self.max_tokens} is not a multiple of block_length {self.block_length}")
        if prompt_len + self.max_tokens > positions:
            raise ContextError(
                f"prompt ({prompt_len}) + generation ({self.max_tokens}) = "
                f"{prompt_len + self.max_tokens} tokens is more than the model's {positions} "
                "positions; shorten the prompt or max tokens"
            )
        if self.cfg_scale < 0:
            raise IlladaError("cfg_scale must be ≥ 0")
        if self.remasking == "random" and self.rule != "schedule":
            raise IlladaError("random remasking has no confidence to threshold: use rule='schedule'")
        if self.cache == "token" and self.logits_at != "masked":
            raise IlladaError("the token cache runs only the block's masked positions: use logits_at='masked'")


def default_budget(model, tokenizer, canvas: str) -> int:
    """A budget nobody asked for: the official 128-token fixed canvas; for the growing canvas iLLaDA's
    1024 (base) or 2048 (a chat model, i.e. a tokenizer with a chat template)."""
    if canvas == "fixed":
        return FIXED_DEFAULT_TOKENS
    return 2048 if tokenizer is not None and getattr(tokenizer, "chat_template", None) else 1024


def fit_budget(
    asked: Optional[int], default: int, prompt_len: Optional[int], positions: int, block: int, fixed: bool
) -> int:
    """The budget rule: an asked-for budget is kept (a fixed canvas rounded up to whole blocks) and refused
    if it does not fit the model's positions; a default one is cut to the room the prompt leaves."""
    want = asked if asked is not None else default
    if want < 1:
        raise IlladaError("max_tokens must be at least 1")
    gen = math.ceil(want / block) * block if fixed else want
    if prompt_len is None or prompt_len + gen <= positions:
        return gen
    room = positions - prompt_len
    room -= room % block if fixed else 0
    if asked is not None:
        whole = "" if gen == asked else f", {gen} in whole blocks"
        raise ContextError(
            f"prompt ({prompt_len} tokens) + max_tokens ({asked}{whole}) exceeds the model's "
            f"{positions} positions; shorten the prompt or lower max_tokens"
        )
    if room < 1:
        raise ContextError(
            f"prompt ({prompt_len} tokens) leaves no room in the model's {positions} positions; shorten it"
        )
    return room


def model_defaults(path) -> dict:
    """A model directory's decode defaults (`diffusion_config.json`: "mode" and TUNABLE fields), checked;
    {} when it has none (the code's defaults then: DEFAULT_MODE with its preset)."""
    from pathlib import Path

    from .files import read_json_object

    root = Path(path)
    if not (root / DIFFUSION_CONFIG).exists():
        return {}
    d = read_json_object(root, DIFFUSION_CONFIG)
    where = f"{root / DIFFUSION_CONFIG}"
    for k, v in d.items():
        if k != "mode" and k not in TUNABLE:
            raise IlladaError(
                f"{where}: {k!r} is not a setting it may hold ({', '.join(('mode',) + TUNABLE)}); "
                "fix or delete the file"
            )
        try:
            setting(k).check(v)
        except IlladaError as e:
            raise IlladaError(f"{where}: {e}; fix or delete the file") from None
    return d


# the number each adaptive rule reads: a caller who gives one of them (and no rule) asks for its rule
RULE_KNOBS = {"threshold": "threshold", "factor": "factor", "entropy_gamma": "entropy", "error_bound": "error"}


def own_settings(model, preset: dict, overrides: dict) -> dict:
    """The model's TUNABLE defaults that apply under `preset` (only an adaptive rule's), with the rule a
    caller's number asks for (RULE_KNOBS) in place of the model's."""
    own = getattr(model, "decode_defaults", None) or {}
    if preset.get("rule", "schedule") == "schedule":
        return {}
    out = {k: v for k, v in own.items() if k in TUNABLE}
    if overrides.get("rule") is None:
        asked = [rule for knob, rule in RULE_KNOBS.items() if overrides.get(knob) is not None]
        if len(asked) == 1:
            out["rule"] = asked[0]
    return out


def think_token_id(tokenizer) -> Optional[int]:
    """The token the end-of-thinking boost pushes: the first token of `</think>`."""
    ids = tokenizer.encode(THINK_END_TEXT, add_special_tokens=False) if tokenizer is not None else []
    return ids[0] if ids else None


SPEC_FIELDS = {f.name for f in fields(DecodeSpec)}


def make_spec(
    model,
    tokenizer=None,
    prompt_len: Optional[int] = None,
    *,
    mode: Optional[str] = None,
    max_tokens: Optional[int] = None,
    default_cap: Optional[int] = None,
    think_boost=False,
    stop=(),
    **overrides,
) -> DecodeSpec:
    """The resolved spec for a decode of `prompt_len` tokens on `model`.

    mode: a PRESETS name (default: the model's own, diffusion_config.json, else DEFAULT_MODE); the model's
    TUNABLE defaults apply to the adaptive modes; overrides: any DecodeSpec field
    (None = keep the preset's / model's); max_tokens: the asked-for budget (None: the default, at most
    `default_cap`, cut to the context); think_boost: True for iLLaDA-Instruct's (100, 3) or a (scale, power).
    """
    a = model.args
    mode = mode or (getattr(model, "decode_defaults", None) or {}).get("mode") or DEFAULT_MODE
    if mode not in PRESETS:
        raise IlladaError(f"mode {mode!r}: use one of {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - SPEC_FIELDS)
    if unknown:
        raise IlladaError(f"unknown decode option {unknown[0]!r}; options are {', '.join(sorted(SPEC_FIELDS))}")
    base = dict(
        mask_id=a.mask_token_id,
        eos_id=a.eos_token_id,
        eot_id=a.eot_token_id,
        pad_id=a.pad_token_id,
        mode=mode,
        **PRESETS[mode].settings,
    )
    base.update(own_settings(model, PRESETS[mode].settings, overrides))
    base.update({k: v for k, v in overrides.items() if v is not None})
    if think_boost:
        base.setdefault("think_token", think_token_id(tokenizer))
        base["think_boost"] = THINK_BOOST if think_boost is True else tuple(think_boost)
    stop = tuple(s for s in ([stop] if isinstance(stop, str) else stop or ()) if s)
    spec = DecodeSpec(**base, stop=stop)
    default = default_budget(model, tokenizer, spec.canvas)
    default = min(default, default_cap) if default_cap else default
    if spec.block_length < 1:
        raise IlladaError("block_length must be at least 1")
    spec = replace(
        spec,
        max_tokens=fit_budget(
            max_tokens, default, prompt_len or 0, a.max_position_embeddings, spec.block_length, not spec.growing
        ),
    )
    spec.check(a.vocab_size, a.max_position_embeddings, prompt_len or 0)
    if spec.stop and tokenizer is None:
        raise IlladaError("stop strings need the tokenizer: pass tokenizer=")
    return spec
