"""The converter: round trips against the oracle, quantization, refusals, atomic output, streaming."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import oracle
import pytest
from click.testing import CliRunner
from fixtures import Spec, write_checkpoint

from illada_mlx.load import HUB_PATTERNS, load
from illada_mlx_convert import convert, convert_command

ILLADA = Spec(seed=11)
LLADA = Spec(layout="llada", kv_heads=4, tied=False, theta=500000.0, seed=12)


def run_convert(*args):
    return CliRunner().invoke(convert_command, list(map(str, args)))


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def params_from_mlx_dir(d: Path, tied: bool) -> dict:
    """Read a converted dir back into the oracle's parameter dict, dequantizing what is quantized."""
    cfg = json.loads((d / "config.json").read_text())
    q = cfg.get("quantization") or {}
    w = {}
    for f in d.glob("*.safetensors"):
        w.update(mx.load(str(f)))

    def get(path):
        if f"{path}.scales" in w:
            prm = q.get(path, q)
            full = mx.dequantize(
                w[f"{path}.weight"],
                w[f"{path}.scales"],
                w.get(f"{path}.biases"),
                group_size=prm["group_size"],
                bits=prm["bits"],
                mode=prm.get("mode", "affine"),
            )
        else:
            full = w[f"{path}.weight"]
        return np.array(full.astype(mx.float32), np.float64)

    p = {"embed": get("model.embed_tokens"), "norm": get("model.norm"), "layers": []}
    p["head"] = p["embed"] if tied else get("lm_head")
    i = 0
    while f"model.layers.{i}.input_layernorm.weight" in w:
        b = f"model.layers.{i}."
        p["layers"].append(
            {
                "attn_norm": get(b + "input_layernorm"),
                "ffn_norm": get(b + "post_attention_layernorm"),
                "wq": get(b + "self_attn.q_proj"),
                "wk": get(b + "self_attn.k_proj"),
                "wv": get(b + "self_attn.v_proj"),
                "wo": get(b + "self_attn.o_proj"),
                "w_gate": get(b + "mlp.gate_proj"),
                "w_up": get(b + "mlp.up_proj"),
                "w_down": get(b + "mlp.down_proj"),
            }
        )
        i += 1
    return p


def logits(model, spec, seed=0):
    ids = np.random.default_rng(seed).integers(0, spec.vocab, (2, 11))
    return ids, np.array(model(mx.array(ids)).astype(mx.float32), np.float64)


@pytest.mark.parametrize("spec", [ILLADA, LLADA], ids=["illada", "llada"])
@pytest.mark.parametrize("flags,tol", [([], 1e-4), (["--dtype", "bfloat16"], 3e-2)], ids=["fp32", "bf16"])
def test_float_round_trip_matches_oracle(spec, flags, tol, ckpt_factory, tmp_path):
    src, params = ckpt_factory(spec)
    out = tmp_path / "mlx"
    r = run_convert("--hf-path", src, "--mlx-path", out, *flags)
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mask_token_id"] == (5 if spec.layout == "illada" else 258)
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    model, tok = load(str(out), compute_dtype="bfloat16" if flags else "auto")  # bf16: computed as stored
    if flags:
        assert model.model.layers[0].mlp.up_proj.weight.dtype == mx.bfloat16
    stored = params_from_mlx_dir(out, spec.tied)
    ids, got = logits(model, spec)
    ref = oracle.forward(stored, ids, spec.heads, spec.kv_heads, spec.theta, spec.eps)
    assert rel(got, ref) <= tol
    # the stored weights are the source's (rounded to the target dtype)
    np.testing.assert_allclose(stored["layers"][1]["w_down"], params["layers"][1]["w_down"], rtol=1e-2, atol=1e-2)


def test_tied_head_is_stored_once(ckpt_factory, tmp_path):
    src, _ = ckpt_factory(ILLADA)
    out = tmp_path / "mlx"
    assert run_convert("--hf-path", src, "--mlx-path", out).exit_code == 0
    names = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names


def test_bf16_source_checkpoint(tmp_path):
    spec = Spec(dtype="bfloat16", seed=13)
    src = tmp_path / "hf"
    params = write_checkpoint(src, spec)
    out = tmp_path / "mlx"
    assert run_convert("--hf-path", src, "--mlx-path", out, "--dtype", "float32").exit_code == 0
    model, _ = load(str(out))
    ids, got = logits(model, spec)
    assert rel(got, oracle.forward(params, ids, spec.heads, spec.kv_heads, spec.theta, spec.eps)) <= 1e-4


QUANT = {
    "q8": (["-q", "--q-bits", "8"], {"bits": 8}),
    "q4": (["-q", "--q-bits", "4", "--q-group-size", "32"], {"bits": 4, "group_size": 32}),
    "mixed_4_8": (["--q-recipe", "mixed_4_8"], {"bits": 4}),
    "mixed_3_6": (["--q-recipe", "mixed_3_6"], {"bits": 4}),
    "mxfp4": (["-q", "--q-mode", "mxfp4", "--q-group-size", "32"], {"mode": "mxfp4"}),
    # no --q-group-size: the mode's own (nvfp4 has only 16; affine's 64 would be refused)
    "nvfp4": (["-q", "--q-mode", "nvfp4"], {"mode": "nvfp4", "group_size": 16, "bits": 4}),
    "nvfp4_mixed_4_8": (["--q-mode", "nvfp4", "--q-recipe", "mixed_4_8"], {"mode": "nvfp4", "group_size": 16}),
}


@pytest.mark.parametrize("spec", [ILLADA, LLADA], ids=["illada", "llada"])
@pytest.mark.parametrize("name", list(QUANT))
def test_quantized_round_trip_matches_dequantized_oracle(spec, name, ckpt_factory, tmp_path):
    if spec.layout == "llada" and name in ("mixed_3_6", "mxfp4", "nvfp4", "nvfp4_mixed_4_8"):
        pytest.skip("covered on the iLLaDA layout")
    flags, expect = QUANT[name]
    src, params = ckpt_factory(spec)
    out = tmp_path / "mlx"
    r = run_convert("--hf-path", src, "--mlx-path", out, *flags)
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    for k, v in expect.items():
        assert cfg["quantization"][k] == v
    if "mixed" in name:  # the embedding/head at 6 or 8 bits, affine whatever the body's mode
        assert cfg["quantization"]["model.embed_tokens"]["bits"] in (6, 8)
        assert cfg["quantization"]["model.embed_tokens"]["mode"] == "affine"
    model, _ = load(str(out))
    assert type(model.model.layers[0].mlp.gate_proj).__name__ == "QuantizedLinear"
    assert type(model.model.embed_tokens).__name__ == "QuantizedEmbedding"
    assert model.model.layers[0].input_layernorm.weight.dtype == mx.float32  # norms stay float
    deq = params_from_mlx_dir(out, spec.tied)
    ids, got = logits(model, spec)
    assert rel(got, oracle.forward(deq, ids, spec.heads, spec.kv_heads, spec.theta, spec.eps)) <= 1e-4
    # the quantized weights are close to the originals (the quantizer really ran on them)
    err = np.abs(deq["layers"][0]["w_up"] - params["layers"][0]["w_up"]).mean()
    assert 0 < err < 0.2 * np.abs(params["layers"][0]["w_up"]).mean()


# ------------------------------------------------------------------------------------------ refusals
def _broken(tmp_path, how):
    src = tmp_path / "hf"
    write_checkpoint(src, Spec(seed=14))
    shard = src / "model-00001-of-00002.safetensors"
    cfg = json.loads((src / "config.json").read_text())
    if how == "missing_config":
        (src / "config.json").unlink()
    elif how == "missing_shard":
        (src / "model-00002-of-00002.safetensors").unlink()
    elif how == "truncated_shard":
        data = shard.read_bytes()
        shard.write_bytes(data[:-100])
    elif how == "corrupt_header":
        data = bytearray(shard.read_bytes())
        data[8:20] = b"\x00garbage!!\xff\xfe"
        shard.write_bytes(bytes(data))
    elif how == "shape_mismatch":
        cfg["intermediate_size"] = 96
    elif how == "unknown_arch":
        cfg.update(model_type="mistral", architectures=["MistralForCausalLM"])
    elif how == "no_mask_id":  # the mask's id 5 named as an ordinary token
        from fixtures import ILLADA_SPECIALS, ILLADA_TEMPLATE, build_tokenizer

        specials = {("<unused5>" if k == "<[MASK]>" else k): v for k, v in ILLADA_SPECIALS.items()}
        build_tokenizer(src, specials, ILLADA_TEMPLATE, "<s>", "</s>", "</s>")
    elif how == "layer_count":
        cfg["num_hidden_layers"] = 3
    (src / "config.json").write_text(json.dumps(cfg)) if how != "missing_config" else None
    return src


REFUSALS = {
    "missing_config": "config.json",
    "missing_shard": "missing",
    "truncated_shard": "truncated",
    "corrupt_header": "corrupt",
    "shape_mismatch": "does not match",
    "unknown_arch": "unknown architecture",
    "no_mask_id": "--mask-id",
    "layer_count": "missing",
}


def assert_clean_refusal(r, out: Path, needle: str):
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert needle in lines[0], lines[0]
    assert "Traceback" not in r.output
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("how", list(REFUSALS))
def test_refuses_broken_checkpoints_cleanly(how, tmp_path):
    src = _broken(tmp_path, how)
    out = tmp_path / "out" / "mlx"
    out.parent.mkdir()
    assert_clean_refusal(run_convert("--hf-path", src, "--mlx-path", out), out, REFUSALS[how])


def test_refuses_bad_paths_and_options(ckpt_factory, tmp_path):
    src, _ = ckpt_factory(ILLADA)
    out = tmp_path / "mlx"
    assert_clean_refusal(run_convert("--hf-path", tmp_path / "nope", "--mlx-path", out), out, "no such directory")
    assert_clean_refusal(
        run_convert("--hf-path", src, "--mlx-path", out, "-q", "--q-mode", "mxfp4", "--q-bits", "3"), out, "mxfp4"
    )
    assert_clean_refusal(run_convert("--hf-path", src, "--mlx-path", out, "--mask-id", "126336"), out, "outside")


def test_wrong_mask_id_flag_is_refused_and_right_one_used(tmp_path):
    src = _broken(tmp_path, "no_mask_id")
    out = tmp_path / "mlx"
    r = run_convert("--hf-path", src, "--mlx-path", out, "--mask-id", "5")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["mask_token_id"] == 5
    assert load(str(out))[0].args.mask_token_id == 5  # what was written can be loaded


def test_non_empty_destination_needs_force_and_force_replaces_only_a_conversion(ckpt_factory, tmp_path):
    src, _ = ckpt_factory(ILLADA)
    out = tmp_path / "mlx"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for extra in ([], ["--force"]):  # not a converted model: refused with or without --force
        r = run_convert("--hf-path", src, "--mlx-path", out, *extra)
        assert r.exit_code == 1 and r.output.startswith("error: ") and "--force" in r.output
        assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert run_convert("--hf-path", src, "--mlx-path", out).exit_code == 0  # an empty directory is filled
    r = run_convert("--hf-path", src, "--mlx-path", out)
    assert r.exit_code == 1 and "pass --force" in r.output
    assert run_convert("--hf-path", src, "--mlx-path", out, "--force", "--dtype", "bfloat16").exit_code == 0
    assert json.loads((out / "config.json").read_text())["illada_mlx_format"] == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".mlx")) == []


def test_interrupt_mid_write_leaves_no_directory(ckpt_factory, tmp_path, monkeypatch):
    import illada_mlx_convert.converter as conv

    src, _ = ckpt_factory(ILLADA)
    out = tmp_path / "mlx"
    calls = []

    def boom(*a, **k):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(conv.mx, "save_safetensors", boom)
    with pytest.raises(KeyboardInterrupt):
        conv.convert(str(src), str(out), progress=False, max_shard_bytes=1)
    assert calls and not out.exists() and not list(tmp_path.iterdir())


def test_torch_bin_without_torch_names_the_extra(tmp_path):
    pytest.importorskip("safetensors")
    try:
        import torch  # noqa: F401

        pytest.skip("torch is installed")
    except ImportError:
        pass
    src = tmp_path / "hf"
    write_checkpoint(src, Spec(seed=15))
    for f in src.glob("*.safetensors"):
        f.unlink()
    (src / "model.safetensors.index.json").unlink()
    (src / "pytorch_model.bin").write_bytes(b"not really")
    out = tmp_path / "mlx"
    assert_clean_refusal(run_convert("--hf-path", src, "--mlx-path", out), out, "illada-mlx[torch]")


def test_hub_id_goes_through_huggingface_hub(ckpt_factory, tmp_path, monkeypatch):
    """A repo id is fetched with snapshot_download (only the needed files); stubbed: no network here."""
    import huggingface_hub

    src, _ = ckpt_factory(ILLADA)
    seen = {}

    def fake_download(repo_id, allow_patterns=None, **kw):
        seen.update(repo=repo_id, patterns=allow_patterns)
        return str(src)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    out = tmp_path / "mlx"
    r = run_convert("--hf-path", "GSAI-ML/iLLaDA-8B-Base", "--mlx-path", out)
    assert r.exit_code == 0, r.output
    assert seen["repo"] == "GSAI-ML/iLLaDA-8B-Base" and "*.safetensors" in seen["patterns"]
    assert "*.bin" not in seen["patterns"] and "generation_config.json" in seen["patterns"]
    card = (out / "README.md").read_text()
    assert "\nbase_model: GSAI-ML/iLLaDA-8B-Base\n" in card
    assert "[GSAI-ML/iLLaDA-8B-Base](https://huggingface.co/GSAI-ML/iLLaDA-8B-Base)" in card


# ------------------------------------------------------------------------------------------ mlx-lm's conventions
def source_tensors(src: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in src.glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


def test_one_shard_is_model_safetensors_with_an_index(ckpt_factory, tmp_path):
    src, _ = ckpt_factory(ILLADA)
    out = tmp_path / "mlx"
    assert run_convert("--hf-path", src, "--mlx-path", out).exit_code == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    stored = source_tensors(out)
    assert set(index["weight_map"].values()) == {"model.safetensors"} and index["weight_map"].keys() == stored.keys()
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in stored.values())
    # fp32 and tied: the parameters are the source's tensors less the head it does not store
    assert index["metadata"]["total_parameters"] == sum(v.size for v in source_tensors(src).values())


def test_several_shards_are_numbered_of_n(ckpt_factory, tmp_path):
    src, _ = ckpt_factory(ILLADA)
    out = tmp_path / "mlx"
    s = convert(str(src), str(out), max_shard_bytes=40_000, progress=False)
    n = s["output_shards"]
    names = sorted(p.name for p in out.glob("*.safetensors"))
    assert n >= 3 and names == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(names)
    for name in names:
        assert {k for k, f in index["weight_map"].items() if f == name} == set(mx.load(str(out / name)))


def test_generation_config_is_copied(ckpt_factory, tmp_path):
    base, _ = ckpt_factory(ILLADA)
    src = tmp_path / "hf"
    shutil.copytree(base, src)
    gen = {"eos_token_id": 2, "temperature": 0.0}
    (src / "generation_config.json").write_text(json.dumps(gen))
    out = tmp_path / "mlx"
    assert run_convert("--hf-path", src, "--mlx-path", out).exit_code == 0
    assert json.loads((out / "generation_config.json").read_text()) == gen
    assert "generation_config.json" in HUB_PATTERNS


def test_decode_defaults_are_written_or_copied_and_loaded(ckpt_factory, tmp_path):
    # a source without diffusion_config.json gets Fast-dLLM's setting written out; one with its own keeps it;
    # load() hands it to make_spec, which applies it to the adaptive modes only, under the caller's flags
    from illada_mlx.spec import make_spec

    base, _ = ckpt_factory(ILLADA)
    out = tmp_path / "plain"
    assert run_convert("--hf-path", base, "--mlx-path", out).exit_code == 0
    assert json.loads((out / "diffusion_config.json").read_text()) == {
        "mode": "fast",
        "rule": "threshold",
        "threshold": 0.9,
    }
    src = tmp_path / "hf"
    shutil.copytree(base, src)
    own = {"mode": "fast", "rule": "error", "error_bound": 0.2, "drift_threshold": 0.3}
    (src / "diffusion_config.json").write_text(json.dumps(own))
    out = tmp_path / "own"
    assert run_convert("--hf-path", src, "--mlx-path", out).exit_code == 0
    assert json.loads((out / "diffusion_config.json").read_text()) == own
    model, tok = load(str(out))
    spec = make_spec(model, tok, 5)
    assert (spec.mode, spec.rule, spec.error_bound, spec.drift_threshold) == ("fast", "error", 0.2, 0.3)
    assert make_spec(model, tok, 5, mode="variable").rule == "schedule"  # the official decode stays official
    assert make_spec(model, tok, 5, threshold=0.8).rule == "threshold"  # a flag for another rule asks for it
    assert make_spec(model, tok, 5, error_bound=0.01).error_bound == 0.01


@pytest.mark.parametrize(
    "content,needle",
    [
        ('{"mode": "warp"}', "mode must be one of exact.*, not 'warp'"),
        ('{"temperature": 1}', "'temperature'"),
        ('{"threshold": "high"}', "must be a number"),
        ('{"rule": "guess"}', "rule must be one of .*, not 'guess'"),
        ("[1]", "not an object"),
        ('{"drift_probes": 2.5}', "drift_probes must be an integer"),
    ],
)
def test_a_bad_decode_defaults_file_is_one_line(ckpt_factory, tmp_path, content, needle):
    from illada_mlx.errors import IlladaError

    base, _ = ckpt_factory(ILLADA)
    src = tmp_path / "hf"
    shutil.copytree(base, src)
    (src / "diffusion_config.json").write_text(content)
    with pytest.raises(IlladaError, match=needle):
        load(str(src))


@pytest.mark.parametrize(
    "flags,exact",
    [
        ([], 32.0),
        (["--dtype", "bfloat16"], 16.0),
        (["-q", "--q-group-size", "32"], None),
        (["--q-recipe", "mixed_4_8"], None),
        (["-q", "--q-mode", "nvfp4"], None),
    ],
    ids=["fp32", "bf16", "q4g32", "mixed_4_8", "nvfp4"],
)
def test_bits_per_weight_is_mlx_lms(flags, exact, ckpt_factory, tmp_path):
    from mlx_lm.utils import compute_bits_per_weight

    src, _ = ckpt_factory(LLADA)
    out = tmp_path / "mlx"
    r = run_convert("--hf-path", src, "--mlx-path", out, *flags)
    assert r.exit_code == 0, r.output
    bpw = compute_bits_per_weight(load(str(out), compute_dtype="stored")[0])  # mlx-lm's count, as stored
    assert bpw == (exact or bpw)
    assert f"{bpw:.3f} bits per weight" in r.output
    assert f"| bits per weight | {bpw:.3f} |" in (out / "README.md").read_text()


def test_convert_returns_bits_per_weight(ckpt_factory, tmp_path):
    from mlx_lm.utils import compute_bits_per_weight

    src, _ = ckpt_factory(ILLADA)
    s = convert(str(src), str(tmp_path / "mlx"), q_recipe="mixed_3_6", progress=False)
    assert s["bits_per_weight"] == pytest.approx(compute_bits_per_weight(load(str(tmp_path / "mlx"))[0]), rel=1e-12)
    assert 4 < s["bits_per_weight"] < 8


@pytest.mark.parametrize("umask,mode", [(0o022, 0o755), (0o027, 0o750)], ids=["022", "027"])
def test_output_directory_has_the_umasks_permissions(umask, mode, ckpt_factory, tmp_path):
    src, _ = ckpt_factory(ILLADA)
    old = os.umask(umask)
    try:
        convert(str(src), str(tmp_path / "mlx"), progress=False)
    finally:
        os.umask(old)
    assert (tmp_path / "mlx").stat().st_mode & 0o777 == mode


def test_model_card_says_what_and_how(ckpt_factory, tmp_path):
    src, _ = ckpt_factory(LLADA)
    out = tmp_path / "my model"
    r = run_convert("--hf-path", src, "--mlx-path", out, "-q", "--q-bits", "8", "--quant-predicate", "mixed_4_6")
    assert r.exit_code == 0, r.output
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mlx\n") and "base_model" not in card  # a local source
    assert f"from the local checkpoint `{src.name}`" in card
    assert "| source layout | llada |" in card
    assert "| quantization | affine 8-bit, group size 64, recipe mixed_4_6 |" in card
    size = sum(v.nbytes for v in source_tensors(out).values())
    assert f"| size | {size / 1e6:.1f} MB |" in card
    assert f"illada-mlx generate --model '{out}' -p" in card
    assert f'from illada_mlx import load\n\nmodel, tokenizer = load("{out}")' in card
    plain = tmp_path / "plain"
    assert run_convert("--hf-path", src, "--mlx-path", plain).exit_code == 0
    assert "| quantization | none |" in (plain / "README.md").read_text()


def test_quant_predicate_is_q_recipe(ckpt_factory, tmp_path):
    src, _ = ckpt_factory(ILLADA)
    for flag in ("--q-recipe", "--quant-predicate"):
        assert run_convert("--hf-path", src, "--mlx-path", tmp_path / flag, flag, "mixed_2_6").exit_code == 0
    a, b = (
        json.loads((tmp_path / f / "config.json").read_text())["quantization"]
        for f in ("--q-recipe", "--quant-predicate")
    )
    assert a == b and a["model.embed_tokens"]["bits"] == 6


def test_quantization_choices_are_quant_modes():
    from illada_mlx.quant import QUANT_MODES, RECIPES

    choices = {p.name: list(p.type.choices) for p in convert_command.params if hasattr(p.type, "choices")}
    assert choices["q_mode"] == list(QUANT_MODES) and choices["q_recipe"] == list(RECIPES)
    for name, i in (("q_bits", 0), ("q_group_size", 1)):
        allowed = {v for spec in QUANT_MODES.values() for v in spec[i]}
        assert sorted(map(int, choices[name])) == sorted(allowed)


# ------------------------------------------------------------------------------------------ upload
class FakeHfApi:
    calls: list = []
    fail: Exception | None = None

    def create_repo(self, repo_id, repo_type=None, exist_ok=False, **kw):
        self.calls.append(("create_repo", repo_id, repo_type, exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, repo_type=None, **kw):
        if self.fail:
            raise self.fail
        files = sorted(p.name for p in Path(folder_path).iterdir())
        card = (Path(folder_path) / "README.md").read_text()
        self.calls.append(("upload_folder", Path(folder_path), repo_id, repo_type, files, card))


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeHfApi.calls, FakeHfApi.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi


def test_upload_repo_creates_and_uploads_the_output(fake_hub, ckpt_factory, tmp_path):
    src, _ = ckpt_factory(ILLADA)
    out = tmp_path / "mlx"
    r = run_convert("--hf-path", src, "--mlx-path", out, "-q", "--upload-repo", "me/illada-tiny-4bit")
    assert r.exit_code == 0, r.output
    (c, repo, kind, exist_ok), (u, folder, repo2, kind2, files, card) = fake_hub.calls
    assert (c, repo, kind, exist_ok) == ("create_repo", "me/illada-tiny-4bit", "model", True)
    assert (u, folder, repo2, kind2) == ("upload_folder", out, "me/illada-tiny-4bit", "model")
    assert files == sorted(p.name for p in out.iterdir()) and "model.safetensors" in files
    assert "# me/illada-tiny-4bit" in card and 'load("me/illada-tiny-4bit")' in card
    assert "uploaded to https://huggingface.co/me/illada-tiny-4bit" in r.output


def test_upload_failure_is_one_line_and_keeps_the_conversion(fake_hub, ckpt_factory, tmp_path):
    src, _ = ckpt_factory(ILLADA)
    out = tmp_path / "mlx"
    fake_hub.fail = ConnectionError("network is unreachable\nsecond line")
    r = run_convert("--hf-path", src, "--mlx-path", out, "--upload-repo", "me/tiny")
    errors = [ln for ln in r.output.splitlines() if "error" in ln.lower()]  # the progress bar precedes it
    assert r.exit_code == 1 and len(errors) == 1 and errors[0].startswith("error: upload to me/tiny failed"), r.output
    assert "ConnectionError: network is unreachable)" in errors[0] and str(out) in errors[0]
    assert "Traceback" not in r.output and "second line" not in r.output
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()


def test_malformed_upload_repo_is_refused_before_converting(fake_hub, ckpt_factory, tmp_path):
    src, _ = ckpt_factory(ILLADA)
    out = tmp_path / "mlx"
    assert_clean_refusal(
        run_convert("--hf-path", src, "--mlx-path", out, "--upload-repo", "a/b/c"), out, "--upload-repo"
    )
    assert fake_hub.calls == []


# ------------------------------------------------------------------------------------------ streaming
@pytest.mark.slow  # a 200 MB conversion
def test_streaming_peak_memory_stays_near_one_shard(tmp_path):
    """≥ 200 MB of shards: the converter's RSS growth stays under 2× (largest shard + output shard)."""
    spec = Spec(d=512, layers=12, heads=8, kv_heads=8, ffn=2048, shards=4, seed=16)
    src = tmp_path / "hf"
    write_checkpoint(src, spec)
    sizes = [f.stat().st_size for f in src.glob("*.safetensors")]
    assert sum(sizes) >= 200e6
    out_shard = 48 << 20
    code = (
        "import json, illada_mlx_convert as c; "
        f"s = c.convert({str(src)!r}, {str(tmp_path / 'mlx')!r}, max_shard_bytes={out_shard}, progress=False); "
        "print(json.dumps(s))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout.strip().splitlines()[-1])
    bound = 2 * (max(sizes) + out_shard)
    print(
        f"source {sum(sizes) / 1e6:.0f} MB, largest shard {max(sizes) / 1e6:.0f} MB, "
        f"RSS growth {s['rss_growth_bytes'] / 1e6:.0f} MB, bound {bound / 1e6:.0f} MB"
    )
    assert s["rss_growth_bytes"] < bound
    assert s["output_shards"] >= 4


# ------------------------------------------------------------------------------------------ the demo model
DEMO = dict(heads=6, kv_heads=2, theta=10000.0, eps=1e-5, vocab=270)  # illada_mlx/demo_model/config.json


def test_load_without_a_path_reads_the_bundled_checkpoint_in_memory(tmp_path, monkeypatch):
    from illada_mlx.demo import BUNDLED

    monkeypatch.setenv("ILLADA_MLX_CACHE", str(tmp_path / "cache"))
    model, tok = load()
    assert not (tmp_path / "cache").exists()  # nothing converted, nothing written
    assert model.model.layers[0].mlp.up_proj.weight.dtype == mx.float32
    params = params_from_mlx_dir(BUNDLED, tied=True)  # the bundled file uses our names, unquantized
    ids = np.random.default_rng(1).integers(0, DEMO["vocab"], (2, 9))
    ref = oracle.forward(params, ids, DEMO["heads"], DEMO["kv_heads"], DEMO["theta"], DEMO["eps"])
    assert rel(np.array(model(mx.array(ids)), np.float64), ref) <= 1e-4
    assert tok.encode("reverse hello", add_special_tokens=False)


def test_ensure_demo_model_converts_once_and_says_so(tmp_path, monkeypatch):
    from illada_mlx.demo import BUNDLED, bundled_digest
    from illada_mlx_convert import ensure_demo_model

    monkeypatch.setenv("ILLADA_MLX_CACHE", str(tmp_path / "cache"))
    notices = []
    d = ensure_demo_model(notices.append)
    assert d == tmp_path / "cache" / f"demo-{bundled_digest()}"
    assert notices == [f"converting the bundled demo model into {d} (first use only)"]
    assert ensure_demo_model(notices.append) == d and len(notices) == 1
    assert ensure_demo_model() == d
    src = {k: np.array(v) for k, v in mx.load(str(BUNDLED / "model.safetensors")).items()}
    out = {}
    for f in d.glob("*.safetensors"):
        out.update({k: np.array(v) for k, v in mx.load(str(f)).items()})
    assert out.keys() == src.keys()
    assert all(np.array_equal(out[k], src[k]) for k in src)


def test_mlx_path_defaults_to_mlx_model_as_in_mlx_lm(ckpt_factory, tmp_path, monkeypatch):
    src, _ = ckpt_factory(ILLADA)
    monkeypatch.chdir(tmp_path)
    r = run_convert("--hf-path", src)
    assert r.exit_code == 0, r.output
    assert load(str(tmp_path / "mlx_model"))[0].args.mask_token_id == 5


def test_a_recipe_says_it_quantizes_and_quant_flags_without_q_are_refused(ckpt_factory, tmp_path):
    src, _ = ckpt_factory(ILLADA)
    r = run_convert("--hf-path", src, "--mlx-path", tmp_path / "r", "--q-recipe", "mixed_4_8")
    assert r.exit_code == 0 and "note: --q-recipe mixed_4_8 quantizes the model (-q implied)" in r.stderr
    assert "quantization" in json.loads((tmp_path / "r" / "config.json").read_text())
    for flags in (["--q-bits", "8"], ["--q-group-size", "32"], ["--q-mode", "mxfp4"]):
        r = run_convert("--hf-path", src, "--mlx-path", tmp_path / "x", *flags)
        assert r.exit_code == 1 and r.output.startswith(f"error: {flags[0]} takes effect only when quantizing")
        assert not (tmp_path / "x").exists()
