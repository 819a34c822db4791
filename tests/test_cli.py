"""The commands people type, through click's runner, on the bundled demo model."""

import json

from click.testing import CliRunner

from illada_mlx.cli import main

FAST = ["--mode", "fast", "--max-tokens", "32"]


def test_generate_streams_text_and_prints_stats():
    r = CliRunner().invoke(main, ["generate", "-p", "reverse abc", *FAST])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "cba"
    assert "tok/s" in r.stderr and "forwards" in r.stderr and "peak memory" in r.stderr


def test_generate_json_is_one_object():
    r = CliRunner().invoke(main, ["generate", "-p", "a=3 b=7 ; b?", "--json", *FAST])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["text"] == "7" and obj["finish_reason"] == "stop"
    for k in ("nfe", "tokens_per_forward", "tokens_per_s", "peak_memory_bytes"):
        assert k in obj["stats"]
    assert obj["settings"]["mode"] == "fast"


def test_generate_exact_mode_and_help_shows_defaults():
    r = CliRunner().invoke(main, ["generate", "-p", "reverse xyz", "--mode", "exact", "--max-tokens", "32", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["text"] == "zyx"
    h = CliRunner().invoke(main, ["generate", "--help"])
    assert "iLLaDA: 1024 base / 2048 instruct" in h.output and "exact = official fixed canvas" in h.output


def test_errors_are_one_line():
    r = CliRunner().invoke(main, ["generate", "-p", "hi", "--model", "/nonexistent/model"])
    assert r.exit_code == 1
    assert r.output.count("\n") == 1 and r.output.startswith("error: ") and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["generate", "-p", "hi", "--max-tokens", "5000"])
    assert r.exit_code == 1 and "positions" in r.output and r.output.count("\n") == 1


def test_chat_two_turns_reset_and_settings():
    script = "reverse abc\na=1 b=2 ; a?\n/settings\n/reset\nreverse pq\n"
    r = CliRunner().invoke(main, ["chat", *FAST], input=script)
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert lines[:3] == ["cba", "1", "qp"]
    assert "history cleared" in r.stderr and "mode=fast" in r.stderr


def test_chat_visual_renders_when_forced(monkeypatch):
    monkeypatch.setenv("ILLADA_MLX_FORCE_VISUAL", "1")
    r = CliRunner().invoke(main, ["chat", "--visual", *FAST], input="reverse abc\n")
    assert r.exit_code == 0, r.output
    assert "\u2591" in r.stdout  # masked slots were drawn
    assert r.stdout.rstrip().endswith("cba")
