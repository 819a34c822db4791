"""The commands people type, through click's runner, on the bundled demo model. Expected texts come
from decoding the same prompt directly (T = 0 is deterministic), so these test the commands, not the
model's skill (that is test_quality.py)."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from illada_mlx.cache import BlockCache
from illada_mlx.cli import main
from illada_mlx.engine import generate_text
from illada_mlx.spec import PRESETS, make_spec

FAST = ["--mode", "fast", "--max-tokens", "32"]


@pytest.fixture(scope="module")
def direct(demo):
    model, tok = demo
    cache = {}

    def answer(history, mode="fast"):
        key = (json.dumps(history), mode)
        if key not in cache:
            cache[key] = generate_text(model, tok, history, mode=mode, max_tokens=32)
        return cache[key]

    return answer


def user(text):
    return [{"role": "user", "content": text}]


def test_generate_streams_text_and_prints_stats(direct):
    r = CliRunner().invoke(main, ["generate", "-p", "reverse abc", *FAST])
    assert r.exit_code == 0, r.output
    assert r.stdout == direct(user("reverse abc")) + "\n"
    # mlx-lm's stats block, plus the diffusion figures and what ran
    assert "Prompt: " in r.stderr and "tokens-per-sec" in r.stderr and "Peak memory" in r.stderr
    assert "Diffusion: 1 forwards" in r.stderr and "fast: growing canvas, budget 32" in r.stderr


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
    for k in ("nfe", "tokens_per_forward", "tokens_per_s", "peak_memory_bytes", "processed", "prompt_tokens"):
        assert k in obj["stats"]
    # what ran, after defaults: fast mode's cache, the bundled model's own rule (its diffusion_config.json),
    # the asked-for budget
    s = obj["settings"]
    assert (s["mode"], s["rule"], s["cache"], s["max_tokens"], s["canvas"]) == (
        "fast",
        "error",
        "prefix",
        32,
        "growing",
    )
    assert (s["error_bound"], s["block_refresh"], s["eos_fill"]) == (0.04, "drift", True)


@pytest.mark.slow  # an exact-mode decode through the CLI
def test_generate_exact_mode_and_help_shows_defaults(direct):
    r = CliRunner().invoke(main, ["generate", "-p", "reverse xyz", "--mode", "exact", "--max-tokens", "32", "--json"])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["text"] == direct(user("reverse xyz"), "exact") and obj["stats"]["nfe"] == 32
    h = CliRunner().invoke(main, ["generate", "-h"])
    text = " ".join(h.output.split())  # click wraps the help
    assert h.exit_code == 0 and "fixed canvas 128 tokens" in text and "exact = the official fixed canvas" in text


def test_errors_are_one_line():
    r = CliRunner().invoke(main, ["generate", "-p", "hi", "--model", "/nonexistent/model"])
    assert r.exit_code == 1
    assert r.output.count("\n") == 1 and r.output.startswith("error: ") and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["generate", "-p", "hi", "--max-tokens", "5000"])
    assert r.exit_code == 1 and "positions" in r.output and r.output.count("\n") == 1


def test_chat_two_turns_reset_and_settings(demo):
    model, tok = demo
    script = "reverse abc\na=1 b=2 ; a?\n/settings\n/reset\nreverse pq\n"
    r = CliRunner().invoke(main, ["chat", *FAST], input=script)
    assert r.exit_code == 0, r.output
    s, cache = dict(mode="fast", max_tokens=32), BlockCache()  # chat keeps one cache across turns
    first = generate_text(model, tok, user("reverse abc"), prompt_cache=cache, **s)
    history = user("reverse abc") + [{"role": "assistant", "content": first}] + user("a=1 b=2 ; a?")
    second = generate_text(model, tok, history, prompt_cache=cache, **s)
    third = generate_text(model, tok, user("reverse pq"), prompt_cache=BlockCache(), **s)  # after /reset
    assert r.stdout.split("\n")[:3] == [first, second, third]
    # /settings reports what ran, a topic per line: the mode's cache and rule, the asked-for budget
    spec = make_spec(model, tok, 10, **s)
    lines = r.stderr.splitlines()
    assert "history cleared" in r.stderr and f"mode: fast ({spec.canvas} canvas, budget 32 tokens)" in lines
    assert f"cache: {spec.cache}, block refresh {spec.block_refresh} (drift threshold {spec.drift_threshold})" in lines
    assert (
        f"commits: error {spec.error_bound}, stable ≥ {spec.stable_threshold}" in lines
        and "sampling: temperature 0 (greedy); seed none" in lines
    )
    assert not any(len(ln) > 100 for ln in lines if ln.startswith(("mode:", "ends:")))
    assert r.stderr.count("==========\nPrompt: ") == 3  # a stats block per reply


@pytest.mark.slow  # one token per step, every frame drawn
def test_chat_visual_renders_when_forced(monkeypatch, direct):
    import illada_mlx.cli.widgets

    monkeypatch.setattr(illada_mlx.cli.widgets, "stdout_is_terminal", lambda: True)
    # one token per step (fast mode fills the demo's whole block in one forward: no masked frame)
    r = CliRunner().invoke(
        main, ["chat", "--visual", "--mode", "variable", "--max-tokens", "32"], input="reverse abc\n"
    )
    assert r.exit_code == 0, r.output
    assert "\u2591" in r.stdout  # masked slots were drawn
    assert "\x1b8" in r.stdout  # frames redraw in place
    assert r.stdout.endswith(direct(user("reverse abc"), mode="variable") + "\n")


@pytest.mark.parametrize("mode", [pytest.param("exact", marks=pytest.mark.slow), "fast_fixed"])  # exact: 128 forwards
def test_fixed_canvas_default_is_the_official_128_tokens(mode):
    # without --max-tokens a fixed canvas is 128 tokens (never one sized to the context), so it finishes
    r = CliRunner().invoke(main, ["generate", "-p", "57+68=", "--mode", mode, "--json"])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["text"] == "125" and obj["stats"]["nfe"] <= 128 and obj["settings"]["max_tokens"] == 128


def test_mode_and_cache_names_come_from_the_one_table():
    from illada_mlx import api
    from illada_mlx.cache import CACHES, REFRESHES
    from illada_mlx.cli.common import mode_names
    from illada_mlx.config import IlladaError

    for cmd in ("generate", "chat"):
        params = {p.name: p for p in main.commands[cmd].params}
        assert list(params["mode"].type.choices) == list(PRESETS)
        assert list(params["cache"].type.choices) == list(CACHES)
        assert list(params["block_refresh"].type.choices) == list(REFRESHES)
    # bench --modes: every preset, nothing else
    assert mode_names(",".join(PRESETS)) == list(PRESETS)
    with pytest.raises(IlladaError, match="warp"):
        mode_names("exact,warp")
    # the server: every preset and cache accepted, anything else refused

    class args:  # what api.settings reads of the model's ModelArgs
        max_position_embeddings = vocab_size = 1024

    for name in PRESETS:
        assert api.settings(args, {"diffusion": {"mode": name}})["mode"] == name
    for name in CACHES:
        assert api.settings(args, {"diffusion": {"cache": name}})["cache"] == name
    for name in REFRESHES:
        assert api.settings(args, {"diffusion": {"block_refresh": name}})["block_refresh"] == name
    for bad in ({"mode": "warp"}, {"cache": "full"}, {"block_refresh": "never"}):
        with pytest.raises(api.ApiError):
            api.settings(args, {"diffusion": bad})
    # the yardstick's sampler rows (bench/quality.py) are presets with overrides
    from training.yardstick import SAMPLERS

    assert {mode for mode, _ in SAMPLERS.values()} <= set(PRESETS) | {None}  # None: the model's default


def test_python_m_and_mlx_lm_aliases(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "illada_mlx", "-h"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "generate" in r.stdout and "convert" in r.stdout
    # --temp, -m, --system-prompt, --ignore-chat-template are mlx-lm's names for ours
    a = CliRunner().invoke(
        main,
        ["generate", "-p", "reverse abc", "--temp", "0", "-m", "32", "--mode", "fast", "--system-prompt", "", "--json"],
    )
    b = CliRunner().invoke(
        main, ["generate", "-p", "reverse abc", "--temperature", "0", "--max-tokens", "32", "--mode", "fast", "--json"]
    )
    assert a.exit_code == 0 and json.loads(a.stdout)["text"] == json.loads(b.stdout)["text"] == "cba"
    raw = CliRunner().invoke(main, ["generate", "-p", "reverse abc", "--ignore-chat-template", "-m", "8", "--json"])
    assert raw.exit_code == 0 and json.loads(raw.stdout)["prompt_tokens"] == 11  # no template: the text alone


class Terminal:
    """stdout and stderr on one terminal: applies text, \\r, \\n, CSI n D (left) and CSI K (erase to end)."""

    def __init__(self):
        self.lines, self.col = [""], 0

    def write(self, s):
        import re

        for tok in re.findall(r"\x1b\[(\d*)([DK])|(\r)|(\n)|([^\x1b\r\n])", s):
            n, code, cr, nl, ch = tok
            line = self.lines[-1]
            if code == "D":
                self.col = max(0, self.col - int(n or 1))
            elif code == "K":
                self.lines[-1] = line[: self.col]
            elif cr:
                self.col = 0
            elif nl:
                self.lines.append("")
                self.col = 0
            else:
                self.lines[-1] = line[: self.col] + ch + line[self.col + 1 :]
                self.col += 1

    def flush(self):
        pass

    def isatty(self):
        return True


def test_progress_status_never_garbles_the_streamed_text(monkeypatch):
    from illada_mlx.cli.widgets import Progress

    term = Terminal()
    monkeypatch.setattr("sys.stdout", term)
    monkeypatch.setattr("sys.stderr", term)
    p = Progress()
    p.status("block 1/4, 0 tokens", force=True)
    assert term.lines == [" [block 1/4, 0 tokens]"]
    p.text("hello ")
    p.status("block 2/4, 6 tokens", force=True)
    assert term.lines == ["hello  [block 2/4, 6 tokens]"]
    p.text("world\nsecond")
    p.done()
    assert term.lines == ["hello world", "second"]
    # stdout piped, stderr a terminal: the status is its own line, redrawn in place and erased at the end
    err = Terminal()
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.setattr(
        "sys.stdout",
        type("Pipe", (), {"write": lambda s, x: None, "flush": lambda s: None, "isatty": lambda s: False})(),
    )
    p = Progress()
    p.status("block 1/4", force=True)
    p.text("abc")
    p.status("block 2/4", force=True)
    assert err.lines == ["block 2/4"]
    p.done()
    assert err.lines == [""]
    # not a terminal: nothing at all
    assert Progress(enabled=False).on is False


def test_chat_with_the_defaults_answers(direct):
    # no options: the chat model's default budget (2048) is cut to the demo's 1024 positions, per turn
    r = CliRunner().invoke(main, ["chat"], input="reverse hello\n")
    assert r.exit_code == 0, r.output
    assert r.stdout.split("\n")[0] == "olleh"


@pytest.mark.parametrize("mode", [[], ["--mode", "fast"]])
def test_chat_answers_three_piped_questions(mode):
    # a new user's first minute: three questions piped into chat, each turn with the earlier exchanges in
    # its prompt (the cross-turn cache on in fast mode); the oracle is each task's rule, not the model
    r = CliRunner().invoke(main, ["chat", *mode], input="reverse hello\nsort 3 1 2\n57+68=\n")
    assert r.exit_code == 0, r.output
    assert r.stdout.split("\n")[:3] == ["olleh", "1 2 3", "125"]


def test_a_piped_prompt_loses_its_line_end(direct):
    # `echo "reverse abc" | illada-mlx generate -p -` asks what `-p "reverse abc"` asks
    for piped in ("reverse abc\n", "reverse abc\r\n", "reverse abc"):
        r = CliRunner().invoke(main, ["generate", "-p", "-", *FAST], input=piped.encode())
        assert r.exit_code == 0, r.output
        assert r.stdout == direct(user("reverse abc")) + "\n"


def test_a_bare_command_prints_its_usage_screen():
    bare, helped = CliRunner().invoke(main, []), CliRunner().invoke(main, ["-h"])
    assert bare.exit_code == 0 and bare.stdout == helped.stdout and "Commands:" in bare.stdout
    assert bare.stderr == ""


@pytest.mark.parametrize("cut", [["--top-k", "1"], ["--top-p", "1e-9"], ["--min-p", "1"]])
def test_generate_top_k_top_p_min_p_keep_only_the_argmax_at_their_extremes(direct, cut):
    # each cuts the candidates to the most likely one: sampling at T = 1 gives the greedy answer
    r = CliRunner().invoke(main, ["generate", "-p", "reverse abc", "--temp", "1", "--seed", "5", *cut, *FAST])
    assert r.exit_code == 0, r.output
    assert r.stdout == direct(user("reverse abc")) + "\n"


@pytest.mark.parametrize("bad", [["--top-p", "0"], ["--top-p", "1.5"], ["--top-k", "-1"], ["--min-p", "nan"]])
def test_generate_sampler_cuts_out_of_range_are_refused(bad):
    r = CliRunner().invoke(main, ["generate", "-p", "x", *bad])
    assert r.exit_code == 1 and r.output.startswith("error: ") and bad[0] in r.output and r.output.count("\n") == 1


def readme_commands() -> list[list[str]]:
    """Every `illada-mlx ...` command in the README's bash blocks (after a pipe or mlx.launch's own
    arguments, continuation lines joined, comments dropped), as argv without the program name."""
    import re
    import shlex
    from pathlib import Path

    command = re.compile(
        r"(?:^|\s)(?:\S*/)?illada-mlx\s+((?:generate|chat|serve|bench|eval|convert)\b.*)$"
        r"|^python -m illada_mlx (.*)$"
    )
    out, lang, joined = [], None, ""
    for line in (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines():
        if line.startswith("```"):
            lang = None if lang is not None else (line[3:] or "text")
            continue
        if lang != "bash":
            continue
        joined += line.lstrip("$ ")
        if joined.endswith("\\"):
            joined = joined[:-1] + " "
            continue
        m = command.search(joined)
        if m:
            out.append(shlex.split(m.group(1) or m.group(2), comments=True))
        joined = ""
    return out


def test_every_readme_command_parses():
    # the README's commands name only options that exist, with values of their types
    cmds = readme_commands()
    assert len(cmds) >= 15 and ["generate", "-p", "57+68="] in cmds
    for args in cmds:
        ctx = main.make_context("illada-mlx", list(args))
        name, cmd, rest = main.resolve_command(ctx, ctx._protected_args + ctx.args)
        if "-h" not in rest:
            cmd.make_context(name, rest, parent=ctx)  # raises on an unknown option or a bad value
    # a command that needs an extra comes after the README's line that installs it
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for flag in ("--plot", "--baselines torch"):
        first = re.search(rf"^.*illada-mlx bench.*{flag}.*$", text, re.M)
        assert first and 0 <= text.find('pip install -e ".[bench]"') < first.start(), flag


def test_help_lists_the_commands_without_importing_them():
    # `-h` reads the summaries from the dispatcher's table: no command module, and never the converter
    code = (
        "import sys; from illada_mlx.cli import main\n"
        "try:\n    main(['-h'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith(('illada_mlx.cli.', 'illada_mlx_convert'))))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.splitlines()[-1] == "[]"
    assert "convert   Convert an HF checkpoint" in r.stdout


def test_the_dispatchers_summaries_are_the_commands_own():
    from illada_mlx.cli import COMMANDS, main

    for name, (_, summary) in COMMANDS.items():
        cmd = main.get_command(None, name)
        assert cmd.name == name and (cmd.help or "").replace("\n", " ").startswith(summary)
