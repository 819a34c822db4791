"""bench/rehearse.py: the true-size rehearsal's shapes and names, and a tiny run end to end."""

import importlib.util
import json
from pathlib import Path

import pytest

from illada_mlx.backend import on_cpu

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "rehearse.py"


@pytest.fixture(scope="module")
def rehearse():
    spec = importlib.util.spec_from_file_location("rehearse", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_8b_shapes_have_the_released_parameter_counts(rehearse):
    # counts from the released checkpoints (issue 33): iLLaDA-8B and LLaDA-8B, every tensor
    counts = {
        layout: sum(
            int.__mul__(*s) if len(s) == 2 else s[0]
            for s in rehearse.tensor_shapes(layout, rehearse.SIZES["8b"][layout]).values()
        )
        for layout in ("illada", "llada")
    }
    assert counts == {"illada": 7_615_025_152, "llada": 8_015_581_184}


def test_the_llada_names_are_the_released_index(rehearse):
    index = Path(__file__).resolve().parent / "data" / "llada_index_names.json"  # LLaDA-8B-Instruct's index
    assert set(rehearse.tensor_shapes("llada", rehearse.SIZES["8b"]["llada"])) == set(json.loads(index.read_text()))


@pytest.mark.slow  # write, convert, load and decode, each stage a process
def test_a_tiny_rehearsal_runs_every_stage(rehearse, tmp_path, capsys):
    out = tmp_path / "r.json"
    rehearse.main(["--size", "tiny", "--workdir", str(tmp_path / "work"), "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["layout"], r["stage"], r["recipe"]) for r in rows] == [
        (lay, stage, rec)
        for lay in ("illada", "llada")
        for stage, rec in [
            ("write", "bf16 source"),
            ("convert", "4bit"),
            ("load + decode", "4bit"),
            ("convert", "mixed_4_8"),
            ("load + decode", "mixed_4_8"),
        ]
    ]
    for r in rows:
        assert r["wall_s"] > 0 and r["peak_rss_bytes"] > 0
        if r["stage"] == "write":
            s = rehearse.SIZES["tiny"][r["layout"]]
            assert r["parameters"] == sum(
                int.__mul__(*x) if len(x) == 2 else x[0] for x in rehearse.tensor_shapes(r["layout"], s).values()
            )
            assert r["bytes"] > 2 * r["parameters"]  # bf16 + the headers
        if r["stage"] == "convert":
            assert 4 < r["bits_per_weight"] < 9
        if r["stage"] == "load + decode":
            assert r["tokens"] == 4 and r["forwards"] == 1 and r["positions"] == 8
            assert r["compute_dtype"] == ("float32" if on_cpu() else "bfloat16")
    assert not (tmp_path / "work" / "illada-tiny").exists()  # removed without --keep
    assert "| illada | convert | 4bit |" in capsys.readouterr().out
