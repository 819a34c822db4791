"""Generated JSON schemas for structured output's yardstick (tests/test_structured.py, bench/structured.py):
objects nested up to depth 3, strings, integers, numbers, booleans, enums, bounded arrays, required and
optional keys."""

from __future__ import annotations

import random


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    kinds = ["string", "integer", "number", "boolean", "enum"] + (["array", "object", "object"] if depth < 3 else [])
    kind = rng.choice(kinds if depth else ["object"])
    if kind == "object":
        props = {f"k{i}": random_schema(rng, depth + 1) for i in range(rng.randint(1, 4))}
        required = rng.sample(sorted(props), rng.randint(0, len(props)))
        return {"type": "object", "properties": props, "required": required, "additionalProperties": False}
    if kind == "array":
        lo = rng.randint(0, 2)
        s = {"type": "array", "items": random_schema(rng, depth + 1), "minItems": lo}
        return {**s, "maxItems": lo + rng.randint(0, 2)} if rng.random() < 0.5 else s
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", 3, None, True, "a b"], rng.randint(1, 4))}
    s = {"type": kind}
    if kind == "string" and rng.random() < 0.5:
        lo = rng.randint(0, 3)
        s.update(minLength=lo, maxLength=lo + rng.randint(0, 6))
    if kind in ("integer", "number") and rng.random() < 0.6:
        lo = rng.randint(-50, 50)
        s.update(minimum=lo, maximum=lo + rng.randint(0, 500))
    return s
