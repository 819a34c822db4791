"""`illada-mlx bench` writes the promised JSON (a quick tiny-shape run; speed targets live in bench/)."""

import json

import pytest
from click.testing import CliRunner

from illada_mlx.cli import main

KEYS = {
    "mode",
    "gen_length",
    "tokens_per_s",
    "nfe",
    "tokens_per_forward",
    "processed_per_output_token",
    "ms_per_forward",
    "peak_memory_bytes",
    "time_to_first_block_s",
}


def test_bench_json_has_every_field(tmp_path):
    out = tmp_path / "b.json"
    r = CliRunner().invoke(
        main,
        [
            "bench",
            "--shape",
            "tiny",
            "--gen-length",
            "32",
            "--block-length",
            "16",
            "--modes",
            "exact,variable,fast,fast_fixed",
            "--prompt-lengths",
            "8",
            "--baselines",
            "ar",
            "--json",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert {"platform", "mlx", "device"} <= set(res["machine"])
    modes = [x["mode"] for x in res["runs"]]
    assert modes == ["exact", "variable", "fast", "fast_fixed", "mlx_lm_ar"]
    for run in res["runs"]:
        assert KEYS <= set(run)
    exact, fast = res["runs"][0], res["runs"][2]
    assert exact["nfe"] == 32 and exact["processed_per_output_token"] == 8 + 32  # whole canvas every step
    assert fast["processed_per_output_token"] < exact["processed_per_output_token"]
    assert "fast prefix drift vs exact" in r.stdout


def test_bench_rejects_unknown_mode():
    r = CliRunner().invoke(main, ["bench", "--shape", "tiny", "--modes", "exact,warp"])
    assert r.exit_code == 1 and r.output.startswith("error: ") and "warp" in r.output


def test_bench_table_on_stdout_progress_on_stderr():
    r = CliRunner().invoke(
        main,
        [
            "bench",
            "--shape",
            "tiny",
            "--gen-length",
            "16",
            "--block-length",
            "16",
            "--modes",
            "fast",
            "--prompt-lengths",
            "8",
        ],
    )
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0].split()[:5] == ["gen", "mode", "cache", "refresh", "prompt"] and "fast" in r.stdout
    assert "ms/fwd" in r.stderr and "ms/fwd" not in r.stdout.splitlines()[1]


def test_bench_refuses_plot_before_running_without_matplotlib(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    r = CliRunner().invoke(
        main,
        [
            "bench",
            "--shape",
            "tiny",
            "--modes",
            "exact",
            "--plot",
            str(tmp_path / "p.png"),
            "--json",
            str(tmp_path / "b.json"),
        ],
    )
    assert r.exit_code == 1 and "illada-mlx[plot]" in r.output and r.output.count("\n") == 1
    assert not (tmp_path / "b.json").exists()  # refused before the benchmark ran


@pytest.mark.slow  # a bench run of several budgets
def test_bench_rows_per_length_and_refresh_policy(tmp_path):
    # one run, side by side: each budget, each block refresh policy of a cached mode; random weights write
    # the whole budget (EOS banned), so the rows compare equal outputs
    out = tmp_path / "b.json"
    r = CliRunner().invoke(
        main,
        [
            "bench",
            "--shape",
            "tiny",
            "--gen-length",
            "32,64",
            "--block-length",
            "16",
            "--modes",
            "fast,variable",
            "--refresh",
            "full,window",
            "--prompt-lengths",
            "8",
            "--caches",
            "prefix,token",
            "--json",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    runs = json.loads(out.read_text())["runs"]
    got = [(x["gen_length"], x["mode"], x["cache"], x["block_refresh"]) for x in runs]
    # the full refresh (the baseline) runs with the first cache only
    assert got == [
        (g, *row)
        for g in (32, 64)
        for row in (
            ("fast", "prefix", "full"),
            ("fast", "prefix", "window"),
            ("fast", "token", "window"),
            ("variable", "none", None),
        )
    ]
    assert all(x["output_tokens"] == x["gen_length"] for x in runs)
    full, window, token = runs[4:7]
    # the token cache's steps run the masks and the tokens committed the step before: a step commits one
    # token here, so the 15 steps after a block's start run 16 + 15 + ... + 2 positions, not 15 × 16
    assert (
        token["processed_per_output_token"] < window["processed_per_output_token"] < full["processed_per_output_token"]
    )
    assert "gen 64 fast prefix window vs fast prefix full refresh" in r.stdout
    assert "gen 64 fast token window vs fast prefix full refresh" in r.stdout


def test_bench_refuses_bad_lists():
    for args in (
        ["--gen-length", "abc"],
        ["--prompt-lengths", "8,x"],
        ["--refresh", "sometimes"],
        ["--caches", "none"],
    ):
        r = CliRunner().invoke(main, ["bench", "--shape", "tiny", *args])
        assert r.exit_code == 1 and r.output.startswith("error: ") and r.output.count("\n") == 1, r.output


def test_bench_refuses_a_baseline_it_cannot_run_before_running(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    r = CliRunner().invoke(
        main,
        ["bench", "--shape", "tiny", "--modes", "exact", "--baselines", "torch", "--json", str(tmp_path / "b.json")],
    )
    assert r.exit_code == 1 and "illada-mlx[torch]" in r.output and r.output.count("\n") == 1
    assert not (tmp_path / "b.json").exists()
    r = CliRunner().invoke(main, ["bench", "--shape", "tiny", "--baselines", "gpu"])
    assert r.exit_code == 1 and "unknown baseline 'gpu'" in r.output


def test_a_row_that_wrote_nothing_has_no_tokens_per_s_and_cells_stay_apart():
    from illada_mlx.bench import table

    row = {
        "gen_length": 64,
        "mode": "fast_fixed",
        "cache": "dual",
        "block_refresh": "window",
        "prompt_tokens": 16,
        "output_tokens": 0,
        "tokens_per_s": None,
        "nfe": 2,
        "tokens_per_forward": 0.0,
        "processed_per_output_token": 96.0,
        "processed_vs_ideal": 1.0,
        "ms_per_forward": 3.0,
        "time_to_first_block_s": 0.1,
        "peak_memory_bytes": 2**20,
    }
    cells = table([row]).splitlines()[1].split()
    assert cells[:7] == ["64", "fast_fixed", "dual", "window", "16", "0", "-"]


def test_rows_that_wrote_nothing_get_a_note(monkeypatch):
    from illada_mlx import bench as B

    real = B.bench_modes

    def nothing(*a, **kw):
        rows = real(*a, **kw)
        return [dict(r, output_tokens=0, tokens_per_s=None) for r in rows]

    monkeypatch.setattr(B, "bench_modes", nothing)
    r = CliRunner().invoke(
        main,
        [
            "bench",
            "--shape",
            "tiny",
            "--modes",
            "fast",
            "--gen-length",
            "16",
            "--block-length",
            "16",
            "--prompt-lengths",
            "8",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "rows with out 0 wrote nothing" in r.stderr and r.stdout.splitlines()[1].split()[5:7] == ["0", "-"]


def test_bench_refuses_an_unwritable_output_before_running():
    r = CliRunner().invoke(main, ["bench", "--shape", "tiny", "--modes", "exact", "--json", "/proc/illada/b.json"])
    assert r.exit_code == 1 and r.output.startswith("error: --json /proc/illada/b.json cannot be written")
    assert r.output.count("\n") == 1
