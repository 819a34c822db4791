"""The engine API (stream_generate / generate_text) on the bundled demo model, the reply text it builds
with the streaming detokenizer, and the README's Python snippets."""

import re
from pathlib import Path

import pytest
from fixtures import reply

from illada_mlx.engine import generate_text, stream_generate
from illada_mlx.text import ReplyText

README = Path(__file__).resolve().parents[1] / "README.md"


class CountingTokenizer:
    """The demo tokenizer, counting every token handed to a detokenizer or to decode()."""

    def __init__(self, tok):
        self.tok, self.tokens_decoded = tok, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def decode(self, ids, *a, **k):
        self.tokens_decoded += len(ids)
        return self.tok.decode(ids, *a, **k)

    @property
    def detokenizer(self):
        d = self.tok.detokenizer
        add = d.add_token

        def counted(t):
            self.tokens_decoded += 1
            return add(t)

        d.add_token = counted
        return d


@pytest.mark.slow  # a reply of several blocks, EOS banned
def test_decoding_work_is_linear_in_the_reply(demo):
    # EOS banned: the reply fills a budget of several blocks; each token passes through the detokenizer once
    model, tok = demo
    counting = CountingTokenizer(tok)
    msgs = [{"role": "user", "content": "count 145 to 190"}]
    text, tokens, last = reply(
        model,
        counting,
        msgs,
        mode="variable",
        max_tokens=96,
        block_length=8,
        steps_per_block=8,
        stop=("@@",),
        logits_eos_inf=True,
    )
    assert last.stats.blocks >= 3 and len(tokens) >= 17
    assert counting.tokens_decoded <= 2 * len(tokens)
    assert text == tok.decode(tokens)  # the streamed text is the whole reply's text


def test_stream_yields_one_response_per_block_and_a_final_one(demo):
    model, tok = demo
    msgs = [{"role": "user", "content": "sort 9 3 7 1 4 2"}]
    rs = list(stream_generate(model, tok, msgs, mode="variable", max_tokens=64, block_length=4, steps_per_block=4))
    *blocks, last = rs
    assert all(r.finish_reason is None for r in blocks) and last.finish_reason == "stop"
    assert len(blocks) == last.stats.blocks and [r.blocks_done for r in blocks] == list(range(1, len(blocks) + 1))
    assert last.generation_tokens == sum(len(r.tokens) for r in rs) == last.stats.output_tokens
    assert last.prompt_tokens == len(
        tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    )
    assert last.prompt_tps > 0 and last.peak_memory > 0 and last.forwards == last.stats.nfe
    assert "".join(r.text for r in rs) == "1 2 3 4 7 9"
    # what ran: the spec after defaults
    assert (last.spec.mode, last.spec.max_tokens, last.spec.block_length, last.spec.cache) == (
        "variable",
        64,
        4,
        "none",
    )


def test_python_api_trims_a_default_budget_like_the_cli(demo):
    # no max_tokens: the growing canvas's default (2048 for a chat model) is cut to the demo's 1024 positions
    model, tok = demo
    rs = list(stream_generate(model, tok, [{"role": "user", "content": "reverse hello"}]))
    assert "".join(r.text for r in rs) == "olleh"
    assert rs[-1].spec.max_tokens == model.args.max_position_embeddings - rs[-1].prompt_tokens


@pytest.mark.slow  # an exact-mode decode of 128 tokens
def test_stopping_the_iteration_stops_the_decode(demo):
    model, tok = demo
    it = stream_generate(model, tok, [{"role": "user", "content": "reverse hello"}], mode="exact", max_tokens=128)
    first = next(it)
    it.close()
    assert first.blocks_done == 1 and first.forwards == 32  # one block of the four ran


def test_reply_text_cuts_at_stop_strings_and_holds_back_a_partial_one(demo):
    _, tok = demo
    ids = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    r = ReplyText(tok, stop=["xy"])
    assert r.add(ids("abx")) is False and r.take() == "ab"  # "x" may begin "xy": held back
    assert r.add(ids("yz")) is True and r.take() == "" and r.finish() == "ab"
    r = ReplyText(tok, stop=["xy"])
    r.add(ids("abx"))
    r.add(ids("qz"))
    assert r.take() == "abxqz" and r.finish() == "abxqz"
    r = ReplyText(tok, stop=["xy"])
    r.add(ids("abx"))
    assert r.finish() == "abx" and r.take() == "abx"  # at the end nothing is held back


def test_generate_text_takes_token_ids_text_or_messages(demo):
    model, tok = demo
    msgs = [{"role": "user", "content": "reverse abc"}]
    ids = tok.encode(
        tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    )
    text = tok.decode(ids)
    got = {generate_text(model, tok, p, mode="fast", max_tokens=32) for p in (msgs, ids, text)}
    assert got == {"cba"}


def python_snippets():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("i", range(len(python_snippets())))
def test_readme_python_snippets_run(i, capsys):
    exec(compile(python_snippets()[i], f"README.md python snippet {i}", "exec"), {})
    out = capsys.readouterr().out
    assert "olleh" in out


def test_the_cache_policy_and_a_kept_prompt_cache_go_together(demo):
    # `cache` is the policy setting; the BlockCache kept across chat turns is `prompt_cache` (mlx-lm's name)
    from illada_mlx.cache import BlockCache

    model, tok = demo
    msgs = [{"role": "user", "content": "reverse abc"}]
    kept = BlockCache()
    rs = list(stream_generate(model, tok, msgs, mode="variable", cache="prefix", max_tokens=32, prompt_cache=kept))
    assert "".join(r.text for r in rs) == "cba" and rs[-1].spec.cache == "prefix" and kept.keys
