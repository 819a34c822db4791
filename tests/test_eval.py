"""`illada-mlx eval` and the lm-eval model on the bundled demo model, offline: a multiple-choice task built
from the demo mix's held-out split (tests/data/demo_mc.jsonl, written by bench/mc_task.py), and the
comparison of two conversions."""

import json
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


def test_lm_eval_multiple_choice_on_the_demo_model(task_dir, tmp_path, monkeypatch):
    # likelihood (the official Monte-Carlo bound) picks the correct answer among 4 of the same family
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["eval", "--tasks", "illada_demo_mc", "--include-path", str(task_dir),
                                  "--apply-chat-template", "--mc-num", "16", "--batch-size", "16", "--no-greedy-check",
                                  "--json", str(out)])
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


def test_unknown_task_and_bad_arguments_are_one_line(task_dir):
    for args, needle in ((["--tasks", "no_such_task", "--include-path", str(task_dir)], "unknown task"),
                         (["--tasks", "illada_demo_mc", "--mc-num", "10", "--batch-size", "4",
                           "--include-path", str(task_dir)], "multiple of batch_size"),
                         ([], "either --tasks"), (["--compare", "a", "b"], "--data")):
        r = CliRunner().invoke(main, ["eval", *args])
        assert r.exit_code == 1 and r.output.startswith("error: ") and needle in r.output, r.output
        assert r.output.count("\n") == 1


def test_compare_reports_what_a_conversion_cost(tmp_path):
    # float against a 2-bit conversion of the demo model, the same masks on both: the 2-bit model's answers
    # are worse, and the per-token log-likelihood difference's interval excludes 0
    from illada_mlx.demo import BUNDLED
    from illada_mlx_convert import convert

    convert(str(BUNDLED), str(tmp_path / "f32"), progress=False)
    convert(str(BUNDLED), str(tmp_path / "q2"), quantize=True, q_bits=2, q_group_size=32, progress=False)
    data = tmp_path / "d.jsonl"
    items = [json.loads(x) for x in DATA.read_text().splitlines()][:12]
    data.write_text("".join(json.dumps({"prompt": it["prompt"], "answer": it["choices"][it["gold"]]}) + "\n"
                            for it in items))
    out = tmp_path / "c.json"
    r = CliRunner().invoke(main, ["eval", "--compare", str(tmp_path / "f32"), str(tmp_path / "q2"), "--data",
                                  str(data), "--mc-num", "16", "--batch-size", "16", "--json", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    lo, hi = res["ci95"]
    assert res["items"] == len(items) and res["greedy_exact_a"] > res["greedy_exact_b"]
    assert lo > 0 and res["greedy_agreement"] < 1 and "greedy answers agree" in r.stdout
