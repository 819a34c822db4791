"""One rank of the tensor/data-parallel checks (tests/test_distributed.py launches it with mlx.launch).

    mlx.launch --backend ring -n 2 --python PY tests/dist_worker.py PLAN.json

PLAN.json: {"out": DIR, "mode": "checks" | "hang" | "die" | "missing", ...}; each rank writes OUT/rank{r}.json with what it
saw, and the test compares those with the single-process results it computes itself.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from illada_mlx import distributed as dist
from illada_mlx.config import IlladaError


class Request:  # what lm-eval hands a model: `.args`
    def __init__(self, *args):
        self.args = args


def logits_of(model, ids):
    from illada_mlx.decode import left_pad

    x, valid = left_pad(ids, model.args.pad_token_id or 0)
    return model(x, valid).astype(mx.float32).tolist()


def tensor_checks(plan, g) -> dict:
    from fixtures import reply

    from illada_mlx.cache import BlockCache
    from illada_mlx.load import load

    out = {}
    for name, path in plan["models"].items():
        model, tok = load(path, group=g)
        r = {
            "logits": logits_of(model, plan["ids"]),
            "param_bytes": sum(v.nbytes for _, v in tree_flatten(model.parameters())),
            "heads": [model.layers[0].self_attn.n_heads, model.layers[0].self_attn.n_kv_heads],
        }
        cache = BlockCache()  # the fast mode's: what its buffers hold
        for mode, settings in plan["decode"].items():
            extra = {"prompt_cache": cache} if mode == "fast" else {}
            r[mode] = reply(model, tok, plan["prompt"], **settings, **extra)[1]
        r["cache_kv_heads"] = cache.keys[0].shape[1]
        out[name] = r
    return out


def refusals(plan, g) -> dict:
    from illada_mlx.load import load

    out = {}
    mine = plan["mismatch"][g.rank() % len(plan["mismatch"])]
    for what, path in (("heads", plan["kv1"]), ("files", mine), ("nan", plan["nan"])):
        try:
            load(path, group=g)
            out[what] = None
        except IlladaError as e:
            out[what] = str(e)
    return out


def data_parallel(plan, g) -> dict:
    from illada_mlx.lm_eval_model import IlladaLM
    from illada_mlx.load import load

    model, tok = load(plan["dp_model"])
    lm = IlladaLM(model=model, tokenizer=tok, mc_num=4, batch_size=2, group=g)
    lm_one = IlladaLM(model=model, tokenizer=tok, mc_num=4, batch_size=2)
    lm.decode = lm_one.decode = {"mode": "fast", "max_tokens": 16, "block_length": 16}
    reqs = [Request(c, a) for c, a in plan["requests"]]
    gens = [Request(c, {"until": ["\n"], "max_gen_toks": 16}) for c, _ in plan["requests"][:3]]
    return {
        "loglikelihood": [list(x) for x in lm.loglikelihood(reqs, disable_tqdm=True)],
        "generate_until": lm.generate_until(gens, disable_tqdm=True),
        "rolling": lm.loglikelihood_rolling([Request(c + a) for c, a in plan["requests"][:3]], disable_tqdm=True),
    }


def commands(plan, g) -> dict:
    """The command line under mlx.launch: rank 0 prints, the others print nothing but errors."""
    from click.testing import CliRunner

    from illada_mlx.cli import main

    out = {}
    for name, argv in plan["commands"].items():
        t0 = time.perf_counter()
        r = CliRunner().invoke(main, argv, input=plan.get("inputs", {}).get(name))  # stdin: rank 0 reads it
        out[name] = {
            "code": r.exit_code,
            "stdout": r.stdout,
            "stderr": r.stderr,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    return out


def main():
    import illada_mlx.likelihood

    plan = json.loads(Path(sys.argv[1]).read_text())
    illada_mlx.likelihood.CHUNK_FORWARDS = plan.get("chunk_forwards", 256)  # small chunks: several to split
    g = dist.group()
    out = Path(plan["out"])
    result = {"rank": g.rank(), "size": g.size()}
    if plan["mode"] == "missing":  # each rank its own --model: rank 1's does not exist
        from click.testing import CliRunner

        from illada_mlx.cli import main as cli

        r = CliRunner().invoke(cli, ["generate", "--model", plan["paths"][g.rank()], "--prompt", "hi"])
        sys.__stderr__.write(r.stderr)
        sys.exit(r.exit_code)
    if plan["mode"] in ("hang", "die"):  # rank 1 stops answering (rank 0's watchdog must end it), or dies
        if g.rank() == 1:
            time.sleep(120) if plan["mode"] == "hang" else sys.exit(3)
        dist.watch(g)  # as a tensor-parallel load starts it
        dist.barrier(g)
        result["passed_barrier"] = True
    else:
        result["seconds"] = {}
        for name, check in (
            ("tensor", tensor_checks),
            ("refusals", refusals),
            ("data", data_parallel),
            ("commands", commands),
        ):
            t0 = time.perf_counter()
            result[name] = check(plan, g)
            result["seconds"][name] = round(time.perf_counter() - t0, 2)
    (out / f"rank{g.rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
