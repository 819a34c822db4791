"""The registry of decode settings (settings.py): every face accepts and refuses the same values."""

import math
from types import SimpleNamespace

import click
import pytest

from illada_mlx.config import IlladaError
from illada_mlx.settings import SETTINGS, setting


def candidates(s):
    """Values at and just past each end of a setting's range, inside it, of the wrong type."""
    if s.kind is str:
        return [*s.choices, "bogus", ""]
    if s.kind is bool:
        return []
    step = 1 if s.kind is int else 1e-3
    out = [s.lo - step, s.lo, s.lo + step] if s.lo is not None else [-1e9]
    out += [s.hi - step, s.hi, s.hi + step] if s.hi is not None else [10**6]
    out += [1.5, "x"] if s.kind is int else [math.nan, "x"]
    return out


def cli_accepts(s, value) -> bool:
    from illada_mlx.cli import main

    try:
        main.commands["generate"].make_context("generate", ["-p", "hi", s.flags[-1], str(value)])
    except click.UsageError:
        return False
    return True


def api_accepts(s, value) -> bool:
    from illada_mlx.api import ApiError, settings

    body = {s.name: value} if s.request == "body" else {"diffusion": {s.name: value}}
    try:
        settings(SimpleNamespace(max_position_embeddings=2**31, vocab_size=100), body)
    except ApiError as e:
        assert e.status == 400 and s.name in e.param
        return False
    return True


def lm_eval_accepts(s, value) -> bool:
    pytest.importorskip("lm_eval")
    from illada_mlx.lm_eval_model import decode_arg

    try:
        decode_arg(s.name, str(value))
    except IlladaError:
        return False
    return True


@pytest.mark.parametrize("s", [s for s in SETTINGS if s.kind is not bool], ids=lambda s: s.name)
def test_every_face_accepts_what_the_registry_accepts(s):
    faces = {"registry": setting(s.name).accepts}
    if s.flags:
        faces["cli"] = lambda v: cli_accepts(s, v)
    if s.request:
        faces["api"] = lambda v: api_accepts(s, v)
        faces["lm-eval"] = lambda v: lm_eval_accepts(s, v)
    for value in candidates(s):
        got = {face: accepts(value) for face, accepts in faces.items()}
        assert len(set(got.values())) == 1, (s.name, value, got)


def test_ranges_are_the_documented_ones():
    # spot checks against the ranges the README and the API contract state
    assert setting("threshold").accepts(1.0) and not setting("threshold").accepts(0.0)
    assert setting("temperature").accepts(2.0) and not setting("temperature").accepts(2.01)
    assert setting("block_length").accepts(1024) and not setting("block_length").accepts(1025)
    assert setting("seed").accepts(2**32 - 1) and not setting("seed").accepts(-1)
    assert not setting("top_p").accepts(0.0) and not setting("top_k").accepts(True)
    assert setting("mode").accepts("fast") and not setting("mode").accepts("fastest")


def test_a_refused_value_names_the_setting_and_its_range():
    with pytest.raises(IlladaError, match=r"^diffusion\.threshold must be a number in \(0, 1\], not 2$"):
        setting("threshold").check(2, label="diffusion.threshold")
    with pytest.raises(IlladaError, match=r"model arg block_length must be an integer in \[1, 1024\], not 'x'"):
        setting("block_length").parse("x", label="model arg block_length")


def test_the_spec_and_the_model_file_check_the_same_ranges(tmp_path):
    from illada_mlx.spec import DecodeSpec, model_defaults

    with pytest.raises(IlladaError, match=r"drift_threshold must be a number in \[0, 2\]"):
        DecodeSpec(mask_id=1, drift_threshold=3.0).check(10, 100, 1)
    (tmp_path / "diffusion_config.json").write_text('{"drift_probes": 0}')
    with pytest.raises(IlladaError, match=r"drift_probes must be an integer in \[1, 256\], not 0; fix or delete"):
        model_defaults(tmp_path)


def test_the_web_page_inputs_keep_to_the_registry():
    import re
    from pathlib import Path

    import illada_mlx

    page = (Path(illada_mlx.__file__).parent / "web" / "index.html").read_text()
    inputs = re.findall(r'<input id="(\w+)" type="number"([^>]*)>', page)
    assert inputs
    for name, attrs in inputs:
        s = setting(name)
        lo = float(re.search(r'min="([^"]+)"', attrs).group(1))
        hi = re.search(r'max="([^"]+)"', attrs)
        assert (lo > s.lo) if s.lo_open else (lo == s.lo), name
        assert (float(hi.group(1)) if hi else None) == s.hi, name
    for name in re.findall(r'<select id="(\w+)"', page):
        options = re.findall(rf'<select id="{name}">(.*?)</select>', page, re.S)[0]
        assert set(re.findall(r'value="(\w+)"', options)) <= set(setting(name).choices), name
