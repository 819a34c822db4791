"""`illada-mlx eval` and the lm-eval model on the bundled demo model, offline: a multiple-choice task built
from the demo mix's held-out split (tests/data/demo_mc.jsonl, written by `python -m training.mc_task --n 5
--out tests/data/demo_mc.jsonl`), and the comparison of two conversions."""

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from illada_mlx.cli import main

DATA = Path(__file__).parent / "data" / "demo_mc.jsonl"
TASK = """task: illada_demo_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
"""

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    (d / "demo_mc.yaml").write_text(TASK.format(data=DATA))
    return d


@pytest.mark.slow  # lm-eval end to end
def test_lm_eval_multiple_choice_on_the_demo_model(task_dir, tmp_path, monkeypatch):
    # likelihood (the official Monte-Carlo bound) picks the correct answer among 4 of the same family
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "r.json"
    r = CliRunner().invoke(
        main,
        [
            "eval",
            "--tasks",
            "illada_demo_mc",
            "--include-path",
            str(task_dir),
            "--apply-chat-template",
            "--mc-num",
            "16",
            "--batch-size",
            "16",
            "--no-greedy-check",
            "--json",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    acc = json.loads(out.read_text())["results"]["illada_demo_mc"]["acc,none"]
    n = sum(1 for _ in DATA.open())
    assert acc >= 0.9, (acc, n, r.output[-2000:])


def test_a_chat_templated_context_keeps_its_trailing_newline(demo):
    # a plain context's trailing whitespace moves into the continuation (the official eval_llada.py); a chat
    # template's "assistant" header ends with a newline that is prompt, so the answer is the answer alone
    from illada_mlx.engine import build_prompt
    from illada_mlx.lm_eval_model import IlladaLM

    model, tok = demo
    lm = IlladaLM(model=model, tokenizer=tok, mc_num=1, batch_size=1)
    ctx, cont = lm._encode_pair("79+79= ", "158")
    assert tok.decode(cont) == " 158" and tok.decode(ctx) == "79+79="
    msgs = [{"role": "user", "content": "79+79="}]
    ctx, cont = lm._encode_pair(lm.apply_chat_template(msgs), "158")
    assert ctx == build_prompt(tok, msgs) and cont == tok.encode("158", add_special_tokens=False)


def test_every_model_arg_from_a_string_reaches_the_model(demo, monkeypatch):
    # lm-eval's --model_args string: the likelihood's args typed, the seed and the decode settings checked by
    # their registry settings, lm-eval's own batch_size only where the string has none
    import importlib

    from illada_mlx.config import IlladaError
    from illada_mlx.lm_eval_model import IlladaLM

    model, tok = demo
    L = importlib.import_module("illada_mlx.load")  # the module (the package's `load` is the function)
    monkeypatch.setattr(L, "load", lambda path: (model, tok) if path == "DIR" else None)
    args = "path=DIR,mc_num=4,batch_size=2,cfg_scale=0.5,greedy_check=false,seed=7,mode=fast,threshold=0.8"
    lm = IlladaLM.create_from_arg_string(args, {"batch_size": 64})
    assert (lm.mc_num, lm.batch, lm.cfg, lm.greedy, lm.seed) == (4, 2, 0.5, False, 7)
    assert lm.decode == {"mode": "fast", "threshold": 0.8} and lm.model is model and lm.tok is tok
    lm = IlladaLM.create_from_arg_string("path=DIR,mc_num=64", {"batch_size": 16})
    assert (lm.mc_num, lm.batch, lm.cfg, lm.greedy, lm.seed, lm.decode) == (64, 16, 0.0, True, 0, {})
    with pytest.raises(IlladaError, match="multiple of batch_size"):
        IlladaLM.create_from_arg_string("path=DIR,mc_num=3,batch_size=2")
    with pytest.raises(IlladaError, match="not a number"):
        IlladaLM.create_from_arg_string("path=DIR,mc_num=many")
    with pytest.raises(IlladaError, match="seed"):
        IlladaLM.create_from_arg_string("path=DIR,seed=x")


@pytest.mark.slow  # lm-eval indexes every task it ships to find one
def test_unknown_task_and_bad_arguments_are_one_line(task_dir):
    for args, needle in (
        (["--tasks", "no_such_task", "--include-path", str(task_dir)], "unknown task"),
        (
            ["--tasks", "illada_demo_mc", "--mc-num", "10", "--batch-size", "4", "--include-path", str(task_dir)],
            "multiple of batch_size",
        ),
        ([], "either --tasks"),
        (["--compare", "a", "b"], "--data"),
    ):
        r = CliRunner().invoke(main, ["eval", *args])
        assert r.exit_code == 1 and r.output.startswith("error: ") and needle in r.output, r.output
        assert r.output.count("\n") == 1


@pytest.mark.slow  # two conversions, scored end to end
def test_compare_reports_what_a_conversion_cost(tmp_path):
    # float against a 2-bit conversion of the demo model, the same masks on both: the 2-bit model's answers
    # are worse, and the per-token log-likelihood difference's interval excludes 0
    from illada_mlx.demo import BUNDLED
    from illada_mlx_convert import convert

    convert(str(BUNDLED), str(tmp_path / "f32"), progress=False)
    convert(str(BUNDLED), str(tmp_path / "q2"), quantize=True, q_bits=2, q_group_size=32, progress=False)
    data = tmp_path / "d.jsonl"
    items = [json.loads(x) for x in DATA.read_text().splitlines()][:12]
    data.write_text(
        "".join(json.dumps({"prompt": it["prompt"], "answer": it["choices"][it["gold"]]}) + "\n" for it in items)
    )
    out = tmp_path / "c.json"
    r = CliRunner().invoke(
        main,
        [
            "eval",
            "--compare",
            str(tmp_path / "f32"),
            str(tmp_path / "q2"),
            "--data",
            str(data),
            "--mc-num",
            "16",
            "--batch-size",
            "16",
            "--json",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    lo, hi = res["ci95"]
    assert res["items"] == len(items) and res["greedy_exact_a"] > res["greedy_exact_b"]
    assert lo > 0 and res["greedy_agreement"] < 1 and "greedy answers agree" in r.stdout


# ------------------------------------------------------------------------------------------ hostile input
def _hostile(tmp: Path) -> list:
    """(what, extra eval args, a needle of the one error line): every input --compare reads, made bad."""

    def data(name, content):
        p = tmp / name
        p.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(p)

    fifo = tmp / "fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    ok = data("ok.jsonl", '{"prompt": "1+1=", "answer": "2"}\n')
    demo = ["--compare", "A", "B"]
    return [
        ("a device", [*demo, "--data", "/dev/zero"], "not a regular file"),
        ("a FIFO", [*demo, "--data", str(fifo)], "not a regular file"),
        ("a directory", [*demo, "--data", str(tmp)], "is a directory"),
        ("missing", [*demo, "--data", str(tmp / "nope.jsonl")], "cannot be read"),
        ("batch size 0", [*demo, "--data", ok, "--batch-size", "0"], "--batch-size"),
        ("seed -1", [*demo, "--data", ok, "--seed", "-1"], "--seed"),
        ("mc-num huge", [*demo, "--data", ok, "--mc-num", "1000000000000"], "--mc-num"),
        ("mc-num not a multiple", [*demo, "--data", ok, "--mc-num", "10", "--batch-size", "4"], "multiple"),
        ("cfg nan", [*demo, "--data", ok, "--cfg-scale", "nan"], "--cfg-scale"),
        ("cfg negative", [*demo, "--data", ok, "--cfg-scale", "-1"], "--cfg-scale"),
        ("limit 0", ["--tasks", "x", "--limit", "0"], "--limit"),
        ("fewshot -1", ["--tasks", "x", "--num-fewshot", "-1"], "--num-fewshot"),
        ("no include dir", ["--tasks", "x", "--include-path", str(tmp / "none")], "--include-path"),
        ("include is a file", ["--tasks", "x", "--include-path", ok], "--include-path"),
        ("json unwritable", [*demo, "--data", ok, "--json", "/proc/illada/out.json"], "cannot be written"),
        ("json a directory", [*demo, "--data", ok, "--json", str(tmp)], "--json"),
    ]


HOSTILE_DATA = [  # (what, the --data file's content, a needle) for lines read from a regular file
    ("deep JSON", "[" * 50_000 + "]" * 50_000 + "\n", "nested too deeply"),
    ("not UTF-8", b'{"prompt": "\xff", "answer": "2"}\n', "not UTF-8"),
    ("not an object", "[1, 2]\n", "expected a JSON object"),
    ("prompt a number", '{"prompt": 5, "answer": "2"}\n', "expected a JSON object"),
    ("empty answer", '{"prompt": "x", "answer": ""}\n', "non-empty string"),
    ("messages a number", '{"messages": 5, "answer": "2"}\n', '"messages" must be'),
    ("messages of lists", '{"messages": [["user", "x"]], "answer": "2"}\n', '"messages" must be'),
    ("role unhashable", '{"messages": [{"role": ["user"], "content": "x"}], "answer": "2"}\n', '"messages" must be'),
    ("no items", "\n\n", "no items"),
    ("not JSON", "{oops\n", "expected a JSON object"),
]


def test_eval_refuses_hostile_options_and_files_before_any_work(tmp_path):
    from fixtures import deadline

    for what, args, needle in _hostile(tmp_path):
        with deadline(20):
            r = CliRunner().invoke(main, ["eval", *args])
        assert r.exit_code == 1 and r.output.startswith("error: ") and r.output.count("\n") == 1, (what, r.output)
        assert needle in r.output and "Traceback" not in r.output, (what, r.output)
    assert not Path("/proc/illada").exists()


@pytest.mark.parametrize("what,content,needle", HOSTILE_DATA, ids=[h[0] for h in HOSTILE_DATA])
def test_eval_data_lines_are_checked(what, content, needle, tmp_path, demo):
    from illada_mlx.config import IlladaError
    from illada_mlx.evaluate import read_items

    p = tmp_path / "d.jsonl"
    p.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(IlladaError, match=needle.replace("(", r"\(")) as e:
        read_items(str(p), demo[1])
    assert "\n" not in str(e.value)


def test_eval_data_over_the_size_bound_is_refused_unread(tmp_path, monkeypatch, demo):
    from illada_mlx import evaluate as E
    from illada_mlx.config import IlladaError

    monkeypatch.setattr(E, "MAX_DATA_BYTES", 100)
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "1+1=", "answer": "2"}\n' * 10)
    with pytest.raises(IlladaError, match="more than 100 bytes"):
        E.read_items(str(p), demo[1])
