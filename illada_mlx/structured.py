"""Structured output by infilling: a JSON schema compiled to a canvas template whose fixed text (braces,
keys, quotes, commas) is written before denoising and whose holes the model fills, each hole's tokens
constrained to its type.

- `compile_schema(schema)` → a `Template`: a tree of fixed text and `Hole`s (strings, integers, numbers,
  booleans, enums). What a schema asks for that this cannot guarantee (`patternProperties`, `oneOf`, ...)
  is refused by name (IlladaError), never answered free-form.
- `Layout(template, tokenizer)`: the template as canvas tokens (fixed ids, masks at the holes) with, per
  hole position, the set of tokens it may take (`allowed`), and after a partial fill the positions'
  dynamic rules (`rules`): a hole ends early by padding (the EOS id) that runs to its end, so a committed
  pad forces the positions after it, a committed token forbids pads before it.
- `Layout.value(tokens)` reads the filled canvas back into a Python value (strings cut to maxLength,
  numbers kept to their bounds, enums and booleans as chosen) and `json.dumps` writes it: the output
  parses and validates against its schema for any fill the rules allow, which is what the decode keeps to.
- `generate_json(..., on_step=f)` calls f with a `TemplateStep` for the template as written (the skeleton
  and the choices) and after each denoising step: the answer canvas, which positions are fixed text, which
  the step filled (the server's step events and the web page's skeleton view).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import numpy as np

from .config import IlladaError

# the schema keywords this compiles (annotations are read and ignored); any other is refused by name
KEYWORDS = {
    "type",
    "properties",
    "required",
    "items",
    "minItems",
    "maxItems",
    "enum",
    "const",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "additionalProperties",
    "title",
    "description",
    "$schema",
    "default",
    "examples",
    "$id",
    "strict",
}
TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
MAX_DEPTH = 8
MAX_PIECES = 4096  # fixed texts and holes of one template (nested arrays' items multiply)
MAX_HOLE = 256  # tokens a single hole may take
STRING_TOKENS = 24  # a string hole's tokens without maxLength
INTEGER_DIGITS = 9  # an integer's digits without bounds that say fewer
FRACTION_DIGITS = 4
ARRAY_ITEMS = 2  # items an array gets between its bounds


@dataclass
class Hole:
    """Masks the model fills. kind: "string", "digits" (an integer, or a number's whole part), "fraction"
    (a number's digits after the point) or "choice" (an enum or boolean, by `options`)."""

    kind: str
    length: int
    min_tokens: int = 1  # positions that may not be padding
    signed: bool = False  # digits: the first position may be "-"
    options: tuple = ()  # choice: the values it chooses among
    index: int = -1  # its number in the template (set by compile_schema)


@dataclass
class Node:
    """One schema value: kind is a TYPES name or "enum"; holes and children by kind."""

    kind: str
    schema: dict
    holes: list[Hole] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # object: its properties, in order
    children: list["Node"] = field(default_factory=list)


Piece = Union[str, Hole]


@dataclass
class Template:
    root: Node
    pieces: list[Piece]  # fixed text and holes, in canvas order
    holes: list[Hole]


def compile_schema(schema: Any) -> Template:
    """The template of a JSON schema (see the module doc); IlladaError naming what is not supported."""
    if not isinstance(schema, dict):
        raise IlladaError("a JSON schema must be an object")
    pieces: list[Piece] = []
    root = _node(schema, pieces, "schema", 0)
    holes = [p for p in pieces if isinstance(p, Hole)]
    for i, h in enumerate(holes):
        h.index = i
    return Template(root, _merge_text(pieces), holes)


def _merge_text(pieces: list[Piece]) -> list[Piece]:
    out: list[Piece] = []
    for p in pieces:
        if isinstance(p, str) and out and isinstance(out[-1], str):
            out[-1] += p
        elif p != "":
            out.append(p)
    return out


def _check_keywords(schema: dict, where: str) -> None:
    for key in schema:
        if key not in KEYWORDS:
            raise IlladaError(
                f"JSON schema feature {key!r} at {where} is not supported; supported: "
                f"{', '.join(sorted(KEYWORDS - {'$schema', '$id'}))}"
            )


def _node(schema: Any, out: list[Piece], where: str, depth: int) -> Node:
    if not isinstance(schema, dict):
        raise IlladaError(f"{where} must be a schema object")
    if depth > MAX_DEPTH:
        raise IlladaError(f"the JSON schema nests deeper than {MAX_DEPTH} levels at {where}")
    if len(out) > MAX_PIECES:
        raise IlladaError(
            f"the JSON schema's template is over {MAX_PIECES} pieces at {where} (fewer or shorter arrays)"
        )
    _check_keywords(schema, where)
    if "const" in schema or "enum" in schema:
        options = (schema["const"],) if "const" in schema else schema["enum"]
        if not isinstance(options, list | tuple) or not options:
            raise IlladaError(f"{where}.enum must be a non-empty list")
        hole = Hole("choice", 1, options=tuple(options))
        out.append(hole)
        return Node("enum", schema, [hole])
    kind = schema.get("type")
    if kind not in TYPES:
        raise IlladaError(
            f"{where}.type must be one of {', '.join(TYPES)} (a list of types is not supported), not {kind!r}"
        )
    return _BUILDERS[kind](schema, out, where, depth)


def _object(schema: dict, out: list[Piece], where: str, depth: int) -> Node:
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        raise IlladaError(f"{where}.properties must be an object")
    extra = schema.get("additionalProperties", False)
    if extra not in (False, True) and not isinstance(extra, dict):
        raise IlladaError(f"{where}.additionalProperties must be a boolean or a schema")
    required = schema.get("required", [])
    if not isinstance(required, list) or any(r not in props for r in required):
        raise IlladaError(f"{where}.required must list names from its properties")
    node = Node("object", schema)
    out.append("{")
    for i, (key, sub) in enumerate(props.items()):  # every property, so every required one
        out.append(("," if i else "") + json.dumps(key) + ":")
        node.keys.append(key)
        node.children.append(_node(sub, out, f"{where}.properties.{key}", depth + 1))
    out.append("}")
    return node


def _array(schema: dict, out: list[Piece], where: str, depth: int) -> Node:
    lo, hi = schema.get("minItems", 0), schema.get("maxItems")
    if not _whole(lo) or (hi is not None and (not _whole(hi) or hi < lo)) or lo > 64:
        raise IlladaError(f"{where}: minItems/maxItems must be whole numbers, minItems ≤ maxItems, at most 64")
    items = schema.get("items", {"type": "string"})
    n = max(lo, ARRAY_ITEMS) if hi is None else min(max(lo, ARRAY_ITEMS), hi)
    node = Node("array", schema)
    out.append("[")
    for i in range(n):
        out.append("," if i else "")
        node.children.append(_node(items, out, f"{where}.items", depth + 1))
    out.append("]")
    return node


def _string(schema: dict, out: list[Piece], where: str, depth: int) -> Node:
    lo, hi = schema.get("minLength", 0), schema.get("maxLength")
    if not _whole(lo) or (hi is not None and (not _whole(hi) or hi < lo)) or lo > MAX_HOLE:
        raise IlladaError(f"{where}: minLength/maxLength must be whole numbers, minLength ≤ maxLength ≤ {MAX_HOLE}")
    length = min(hi if hi is not None else max(STRING_TOKENS, lo), MAX_HOLE)
    hole = Hole("string", max(length, 1), min_tokens=min(lo, length) if length else 0)
    out.extend(['"', hole, '"'])
    return Node("string", schema, [hole])


def _digits(schema: dict, where: str) -> tuple[int, bool]:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    for name, v in (("minimum", lo), ("maximum", hi)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            raise IlladaError(f"{where}.{name} must be a number")
    if lo is not None and hi is not None and hi < lo:
        raise IlladaError(f"{where}: maximum is below minimum")
    widest = max((len(str(int(abs(v)))) for v in (lo, hi) if v is not None), default=INTEGER_DIGITS)
    return min(widest, INTEGER_DIGITS), lo is None or lo < 0


def _integer(schema: dict, out: list[Piece], where: str, depth: int) -> Node:
    n, signed = _digits(schema, where)
    hole = Hole("digits", n + signed, signed=signed)
    out.append(hole)
    return Node("integer", schema, [hole])


def _number(schema: dict, out: list[Piece], where: str, depth: int) -> Node:
    n, signed = _digits(schema, where)
    whole = Hole("digits", n + signed, signed=signed)
    frac = Hole("fraction", FRACTION_DIGITS)
    out.extend([whole, ".", frac])
    return Node("number", schema, [whole, frac])


def _boolean(schema: dict, out: list[Piece], where: str, depth: int) -> Node:
    hole = Hole("choice", 1, options=(True, False))
    out.append(hole)
    return Node("boolean", schema, [hole])


def _null(schema: dict, out: list[Piece], where: str, depth: int) -> Node:
    out.append("null")
    return Node("null", schema)


_BUILDERS = {
    "object": _object,
    "array": _array,
    "string": _string,
    "integer": _integer,
    "number": _number,
    "boolean": _boolean,
    "null": _null,
}


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# ------------------------------------------------------------------------------------------ reading back
def read_value(node: Node, fills: list[Any]) -> Any:
    """The Python value of a template whose holes hold `fills` (by hole index: text for string/digit holes,
    the chosen option for choices), kept to the schema's bounds."""
    s = node.schema
    if node.kind == "object":
        return {k: read_value(c, fills) for k, c in zip(node.keys, node.children)}
    if node.kind == "array":
        return [read_value(c, fills) for c in node.children]
    if node.kind in ("enum", "boolean"):
        return fills[node.holes[0].index]
    if node.kind == "null":
        return None
    if node.kind == "string":
        text = fills[node.holes[0].index]
        return text if s.get("maxLength") is None else text[: s["maxLength"]]
    whole = _int_text(fills[node.holes[0].index])
    if node.kind == "integer":
        return int(_clamp(whole, s))
    digits = "".join(ch for ch in fills[node.holes[1].index] if ch.isdigit()) or "0"
    value = float(f"{'-' if whole < 0 or fills[node.holes[0].index].startswith('-') else ''}{abs(whole)}.{digits}")
    return _clamp(value, s)


def _int_text(text: str) -> int:
    sign = -1 if text.startswith("-") else 1
    digits = "".join(ch for ch in text if ch.isdigit())
    return sign * int(digits) if digits else 0


def _clamp(v, s: dict):
    if s.get("minimum") is not None and v < s["minimum"]:
        v = s["minimum"]
    if s.get("maximum") is not None and v > s["maximum"]:
        v = s["maximum"]
    return v


def render(template: Template, fills: list[Any]) -> str:
    """The JSON text of a filled template: valid, and valid against its schema, for any fills."""
    return json.dumps(read_value(template.root, fills), ensure_ascii=False)


# ------------------------------------------------------------------------------------------ on the canvas
@dataclass
class TokenClasses:
    """What each kind of hole may hold, from a tokenizer's vocabulary (token id → decoded text)."""

    text: np.ndarray  # (V,) bool: a string's tokens: printable text without quotes, backslashes or newlines
    digit: np.ndarray  # (V,) bool: all decimal digits
    minus: Optional[int]  # the "-" token
    pad: int  # the padding that ends a hole early (EOS)

    @classmethod
    def of(cls, tokenizer, pad: int, special: tuple = ()) -> "TokenClasses":
        """The classes of `tokenizer`'s tokens; its special and added tokens (the mask, chat markers) and
        `special` are in none."""
        vocab = max(tokenizer.get_vocab().values()) + 1
        texts = [tokenizer.decode([i]) for i in range(vocab)]
        added = getattr(getattr(tokenizer, "_tokenizer", tokenizer), "get_added_vocab", dict)()
        banned = set(special) | {pad} | set(getattr(tokenizer, "all_special_ids", []) or []) | set(added.values())
        text = np.array([i not in banned and _plain(t) for i, t in enumerate(texts)])
        digit = np.array([i not in banned and t.isascii() and t.isdigit() for i, t in enumerate(texts)])
        minus = next((i for i, t in enumerate(texts) if t == "-"), None)
        return cls(text, digit, minus, pad)


@functools.lru_cache(maxsize=4)
def token_classes(tokenizer, pad: int, special: tuple) -> TokenClasses:
    """TokenClasses.of, once per tokenizer (it decodes every token of the vocabulary)."""
    return TokenClasses.of(tokenizer, pad, special)


def _plain(t: str) -> bool:
    return bool(t) and t.isprintable() and not any(c in t for c in '"\\\ufffd')


class Layout:
    """A template on the canvas: `ids` (fixed tokens, `mask_id` at the holes), and per position its hole
    (`hole`, −1 for fixed text) and place in it (`slot`). Choice holes are not denoised: `choices` scores
    their options from one forward's logits."""

    def __init__(self, template: Template, tokenizer, classes: TokenClasses, mask_id: int):
        self.template, self.classes, self.mask_id, self.tok = template, classes, mask_id, tokenizer
        ids, hole, slot = [], [], []
        self.options: dict[int, list[list[int]]] = {}  # choice hole → each option's tokens
        for p in template.pieces:
            if isinstance(p, str):
                t = tokenizer.encode(p, add_special_tokens=False)
                ids += t
                hole += [-1] * len(t)
                slot += [-1] * len(t)
                continue
            if p.kind == "choice":
                opts = [
                    tokenizer.encode(json.dumps(o, ensure_ascii=False), add_special_tokens=False) for o in p.options
                ]
                self.options[p.index] = opts
                p.length = max(len(o) for o in opts)
            ids += [mask_id] * p.length
            hole += [p.index] * p.length
            slot += list(range(p.length))
        self.ids, self.hole, self.slot = np.array(ids), np.array(hole), np.array(slot)

    def __len__(self) -> int:
        return len(self.ids)

    def static_allowed(self) -> np.ndarray:
        """(L, V) bool: the tokens each position may take, ignoring the others (fixed text: none)."""
        c, V = self.classes, len(self.classes.text)
        out = np.zeros((len(self), V), dtype=bool)
        for i, (h, k) in enumerate(zip(self.hole, self.slot)):
            if h < 0:
                continue
            hole = self.template.holes[h]
            if hole.kind == "choice":
                continue  # chosen by `choose`, never committed token by token
            out[i] = c.text if hole.kind == "string" else c.digit
            if hole.signed and k == 0 and c.minus is not None:
                out[i, c.minus] = True
            out[i, c.pad] = k >= hole.min_tokens
        return out

    def allowed(self, canvas: np.ndarray, static: Optional[np.ndarray] = None) -> np.ndarray:
        """(L, V) bool given the answer canvas so far (L tokens, mask_id where open): a hole's padding runs to
        its end, so after a committed pad only pad, before a committed token no pad."""
        out = (self.static_allowed() if static is None else static).copy()
        pad = self.classes.pad
        for h in np.unique(self.hole[self.hole >= 0]):
            at = np.flatnonzero(self.hole == h)
            got = canvas[at]
            pads, words = at[got == pad], at[(got != pad) & (got != self.mask_id)]
            if len(pads):
                later = at[at > pads.min()]
                out[later] = False
                out[later, pad] = True
            if len(words):
                out[at[at < words.max()], pad] = False
        return out

    def on_device(self, prompt_len: int):
        """`allowed`'s rules as an Infill takes them: computed on the device from the canvas (B, P + L) at the
        positions `pos` (B, K), (B, K, V) bool, with no host sync on the sampler's step."""
        import mlx.core as mx

        static = mx.array(self.static_allowed())
        inside = (self.hole[:, None] == self.hole[None, :]) & (self.hole >= 0)[:, None]
        earlier = self.slot[None, :] < self.slot[:, None]  # [i, j]: j comes before i
        pad_before, word_after = mx.array(inside & earlier), mx.array(inside & earlier.T)
        pad, mask = self.classes.pad, self.mask_id
        pad_col = mx.arange(static.shape[1]) == pad

        def allowed(x, pos):
            answer, at = x[:, prompt_len:], pos - prompt_len
            is_pad, is_word = answer == pad, (answer != pad) & (answer != mask)
            pad_only = mx.any(pad_before[None] & is_pad[:, None, :], axis=-1)
            no_pad = mx.any(word_after[None] & is_word[:, None, :], axis=-1)
            pad_only = mx.take_along_axis(pad_only, at, axis=1)[..., None]
            no_pad = mx.take_along_axis(no_pad, at, axis=1)[..., None]
            return mx.where(pad_only, pad_col, static[at]) & ~(no_pad & pad_col)

        return allowed

    def fills(self, canvas: np.ndarray, chosen: dict[int, int]) -> list[Any]:
        """Each hole's fill from a finished answer canvas: its text up to the padding, or the chosen option."""
        out: list[Any] = []
        for hole in self.template.holes:
            if hole.kind == "choice":
                out.append(hole.options[chosen[hole.index]])
                continue
            toks = [int(t) for t in canvas[self.hole == hole.index]]
            toks = toks[: toks.index(self.classes.pad)] if self.classes.pad in toks else toks
            out.append(self.tok.decode([t for t in toks if t != self.mask_id]))
        return out

    def choose(self, logprobs) -> dict[int, int]:
        """Each choice hole's option with the largest summed log-probability of its tokens (padding after a
        shorter option counts too); logprobs[i]: the (V,) log-probabilities at answer position i."""
        out = {}
        for h, opts in self.options.items():
            at = np.flatnonzero(self.hole == h).tolist()
            padded = [o + [self.classes.pad] * (len(at) - len(o)) for o in opts]
            scores = [sum(logprobs[i][t] for i, t in zip(at, o)) for o in padded]
            out[h] = int(np.argmax(scores))
        return out

    def render(self, canvas: np.ndarray, chosen: dict[int, int]) -> str:
        return render(self.template, self.fills(canvas, chosen))


def template_length(tokenizer, schema: dict, mask_id: int) -> int:
    """The canvas positions `schema`'s template takes (its fixed tokens and its holes)."""
    return len(Layout(compile_schema(schema), tokenizer, None, mask_id))


# ------------------------------------------------------------------------------------------ the decode
@dataclass
class JsonResult:
    text: str  # the JSON answer
    value: Any  # the same, parsed
    stats: Any  # decode.Stats: forwards and processed tokens, the choices' scoring forward included
    spec: Any  # the DecodeSpec that ran
    answer: Optional[np.ndarray] = None  # (L,) the filled answer canvas the text was read from


@dataclass
class TemplateStep:
    """The answer canvas of a template's decode at one step (generate_json's on_step): step 0 is the template
    as written before denoising (its fixed text, the choices' options, masks at the open holes), then one per
    denoising step."""

    step: int
    answer: np.ndarray  # (L,) the answer canvas after the step: mask_id where a hole is still open
    fixed: np.ndarray  # (L,) bool: the template's fixed text (written at step 0, never changed)
    filled: np.ndarray  # (L,) bool: what this step wrote (step 0: the choices' options and their padding)
    mask_id: int

    @property
    def masked(self) -> np.ndarray:
        """(L,) bool: the hole positions still open."""
        return self.answer == self.mask_id


def _stepper(layout: Layout, answer: np.ndarray, prompt_len: int, on_step: Callable):
    """Calls on_step with the written template (step 0); returns decode's on_event, which calls it after each
    denoising step with what that step filled (one host sync a step, only when there is an on_step)."""
    from .decode import Step

    fixed, mask = layout.hole < 0, layout.mask_id
    on_step(TemplateStep(0, answer.copy(), fixed, np.isin(layout.hole, list(layout.options)), mask))
    prev = [answer]

    def on_event(ev) -> None:
        if isinstance(ev, Step):
            now = np.array(ev.canvas[0, prompt_len:])
            on_step(TemplateStep(ev.step + 1, now, fixed, (prev[0] == mask) & (now != mask), mask))
            prev[0] = now

    return on_event


def _choose(model, ids: list[int], layout: Layout, stats) -> dict[int, int]:
    """The choice holes' options, scored from one forward of the prompt and the skeleton (every hole open);
    no forward when every choice has one option (a const, such as a tool call's name)."""
    import mlx.core as mx

    if all(len(opts) == 1 for opts in layout.options.values()):
        return {h: 0 for h in layout.options}
    x = mx.array([ids + layout.ids.tolist()], dtype=mx.int32)
    at = np.flatnonzero(np.isin(layout.hole, list(layout.options)))
    logits = model(x, None, logits_at=mx.array(at + len(ids)))
    logp = np.array((logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0].astype(mx.float32))
    stats.add_forwards(1, x.shape[1])
    return layout.choose(dict(zip(at.tolist(), logp)))


def _written(layout: Layout, chosen: dict[int, int]) -> np.ndarray:
    """The answer canvas before denoising: the skeleton, with each choice's option and its padding."""
    answer = layout.ids.copy()
    for h, k in chosen.items():
        at = np.flatnonzero(layout.hole == h)
        opt = layout.options[h][k]
        answer[at] = opt + [layout.classes.pad] * (len(at) - len(opt))
    return answer


def template_spec(base, prompt_len: int, layout: Layout, n_open: int, args):
    """The DecodeSpec that fills a template: `base`'s commit rule, cache and sampling on one fixed block the
    template's length, one step per open position at most, EOS free to pad the holes, no stop strings."""
    from dataclasses import replace

    L = len(layout)
    spec = replace(
        base,
        canvas="fixed",
        max_tokens=L,
        block_length=L,
        steps_per_block=max(n_open, 1),
        logits_eos_inf=False,
        confidence_eos_eot_inf=False,
        eos_fill=False,
        stop=(),
    )
    spec.check(args.vocab_size, args.max_position_embeddings, prompt_len)
    return spec


def generate_json(model, tokenizer, ids: list[int], schema: dict, spec=None, on_step=None, **settings) -> JsonResult:
    """An answer to the prompt `ids` that is JSON valid against `schema` (see the module doc). spec: a
    resolved DecodeSpec whose rule, cache and sampling to use, else make_spec's `settings` (mode, rule,
    threshold, cache, seed, ...). on_step: called with a TemplateStep for the written template and after
    each denoising step."""
    import mlx.core as mx

    from .decode import Infill, Stats, decode, run
    from .spec import make_spec

    a = model.args
    classes = token_classes(tokenizer, a.eos_token_id, (a.mask_token_id,))
    layout = Layout(compile_schema(schema), tokenizer, classes, a.mask_token_id)
    stats = Stats()
    chosen = _choose(model, ids, layout, stats)
    answer = _written(layout, chosen)
    n_open = int((answer == a.mask_token_id).sum())
    base = spec if spec is not None else make_spec(model, tokenizer, len(ids), max_tokens=len(layout), **settings)
    spec = template_spec(base, len(ids), layout, n_open, a)
    on_event = _stepper(layout, answer, len(ids), on_step) if on_step is not None else None
    if n_open:
        infill = Infill(mx.array(answer[None]), layout.on_device(len(ids)))
        g = run(decode(model, [ids], spec, infill=infill), on_event)
        answer = np.array(g.canvas[0, len(ids) :])
        stats.add_forwards(g.stats.nfe, g.stats.processed)
    text = layout.render(answer, chosen)
    return JsonResult(text, json.loads(text), stats, spec, answer)
