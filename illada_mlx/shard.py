"""Tensor parallel (`Model.shard`): each rank's slice of every layer, in mlx-lm's way over
`mlx.nn.layers.distributed`, and the vocabulary-split embedding and LM head."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear
from mlx.utils import tree_map

from .config import IlladaError, ModelArgs
from .distributed import beat, watch


def _rows_of(module: nn.Module, rank: int, size: int) -> tuple[int, int]:
    """Keep rows [start, start + n) of every parameter of `module` (n = ceil(rows / size); the last rank's
    share is padded with zero rows); returns (start, n)."""
    V = module.weight.shape[0]
    n = -(-V // size)
    start = rank * n

    def cut(w):
        part = w[start : min(start + n, V)]
        if part.shape[0] < n:
            part = mx.concatenate([part, mx.zeros((n - part.shape[0], *w.shape[1:]), w.dtype)])
        return mx.contiguous(part)

    module.update(tree_map(cut, module.parameters()))
    return start, n


def _gather_last(x: mx.array, group) -> mx.array:
    """The ranks' `x` concatenated along the last axis (all_gather stacks along the first)."""
    N = group.size()
    y = mx.distributed.all_gather(x, group=group).reshape(N, *x.shape)
    return mx.moveaxis(y, 0, -2).reshape(*x.shape[:-1], N * x.shape[-1])


class VocabSharded(nn.Module):
    """An embedding or LM head whose vocabulary rows are split across the group: a lookup takes the rows
    this rank holds (zeros elsewhere) and all-sums them (x + 0 is exact); a projection computes this
    rank's logits over the whole hidden size, as one process does, and all-gathers them."""

    def __init__(self, inner: nn.Module, vocab: int, group):
        super().__init__()
        self.inner, self.vocab, self.group = inner, vocab, group
        self.start, self.rows = _rows_of(inner, group.rank(), group.size())

    def __call__(self, ids: mx.array) -> mx.array:
        beat()  # every tensor-parallel forward starts here: the watchdog sees this rank making progress
        local = ids - self.start
        inside = (local >= 0) & (local < self.rows)
        h = self.inner(mx.where(inside, local, 0))
        return mx.distributed.all_sum(mx.where(inside[..., None], h, mx.zeros((), h.dtype)), group=self.group)

    def as_linear(self, h: mx.array) -> mx.array:
        project = self.inner.as_linear if hasattr(self.inner, "as_linear") else self.inner
        return _gather_last(project(h), self.group)[..., : self.vocab]


def check_shardable(model: nn.Module, args: ModelArgs, size: int) -> None:
    """Refuse, in one line, a model that `size` ranks cannot split evenly."""
    for name, n in (
        ("attention heads", args.num_attention_heads),
        ("key/value heads", args.num_key_value_heads),
        ("FFN width (intermediate_size)", args.intermediate_size),
    ):
        if n % size:
            raise IlladaError(
                f"{size} ranks cannot split the model's {n} {name}; launch a number of ranks that divides {n}"
            )
    for i, layer in enumerate(model.model.layers):  # the layers split by input: whole groups on each rank
        for name, m in (("self_attn.o_proj", layer.self_attn.o_proj), ("mlp.down_proj", layer.mlp.down_proj)):
            gs = getattr(m, "group_size", None)
            if gs is not None and (m.weight.shape[1] * 32 // m.bits // size) % gs:
                cols = m.weight.shape[1] * 32 // m.bits
                raise IlladaError(
                    f"{size} ranks cannot split layer {i}'s {name} ({cols} inputs) into whole "
                    f"quantization groups of {gs}; launch fewer ranks or re-convert with a smaller "
                    "--q-group-size"
                )


def shard_model(model, group) -> None:
    """Tensor parallel in mlx-lm's way: q/k/v and gate/up column-sharded, o_proj and down_proj row-sharded
    (one all-sum per sub-block), each rank with 1/N of the heads (its cache holds only those) and 1/N of
    the vocabulary rows of the embedding and LM head (VocabSharded)."""
    N = group.size()
    check_shardable(model, model.args, N)
    watch(group)
    for layer in model.model.layers:
        at, mlp = layer.self_attn, layer.mlp
        at.q_proj = shard_linear(at.q_proj, "all-to-sharded", group=group)
        at.k_proj = shard_linear(at.k_proj, "all-to-sharded", group=group)
        at.v_proj = shard_linear(at.v_proj, "all-to-sharded", group=group)
        at.o_proj = shard_linear(at.o_proj, "sharded-to-all", group=group)
        at.n_heads //= N
        at.n_kv_heads //= N
        mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
        mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
        mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)
    V = model.args.vocab_size
    model.model.embed_tokens = VocabSharded(model.model.embed_tokens, V, group)
    if not model.args.tie_word_embeddings:
        model.lm_head = VocabSharded(model.lm_head, V, group)
