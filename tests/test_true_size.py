"""What a user meets around a big model (issue 33): the compute dtype per backend, memory checks before
loading, progress a log can show, one size unit, honest prompt figures, a line on SIGTERM. Expected sizes
come from the files themselves (numpy / safetensors), not from the code under test."""

import json
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import oracle
import pytest
from click.testing import CliRunner
from fixtures import Spec
from test_convert import params_from_mlx_dir

from illada_mlx import memory, progress
from illada_mlx.backend import on_cpu
from illada_mlx.cli import main
from illada_mlx.engine import stream_generate
from illada_mlx.errors import IlladaWarning
from illada_mlx.load import load
from illada_mlx_convert import convert

SPEC = Spec(seed=33, dtype="bfloat16")
BF16_ITEM, F32_ITEM = 2, 4


def tensor_bytes(d: Path, itemsize=None) -> int:
    """Bytes of every tensor in d's safetensors files; float tensors at `itemsize` when given."""
    total = 0
    for f in d.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        header.pop("__metadata__", None)
        for t in header.values():
            n = int(np.prod(t["shape"], dtype=np.int64))
            size = {"F32": 4, "BF16": 2, "F16": 2, "U32": 4, "U8": 1}[t["dtype"]]
            total += n * (itemsize if itemsize and t["dtype"] in ("F32", "BF16", "F16") else size)
    return total


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


@pytest.fixture(scope="module")
def q4_dir(ckpt_factory, tmp_path_factory):
    src, params = ckpt_factory(SPEC)
    out = tmp_path_factory.mktemp("q4") / "mlx"
    convert(str(src), str(out), quantize=True, q_group_size=32, progress=False)
    return out


# ------------------------------------------------------------------------------------------ compute dtype
@pytest.mark.skipif(not on_cpu(), reason="the CPU's choice")
def test_a_bf16_4bit_model_computes_in_float32_on_the_cpu(q4_dir, tmp_path):
    model, _ = load(str(q4_dir))
    stored, _ = load(str(q4_dir), compute_dtype="stored")
    layer = model.model.layers[0].mlp.gate_proj
    assert layer.scales.dtype == mx.float32 and layer.weight.dtype == mx.uint32  # packed weights untouched
    assert stored.model.layers[0].mlp.gate_proj.scales.dtype == mx.bfloat16
    ids = np.random.default_rng(0).integers(0, SPEC.vocab, (1, 9))
    out = model(mx.array(ids))
    assert out.dtype == mx.float32
    # the oracle (float64) on the stored weights, dequantized exactly (in float32): float32 compute matches it
    exact = tmp_path / "exact"
    exact.mkdir()
    (exact / "config.json").write_bytes((q4_dir / "config.json").read_bytes())
    for f in q4_dir.glob("*.safetensors"):
        w = mx.load(str(f))
        mx.save_safetensors(
            str(exact / f.name),
            {k: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in w.items()},
        )
    ref = oracle.forward(params_from_mlx_dir(exact, SPEC.tied), ids, SPEC.heads, SPEC.kv_heads, SPEC.theta, SPEC.eps)
    assert np.abs(np.array(out, np.float64) - ref).max() / np.abs(ref).max() <= 1e-4


def test_generate_reports_the_compute_dtype(q4_dir):
    r = CliRunner().invoke(
        main, ["generate", "--model", str(q4_dir), "-p", "hi", "--json", "-m", "32", "--mode", "exact"]
    )
    assert r.exit_code == 0, r.output
    stats = json.loads(r.stdout.strip().splitlines()[-1])["stats"]
    assert stats["compute_dtype"] == ("float32" if on_cpu() else "bfloat16")


# ------------------------------------------------------------------------------------------ memory checks
def test_a_model_over_the_limit_is_refused_in_one_line(q4_dir, monkeypatch):
    need = tensor_bytes(q4_dir, F32_ITEM if on_cpu() else None)
    monkeypatch.setattr(memory, "memory_limit", lambda: memory.Limit(need // 2, "the test's limit", None))
    r = CliRunner().invoke(main, ["generate", "--model", str(q4_dir), "-p", "hi"])
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert gb(need) in lines[0] and gb(need // 2) in lines[0] and "quantize" in lines[0]


def test_close_to_the_limit_warns(q4_dir):
    need = tensor_bytes(q4_dir, F32_ITEM if on_cpu() else None)
    fp = memory.footprint(_headers(q4_dir))
    plan = memory.plan_load(fp, mx.float32 if on_cpu() else None, "m", limit=memory.Limit(int(need * 1.1), "x"))
    assert plan.need_bytes == need and len(plan.notes) == 1 and "close to x" in plan.notes[0]
    assert memory.plan_load(fp, None, "m", limit=memory.Limit(need * 10, "x")).notes == []


def test_float32_that_does_not_fit_keeps_the_stored_dtype(ckpt_factory):
    src, _ = ckpt_factory(SPEC)
    fp = memory.footprint(_headers(src))
    stored, as_f32 = tensor_bytes(src), tensor_bytes(src, F32_ITEM)
    assert as_f32 == 2 * stored  # a bf16 checkpoint
    plan = memory.plan_load(fp, mx.float32, "m", limit=memory.Limit(int(stored * 1.5), "x"))
    assert plan.dtype is None and plan.need_bytes == stored
    assert len(plan.notes) == 1 and "the files store: float32 would need" in plan.notes[0]


def test_an_unconverted_hf_dir_gets_the_convert_note(ckpt_factory, monkeypatch):
    src, _ = ckpt_factory(SPEC)
    monkeypatch.setattr(memory, "HF_NOTICE_BYTES", 0)
    notes = []
    load(str(src), notice=notes.append)
    assert len(notes) == 1 and "unconverted HF checkpoint" in notes[0]
    assert gb(tensor_bytes(src)) in notes[0] and "illada-mlx convert" in notes[0]
    with pytest.warns(IlladaWarning, match="unconverted HF checkpoint"):
        load(str(src))
    r = CliRunner().invoke(main, ["generate", "--model", str(src), "-p", "hi", "-m", "32", "--mode", "exact"])
    assert r.exit_code == 0 and r.stderr.startswith("warning: ") and "unconverted HF checkpoint" in r.stderr


def test_small_hf_dirs_load_without_a_note(ckpt_factory):
    src, _ = ckpt_factory(SPEC)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IlladaWarning)
        load(str(src))


def _headers(d: Path) -> dict:
    out = {}
    for f in d.glob("*.safetensors"):
        with open(f, "rb") as fh:
            h = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        h.pop("__metadata__", None)
        out.update(h)
    return out


# ------------------------------------------------------------------------------------------ progress, units
def test_convert_and_load_progress_in_a_log(ckpt_factory, tmp_path, monkeypatch):
    src, _ = ckpt_factory(SPEC)
    monkeypatch.setattr(progress, "LOG_BELOW", 0)
    out = tmp_path / "mlx"
    r = CliRunner().invoke(main, ["convert", "--hf-path", str(src), "--mlx-path", str(out), "-q"])
    assert r.exit_code == 0, r.output
    src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    lines = r.stderr.splitlines()
    assert lines[0].startswith("converting ") and lines[0].endswith(f"{gb(src_bytes)} ...")
    assert lines[1].startswith(f"converting done: {gb(src_bytes)} in ")
    r = CliRunner().invoke(main, ["generate", "--model", str(out), "-p", "hi", "-m", "32", "--mode", "exact"])
    assert r.exit_code == 0, r.output
    out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    lines = r.stderr.splitlines()
    assert lines[0] == f"loading {out} (1 file(s)): {gb(out_bytes)} ..."
    assert lines[1].startswith(f"loading done: {gb(out_bytes)} in ")
    prompt = json.loads(
        CliRunner()
        .invoke(main, ["generate", "--model", str(out), "-p", "hi", "-m", "32", "--mode", "exact", "--json"])
        .stdout.splitlines()[-1]
    )["prompt_tokens"]
    assert lines[2] == f"first forward: the prompt ({prompt} tokens) and the masks ..."
    assert lines[3].startswith(f"first forward done: {prompt + 32} positions in ")  # the fixed canvas


def test_convert_progress_moves_per_tensor(ckpt_factory, tmp_path, monkeypatch):
    src, _ = ckpt_factory(SPEC)
    steps = []
    real = progress.Progress.update
    monkeypatch.setattr(progress.Progress, "update", lambda self, n: (steps.append(n), real(self, n)))
    convert(str(src), str(tmp_path / "mlx"), quantize=True, q_group_size=32)
    tensors = len(_headers(src))
    assert len([n for n in steps if n > 0]) >= tensors
    assert sum(steps) == sum(f.stat().st_size for f in src.glob("*.safetensors"))


def test_sizes_are_decimal_gb():
    assert progress.format_bytes(15_230_000_000) == "15.23 GB"
    assert progress.format_bytes(4_300_000) == "4.3 MB"


# ------------------------------------------------------------------------------------------ prompt figures
@pytest.mark.slow  # an exact-mode decode of 64 tokens
def test_the_prompt_rate_is_the_first_forwards_over_what_it_ran(demo):
    model, tok = demo
    ids = tok.encode("sort 9 3 7", add_special_tokens=False)
    last = list(stream_generate(model, tok, ids, mode="exact", max_tokens=64))[-1]
    assert last.first_forward_positions == len(ids) + 64  # the fixed canvas: prompt + every mask
    assert last.first_forward_s == last.stats.prompt_s > 0
    assert last.prompt_tps == pytest.approx((len(ids) + 64) / last.stats.prompt_s)


# ------------------------------------------------------------------------------------------ SIGTERM
def _catches_sigterm(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc to know the handler is set")
def test_sigterm_ends_generate_with_one_line():
    p = subprocess.Popen(
        [sys.executable, "-m", "illada_mlx.cli", "generate", "-p", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while not _catches_sigterm(p.pid) and time.time() < deadline and p.poll() is None:
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 128 + signal.SIGTERM
    assert err == "interrupted (signal 15)\n"
