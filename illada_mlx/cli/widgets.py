"""The terminal's widgets: a progress status beside the streamed reply, the canvas drawn as it is denoised,
and the texts of the stats a reply ends with."""

from __future__ import annotations

import shutil
import sys
import time

import click


def prompt_line(r) -> str:
    """The prompt's figures: a diffusion model has no prompt-only pass, so the rate is the first forward's,
    which runs the prompt and the masks together, labelled as such."""
    if r.first_forward_positions:
        return (
            f"Prompt: {r.prompt_tokens} tokens; first forward (prompt + masks): {r.first_forward_positions} "
            f"positions in {r.first_forward_s:.3f} s, {r.prompt_tps:.3f} positions-per-sec"
        )
    return f"Prompt: {r.prompt_tokens} tokens; first forward: {r.first_forward_s:.3f} s"


def stats_block(r, compute: str = "") -> str:
    """mlx-lm's stats block, plus the diffusion figures, what ran and the compute dtype (`compute`)."""
    sp, st = r.spec, r.stats
    what = (
        f"{sp.mode}: {sp.canvas} canvas, budget {sp.max_tokens}, block {sp.block_length}, "
        f"{sp.steps_per_block} steps/block, rule {sp.rule}"
        + (f" {sp.rule_number}" if sp.rule_number is not None else "")
        + stable_words(sp)
        + f", cache {sp.cache}"
        + (f", refresh {sp.block_refresh}" if sp.cache != "none" else "")
        + (f" ({st.drift_refreshes} whole-canvas)" if sp.cache != "none" and sp.block_refresh == "drift" else "")
    )
    return (
        "==========\n"
        f"{prompt_line(r)}\n"
        f"Generation: {r.generation_tokens} tokens, {st.tokens_per_s:.3f} tokens-per-sec\n"
        f"Diffusion: {st.nfe} forwards, {st.tokens_per_forward:.2f} tokens/forward, finish {r.finish_reason} "
        f"({what})\n"
        f"Peak memory: {r.peak_memory:.3f} GB" + (f"\nCompute: {compute}" if compute else "")
    )


def stable_words(sp) -> str:
    """', stable ≥ 0.9' when stable commits run beside the rule (rules.commit_stable), else ''."""
    return f", stable ≥ {sp.stable_threshold}" if sp.stable else ""


def compute_note(model) -> str:
    """'float32 on cpu': the dtype the model computes in, on which backend (backend.py chose it)."""
    from ..backend import backend_name, compute_dtype

    return f"{compute_dtype(model)} on {backend_name()}"


def settings_text(sp) -> str:
    """chat's /settings: the decode settings a person chooses, one topic per line."""
    commits = f"{sp.rule} {sp.rule_number}" if sp.rule_number is not None else f"{sp.rule} ({sp.remasking})"
    commits += stable_words(sp)
    sampling = (
        "temperature 0 (greedy)"
        if sp.temperature == 0
        else (f"temperature {sp.temperature}, top_p {sp.top_p}, top_k {sp.top_k}, min_p {sp.min_p}")
    )
    seed = "none" if sp.seed is None else sp.seed
    cache = f"{sp.cache}, block refresh {sp.block_refresh}" if sp.cache != "none" else "none"
    cache += f" (drift threshold {sp.drift_threshold})" if sp.cache != "none" and sp.block_refresh == "drift" else ""
    ends = ", ".join(f"{n} {t}" for n, t in (("EOS", sp.eos_id), ("EoT", sp.eot_id)) if t is not None)
    stops = ", ".join(repr(x) for x in sp.stop) or "none"
    lines = [
        f"mode: {sp.mode} ({sp.canvas} canvas, budget {sp.max_tokens} tokens)",
        f"blocks: {sp.block_length} tokens, {sp.steps_per_block} steps each",
        f"commits: {commits}",
        f"sampling: {sampling}; seed {seed}",
        f"cache: {cache}",
        f"ends: {ends or 'none'}; stop strings: {stops}",
    ]
    if sp.think_boost or sp.cfg_scale:
        lines.append(f"extras: think boost {sp.think_boost}, cfg scale {sp.cfg_scale}")
    return "\n".join(lines)


class Progress:
    """A status on a terminal's stderr while a reply is written (block of the budget, tokens/s); nothing
    when stderr is not a terminal. When stdout is the same terminal the status sits after the streamed
    text and is erased before more text is written."""

    def __init__(self, enabled=None):
        self.on = sys.stderr.isatty() if enabled is None else enabled
        self.inline = self.on and sys.stdout.isatty()
        self.shown, self.col, self.last, self.msg = 0, 0, 0.0, ""
        self.width = shutil.get_terminal_size().columns

    def _draw(self):
        if not self.msg:
            return
        msg = f" [{self.msg}]" if self.inline else self.msg
        if self.inline and self.col + len(msg) >= self.width:
            return
        sys.stdout.flush()
        sys.stderr.write(msg if self.inline else "\r\033[K" + msg)
        sys.stderr.flush()
        self.shown = len(msg)

    def clear(self):
        if self.on and self.shown:
            sys.stderr.write(f"\033[{self.shown}D\033[K" if self.inline else "\r\033[K")
            sys.stderr.flush()
            self.shown = 0

    def status(self, msg: str, force: bool = False):
        now = time.perf_counter()
        if not self.on or (not force and now - self.last < 0.1):
            return
        self.last, self.msg = now, msg
        self.clear()
        self._draw()

    def text(self, s: str):
        """Write reply text to stdout, keeping the status out of its way."""
        if not s:
            return
        self.clear()
        sys.stdout.write(s)
        sys.stdout.flush()
        self.col = len(s.rsplit("\n", 1)[-1]) if "\n" in s else self.col + len(s)
        self._draw()

    def done(self):
        self.clear()
        self.msg = ""


def first_forward_log(model, prompt_tokens: int, progress: Progress):
    """The wait before the first forward ends (minutes for a big model on a CPU): a status on a terminal;
    in a log, for a model of progress.LOG_BELOW bytes or more, a line when it starts and one when it ends.
    Returns the step hook that ends it (None when there is nothing to end)."""
    from ..bench import parameter_bytes
    from ..progress import LOG_BELOW

    what = f"first forward: the prompt ({prompt_tokens} tokens) and the masks"
    t0 = time.perf_counter()
    if progress.on:
        progress.status(f"{what} ...", force=True)
        return None
    if sys.stderr.isatty() or parameter_bytes(model) < LOG_BELOW:
        return None
    click.echo(f"{what} ...", err=True)
    done = []

    def end(ev):
        if not done:
            done.append(True)
            positions = ev.canvas.shape[0] * ev.canvas.shape[1]
            click.echo(f"first forward done: {positions} positions in {time.perf_counter() - t0:.1f} s", err=True)

    return end


def stream_reply(model, tok, ids, settings, progress: Progress, cache=None, on_step=None, show_text=True):
    """Stream one reply to stdout (show_text) with a progress status; returns (last Response, text, tokens)."""
    from ..engine import stream_generate

    t0 = time.perf_counter()
    n, total = [0], [0]
    log = first_forward_log(model, len(ids), progress)

    def step(ev):
        if on_step is not None:
            on_step(ev)
        if log is not None:
            log(ev)
        if total[0]:
            tps = n[0] / max(time.perf_counter() - t0, 1e-9)
            progress.status(f"block {ev.block + 1}/{total[0]}, step {ev.step + 1}, {n[0]} tokens, {tps:.1f} tok/s")

    r, parts, tokens = None, [], []
    try:
        for r in stream_generate(model, tok, ids, prompt_cache=cache, on_step=step, **settings):
            total[0], n[0] = r.blocks, r.generation_tokens
            parts.append(r.text)
            tokens.extend(r.tokens)
            if show_text:
                progress.text(r.text)
    finally:
        progress.done()
    return r, "".join(parts), tokens


def reply_json(r, text: str, tokens: list, model) -> dict:
    """generate --json's object: the reply, its settings and its stats."""
    from ..backend import backend_name, compute_dtype

    stats = {
        **r.stats.as_dict(),
        "prompt_tps": r.prompt_tps,
        "first_forward_s": r.first_forward_s,
        "first_forward_positions": r.first_forward_positions,
        "compute_dtype": compute_dtype(model),
        "backend": backend_name(),
    }
    return {
        "text": text,
        "tokens": tokens,
        "finish_reason": r.finish_reason,
        "prompt_tokens": r.prompt_tokens,
        "settings": r.spec.as_dict(),
        "stats": stats,
    }


def stdout_is_terminal() -> bool:
    """`chat --visual` draws frames only on a terminal (a test replaces this to see them)."""
    return sys.stdout.isatty()


class CanvasView:
    """Draws the reply's canvas in place: committed tokens as text, masked slots as ░."""

    MASK_GLYPH = "░"

    def __init__(self, tok, mask_id, prompt_len, out=None):
        self.tok, self.mask_id, self.P, self.out = tok, mask_id, prompt_len, out or sys.stdout
        self.pieces = {mask_id: self.MASK_GLYPH}  # token id -> its text, decoded once per id
        self.out.write("\0337")  # save the cursor: every frame redraws from here

    def frame(self, ev):
        import numpy as np

        if 0 not in ev.rows:
            return
        row = np.array(ev.canvas[ev.rows.index(0), self.P :]).tolist()
        for t in set(row) - self.pieces.keys():
            self.pieces[t] = self.tok.decode([t])
        parts = [self.pieces[t] for t in row]
        self.out.write("\0338\033[J" + "".join(parts))
        self.out.flush()

    def finish(self, text):
        self.out.write("\0338\033[J" + text + "\n")
        self.out.flush()
