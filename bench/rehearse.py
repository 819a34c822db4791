"""A true-size rehearsal: write a random checkpoint with either layout's exact shapes and names, convert it
with the chosen recipes, load each result and run one short decode; report per stage the wall time, the
peak memory and the sizes, as JSON and a table.

    python bench/rehearse.py --size tiny                       # seconds: both layouts, 4bit and mixed_4_8
    python bench/rehearse.py --size 8b --layouts illada,llada --recipes 4bit,mixed_4_8 \\
        --workdir /tmp/rehearse --json bench/results/rehearse_8b.json

Every stage runs in a process of its own, so its peak resident memory (VmHWM) is its own. The checkpoint is
written one shard at a time (memory: about one shard), in bfloat16 like the released models; the decode
is the fixed canvas (mode exact) on a random prompt: one block of --block tokens in --steps steps. The work
directory's files are removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "illada_mlx" / "demo_model"  # its tokenizer files go beside the random weights

# the true shapes (from the released config.json of iLLaDA-8B and LLaDA-8B)
SIZES = {
    "8b": {
        "illada": dict(d=4096, layers=32, heads=32, kv_heads=8, ffn=14336, vocab=155136, tied=True),
        "llada": dict(d=4096, layers=32, heads=32, kv_heads=32, ffn=12288, vocab=126464, tied=False),
    },
    "tiny": {  # the same ratios, small enough for a test
        "illada": dict(d=128, layers=2, heads=4, kv_heads=1, ffn=448, vocab=1024, tied=True),
        "llada": dict(d=128, layers=2, heads=4, kv_heads=4, ffn=384, vocab=1024, tied=False),
    },
}
SHARD_BYTES = {"8b": 4_000_000_000, "tiny": 400_000}
MASK_ID = {"illada": 5, "llada": 126336}
EOS_ID = {"illada": 2, "llada": 126081}


def special(ids: dict, layout: str, s: dict) -> int:
    """The layout's id, or the demo tokenizer's (mask 5, EOS 2) where the vocabulary is too small for it."""
    return ids[layout] if ids[layout] < s["vocab"] else {id(MASK_ID): 5, id(EOS_ID): 2}[id(ids)]


RECIPES = {  # name -> convert() keyword arguments
    "bf16": {},
    "8bit": dict(quantize=True, q_bits=8),
    "4bit": dict(quantize=True),
    "mixed_4_8": dict(q_recipe="mixed_4_8"),
    "mixed_3_6": dict(q_recipe="mixed_3_6"),
}


# ------------------------------------------------------------------------------------------ the checkpoint
def tensor_shapes(layout: str, s: dict) -> dict[str, tuple]:
    """Every tensor of the layout's checkpoint, by its source name, in writing order."""
    d, f, V, hd = s["d"], s["ffn"], s["vocab"], s["d"] // s["heads"]
    q, kv = s["heads"] * hd, s["kv_heads"] * hd
    if layout == "illada":
        out = {"model.embed_tokens.weight": (V, d)}
        block = {
            "input_layernorm": (d,),
            "self_attn.q_proj": (q, d),
            "self_attn.k_proj": (kv, d),
            "self_attn.v_proj": (kv, d),
            "self_attn.o_proj": (d, q),
            "post_attention_layernorm": (d,),
            "mlp.gate_proj": (f, d),
            "mlp.up_proj": (f, d),
            "mlp.down_proj": (d, f),
        }
        prefix, top = "model.layers", {"model.norm.weight": (d,)}
    else:
        out = {"model.transformer.wte.weight": (V, d)}
        block = {
            "attn_norm": (d,),
            "q_proj": (q, d),
            "k_proj": (kv, d),
            "v_proj": (kv, d),
            "attn_out": (d, q),
            "ff_norm": (d,),
            "ff_proj": (f, d),
            "up_proj": (f, d),
            "ff_out": (d, f),
        }
        prefix, top = (
            "model.transformer.blocks",
            {"model.transformer.ln_f.weight": (d,), "model.transformer.ff_out.weight": (V, d)},
        )
    for i in range(s["layers"]):
        out.update({f"{prefix}.{i}.{k}.weight": v for k, v in block.items()})
    out.update(top)
    return out


def config_for(layout: str, s: dict) -> dict:
    """The layout's config.json: iLLaDA's HF keys, LLaDA's OLMo keys (values of the released config)."""
    if layout == "illada":
        return {
            "architectures": ["ILLaDAForCausalLM"],
            "model_type": "illada",
            "hidden_size": s["d"],
            "num_hidden_layers": s["layers"],
            "num_attention_heads": s["heads"],
            "num_key_value_heads": s["kv_heads"],
            "intermediate_size": s["ffn"],
            "vocab_size": s["vocab"],
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 2,
            "torch_dtype": "bfloat16",
        }
    return {
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "d_model": s["d"],
        "n_heads": s["heads"],
        "n_kv_heads": s["kv_heads"],
        "n_layers": s["layers"],
        "mlp_hidden_size": s["ffn"],
        "vocab_size": s["vocab"],
        "embedding_size": s["vocab"],
        "max_sequence_length": 4096,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "weight_tying": False,
        "activation_type": "silu",
        "block_type": "llama",
        "layer_norm_type": "rms",
        "include_bias": False,
        "mask_token_id": special(MASK_ID, layout, s),
        "eos_token_id": special(EOS_ID, layout, s),
        "pad_token_id": special(EOS_ID, layout, s),
        "precision": "amp_bf16",
    }


def write_checkpoint(out: Path, layout: str, size: str) -> dict:
    """Random bf16 weights (uniform, std 0.02; norms 1) written shard by shard, the index, the config and
    the demo model's tokenizer files."""
    import mlx.core as mx

    out.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(layout, SIZES[size][layout])
    mx.random.seed(0)
    groups, cur, cur_bytes = [], [], 0
    for name, shape in shapes.items():  # plan the shards: whole tensors, about SHARD_BYTES each
        n = 2 * _numel(shape)
        if cur and cur_bytes + n > SHARD_BYTES[size]:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += n
    groups.append(cur)
    weight_map = {}
    for k, names in enumerate(groups):
        shard = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        part = {}
        for name in names:
            shape, a = shapes[name], 0.02 * 3**0.5
            part[name] = (
                mx.ones(shape, mx.bfloat16) if len(shape) == 1 else mx.random.uniform(-a, a, shape, dtype=mx.bfloat16)
            )
            mx.eval(part[name])
        mx.save_safetensors(str(out / shard), part, metadata={"format": "pt"})
        weight_map.update({n: shard for n in names})
        del part
    total = sum(2 * _numel(s) for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config_for(layout, SIZES[size][layout]), indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(DEMO / name, out / name)
    return {"parameters": sum(_numel(s) for s in shapes.values()), "bytes": _dir_bytes(out), "shards": len(groups)}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------ the stages
def stage_convert(src: Path, dst: Path, layout: str, recipe: str) -> dict:
    from illada_mlx_convert import convert

    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    mask = special(MASK_ID, layout, {"vocab": vocab})
    s = convert(str(src), str(dst), mask_id=mask, force=True, **RECIPES[recipe])
    return {"bytes": s["output_bytes"], "bits_per_weight": s["bits_per_weight"], "shards": s["output_shards"]}


def stage_decode(path: Path, prompt: int, block: int, steps: int) -> dict:
    """Load (auto compute dtype, memory check, progress) and run one block of the fixed canvas."""
    import mlx.core as mx
    import numpy as np

    from illada_mlx.backend import compute_dtype
    from illada_mlx.bench import parameter_bytes
    from illada_mlx.engine import stream_generate
    from illada_mlx.load import LoadOptions, load_model

    t0 = time.perf_counter()
    model = load_model(path, opts=LoadOptions(progress=True, notice=lambda m: print(f"warning: {m}", file=sys.stderr)))
    load_s = time.perf_counter() - t0
    ids = np.random.default_rng(0).integers(10, model.args.vocab_size - 10, prompt).tolist()
    t1 = time.perf_counter()
    last = list(
        stream_generate(model, None, ids, mode="exact", max_tokens=block, block_length=block, steps_per_block=steps)
    )[-1]
    return {
        "load_s": load_s,
        "resident_bytes": parameter_bytes(model),
        "compute_dtype": compute_dtype(model),
        "decode_s": time.perf_counter() - t1,
        "first_forward_s": last.first_forward_s,
        "forwards": last.stats.nfe,
        "positions": prompt + block,
        "tokens": last.generation_tokens,
        "mlx_peak_bytes": mx.get_peak_memory(),
    }


def run_stage(argv: list[str]) -> dict:
    """One stage in a process of its own: its result, wall time and peak resident memory."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--stage", *argv], stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise SystemExit(f"error: the stage {argv[0]} failed (exit {p.returncode}); its error is above")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0
    return result


def child(argv: list[str]) -> None:
    from illada_mlx.options import one_line_errors
    from illada_mlx_convert.converter import peak_rss_bytes

    kind, rest = argv[0], argv[1:]
    with one_line_errors():
        if kind == "write":
            r = write_checkpoint(Path(rest[0]), rest[1], rest[2])
        elif kind == "convert":
            r = stage_convert(Path(rest[0]), Path(rest[1]), rest[2], rest[3])
        else:
            r = stage_decode(Path(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]))
    r["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(r))


# ------------------------------------------------------------------------------------------ the rehearsal
def rehearse(layout: str, a) -> list[dict]:
    """Write, then per recipe convert and decode; one row per stage."""
    work = Path(a.workdir) / f"{layout}-{a.size}"
    src = work / "hf"
    written = run_stage(["write", str(src), layout, a.size])
    rows = [{"layout": layout, "stage": "write", "recipe": "bf16 source", **written}]
    for recipe in a.recipes:
        dst = work / f"mlx-{recipe}"
        rows.append(
            {
                "layout": layout,
                "stage": "convert",
                "recipe": recipe,
                **run_stage(["convert", str(src), str(dst), layout, recipe]),
            }
        )
        rows.append(
            {
                "layout": layout,
                "stage": "load + decode",
                "recipe": recipe,
                **run_stage(["decode", str(dst), str(a.prompt), str(a.block), str(a.steps)]),
            }
        )
        if not a.keep:
            shutil.rmtree(dst, ignore_errors=True)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a markdown table (sizes in decimal GB / MB)."""
    from illada_mlx.progress import format_bytes

    size = lambda r, k: format_bytes(r[k]) if r.get(k) is not None else "–"  # noqa: E731
    secs = lambda r, k: f"{r[k]:.1f}" if k in r else "–"  # noqa: E731
    out = [
        "| layout | stage | recipe | wall s | peak RSS | files | resident | compute | load s | first forward s "
        "| decode s |",
        "|" + "---|" * 11,
    ]
    for r in rows:
        out.append(
            f"| {r['layout']} | {r['stage']} | {r['recipe']} | {r['wall_s']:.1f} | {size(r, 'peak_rss_bytes')} "
            f"| {size(r, 'bytes')} | {size(r, 'resident_bytes')} | {r.get('compute_dtype', '–')} | "
            f"{secs(r, 'load_s')} | {secs(r, 'first_forward_s')} | {secs(r, 'decode_s')} |"
        )
    return "\n".join(out)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="tiny")
    ap.add_argument("--layouts", default="illada,llada", help="comma list of illada, llada")
    ap.add_argument("--recipes", default="4bit,mixed_4_8", help=f"comma list of {', '.join(RECIPES)}")
    ap.add_argument("--prompt", type=int, default=4, help="prompt tokens (random ids)")
    ap.add_argument("--block", type=int, default=4, help="the block (and budget) decoded")
    ap.add_argument("--steps", type=int, default=1, help="steps for that block")
    ap.add_argument("--workdir", default="/tmp/illada-rehearse")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints written")
    a = ap.parse_args(argv)
    a.layouts, a.recipes = [x for x in a.layouts.split(",") if x], [x for x in a.recipes.split(",") if x]
    bad = [x for x in a.layouts if x not in ("illada", "llada")] + [x for x in a.recipes if x not in RECIPES]
    if bad:
        ap.error(f"unknown layout or recipe {bad[0]!r}")
    return a


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--stage"]:
        return child(argv[1:])
    a = parse(argv)
    t0 = time.perf_counter()
    rows = [r for layout in a.layouts for r in rehearse(layout, a)]
    from illada_mlx.bench import machine

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "size": a.size,
        "machine": machine(),
        "prompt": a.prompt,
        "block": a.block,
        "steps": a.steps,
        "command": "python bench/rehearse.py " + " ".join(argv),
        "total_s": time.perf_counter() - t0,
        "rows": rows,
    }
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
