"""An lm-evaluation-harness model (`illada-mlx`) over the likelihood API and the engine.

    pip install 'illada-mlx[eval]'
    illada-mlx eval --model DIR --tasks TASKS            # registers this model, then runs lm-eval
    python -m illada_mlx.lm_eval_model --model illada-mlx --model_args path=DIR,mc_num=128 --tasks ...

- loglikelihood: the official Monte-Carlo bound (likelihood.log_likelihoods) with the official greedy
  check as `is_greedy`; context and continuation are encoded as the official eval_llada does (trailing
  spaces of the context move to the continuation, the pair is encoded together and split).
- loglikelihood_rolling: the same bound on the whole text with no prompt (texts longer than the context
  are scored in context-sized windows, summed). A diffusion model has no left-to-right factorization, so
  this is a bound on log p(text), not a sum of next-token log-probabilities.
- generate_until: engine.generate_text with `until` as stop strings and `max_gen_toks` as the budget, in
  the decoding mode given by the model args (mode, threshold, block_length, steps_per_block, ...).
- data parallel (`group`, under mlx.launch): lm-eval runs whole on every rank and sees one process
  (rank 0, world size 1); each of the three methods scores a contiguous share of its work (loglikelihood:
  of the request chunks one process would score together, so every score is the one-process score) and
  gathers every rank's results in order, so every rank returns the full list.
"""

from __future__ import annotations

import sys
from typing import Optional

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from .config import IlladaError
from .distributed import gather, split
from .engine import generate_text
from .likelihood import chunk_size, greedy_answers, log_likelihoods
from .settings import BY_NAME

_INT = {"mc_num", "batch_size"}  # the likelihood's own args; decode args and the seed are the registry's
_FLOAT = {"cfg_scale"}
SCORING_DEFAULTS = {"mc_num": 128, "batch_size": 32, "cfg_scale": 0.0, "greedy_check": True}  # the likelihood's args


def decode_arg(key: str, value):
    """A decode model arg, typed and checked by its registry setting (settings.py); other keys go to
    make_spec as they are (which refuses unknown ones)."""
    if key not in BY_NAME:
        return value
    label = f"model arg {key}"
    return BY_NAME[key].parse(value, label) if isinstance(value, str) else BY_NAME[key].check(value, label)


def _typed(key: str, value):
    if not isinstance(value, str):
        return value
    try:
        if key in _INT:
            return int(value)
        if key in _FLOAT:
            return float(value)
    except ValueError:
        raise IlladaError(f"model arg {key}={value!r} is not a number")
    if key == "greedy_check":
        return value.lower() in ("1", "true", "yes")
    return value


@register_model("illada-mlx")
class IlladaLM(LM):
    def __init__(self, path: Optional[str] = None, model=None, tokenizer=None, group=None, **model_args):
        """A checkpoint at `path` (loaded here), or a loaded `model` and `tokenizer`. model_args, as lm-eval's
        --model_args passes them (strings) or as values: the likelihood's mc_num (128), batch_size (32),
        cfg_scale (0.0) and greedy_check (True); the seed (0); every other key is a decode setting for
        generate_until (checked by its registry setting, and by make_spec, which refuses unknown keys)."""
        super().__init__()
        self.group = group if group is not None and group.size() > 1 else None
        scoring = {k: model_args.pop(k, default) for k, default in SCORING_DEFAULTS.items()}
        seed = model_args.pop("seed", 0)
        self.decode = {k: decode_arg(k, v) for k, v in model_args.items() if v is not None}  # before any loading
        self.seed = decode_arg("seed", seed)
        if model is None:
            from .load import load

            model, tokenizer = load(path)
        kw = {k: _typed(k, v) for k, v in scoring.items()}
        self.model, self.tok = model, tokenizer
        self.mc_num, self.batch, self.cfg = kw["mc_num"], kw["batch_size"], kw["cfg_scale"]
        self.greedy = kw["greedy_check"]
        self.templated = False  # set once lm-eval renders a prompt through the chat template
        if self.mc_num % self.batch:
            raise IlladaError(f"mc_num ({self.mc_num}) must be a multiple of batch_size ({self.batch})")

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv.strip())
        for k, v in (additional_config or {}).items():
            if v is not None and k in ("batch_size",) and str(v) != "auto":
                args.setdefault(k, v)
        return cls(**args)

    # -------------------------------------------------------------------------------- chat templates
    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tok, "name_or_path", "illada-mlx")

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        self.templated = True  # lm-eval asks for this only under --apply-chat-template
        return self.tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt, tokenize=False)

    # -------------------------------------------------------------------------------- data parallel
    def _share(self, items: list) -> list:
        return items if self.group is None else split(items, self.group.rank(), self.group.size())

    def _gather(self, results: list) -> list:
        return results if self.group is None else gather(self.group, results)

    # -------------------------------------------------------------------------------- scoring
    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids). A plain context's trailing whitespace moves into the continuation
        (" A" tokenizes as one token), as the official eval_llada.py and lm-eval's HF model do. A chat
        template's context keeps it: it ends with the template's own "assistant" header, which is prompt,
        not answer."""
        n = 0 if self.templated else len(context) - len(context.rstrip())
        if n:
            continuation, context = context[-n:] + continuation, context[:-n]
        whole, ctx = self._encode(context + continuation), self._encode(context)
        return ctx, whole[len(ctx) :]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        pairs = [self._encode_pair(*r.args) for r in requests]
        out = []
        step = chunk_size(self.mc_num, self.batch)  # requests scored together
        starts = self._share(list(range(0, len(pairs), step)))
        for s in tqdm(starts, disable=disable_tqdm, desc="loglikelihood", file=sys.stderr):
            chunk = pairs[s : s + step]
            scored = log_likelihoods(self.model, chunk, self.mc_num, self.batch, self.cfg, self.seed)
            greedy = (
                greedy_answers(self.model, [(p, len(a)) for p, a in chunk], self.cfg)
                if self.greedy
                else [None] * len(chunk)
            )
            out += [(sc.log_likelihood, g == a) for sc, g, (_, a) in zip(scored, greedy, chunk)]
        return [tuple(x) for x in self._gather(out)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        limit = self.model.args.max_position_embeddings
        out = []
        for r in tqdm(self._share(list(requests)), disable=disable_tqdm, desc="loglikelihood_rolling", file=sys.stderr):
            ids = self._encode(r.args[0])
            windows = [([], ids[i : i + limit]) for i in range(0, len(ids), limit)] or []
            out.append(
                sum(
                    sc.log_likelihood
                    for sc in log_likelihoods(self.model, windows, self.mc_num, self.batch, self.cfg, self.seed)
                )
                if windows
                else 0.0
            )
        return self._gather(out)

    # -------------------------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for r in tqdm(self._share(list(requests)), disable=disable_tqdm, desc="generate_until", file=sys.stderr):
            context, gen = r.args[0], dict(r.args[1] or {})
            until = gen.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            settings = dict(self.decode)
            if gen.get("max_gen_toks"):
                settings["max_tokens"] = int(gen["max_gen_toks"])
            out.append(generate_text(self.model, self.tok, self._encode(context), stop=tuple(until), **settings))
        return self._gather(out)


if __name__ == "__main__":  # lm-eval's own command line, with this model registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
