"""The demo model's structured-output training rows (training/tool_tasks.py): a template row's canvas is
what the runtime's template reads back as the right value, its open positions are exactly the holes, and
its prompts keep to the held-out split and to the tool call's contract."""

import itertools
import json
import random
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from tokenizers import Tokenizer

from illada_mlx.structured import Layout, compile_schema, token_classes
from illada_mlx.tools import parse_tools
from training.demo_tasks import TASKS, TOOL_TASKS, examples, held_out
from training.tool_tasks import (
    CATALOG,
    EOS,
    TOOL_FOR,
    TokenizerView,
    answer_schema,
    answer_value,
    filled_canvas,
    template_batches,
    template_item,
)
from training.train_rows import render

DEMO_DIR = Path(__file__).resolve().parents[1] / "illada_mlx" / "demo_model"


@pytest.fixture(scope="module")
def rust_tok():
    return Tokenizer.from_file(str(DEMO_DIR / "tokenizer.json"))


@pytest.fixture(scope="module")
def runtime_tok(demo):
    return demo[1]


def base_prompt(messages) -> str:
    return messages[0]["content"].rsplit("\n\n", 1)[-1]


def test_a_template_row_reads_back_as_its_value_through_the_runtime_layout(rust_tok, runtime_tok):
    classes = token_classes(runtime_tok, EOS, (5,))
    for task in TASKS:
        answer = {"add": "125", "recall": "7", "sort": "1 2 3", "reverse": "olleh", "parity": "011011101100"}[task]
        schema, value = answer_schema(task, "result"), answer_value(task, answer, "result")
        ours = Layout(compile_schema(schema), TokenizerView(rust_tok), classes, 5)
        theirs = Layout(compile_schema(schema), runtime_tok, classes, 5)
        assert ours.ids.tolist() == theirs.ids.tolist()
        canvas, open_ = filled_canvas(ours, value)
        assert json.loads(theirs.render(canvas, {})) == value
        assert (open_ == (theirs.hole >= 0)).all() and (canvas[~open_] == theirs.ids[~open_]).all()


def test_template_batches_open_only_the_holes_and_their_values_are_right(rust_tok):
    ids, answer, valid, prompt_maskable, cuts = next(template_batches(rust_tok, 0, 16, render))
    assert not prompt_maskable.any() and (cuts == -1).all() and (answer <= valid).all()
    for j in range(16):
        row = ids[j, valid[j]].tolist()
        text = rust_tok.decode(row, skip_special_tokens=False)
        shown = rust_tok.decode([t for t in row if t != EOS])
        reply = shown.rsplit("assistant\n", 1)[1]
        value = json.loads(reply)
        prompt = text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0].rsplit("\n\n", 1)[-1]
        if "name" in value:  # a call: its arguments are the prompt's
            if value["name"] == "add":
                assert prompt == f"{value['arguments']['a']}+{value['arguments']['b']}="
            else:
                assert prompt == "reverse " + value["arguments"]["text"]
        else:
            assert len(value) == 1 and next(iter(value.values())) is not None
        assert all(rust_tok.id_to_token(t) != "<[MASK]>" for t in row)
        assert set(np.flatnonzero(answer[j])) <= set(np.flatnonzero(valid[j]))


def test_tool_rows_keep_to_the_split_and_the_call_contract():
    tools = {t.name: t for t in parse_tools(CATALOG)}
    for split in ("train", "test"):
        for task, messages, answer in itertools.islice(examples(5, split, TOOL_TASKS), 300):
            p = base_prompt(messages)
            assert held_out(p) == (split == "test")
            offered = messages[0]["content"].split("\n\n")[0].splitlines()[1:]
            assert messages[0]["content"].startswith("tools:\n")
            kind = "add" if "+" in p else "reverse" if p.startswith("reverse ") else None
            if task == "tool_call":
                call = json.loads(answer)
                assert call["name"] == TOOL_FOR[kind] and any(o.startswith(kind + "(") for o in offered)
                jsonschema.validate(call["arguments"], tools[call["name"]].parameters)
            elif task == "tool_plain":
                assert kind is None or not any(o.startswith(kind + "(") for o in offered)
            else:
                assert messages[2] == {"role": "user", "content": f"tool: {answer}"}


def test_values_longer_than_their_hole_are_drawn_again():
    rng = random.Random(0)
    view = TokenizerView(Tokenizer.from_file(str(DEMO_DIR / "tokenizer.json")))
    for _ in range(200):
        try:
            _, canvas, open_ = template_item(rng, view)
        except ValueError:
            continue
        assert open_.any() and len(canvas) == len(open_)


def test_the_rows_show_the_model_what_the_runtime_shows_it(runtime_tok):
    # a training row's conversation (tools offered, the call, its result) renders to the same prompt ids as
    # the runtime's rendering of the OpenAI history that carries them (tools.plain_messages, build_prompt)
    from illada_mlx.engine import build_prompt
    from illada_mlx.tools import call_text, plain_messages, result_text
    from training.tool_tasks import TOOLS, with_tools

    tools = [TOOLS["reverse"], TOOLS["add"]]
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 57, "b": 68}'}}
    history = [
        {"role": "user", "content": "57+68="},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "125"},
    ]
    row = [
        {"role": "user", "content": with_tools(tools, "57+68=")},
        {"role": "assistant", "content": call_text("add", {"a": 57, "b": 68})},
        {"role": "user", "content": result_text("125")},
    ]
    want = runtime_tok.encode(render(row), add_special_tokens=False)
    assert build_prompt(runtime_tok, plain_messages(history, tools)) == want
    assert build_prompt(runtime_tok, plain_messages(history[:1], tools)) == runtime_tok.encode(
        render(row[:1]), add_special_tokens=False
    )
