"""The `illada-mlx` command: convert, generate, chat, serve, bench."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .config import IlladaError


class _Group(click.Group):
    """Every user-facing failure is one line on stderr and exit code 1, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except IlladaError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group)
@click.version_option(package_name="illada-mlx")
def main():
    """Run iLLaDA / LLaDA masked-diffusion language models with MLX."""


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


# ------------------------------------------------------------------------------------------ shared options
def _load(model_path, mask_id=None):
    from .load import load

    return load(model_path, mask_id=mask_id)


def sampler_options(f):
    """The decoding options generate/chat share. Unset ones take the model's defaults (see --help)."""
    opts = [
        click.option("--model", "model_path", default=None, help="MLX dir, HF dir or hub id (default: the bundled demo model)."),
        click.option("--mode", type=click.Choice(["exact", "variable", "fast", "fast_fixed"]), default=None,
                     help="exact = official fixed canvas (LLaDA default); variable = iLLaDA growing canvas "
                          "(iLLaDA default); fast = variable + threshold commits + prefix cache; "
                          "fast_fixed = fixed canvas + threshold + dual cache."),
        click.option("--max-tokens", type=int, default=None, help="Budget (iLLaDA: 1024 base / 2048 instruct; LLaDA: 128; a default is cut to the context, a given one refused if it does not fit)."),
        click.option("--block-length", type=int, default=None, help="Block size (default 32)."),
        click.option("--steps-per-block", type=int, default=None, help="Denoising steps per block (default 32)."),
        click.option("--temperature", type=float, default=None, help="0 = greedy (default)."),
        click.option("--threshold", type=float, default=None, help="Fast mode: commit tokens with confidence ≥ τ (0.9)."),
        click.option("--cache", type=click.Choice(["none", "prefix", "dual"]), default=None,
                     help="Block KV cache (fast mode default: prefix)."),
        click.option("--seed", type=int, default=None),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
        click.option("--think-boost/--no-think-boost", default=False, help="iLLaDA-Instruct end-of-thinking boost."),
        click.option("--mask-id", type=int, default=None, help="Override the mask token id."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _settings(model, tok, **kw):
    from .runner import default_settings

    s = default_settings(model, tok).with_budget(kw.pop("max_tokens", None))
    for k, v in kw.items():
        if v is not None and hasattr(s, k):
            setattr(s, k, list(v) if k == "stop" else v)
    return s


def _stats_line(st) -> str:
    return (f"{st.output_tokens} tokens in {st.wall_s:.2f}s = {st.tokens_per_s:.1f} tok/s to EOS | "
            f"{st.nfe} forwards, {st.tokens_per_forward:.2f} tokens/forward | peak memory {_gb(st.peak_memory_bytes)}")


@main.command()
@click.option("--prompt", "-p", required=True, help="The prompt ('-' reads stdin).")
@click.option("--system", default=None, help="System text (merged into the first user turn).")
@click.option("--raw", is_flag=True, help="No chat template (base models).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@sampler_options
def generate(prompt, system, raw, as_json, model_path, mask_id, **kw):
    """Generate a reply to one prompt, streamed block by block; stats on stderr."""
    import json

    from .runner import build_prompt, complete

    if prompt == "-":
        prompt = sys.stdin.read()
    model, tok = _load(model_path, mask_id)
    s = _settings(model, tok, **kw)
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids = build_prompt(tok, msgs, raw=raw)

    def show(text):
        click.echo(text, nl=False)
        sys.stdout.flush()

    g = complete(model, tok, ids, s, on_text=None if as_json else show)
    if as_json:
        click.echo(json.dumps({"text": g.texts[0], "tokens": g.tokens[0], "finish_reason": g.finish_reasons[0],
                               "prompt_tokens": len(ids), "settings": s.as_dict(), "stats": g.stats.as_dict()}))
    else:
        click.echo()
        click.echo(_stats_line(g.stats), err=True)


# ------------------------------------------------------------------------------------------ chat
class CanvasView:
    """Draws the reply's canvas in place: committed tokens as text, masked slots as ░."""

    MASK_GLYPH = "░"

    def __init__(self, tok, mask_id, prompt_len, out=None):
        self.tok, self.mask_id, self.P, self.out = tok, mask_id, prompt_len, out or sys.stdout
        self.out.write("\0337")  # save the cursor: every frame redraws from here

    def frame(self, ev):
        import numpy as np

        from .decode import Step

        if not isinstance(ev, Step) or 0 not in ev.rows:
            return
        row = np.array(ev.canvas[ev.rows.index(0), self.P:]).tolist()
        parts = [self.MASK_GLYPH if t == self.mask_id else self.tok.decode([t]) for t in row]
        self.out.write("\0338\033[J" + "".join(parts))
        self.out.flush()

    def finish(self, text):
        self.out.write("\0338\033[J" + text + "\n")
        self.out.flush()


@main.command()
@click.option("--system", default=None, help="System text for the conversation.")
@click.option("--visual/--no-visual", default=False, help="Show the canvas being denoised (TTY only).")
@sampler_options
def chat(system, visual, model_path, mask_id, **kw):
    """Multi-turn chat. /reset clears the history, /settings shows the decoding settings, /quit ends.
    Ctrl-C interrupts a reply, not the session."""
    import os

    from .runner import build_prompt, complete

    model, tok = _load(model_path, mask_id)
    s = _settings(model, tok, **kw)
    visual = visual and (sys.stdout.isatty() or os.environ.get("ILLADA_MLX_FORCE_VISUAL") == "1")
    history = [{"role": "system", "content": system}] if system else []
    from .cache import BlockCache

    cache = BlockCache()  # reused across turns when the mode has a cache on
    click.echo("illada-mlx chat: /reset, /settings, /quit. Ctrl-C stops a reply.", err=True)
    while True:
        try:
            line = input(">>> ") if sys.stdin.isatty() else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            break
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/quit":
            break
        if line.strip() == "/reset":
            history = history[:1] if system else []
            cache = BlockCache()
            click.echo("(history cleared)", err=True)
            continue
        if line.strip() == "/settings":
            click.echo(" ".join(f"{k}={v}" for k, v in s.as_dict().items()), err=True)
            continue
        history.append({"role": "user", "content": line})
        ids = build_prompt(tok, history)
        view = CanvasView(tok, model.args.mask_token_id, len(ids)) if visual else None
        try:
            g = complete(model, tok, ids, s, on_text=None if visual else (lambda t: (click.echo(t, nl=False),
                                                                                         sys.stdout.flush())),
                         on_event=view.frame if view else None, cache=cache)
        except KeyboardInterrupt:
            click.echo("\n(interrupted)", err=True)
            history.pop()
            continue
        reply = g.texts[0]
        if view:
            view.finish(reply)
        else:
            click.echo()
        click.echo(_stats_line(g.stats), err=True)
        history.append({"role": "assistant", "content": reply})


# ------------------------------------------------------------------------------------------ serve
@main.command()
@click.option("--model", "model_path", default=None, help="MLX dir, HF dir or hub id (default: the demo model).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (localhost by default).")
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--max-queue", default=16, show_default=True, type=int, help="Requests waiting beyond this get 429.")
@click.option("--mask-id", type=int, default=None)
def serve(model_path, host, port, max_queue, mask_id):
    """OpenAI-compatible HTTP server: /v1/models, /v1/chat/completions, /v1/completions."""
    import uvicorn

    from .server import Engine, make_app

    model, tok = _load(model_path, mask_id)
    name = Path(str(model_path)).name if model_path else "illada-demo"
    click.echo(f"serving {name} on http://{host}:{port}/v1", err=True)
    uvicorn.run(make_app(Engine(model, tok, name, max_queue)), host=host, port=port, log_level="warning")


# ------------------------------------------------------------------------------------------ bench
@main.command()
@click.option("--model", "model_path", default=None, help="Model dir (default: the demo model, or --shape).")
@click.option("--shape", type=click.Choice(["tiny", "small", "8b"]), default=None,
              help="A random-weight model of this shape instead of a checkpoint (8b = iLLaDA-8B dims).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--modes", default="exact,fast", show_default=True, help="Comma list of exact,variable,fast,fast_fixed.")
@click.option("--gen-length", type=int, default=256, show_default=True)
@click.option("--block-length", type=int, default=32, show_default=True)
@click.option("--prompt-lengths", default="auto", show_default=True,
              help="Comma list of prompt lengths (random tokens), or auto: demo prompts / 16,128.")
@click.option("--repeats", type=int, default=1, show_default=True)
@click.option("--baselines", default="", help="Comma list of torch,ar: the official PyTorch loop, mlx-lm AR.")
@click.option("--json", "json_out", default=None, help="Write the results JSON here.")
@click.option("--plot", "plot_out", default=None, help="Write a PNG here (needs matplotlib).")
def bench(model_path, shape, dtype, modes, gen_length, block_length, prompt_lengths, repeats, baselines, json_out,
          plot_out):
    """Tokens/s (to EOS), forwards, tokens per forward, processed tokens, memory, per mode, with baselines."""
    import json
    import time as _time

    import mlx.core as mx

    from . import bench as B
    from .runner import build_prompt

    tok = None
    if shape:
        model = B.random_model(shape, getattr(mx, dtype))
        name = f"random {shape} ({dtype})"
    else:
        model, tok = _load(model_path)
        name = model_path or "illada-demo"
    if prompt_lengths == "auto" and tok is not None:
        texts = ["reverse qwerty", "sort 9 3 7 1 4 2"]  # the demo model's longest in-distribution answers
        prompts = {len(p): p for p in (build_prompt(tok, [{"role": "user", "content": t}]) for t in texts)}
    else:
        lens = [16, 128] if prompt_lengths == "auto" else [int(x) for x in prompt_lengths.split(",")]
        import numpy as np

        rng = np.random.default_rng(0)
        prompts = {n: rng.integers(10, model.args.vocab_size, n).tolist() for n in lens}
    mode_list = [m for m in modes.split(",") if m]
    bad = [m for m in mode_list if m not in B.MODES]
    if bad:
        raise IlladaError(f"unknown mode {bad[0]!r}; choose from {', '.join(B.MODES)}")
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    runs = B.bench_modes(model, prompts, mode_list, gen_length, repeats, tok, block_length, log)
    base = [b for b in baselines.split(",") if b]
    first_prompt = next(iter(prompts.values()))
    if "torch" in base:
        r = B.bench_torch(model, first_prompt, gen_length, block_length, log)
        runs += [r] if r else []
    if "ar" in base:
        r = B.bench_ar(model.args, len(first_prompt), gen_length, log)
        runs += [r] if r else []
    result = {"model": name, "gen_length": gen_length, "block_length": block_length, "repeats": repeats,
              "date": _time.strftime("%Y-%m-%d"), "machine": B.machine(), "runs": runs}
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2))
    if plot_out:
        B.plot(result, plot_out)
    exact = [r for r in runs if r["mode"] == "exact"]
    for r in runs:
        if exact and r["mode"] != "exact":
            e = next((x for x in exact if x["prompt_tokens"] == r["prompt_tokens"]), exact[0])
            click.echo(f"{r['mode']} vs exact (prompt {r['prompt_tokens']}): "
                       f"{r['tokens_per_s'] / e['tokens_per_s']:.2f}x tokens/s, "
                       f"{e['processed_per_output_token'] / r['processed_per_output_token']:.2f}x fewer processed "
                       "tokens per output token")


if __name__ == "__main__":
    main()
