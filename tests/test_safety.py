"""Hostile and careless input: nothing of the user's is destroyed or read from outside the source, a killed
conversion leaves nothing behind once the next one ran, and every bad config, weight file or option is one
`error:` line (exit 1), never a traceback or a hang."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import psutil
import pytest
from click.testing import CliRunner
from fixtures import Spec, deadline, write_checkpoint

from illada_mlx.cache import CACHES
from illada_mlx.cli import main
from illada_mlx.config import IlladaError
from illada_mlx.load import load
from illada_mlx_convert import convert, convert_command

SPEC = Spec(seed=21)
ROOT = Path(__file__).resolve().parent.parent


def run_convert(*args):
    return CliRunner().invoke(convert_command, list(map(str, args)))


def on_screen(text: str) -> list[str]:
    """The non-blank lines a terminal shows for `text`: a carriage return goes back to the line's start (the
    progress bar erases itself that way)."""
    return [ln.split("\r")[-1] for ln in text.split("\n") if ln.split("\r")[-1].strip()]


def one_error_line(r, needle: str = "", code: int = 1):
    """The run failed with exactly one `error:` line containing `needle`, no traceback."""
    lines = on_screen(r.output)
    assert r.exit_code == code, r.output
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert needle in lines[0], lines[0]
    assert "Traceback" not in r.output
    return lines[0]


def snapshot(root: Path) -> dict:
    """Every entry under root (symlinks not followed): relative path -> bytes, link target or 'dir'."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            out[rel] = ("link", os.readlink(p)) if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes()
    return out


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "src"
    write_checkpoint(d, SPEC)
    return d


@pytest.fixture
def own(src, tmp_path):
    """A private copy of the source checkpoint, free to break."""
    d = tmp_path / "own"
    shutil.copytree(src, d)
    return d


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory):
    d = tmp_path_factory.mktemp("mlx") / "mlx"
    convert(str(src), str(d), progress=False)
    return d


# ------------------------------------------------------------------------------------------ --force
def test_force_refuses_an_unrelated_directory(src, tmp_path):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = snapshot(out)
    one_error_line(run_convert("--hf-path", src, "--mlx-path", out, "--force"), "not a converted model")
    assert snapshot(out) == before


def test_force_refuses_a_conversion_with_a_users_file_added(src, converted, tmp_path):
    out = tmp_path / "mlx"
    shutil.copytree(converted, out)
    (out / "my-notes.md").write_text("keep me")
    before = snapshot(out)
    one_error_line(run_convert("--hf-path", src, "--mlx-path", out, "--force"), "my-notes.md")
    assert snapshot(out) == before


@pytest.mark.parametrize("where", [".", "", "..", "./"])
def test_force_never_replaces_the_current_directory_or_its_parents(where, src, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "file.txt").write_text("mine")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    one_error_line(run_convert("--hf-path", src, "--mlx-path", where, "--force"))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["~", "~/..", "/"])
def test_force_never_replaces_home_its_parents_or_a_root(where, src, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".profile").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    before = snapshot(tmp_path)
    line = one_error_line(run_convert("--hf-path", src, "--mlx-path", where, "--force"))
    assert "home directory" in line or "root" in line
    assert snapshot(tmp_path) == before


def test_force_never_replaces_the_source_its_parents_or_writes_inside_it(converted, tmp_path):
    a = tmp_path / "a"
    source = a / "src"
    shutil.copytree(converted, source)  # a converted model is a valid source, and recognizably ours
    before = snapshot(tmp_path)
    for dst, needle in ((source, "source"), (a, ""), (source / "inner", "inside the source")):
        one_error_line(run_convert("--hf-path", source, "--mlx-path", dst, "--force"), needle)
        assert snapshot(tmp_path) == before


def test_a_symlinked_destination_is_refused(src, converted, tmp_path):
    target = tmp_path / "target"
    shutil.copytree(converted, target)
    link = tmp_path / "link"
    link.symlink_to(target)
    before = snapshot(tmp_path)
    for dst in (link, f"{link}/"):
        one_error_line(run_convert("--hf-path", src, "--mlx-path", dst, "--force"), "symlink")
    assert snapshot(tmp_path) == before


def test_a_file_as_destination_is_refused(src, tmp_path):
    f = tmp_path / "model"
    f.write_text("mine")
    one_error_line(run_convert("--hf-path", src, "--mlx-path", f, "--force"), "not a directory")
    assert f.read_text() == "mine"


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc")
def test_an_unwritable_destination_is_one_line_naming_the_file(src):
    one_error_line(run_convert("--hf-path", src, "--mlx-path", "/proc/illada-mlx-test"), "/proc/")


@pytest.mark.parametrize("how", ["short_write", "save_raises"])
def test_a_full_disk_mid_write_is_one_line_and_leaves_nothing(how, src, tmp_path, monkeypatch):
    import illada_mlx_convert.converter as conv

    real = conv.mx.save_safetensors

    def full_disk(path, arrays, metadata=None):
        if how == "save_raises":
            raise RuntimeError("[save_safetensors] Failed to write: No space left on device")
        real(path, arrays, metadata=metadata)
        with open(path, "r+b") as f:  # what a full disk leaves: a short file
            f.truncate(Path(path).stat().st_size // 2)

    monkeypatch.setattr(conv.mx, "save_safetensors", full_disk)
    out = tmp_path / "out"
    line = one_error_line(run_convert("--hf-path", src, "--mlx-path", out), "could not write model-00001")
    assert "free some space" in line and not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_bench_never_writes_over_a_directory_or_through_a_symlink(flag, tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    (d / "old.json").write_text("{}")
    (tmp_path / "real.json").write_text("mine")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    before = snapshot(tmp_path)
    for path, needle in ((d, "directory"), (tmp_path / "link.json", "symlink"), ("", "empty")):
        r = CliRunner().invoke(main, ["bench", "--shape", "tiny", flag, str(path)])
        one_error_line(r, needle)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------ debris
def wait_stopped(proc, timeout=120):
    p = psutil.Process(proc.pid)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"exited early: {proc.stderr.read().decode()}")
        if p.status() == psutil.STATUS_STOPPED:
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("never reached the stop point")


def killed_run(src, dst: Path, point: str, sig: int, force: bool):
    """Run `illada-mlx convert` in a subprocess, stop it at `point`, send `sig`; returns (rc, stderr)."""
    env = {**os.environ, "ILLADA_MLX_CONVERT_STOP_AT": point}
    cmd = [
        sys.executable,
        "-m",
        "illada_mlx",
        "convert",
        "--hf-path",
        str(src),
        "--mlx-path",
        str(dst),
        "--max-shard-size",
        "0.00004",
    ] + (["--force"] if force else [])
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    wait_stopped(proc)
    os.kill(proc.pid, sig)
    if sig != signal.SIGKILL:
        os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err.decode()


KILLS = [(sig, point) for sig in ("SIGTERM", "SIGKILL") for point in ("shard", "written", "swapping")] + [
    ("SIGHUP", "written")
]  # SIGHUP takes SIGTERM's path


@pytest.mark.parametrize("sig,point", KILLS, ids=[f"{s}-{p}" for s, p in KILLS])
def test_a_killed_conversion_leaves_nothing_after_the_next_run(sig, point, src, converted, tmp_path):
    """Stopped at a point (mid-write after one shard, all written, the old conversion moved aside), then
    signalled: SIGTERM/SIGHUP clean up at once, SIGKILL's leftovers go at the next run."""
    sig = getattr(signal, sig)
    dst = tmp_path / "mlx"
    if point == "swapping":  # replacing an existing conversion: the old one is moved aside first
        shutil.copytree(converted, dst)
    before = snapshot(dst) if dst.exists() else None
    rc, err = killed_run(src, dst, point, sig, force=point == "swapping")
    if sig == signal.SIGKILL:
        assert rc == -signal.SIGKILL and leftovers(tmp_path), "the kill should have left something to sweep"
    else:
        assert rc == 128 + sig and f"interrupted (signal {sig})" in err and "Traceback" not in err, err
        assert leftovers(tmp_path) == []  # handled like Ctrl-C: cleaned up at once
        if point == "swapping":  # the signal waited for the swap: the new conversion is in place
            assert (dst / "model-00001-of-00002.safetensors").exists() or len(list(dst.glob("*.safetensors"))) > 1
    if sig == signal.SIGKILL and point == "swapping":
        # killed with the old conversion moved aside: the next run puts it back, byte for byte
        notices = []
        with pytest.raises(IlladaError, match="--force"):
            convert(str(src), str(dst), progress=False, notice=notices.append)
        assert snapshot(dst) == before and leftovers(tmp_path) == []
        assert len(notices) == 1 and "moved mlx back" in notices[0]
    notices = []
    convert(str(src), str(dst), progress=False, force=True, notice=notices.append)
    assert leftovers(tmp_path) == []
    assert len(notices) == (1 if sig == signal.SIGKILL and point != "swapping" else 0), notices
    if notices:
        assert notices[0].startswith(f"removed what an interrupted conversion left in {tmp_path}: .mlx.")
    load(str(dst))


def test_a_live_conversions_temp_dir_is_not_swept(tmp_path):
    from illada_mlx_convert.output import WorkDir, sweep

    live = WorkDir(tmp_path / "other", "tmp")
    (live.path / "config.json").write_text("{}")
    notices = []
    sweep(tmp_path, notices.append)
    assert live.path.exists() and notices == []
    live.close()  # as if its process died
    sweep(tmp_path, notices.append)
    assert not live.path.exists() and len(notices) == 1


def test_a_users_directory_with_our_naming_is_left_alone(tmp_path):
    from illada_mlx_convert.output import sweep

    d = tmp_path / ".photos.tmp-abcdefgh"
    d.mkdir()
    (d / "holiday.jpg").write_bytes(b"jpg")
    notices = []
    sweep(tmp_path, notices.append)
    assert (d / "holiday.jpg").read_bytes() == b"jpg" and notices == []


def test_a_killed_conversions_leftovers_go_at_a_load_or_convert_beside_them(src, converted, tmp_path):
    """SIGKILL leaves `.a.tmp-*`; loading another model in the same parent removes it (one notice), and so
    does a convert into another destination there."""
    for sweeper in ("load", "convert"):
        parent = tmp_path / sweeper
        parent.mkdir()
        rc, _ = killed_run(src, parent / "a", "written", signal.SIGKILL, force=False)
        assert rc == -signal.SIGKILL and len(leftovers(parent)) == 1
        notices = []
        if sweeper == "load":
            shutil.copytree(converted, parent / "b")
            load(str(parent / "b"), notice=notices.append)
        else:
            convert(str(src), str(parent / "c"), progress=False, notice=notices.append)
        assert leftovers(parent) == [] and len(notices) == 1, notices
        assert notices[0].startswith(f"removed what an interrupted conversion left in {parent}: .a.tmp-")
        assert not [p for p in parent.rglob(".illada-mlx-convert")]  # no marker in the finished models


def test_a_directory_that_looks_like_ours_without_our_marker_is_left_alone(converted, tmp_path):
    """Our naming and only file names convert writes, but nothing proves a conversion made it: kept."""
    d = tmp_path / ".notes.tmp-abcdefgh"
    d.mkdir()
    (d / "config.json").write_text('{"mine": true}')
    (d / "README.md").write_text("my notes")
    shutil.copytree(converted, tmp_path / "b")
    before = snapshot(d)
    notices = []
    load(str(tmp_path / "b"), notice=notices.append)
    assert snapshot(d) == before and notices == []


def test_a_live_conversions_work_dir_is_not_swept_by_a_load(converted, tmp_path):
    from illada_mlx_convert.output import WorkDir

    live = WorkDir(tmp_path / "other", "tmp")
    (live.path / "config.json").write_text("{}")
    shutil.copytree(converted, tmp_path / "b")
    notices = []
    load(str(tmp_path / "b"), notice=notices.append)
    assert (live.path / "config.json").exists() and notices == []
    live.close()
    load(str(tmp_path / "b"), notice=notices.append)
    assert not live.path.exists() and len(notices) == 1


# ------------------------------------------------------------------------------------------ reading the source
def test_a_tokenizer_file_linking_out_of_the_source_is_refused(own, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"secret": "do not copy"}))
    (own / "special_tokens_map.json").symlink_to(secret)
    out = tmp_path / "out"
    one_error_line(run_convert("--hf-path", own, "--mlx-path", out), "outside the model directory")
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "name", ["config.json", "tokenizer.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json"]
)
def test_any_file_linking_out_of_the_source_is_refused(name, own, tmp_path):
    outside = tmp_path / f"outside-{name}"
    (own / name).rename(outside)
    (own / name).symlink_to(outside)
    out = tmp_path / "out"
    one_error_line(run_convert("--hf-path", own, "--mlx-path", out), "outside the model directory")
    assert not out.exists()


def test_a_symlink_inside_the_source_is_followed(own, tmp_path):
    (own / "tokenizer.json").rename(own / "tok-real.json")
    (own / "tokenizer.json").symlink_to("tok-real.json")
    out = tmp_path / "out"
    r = run_convert("--hf-path", own, "--mlx-path", out)
    assert r.exit_code == 0, r.output
    assert (
        not (out / "tokenizer.json").is_symlink()
        and (out / "tokenizer.json").read_bytes() == (own / "tok-real.json").read_bytes()
    )


def test_a_hub_snapshot_linking_into_its_blobs_is_read(src, tmp_path):
    repo = tmp_path / "hub" / "models--me--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in src.iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    r = run_convert("--hf-path", snap, "--mlx-path", tmp_path / "out")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("entry", ["/etc/passwd", "../own2/x.safetensors", "sub/x.safetensors", "..", ""])
def test_index_entries_must_name_files_in_the_source(entry, own, tmp_path):
    index = json.loads((own / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = entry
    (own / "model.safetensors.index.json").write_text(json.dumps(index))
    one_error_line(run_convert("--hf-path", own, "--mlx-path", tmp_path / "out"), "fix the index")


@pytest.mark.parametrize(
    "name",
    [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ],
)
def test_a_fifo_in_the_source_is_refused_without_hanging(name, own, tmp_path):
    (own / name).unlink()
    os.mkfifo(own / name)
    with deadline(60):
        r = run_convert("--hf-path", own, "--mlx-path", tmp_path / "out")
    one_error_line(r, "not a regular file")


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "added_tokens.json", "model.safetensors"])
def test_a_fifo_in_an_mlx_directory_is_refused_at_load_without_hanging(name, converted, tmp_path):
    d = tmp_path / "mlx"
    shutil.copytree(converted, d)
    if (d / name).exists():
        (d / name).unlink()
    os.mkfifo(d / name)
    with deadline(60):
        r = CliRunner().invoke(main, ["generate", "--model", str(d), "-p", "hi", "-m", "32", "--mode", "fast"])
    one_error_line(r, "not a regular file")


def test_a_directory_as_config_is_refused(own, tmp_path):
    (own / "config.json").unlink()
    (own / "config.json").mkdir()
    one_error_line(run_convert("--hf-path", own, "--mlx-path", tmp_path / "out"), "a directory")


def test_load_refuses_a_shard_linking_out_of_an_mlx_directory(converted, tmp_path):
    d = tmp_path / "mlx"
    shutil.copytree(converted, d)
    (d / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (d / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(IlladaError, match="outside the model directory"):
        load(str(d))


# ------------------------------------------------------------------------------------------ bad configs
CONFIGS = {
    "hidden_size_string": ({"hidden_size": "64"}, "hidden_size"),
    "hidden_size_float": ({"hidden_size": 64.0}, "hidden_size"),
    "zero_heads": ({"num_attention_heads": 0}, "num_attention_heads"),
    "negative_kv_heads": ({"num_key_value_heads": -2}, "num_key_value_heads"),
    "kv_heads_not_dividing": ({"num_key_value_heads": 3}, "num_key_value_heads"),
    "kv_heads_above_heads": ({"num_key_value_heads": 8}, "num_key_value_heads"),
    "huge_layer_count": ({"num_hidden_layers": 10**7}, "num_hidden_layers"),
    "bool_layer_count": ({"num_hidden_layers": True}, "num_hidden_layers"),
    "huge_vocab": ({"vocab_size": 2**40}, "vocab_size"),
    "hidden_not_dividing": ({"hidden_size": 66}, "hidden_size"),
    "odd_head_dim": ({"head_dim": 7}, "head dimension"),
    "eps_string": ({"rms_norm_eps": "x"}, "rms_norm_eps"),
    "eps_negative": ({"rms_norm_eps": -1}, "rms_norm_eps"),
    "eps_zero": ({"rms_norm_eps": 0}, "rms_norm_eps"),
    "theta_zero": ({"rope_theta": 0}, "rope_theta"),
    "rope_scaling_string": ({"rope_scaling": "linear"}, "rope_scaling"),
    "rope_factor_zero": ({"rope_scaling": {"type": "linear", "factor": 0}}, "factor"),
    "rope_factor_missing": ({"rope_scaling": {"type": "linear"}}, "factor"),
    "rope_type_unknown": ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "yarn"),
    "tie_string": ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
    "bias_number": ({"attention_bias": 1}, "attention_bias"),
    "eos_string": ({"eos_token_id": "2"}, "eos_token_id"),
    "positions_negative": ({"max_position_embeddings": -5}, "max_position_embeddings"),
    "act_unknown": ({"hidden_act": "gelu"}, "hidden_act"),
    "missing_key": ({"intermediate_size": None}, "intermediate_size"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_bad_config_values_are_one_line(case, own, tmp_path):
    change, needle = CONFIGS[case]
    cfg = json.loads((own / "config.json").read_text())
    for k, v in change.items():
        if v is None:
            del cfg[k]
        else:
            cfg[k] = v
    (own / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    one_error_line(run_convert("--hf-path", own, "--mlx-path", out), needle)
    assert not out.exists() and leftovers(tmp_path) == []


LLADA_CONFIGS = {
    "weight_tying_string": ({"weight_tying": "yes"}, "weight_tying"),
    "n_heads_missing": ({"n_heads": None}, "n_heads"),
    "d_model_list": ({"d_model": [64]}, "hidden_size"),
}


@pytest.mark.parametrize("case", list(LLADA_CONFIGS))
def test_bad_llada_config_values_are_one_line(case, tmp_path):
    src = tmp_path / "hf"
    write_checkpoint(src, Spec(layout="llada", kv_heads=4, tied=False, seed=22))
    cfg = json.loads((src / "config.json").read_text())
    change, needle = LLADA_CONFIGS[case]
    for k, v in change.items():
        cfg.pop(k) if v is None else cfg.__setitem__(k, v)
    (src / "config.json").write_text(json.dumps(cfg))
    one_error_line(run_convert("--hf-path", src, "--mlx-path", tmp_path / "out"), needle)


CONFIG_FILES = {
    "not_utf8": (b'{"hidden_size": "\xff"}', "not UTF-8"),
    "a_list": (b"[1, 2]", "not an object"),
    "a_string": (b'"config"', "not an object"),
    "not_json": (b"{hidden_size: 64", "not valid JSON"),
    "deeply_nested": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "nan_eps": (None, "rms_norm_eps"),
    "empty": (b"", "not valid JSON"),
}


@pytest.mark.parametrize("case", list(CONFIG_FILES))
def test_unreadable_config_files_are_one_line(case, own, tmp_path):
    data, needle = CONFIG_FILES[case]
    if data is None:  # Python's json reads NaN
        data = (own / "config.json").read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN').encode()
        assert b"NaN" in data
    (own / "config.json").write_bytes(data)
    one_error_line(run_convert("--hf-path", own, "--mlx-path", tmp_path / "out"), needle)


# ------------------------------------------------------------------------------------------ bad weights
SHARD = "model-00001-of-00002.safetensors"


def write_header(path: Path, header_bytes: bytes, body: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + body)


def rewrite_shard(own: Path, change):
    """Load SHARD, let `change` edit its {name: numpy array}, save it back with safetensors (dtype kept)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(own / SHARD))
    change(tensors)
    save_file(tensors, str(own / SHARD))


def entry(dtype, shape, offsets) -> bytes:
    return json.dumps({"model.norm.weight": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}).encode()


HEADERS = {
    "a_list": (b"[1, 2, 3]", "corrupt"),
    "nested": (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "corrupt"),
    "entry_not_object": (b'{"model.norm.weight": 5}', "corrupt entry"),
    "negative_shape": (entry("F32", [-1], [0, 0]), "corrupt entry"),
    "bool_shape": (entry("F32", [True], [0, 4]), "corrupt entry"),
    "unknown_dtype": (entry("F8_E4M3", [1], [0, 1]), "corrupt entry"),
    "offsets_reversed": (entry("F32", [1], [4, 0]), "corrupt entry"),
    "not_utf8": (b'{"\xff": 1}', "corrupt"),
    "huge_length": (None, "truncated or corrupt"),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_corrupt_safetensors_headers_are_one_line(case, own, tmp_path):
    header, needle = HEADERS[case]
    if header is None:
        (own / SHARD).write_bytes(struct.pack("<Q", 2**63) + b"{}")
    else:
        write_header(own / SHARD, header)
    one_error_line(run_convert("--hf-path", own, "--mlx-path", tmp_path / "out"), needle)


@pytest.mark.parametrize(
    "dtype,needle", [(np.float64, "F64"), (np.int32, "I32"), (np.bool_, "BOOL"), (np.int64, "I64"), (np.uint8, "U8")]
)
def test_only_float_weights_are_converted(dtype, needle, own, tmp_path):
    def cast(t):
        k = next(iter(t))
        t[k] = t[k].astype(dtype)

    rewrite_shard(own, cast)
    out = tmp_path / "out"
    line = one_error_line(run_convert("--hf-path", own, "--mlx-path", out), needle)
    assert "F16, BF16 and F32" in line and not out.exists()


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_weights_are_refused_unless_allowed(value, own, tmp_path):
    def poison(t):
        k = sorted(t)[0]
        t[k] = t[k].copy()
        t[k].flat[3] = value

    rewrite_shard(own, poison)
    out = tmp_path / "out"
    one_error_line(run_convert("--hf-path", own, "--mlx-path", out), "--allow-nonfinite")
    assert not out.exists()
    with pytest.raises(IlladaError, match="NaN or infinite"):
        load(str(own))  # the direct HF loader checks too
    r = run_convert("--hf-path", own, "--mlx-path", out, "--allow-nonfinite")
    assert r.exit_code == 0, r.output
    load(str(out))  # the conversion says it was allowed


def test_a_float16_overflow_is_refused(own, tmp_path):
    def big(t):
        k = sorted(t)[0]
        t[k] = t[k].copy()
        t[k].flat[0] = 1e6

    rewrite_shard(own, big)
    one_error_line(run_convert("--hf-path", own, "--mlx-path", tmp_path / "o", "--dtype", "float16"), "overflow")
    assert run_convert("--hf-path", own, "--mlx-path", tmp_path / "o", "--dtype", "bfloat16").exit_code == 0


@pytest.mark.parametrize(
    "index,needle",
    [
        (b"not json", "not valid JSON"),
        (b"{}", "weight_map"),
        (b'{"weight_map": []}', "weight_map"),
        (b'{"weight_map": {"a": 5}}', "weight_map"),
    ],
)
def test_bad_indexes_are_one_line(index, needle, own, tmp_path):
    (own / "model.safetensors.index.json").write_bytes(index)
    one_error_line(run_convert("--hf-path", own, "--mlx-path", tmp_path / "out"), needle)


# ------------------------------------------------------------------------------------------ load-time checks
def mlx_copy(converted, tmp_path) -> Path:
    d = tmp_path / "mlx"
    shutil.copytree(converted, d)
    return d


def edit_mlx(d: Path, change):
    w = dict(mx.load(str(d / "model.safetensors")))
    change(w)
    mx.save_safetensors(str(d / "model.safetensors"), w, metadata={"format": "mlx"})


def _nan(w):
    w["model.norm.weight"] = mx.full(w["model.norm.weight"].shape, float("nan"))


def _int(w):
    w["model.norm.weight"] = w["model.norm.weight"].astype(mx.int32)


def _extra(w):
    for i in range(9):
        w[f"model.extra.{i}.weight"] = mx.zeros((2,))


LOAD_CASES = {
    "nan_weight": (lambda d: edit_mlx(d, _nan), "NaN or infinite values in model.norm.weight"),
    "int_weight": (lambda d: edit_mlx(d, _int), "dtype I32"),
    "nine_unknown": (
        lambda d: edit_mlx(d, _extra),
        "9 parameters not in the model: model.extra.0.weight, model.extra.1.weight, "
        "model.extra.2.weight and 6 more); re-convert the model",
    ),
    "truncated": (
        lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-10]),
        "truncated",
    ),
    "config_heads": (
        lambda d: (d / "config.json").write_text(
            (d / "config.json").read_text().replace('"num_attention_heads": 4', '"num_attention_heads": "4"')
        ),
        "num_attention_heads",
    ),
    "quant_record": (
        lambda d: (d / "config.json").write_text(
            json.dumps({**json.loads((d / "config.json").read_text()), "quantization": {"bits": 7, "group_size": 64}})
        ),
        "quantization",
    ),
    "mask_outside": (
        lambda d: (d / "config.json").write_text(
            json.dumps({**json.loads((d / "config.json").read_text()), "mask_token_id": 10**6})
        ),
        "outside the vocabulary",
    ),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_load_checks_a_hand_made_mlx_directory(case, converted, tmp_path):
    d = mlx_copy(converted, tmp_path)
    change, needle = LOAD_CASES[case]
    change(d)
    r = CliRunner().invoke(main, ["generate", "--model", str(d), "-p", "hi", "-m", "32", "--mode", "fast"])
    line = one_error_line(r, needle)
    assert not line.endswith("(") and ": )" not in line  # never cut mid-sentence


@pytest.mark.parametrize("how", ["truncate", "garbage_config", "nan", "missing_tokenizer"])
def test_a_corrupt_demo_cache_is_converted_again(how, tmp_path, monkeypatch):
    from illada_mlx_convert import ensure_demo_model

    monkeypatch.setenv("ILLADA_MLX_CACHE", str(tmp_path / "cache"))
    d = ensure_demo_model()
    good = snapshot(d)
    if how == "truncate":
        (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000])
    elif how == "garbage_config":
        (d / "config.json").write_bytes(b"\x00\xff garbage")
    elif how == "nan":
        edit_mlx(d, _nan)
    else:
        (d / "tokenizer.json").unlink()
    notices = []
    assert ensure_demo_model(notices.append) == d
    assert len(notices) == 1 and "corrupt" in notices[0] and "converting it again" in notices[0]
    assert snapshot(d).keys() == good.keys()
    load(str(d))
    r = CliRunner().invoke(main, ["generate", "-p", "reverse ab", "-m", "32", "--mode", "fast"])
    assert r.exit_code == 0, r.output


def test_a_corrupt_demo_cache_with_a_users_file_is_not_removed(tmp_path, monkeypatch):
    from illada_mlx_convert import ensure_demo_model

    monkeypatch.setenv("ILLADA_MLX_CACHE", str(tmp_path / "cache"))
    d = ensure_demo_model()
    (d / "config.json").write_text("[]")
    (d / "mine.txt").write_text("keep")
    with pytest.raises(IlladaError, match="ILLADA_MLX_CACHE"):
        ensure_demo_model()
    assert (d / "mine.txt").read_text() == "keep"


# ------------------------------------------------------------------------------------------ options, prompts
OPTIONS = [
    (["convert", "--hf-path", "x", "--mlx-path", "y", "--max-shard-size", "nan"], "--max-shard-size"),
    (["convert", "--hf-path", "x", "--mlx-path", "y", "--max-shard-size", "inf"], "--max-shard-size"),
    (["convert", "--hf-path", "x", "--mlx-path", "y", "--max-shard-size", "0"], "--max-shard-size"),
    (["convert", "--hf-path", "x", "--mlx-path", "y", "--mask-id", "-3"], "--mask-id"),
    (["generate", "-p", "hi", "--block-length", "0", "--mode", "exact"], "--block-length"),
    (["generate", "-p", "hi", "--steps-per-block", "0"], "--steps-per-block"),
    (["generate", "-p", "hi", "--max-tokens", "-1"], "--max-tokens"),
    (["generate", "-p", "hi", "--seed", "-1"], "--seed"),
    (["generate", "-p", "hi", "--seed", "12345678901234567890"], "--seed"),
    (["generate", "-p", "hi", "--temperature", "nan"], "--temperature"),
    (["generate", "-p", "hi", "--temp", "-0.5"], "--temp"),
    (["generate", "-p", "hi", "--threshold", "0"], "--threshold"),
    (["generate", "-p", "hi", "--threshold", "1.5"], "--threshold"),
    (["generate", "-p", "hi", "--threshold", "inf"], "--threshold"),
    (["chat", "--seed", "x"], "--seed"),
    (["serve", "--port", "99999"], "--port"),
    (["serve", "--port", "0"], "--port"),
    (["serve", "--max-queue", "0"], "--max-queue"),
    (["bench", "--prompt-lengths", "abc"], "--prompt-lengths"),
    (["bench", "--gen-length", "0"], "--gen-length"),
    (["bench", "--repeats", "0"], "--repeats"),
]


@pytest.mark.parametrize("args,needle", OPTIONS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in OPTIONS])
def test_bad_option_values_are_one_line(args, needle):
    one_error_line(CliRunner().invoke(main, args), needle)


@pytest.mark.parametrize("cache", CACHES)
def test_every_cache_choice_runs(cache):
    r = CliRunner().invoke(main, ["generate", "-p", "reverse ab", "--cache", cache, "--mode", "fast_fixed", "-m", "32"])
    assert r.exit_code == 0, r.output


def test_serve_refuses_an_address_it_cannot_listen_on():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        one_error_line(CliRunner().invoke(main, ["serve", "--port", str(port)]), f"cannot listen on 127.0.0.1:{port}")
    one_error_line(CliRunner().invoke(main, ["serve", "--host", "no-such-host.invalid"]), "--host")


def test_usage_errors_are_one_line_with_exit_2():
    one_error_line(CliRunner().invoke(main, ["generate", "--no-such-option"]), "--no-such-option", code=2)
    one_error_line(CliRunner().invoke(main, ["generate"]), "--prompt", code=2)
    one_error_line(CliRunner().invoke(main, ["no-such-command"]), "no-such-command", code=2)


def test_a_prompt_that_is_not_utf8_is_refused():
    one_error_line(CliRunner().invoke(main, ["generate", "-p", "a\udcffb"]), "--prompt is not valid UTF-8")
    one_error_line(CliRunner().invoke(main, ["generate", "-p", "-"], input=b"ab\xff\xfe"), "stdin is not valid UTF-8")


def test_argv_bytes_that_are_not_utf8_are_refused_by_the_command():
    res = subprocess.run(
        [sys.executable, "-m", "illada_mlx", "generate", "-p", b"hi \xff there"],
        capture_output=True,
        timeout=120,
        cwd=ROOT,
    )
    err = res.stderr.decode()
    assert res.returncode == 1 and err.count("\n") == 1 and err.startswith("error: --prompt is not valid UTF-8"), err


def test_chat_skips_a_line_that_is_not_utf8(demo):
    r = CliRunner().invoke(main, ["chat", "--mode", "fast", "-m", "32"], input=b"\xff\xfe\nreverse ab\n")
    assert r.exit_code == 0, r.output
    assert "error: this line is not valid UTF-8 (byte 0xff at offset 0); fix its encoding; line skipped" in r.stderr
    assert r.stderr.count("Generation:") == 1 and "Traceback" not in r.output


@pytest.fixture
def raising_template(converted, tmp_path):
    d = tmp_path / "tpl"
    shutil.copytree(converted, d)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["chat_template"] = "{{ raise_exception('roles must alternate user/assistant') }}"
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    return d


def test_a_chat_template_that_raises_is_one_line(raising_template):
    args = ["--model", str(raising_template), "-m", "32", "--mode", "fast"]
    line = one_error_line(CliRunner().invoke(main, ["generate", "-p", "hi", *args]), "chat template failed")
    assert "roles must alternate user/assistant" in line and "--raw" in line
    assert CliRunner().invoke(main, ["generate", "-p", "hi", "--raw", *args]).exit_code == 0
    r = CliRunner().invoke(main, ["chat", *args], input="hi\n/quit\n")
    assert r.exit_code == 0 and "error: the model's chat template failed" in r.stderr


def test_tracebacks_only_with_debug(monkeypatch, tmp_path):
    L = sys.modules["illada_mlx.load"]

    def bug(*a, **k):
        raise TypeError("a bug")

    monkeypatch.setattr(L, "load_model", bug)
    args = ["generate", "--model", str(tmp_path), "-p", "hi"]
    (tmp_path / "config.json").write_text("{}")
    line = one_error_line(CliRunner().invoke(main, args), "unexpected TypeError: a bug")
    assert "--debug" in line
    r = CliRunner().invoke(main, ["--debug", *args])
    assert isinstance(r.exception, TypeError)
    r = CliRunner(env={"ILLADA_MLX_DEBUG": "1"}).invoke(main, args)
    assert isinstance(r.exception, TypeError)


# ------------------------------------------------------------------------------------------ issue 32
def test_a_source_without_tokenizer_json_is_refused_before_converting(own, tmp_path):
    (own / "tokenizer.json").unlink()
    out = tmp_path / "out" / "mlx"
    r = run_convert("--hf-path", str(own), "--mlx-path", str(out), "--mask-id", "5")
    one_error_line(r, "no tokenizer.json")
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


@pytest.mark.parametrize("mask_id", [1, 2])  # the demo model's BOS, EOS (= pad)
def test_a_mask_id_that_ends_or_pads_a_text_is_refused(mask_id):
    r = CliRunner().invoke(main, ["generate", "-p", "hi", "--mask-id", str(mask_id), "--max-tokens", "32"])
    lines = [ln for ln in on_screen(r.output) if not ln.startswith("converting the bundled demo model")]
    assert r.exit_code == 1 and len(lines) == 1 and "Traceback" not in r.output, r.output
    assert lines[0].startswith(f"error: mask token id {mask_id} is also the model's")
