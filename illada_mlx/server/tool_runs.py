"""A request with tools (tool_choice auto, required or a tool's name) as the scheduler runs it, with Solo's
interface (runs.py). Each choice first decides (tools.choose_tool: auto's one forward, then which tool's
when several), then either fills the call's template (tools.fill_call: structured.generate_json), answered
whole with finish_reason "tool_calls" and the call in `calls`, or, when auto decides not to call, is decoded
as an ordinary answer by a Solo (streamed block by block, cancelled at the step it is on), its decision's
forward counted in its figures."""

from __future__ import annotations

from typing import Optional

from ..decode import Stats
from ..spec import DecodeSpec
from ..tools import Tool, ToolCall, call_text, choose_tool, fill_call
from .runs import OneAtATime, Solo, choice_spec


class ToolRun(OneAtATime):
    def __init__(self, model, tokenizer, spec: DecodeSpec, tools: list[Tool], choice: str):
        super().__init__(spec)
        self.model, self.tok, self.tools, self.choice = model, tokenizer, tools, choice
        self.solo = Solo(model, spec)  # the choices answering free-form
        self.calls: dict[int, ToolCall] = {}  # id(row) -> its call, until the scheduler takes it
        self.cost: dict[int, Stats] = {}  # id(row) -> its decision's forwards (a free-form choice's)

    @property
    def rows(self) -> list:
        return self.solo.rows + self.solo.joining

    def remove(self, handles: set) -> list:
        return super().remove(handles) + self.solo.remove(handles)

    def call_of(self, row) -> Optional[ToolCall]:
        """The row's call, once (the scheduler's finish takes it)."""
        return self.calls.pop(id(row), None)

    def run_block(self, stop_fn=None, logprobs=None, on_step=None, leave=None) -> list:
        """A free-form choice's next block; else the next choice decided, and its call whole."""
        if self.solo.size:
            results = self.solo.run_block(stop_fn, logprobs, on_step, leave)
            self.lo = self.solo.lo
            for row, _, reason, _ in results:
                if reason is not None and id(row) in self.solo.finished:
                    self.finished[id(row)] = self._with_cost(row, self.solo.finished.pop(id(row)))
            return results
        row = self.joining.pop(0)
        spec = choice_spec(self.spec, row)
        tool, stats = choose_tool(self.model, self.tok, row.ids, self.tools, self.choice, spec.block_length)
        if tool is None:
            self.cost[id(row)] = stats
            self.solo.add(row)
            return []
        call, ran = fill_call(self.model, self.tok, row.ids, tool, spec, stats)
        row.blocks += 1
        self.calls[id(row)], self.ran[id(row)] = call, ran
        self.finished[id(row)] = stats.as_dict()
        toks = self.tok.encode(call_text(call.name, call.arguments), add_special_tokens=False)
        return [(row, toks, "tool_calls", None)]

    def _with_cost(self, row, figures: dict) -> dict:
        """A free-form choice's figures with its decision's forwards and processed tokens added."""
        st = Stats(**{k: figures[k] for k in Stats.__dataclass_fields__})
        cost = self.cost.pop(id(row), Stats())
        st.add_forwards(cost.nfe, cost.processed)
        return {**figures, **st.as_dict()}
