"""Tensor and data parallel under `mlx.launch --backend ring -n 2` on this machine (CPU backend).

Launches of tests/dist_worker.py: one runs every check (each rank writes what it saw); the others have
rank 1 stop answering, die, or miss its model directory. One launches `illada-mlx serve` and talks to it
over HTTP. The oracle is this process: the unsharded
model's logits, the single-process tokens, scores, bench rows and command output.
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from fixtures import Spec, reply, write_checkpoint
from mlx.utils import tree_flatten

HERE = Path(__file__).parent
LAUNCH = Path(sys.executable).parent / "mlx.launch"
pytestmark = [
    pytest.mark.slow,  # every test launches processes
    pytest.mark.skipif(
        not LAUNCH.exists() and shutil.which("mlx.launch") is None,
        reason="mlx.launch is not installed (it comes with mlx)",
    ),
]

DECODE = {  # few forwards: each costs several collectives
    "exact": dict(mode="exact", max_tokens=16, block_length=16, steps_per_block=8, temperature=0.0),
    "fast": dict(mode="fast", max_tokens=16, block_length=8, temperature=0.0, threshold=0.9),
    "sampled": dict(mode="exact", max_tokens=16, block_length=16, steps_per_block=4, temperature=0.8, seed=1),
}
PROMPT = [1, 10, 11, 12, 13, 14]
IDS = [[1, 9, 5, 5, 30, 31, 40], [1, 5, 40]]
CHUNK_FORWARDS = 4  # 2 requests per chunk at mc_num 4, batch 2: 5 chunks to split across the ranks
REQUESTS = [(f"reverse {w}", " " + w[::-1]) for w in ("ab", "cat", "dog", "moon", "x", "sun", "tree", "pq", "ok", "z")]
GENERATE = ["--prompt", "reverse ab", "--mode", "exact", "--max-tokens", "16", "--block-length", "16", "--json"]
CHAT = ["chat", "--mode", "fast", "--max-tokens", "16", "--block-length", "16"]
CHAT_IN = "reverse ab\nsort 3 1 2\n/quit\n"
BENCH = [
    "bench",
    "--shape",
    "tiny",
    "--gen-length",
    "16",
    "--block-length",
    "16",
    "--modes",
    "exact,fast",
    "--prompt-lengths",
    "8,12",
]
SAME = (
    "mode",
    "gen_length",
    "prompt_tokens",
    "block_refresh",
    "nfe",
    "output_tokens",
    "tokens_crc32",
    "processed_per_output_token",
)


def launch(plan: dict, tmp: Path, seconds: int, env=None):
    import os

    (tmp / "plan.json").write_text(json.dumps(plan))
    exe = str(LAUNCH) if LAUNCH.exists() else shutil.which("mlx.launch")
    t0 = time.perf_counter()
    p = subprocess.run(
        [
            exe,
            "--backend",
            "ring",
            "-n",
            "2",
            "--python",
            sys.executable,
            str(HERE / "dist_worker.py"),
            str(tmp / "plan.json"),
        ],
        capture_output=True,
        text=True,
        timeout=seconds,
        env={**os.environ, **(env or {})},
    )
    return p, time.perf_counter() - t0


def mlx_dir(tmp: Path, name: str, spec: Spec, **q) -> str:
    from illada_mlx_convert import convert

    hf, out = tmp / f"hf-{name}", tmp / name
    write_checkpoint(hf, spec)
    convert(str(hf), str(out), progress=False, **q)
    return str(out)


def rel_err(a, b) -> float:
    a, b = np.array(a), np.array(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The models, the single-process results, and what each rank saw (one launch)."""
    from illada_mlx.cli import main
    from illada_mlx.lm_eval_model import IlladaLM
    from illada_mlx.load import load

    tmp = tmp_path_factory.mktemp("dist")
    q = dict(quantize=True, q_group_size=32)  # o_proj's 64 inputs split in two: whole groups of 32
    models = {
        "illada": mlx_dir(tmp, "illada", Spec()),
        "llada": mlx_dir(tmp, "llada", Spec(layout="llada", tied=False, seed=1)),
    }
    models["illada_q"] = mlx_dir(tmp, "illada_q", Spec(), **q)
    models["llada_q"] = mlx_dir(tmp, "llada_q", Spec(layout="llada", tied=False, seed=1), **q)
    kv1 = mlx_dir(tmp, "kv1", Spec(kv_heads=1, seed=2))
    nan = mlx_dir(tmp, "nan", Spec(seed=3))  # a NaN in rank 0's rows of one weight only
    w = mx.load(str(Path(nan) / "model.safetensors"))
    w["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")
    mx.save_safetensors(str(Path(nan) / "model.safetensors"), w)
    out = tmp / "out"
    out.mkdir()
    bench_json, compare_json, data = tmp / "bench2.json", tmp / "compare2.json", tmp / "items.jsonl"
    data.write_text("".join(json.dumps({"prompt": c, "answer": a}) + "\n" for c, a in REQUESTS[:5]))
    compare = [
        "eval",
        "--compare",
        models["illada"],
        models["illada_q"],
        "--data",
        str(data),
        "--mc-num",
        "4",
        "--batch-size",
        "2",
    ]
    plan = {
        "mode": "checks",
        "out": str(out),
        "chunk_forwards": CHUNK_FORWARDS,
        "models": models,
        "ids": IDS,
        "prompt": PROMPT,
        "decode": DECODE,
        "kv1": kv1,
        "nan": nan,
        "mismatch": [models["illada"], models["illada_q"]],
        "dp_model": models["illada"],
        "requests": REQUESTS,
        "commands": {
            "generate": ["generate", "--model", models["illada"], *GENERATE],
            "bench": [*BENCH, "--json", str(bench_json)],
            "heads": ["generate", "--model", kv1, "-p", "hi"],
            "stdin": ["generate", "--model", models["illada"], "--prompt", "-"],
            "chat": [*CHAT, "--model", models["illada"]],
            "compare": [*compare, "--json", str(compare_json)],
        },
        "inputs": {"chat": CHAT_IN},
    }
    p, seconds = launch(plan, tmp, 240)
    ranks = [
        json.loads((out / f"rank{r}.json").read_text()) if (out / f"rank{r}.json").exists() else None for r in range(2)
    ]
    assert ranks[0] and ranks[1], f"a rank wrote nothing: {p.stdout[-2000:]} {p.stderr[-2000:]}"

    one = {}
    for name, path in models.items():
        model, tok = load(path)
        from dist_worker import logits_of

        one[name] = {
            "logits": logits_of(model, IDS),
            "param_bytes": sum(v.nbytes for _, v in tree_flatten(model.parameters())),
            **{mode: reply(model, tok, PROMPT, **s)[1] for mode, s in DECODE.items()},
        }
    import illada_mlx.likelihood

    old, illada_mlx.likelihood.CHUNK_FORWARDS = illada_mlx.likelihood.CHUNK_FORWARDS, CHUNK_FORWARDS
    model, tok = load(models["illada"])
    lm = IlladaLM(model=model, tokenizer=tok, mc_num=4, batch_size=2)
    lm.decode = {"mode": "fast", "max_tokens": 16, "block_length": 16}
    from dist_worker import Request

    one["data"] = {
        "loglikelihood": [list(x) for x in lm.loglikelihood([Request(c, a) for c, a in REQUESTS], disable_tqdm=True)],
        "generate_until": lm.generate_until(
            [Request(c, {"until": ["\n"], "max_gen_toks": 16}) for c, _ in REQUESTS[:3]], disable_tqdm=True
        ),
        "rolling": lm.loglikelihood_rolling([Request(c + a) for c, a in REQUESTS[:3]], disable_tqdm=True),
    }
    r = CliRunner().invoke(main, ["generate", "--model", models["illada"], *GENERATE])
    one["generate"] = json.loads(r.stdout)
    one["chat"] = CliRunner().invoke(main, [*CHAT, "--model", models["illada"]], input=CHAT_IN).stdout
    bench1 = tmp / "bench1.json"
    assert CliRunner().invoke(main, [*BENCH, "--json", str(bench1)]).exit_code == 0
    one["bench"], one["bench2"] = json.loads(bench1.read_text()), json.loads(bench_json.read_text())
    compare1 = tmp / "compare1.json"
    assert CliRunner().invoke(main, [*compare, "--json", str(compare1)]).exit_code == 0
    one["compare"], one["compare2"] = json.loads(compare1.read_text()), json.loads(compare_json.read_text())
    illada_mlx.likelihood.CHUNK_FORWARDS = old
    return {"ranks": ranks, "one": one, "seconds": seconds, "models": models}


@pytest.mark.parametrize("name", ["illada", "llada", "illada_q", "llada_q"])
def test_sharded_logits_and_tokens_equal_one_process(launched, name):
    one = launched["one"][name]
    for r in launched["ranks"]:
        got = r["tensor"][name]
        assert got["heads"] == [2, 1]  # 4 query heads and 2 KV heads, split in two
        assert got["cache_kv_heads"] == 1  # the block cache holds this rank's KV heads only
        assert rel_err(got["logits"], one["logits"]) <= 1e-5
        assert got["exact"] == one["exact"] and got["fast"] == one["fast"]  # T = 0
        assert got["param_bytes"] <= 0.55 * one["param_bytes"]
    # sampling: both ranks draw the same tokens (one seed, the same logits)
    assert launched["ranks"][0]["tensor"][name]["sampled"] == launched["ranks"][1]["tensor"][name]["sampled"]


def test_refusals_are_one_line(launched):
    for r in launched["ranks"]:
        heads, files = r["refusals"]["heads"], r["refusals"]["files"]
        assert heads and "2 ranks cannot split the model's 1 key/value heads" in heads and "\n" not in heads
        assert files and "rank 1 has a different model from rank 0" in files and "\n" not in files
        assert r["refusals"]["nan"].startswith("NaN or infinite values in model.layers.1.self_attn.q_proj.weight")
    cmds = [r["commands"] for r in launched["ranks"]]
    assert cmds[0]["heads"]["code"] == 1 and cmds[0]["heads"]["stderr"].startswith("error: 2 ranks cannot split")
    assert cmds[1]["heads"]["stderr"].startswith("error: rank 1: 2 ranks cannot split")
    assert cmds[0]["stdin"]["code"] == 1 and "--prompt - does not work under mlx.launch" in cmds[0]["stdin"]["stderr"]
    assert len(cmds[0]["stdin"]["stderr"].splitlines()) == 1


def test_generate_prints_on_rank_0_only_and_matches_one_process(launched):
    cmds = [r["commands"]["generate"] for r in launched["ranks"]]
    assert cmds[0]["code"] == cmds[1]["code"] == 0, cmds
    assert json.loads(cmds[0]["stdout"])["tokens"] == launched["one"]["generate"]["tokens"]
    assert cmds[1]["stdout"] == "" and cmds[1]["stderr"] == ""


def test_chat_reads_on_rank_0_and_answers_as_one_process(launched):
    cmds = [r["commands"]["chat"] for r in launched["ranks"]]
    assert cmds[0]["code"] == cmds[1]["code"] == 0, cmds
    assert cmds[0]["stdout"] == launched["one"]["chat"] and cmds[0]["stdout"].count("\n") == 2
    assert cmds[1]["stdout"] == ""


def test_data_parallel_scores_equal_one_process(launched):
    for r in launched["ranks"]:
        assert r["data"] == launched["one"]["data"]  # every score bit for bit, in order, on every rank


def test_data_parallel_compare_equals_one_process(launched):
    one, two = launched["one"]["compare"], launched["one"]["compare2"]
    assert one["items"] == 5 and one == two


def test_data_parallel_bench_equals_one_process(launched):
    one, two = launched["one"]["bench"], launched["one"]["bench2"]
    assert two["ranks"] == 2 and two["parallel"] == "data" and len(two["runs"]) == len(one["runs"]) == 4
    for a, b in zip(one["runs"], two["runs"]):
        assert {k: a[k] for k in SAME} == {k: b[k] for k in SAME}
    assert launched["ranks"][1]["commands"]["bench"]["stdout"] == ""


def test_split_shares_restore_the_order():
    from illada_mlx.distributed import split

    for n in range(9):
        for size in (1, 2, 3, 4):
            parts = [split(list(range(n)), r, size) for r in range(size)]
            assert sum(parts, []) == list(range(n)) and max(map(len, parts)) - min(map(len, parts)) <= 1


def test_a_rank_without_the_model_says_so_and_ends_the_launch(launched, tmp_path):
    plan = {"mode": "missing", "out": str(tmp_path), "paths": [launched["models"]["illada"], str(tmp_path / "nope")]}
    p, seconds = launch(plan, tmp_path, 60, env={"ILLADA_DIST_TIMEOUT": "20"})
    assert seconds < 30
    assert f"error: rank 1: {tmp_path / 'nope'}: no such directory" in p.stdout + p.stderr


def test_a_rank_that_dies_ends_the_launch(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    p, seconds = launch({"mode": "die", "out": str(out)}, tmp_path, 60, env={"ILLADA_DIST_TIMEOUT": "20"})
    assert seconds < 30 and not (out / "rank0.json").exists()
    # whichever is seen first: mlx.launch stops rank 0 (blocked in a collective) when rank 1 exits with an
    # error, or rank 0's ring sees its peer's socket close while rank 1 is still exiting, and fails
    said = p.stdout + p.stderr
    assert "rank 1 exited with code 3" in said or ("closed by the peer" in said and "rank 0 exited with code 1" in said)


def test_a_rank_that_stops_answering_ends_the_launch(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    p, seconds = launch({"mode": "hang", "out": str(out)}, tmp_path, 60, env={"ILLADA_DIST_TIMEOUT": "2"})
    assert seconds < 30
    assert "error: rank 0: no reply from the other ranks for 2 s (a rank died?); exiting" in p.stdout + p.stderr
    assert not (out / "rank0.json").exists()


# ------------------------------------------------------------------------------------------ serve
SERVE = {"mode": "exact", "block_length": 8, "steps_per_block": 4}  # 2 blocks of 16 tokens: a check per block
MESSAGES = [{"role": "user", "content": "reverse ab"}]


def test_spec_survives_json():
    from illada_mlx.spec import DecodeSpec

    spec = DecodeSpec(mask_id=5, stop=("a", "bc"), think_boost=(100.0, 3.0), seed=7, temperature=0.5)
    assert DecodeSpec.from_dict(json.loads(json.dumps(spec.as_dict()))) == spec
    assert DecodeSpec.from_dict(json.loads(json.dumps(DecodeSpec(mask_id=5).as_dict()))) == DecodeSpec(mask_id=5)


def watchdog_seconds(one_request: float) -> int:
    """ILLADA_DIST_TIMEOUT for a healthy launch on this machine, from how long this process took to answer
    the same request alone: the watchdog must outlast a healthy rank's longest quiet spell (loading, the
    first forward's graph building), and that grows with the machine's speed and load as the request does.
    On a 2-core machine at load 3 the request takes ~0.09 s (22 s here) and a healthy launch needed more
    than 8 s."""
    return int(min(120, max(8, 250 * one_request)))


def test_serve_on_two_ranks_answers_as_one_process_and_ends_with_the_server(tmp_path):
    """`illada-mlx serve` on 2 ranks: rank 0 listens, rank 1 decodes with it; the replies equal one process's,
    a stream left after its first step stops both ranks at the same block (the next reply is still right),
    the ranks idle past ILLADA_DIST_TIMEOUT without the watchdog ending them, and Ctrl-C (SIGINT to the
    launch's process group) ends the whole launch."""
    import os
    import signal
    import socket

    import httpx

    from illada_mlx.engine import build_prompt, stream_generate
    from illada_mlx.load import load

    path = mlx_dir(tmp_path, "illada", Spec())
    model, tok = load(path)
    ids = build_prompt(tok, MESSAGES)

    def one(**s):
        return "".join(r.text for r in stream_generate(model, tok, ids, **SERVE, **s))

    t0 = time.perf_counter()
    greedy = one(max_tokens=16, temperature=0.0)
    watchdog = watchdog_seconds(time.perf_counter() - t0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = str(LAUNCH) if LAUNCH.exists() else shutil.which("mlx.launch")
    cli = Path(sys.executable).parent / "illada-mlx"
    log = tmp_path / "serve.log"
    with open(log, "w") as out:  # --port, not -p (mlx.launch's own); no --host (an abbreviation of its --hosts)
        p = subprocess.Popen(
            [
                exe,
                "--backend",
                "ring",
                "-n",
                "2",
                "--python",
                sys.executable,
                str(cli if cli.exists() else shutil.which("illada-mlx")),
                "serve",
                "--model",
                path,
                "--port",
                str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "ILLADA_DIST_TIMEOUT": str(watchdog)},
        )
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=60) as http:
            for _ in range(300):
                try:
                    if http.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert p.poll() is None, log.read_text()
                time.sleep(0.1)
            ready = time.perf_counter()
            time.sleep(max(0.0, ready + watchdog + 1 - time.perf_counter()))  # idle past the watchdog: it waits

            def ask(stream=False, **s):
                body = {"messages": MESSAGES, "max_tokens": 16, "stream": stream, "diffusion": SERVE, **s}
                return http.post(f"{url}/v1/chat/completions", json=body)

            r = ask(temperature=0.0)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == greedy
            chunks = [
                json.loads(x[6:])
                for x in ask(stream=True, temperature=0.8, seed=3).text.split("\n\n")
                if x.startswith("data: {")
            ]
            sampled = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            assert sampled == one(max_tokens=16, temperature=0.8, seed=3)
            long = {
                "messages": MESSAGES,
                "max_tokens": 480,
                "stream": True,  # 60 blocks: left after one step
                "diffusion": {**SERVE, "steps": True},
            }
            with http.stream("POST", f"{url}/v1/chat/completions", json=long) as s:
                next(x for x in s.iter_lines() if '"diffusion"' in x)
            r = ask(temperature=0.0)  # the ranks are still in step
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == greedy
        time.sleep(0.5)  # mlx.launch passes the ranks' output on every 0.1 s; Ctrl-C ends that at once
        t0 = time.perf_counter()
        os.killpg(p.pid, signal.SIGINT)  # Ctrl-C: every process of the launch; rank 1 ignores it
        p.wait(timeout=30)  # the launcher waits for both ranks: rank 1 ends only when rank 0 tells it
        assert time.perf_counter() - t0 < 30
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    text = log.read_text()
    assert "tensor parallel over 2 ranks: one request at a time" in text
    cancelled = [line for line in text.splitlines() if "request cancelled after block" in line]
    assert len(cancelled) == 1 and int(cancelled[0].split("after block ")[1].split()[0]) < 60, text
