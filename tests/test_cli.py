"""The commands people type, through click's runner, on the bundled demo model. Expected texts come
from decoding the same prompt directly (T = 0 is deterministic), so these test the commands, not the
model's skill (that is test_quality.py)."""

import json

import pytest
from click.testing import CliRunner

from illada_mlx.cli import main
from illada_mlx.runner import Settings, build_prompt, complete

FAST = ["--mode", "fast", "--max-tokens", "32"]


@pytest.fixture(scope="module")
def direct(demo):
    model, tok = demo
    cache = {}

    def answer(history, mode="fast"):
        key = (json.dumps(history), mode)
        if key not in cache:
            ids = build_prompt(tok, history)
            cache[key] = complete(model, tok, ids, Settings(mode=mode, max_tokens=32)).texts[0]
        return cache[key]

    return answer


def user(text):
    return [{"role": "user", "content": text}]


def test_generate_streams_text_and_prints_stats(direct):
    r = CliRunner().invoke(main, ["generate", "-p", "reverse abc", *FAST])
    assert r.exit_code == 0, r.output
    assert r.stdout == direct(user("reverse abc")) + "\n"
    assert "tok/s" in r.stderr and "forwards" in r.stderr and "peak memory" in r.stderr


def test_readme_command_answers_with_the_default_settings():
    # the README's second line: no options, so the model's defaults (variable length, a 2048-token
    # budget for a chat model) must fit the demo model's 1024 positions; reversing is a learned task
    r = CliRunner().invoke(main, ["generate", "-p", "reverse hello"])
    assert r.exit_code == 0, r.output
    assert r.stdout == "olleh\n"


def test_generate_json_is_one_object(direct):
    r = CliRunner().invoke(main, ["generate", "-p", "a=3 b=7 ; b?", "--json", *FAST])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["text"] == direct(user("a=3 b=7 ; b?"))
    assert obj["finish_reason"] in ("stop", "length") and isinstance(obj["tokens"], list)
    for k in ("nfe", "tokens_per_forward", "tokens_per_s", "peak_memory_bytes", "processed"):
        assert k in obj["stats"]
    assert obj["settings"]["mode"] == "fast"


def test_generate_exact_mode_and_help_shows_defaults(direct):
    r = CliRunner().invoke(main, ["generate", "-p", "reverse xyz", "--mode", "exact", "--max-tokens", "32", "--json"])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["text"] == direct(user("reverse xyz"), "exact") and obj["stats"]["nfe"] == 32
    h = CliRunner().invoke(main, ["generate", "--help"])
    assert "iLLaDA: 1024 base / 2048 instruct" in h.output and "exact = official fixed canvas" in h.output


def test_errors_are_one_line():
    r = CliRunner().invoke(main, ["generate", "-p", "hi", "--model", "/nonexistent/model"])
    assert r.exit_code == 1
    assert r.output.count("\n") == 1 and r.output.startswith("error: ") and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["generate", "-p", "hi", "--max-tokens", "5000"])
    assert r.exit_code == 1 and "positions" in r.output and r.output.count("\n") == 1


def test_chat_two_turns_reset_and_settings(demo):
    from illada_mlx.cache import BlockCache

    model, tok = demo
    script = "reverse abc\na=1 b=2 ; a?\n/settings\n/reset\nreverse pq\n"
    r = CliRunner().invoke(main, ["chat", *FAST], input=script)
    assert r.exit_code == 0, r.output
    s, cache = Settings(mode="fast", max_tokens=32), BlockCache()  # chat keeps one cache across turns
    first = complete(model, tok, build_prompt(tok, user("reverse abc")), s, cache=cache).texts[0]
    history = user("reverse abc") + [{"role": "assistant", "content": first}] + user("a=1 b=2 ; a?")
    second = complete(model, tok, build_prompt(tok, history), s, cache=cache).texts[0]
    third = complete(model, tok, build_prompt(tok, user("reverse pq")), s, cache=BlockCache()).texts[0]  # /reset
    assert r.stdout.split("\n")[:3] == [first, second, third]
    assert "history cleared" in r.stderr and "mode=fast" in r.stderr and r.stderr.count("tok/s") == 3


def test_chat_visual_renders_when_forced(monkeypatch, direct):
    monkeypatch.setenv("ILLADA_MLX_FORCE_VISUAL", "1")
    # one token per step (fast mode fills the demo's whole block in one forward: no masked frame)
    r = CliRunner().invoke(main, ["chat", "--visual", "--mode", "variable", "--max-tokens", "32"],
                           input="reverse abc\n")
    assert r.exit_code == 0, r.output
    assert "\u2591" in r.stdout  # masked slots were drawn
    assert "\x1b8" in r.stdout  # frames redraw in place
    assert r.stdout.endswith(direct(user("reverse abc"), mode="variable") + "\n")
