"""Property: whatever a config.json or a safetensors header says, convert and load either succeed or raise
IlladaError (the one-line error the commands print), never another exception and never a hang.

A valid tiny checkpoint is mutated at random (hypothesis, derandomized so a run is repeatable, bounded in
examples and time); each example works on a fresh copy and must finish within a per-example alarm."""

import json
import shutil
import struct
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
from fixtures import Spec, deadline, write_checkpoint
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from illada_mlx.config import IlladaError
from illada_mlx.load import load
from illada_mlx_convert import convert

pytestmark = pytest.mark.slow  # many mutated checkpoints, each converted and loaded

SETTINGS = settings(
    max_examples=60,
    deadline=timedelta(seconds=30),
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
PER_EXAMPLE_S = 60
DELETE = object()

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 2, 3, 4, 7, 64, 10**7, 2**31, 2**63, 10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
rope = st.fixed_dictionaries({"type": st.sampled_from(["linear", "default", "yarn", 5, None]), "factor": scalars})
CONFIG_KEYS = [
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "hidden_act",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "head_dim",
    "layer_norm_eps",
    "mask_token_id",
    "eot_token_id",
    "architectures",
    "model_type",
    "quantization",
    "illada_mlx_format",
    "source_layout",
    "d_model",
    "n_layers",
]
config_changes = st.dictionaries(
    st.sampled_from(CONFIG_KEYS), st.one_of(values, rope, st.just(DELETE)), min_size=1, max_size=3
)
DTYPES = st.sampled_from(["F16", "BF16", "F32", "F64", "I32", "I64", "U8", "BOOL", "U32", "F8_E4M3", ""])
header_changes = st.one_of(
    st.tuples(
        st.just("field"),
        st.integers(0, 100),
        st.sampled_from(["dtype", "shape", "data_offsets", "extra"]),
        st.one_of(values, DTYPES, st.just(DELETE)),
    ),
    st.tuples(st.just("whole"), values),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1)),
    st.tuples(
        st.just("bytes"), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4)
    ),
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A valid checkpoint and its conversion."""
    root = tmp_path_factory.mktemp("fuzz")
    write_checkpoint(root / "hf", Spec(seed=31))
    convert(str(root / "hf"), str(root / "mlx"), progress=False)
    return root


def apply_config(path: Path, changes: dict):
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is DELETE:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


def apply_header(shard: Path, change):
    data = shard.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    kind = change[0]
    if kind == "field":
        _, i, field, value = change
        names = sorted(k for k in header if k != "__metadata__")
        entry = header[names[i % len(names)]]
        if value is DELETE:
            entry.pop(field, None)
        else:
            entry[field] = value
    elif kind == "whole":
        header = change[1]
    if kind == "length":
        raw = json.dumps(header).encode()
        shard.write_bytes(struct.pack("<Q", change[1]) + raw + body)
        return
    raw = bytearray(json.dumps(header).encode())
    if kind == "bytes":
        for pos, byte in change[1]:
            raw[pos % len(raw)] = byte
    shard.write_bytes(struct.pack("<Q", len(raw)) + bytes(raw) + body)


def succeeds_or_refuses(fn):
    """fn() returns or raises IlladaError; anything else (or a hang) fails the property."""
    with deadline(PER_EXAMPLE_S):
        try:
            fn()
        except IlladaError as e:
            assert "\n" not in str(e) and str(e)
            event("refused")
            return False
    event("succeeded")
    return True


def convert_then_load(src: Path, out: Path):
    def run():
        convert(str(src), str(out), progress=False)
        load(str(out))

    return run


@SETTINGS
@given(changes=config_changes)
def test_mutated_configs_convert_or_refuse(base, changes):
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "hf"
        shutil.copytree(base / "hf", src)
        apply_config(src / "config.json", changes)
        succeeds_or_refuses(convert_then_load(src, Path(d) / "out"))
        succeeds_or_refuses(lambda: load(str(src)))


@SETTINGS
@given(
    change=header_changes,
    shard=st.sampled_from(["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]),
)
def test_mutated_headers_convert_or_refuse(base, change, shard):
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "hf"
        shutil.copytree(base / "hf", src)
        apply_header(src / shard, change)
        succeeds_or_refuses(convert_then_load(src, Path(d) / "out"))


@settings(SETTINGS, max_examples=40)
@given(changes=config_changes, header=st.one_of(st.none(), header_changes))
def test_mutated_converted_models_load_or_refuse(base, changes, header):
    with tempfile.TemporaryDirectory() as d:
        mlx = Path(d) / "mlx"
        shutil.copytree(base / "mlx", mlx)
        apply_config(mlx / "config.json", changes)
        if header is not None:
            apply_header(mlx / "model.safetensors", header)
        succeeds_or_refuses(lambda: load(str(mlx)))
