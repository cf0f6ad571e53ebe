"""HF <-> Megatron parity for every dense family and layout, and bit-exact export round trips.

The `megatune verify` runs are batched per world size (tests/multirun.py: one set of worker
processes runs every case of a batch in turn); each test asserts on its own case's outputs.
"""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from megatune.models.hf_io import SafetensorsSource
from tests.multirun import Batches, nproc_of

LAYOUTS = {
    "tp1": [],
    "tp2": ["--tensor_model_parallel_size", "2", "--nproc_per_node", "2"],
    "tp2_sp": ["--tensor_model_parallel_size", "2", "--sequence_parallel", "true", "--nproc_per_node", "2"],
    "pp2": ["--pipeline_model_parallel_size", "2", "--nproc_per_node", "2"],
}
EXPORT_LAYOUTS = ("tp2", "pp2")


def all_tensors(folder) -> dict[str, torch.Tensor]:
    src = SafetensorsSource(folder)
    return {name: src.read(name) for name in src.file_of}


def parse_diffs(stdout: str) -> dict[str, float]:
    line = next(line for line in stdout.splitlines() if line.startswith("max_abs_diff="))
    return {k: float(v) for k, v in (part.split("=") for part in line.split()[:3])}


@pytest.fixture(scope="module")
def verify_runs(tiny_models, vl_verify_models, tmp_path_factory):
    """The batched `megatune verify` runs of this file; a case's --export_path is `root / case`."""
    root = tmp_path_factory.mktemp("verify_runs")
    runs = Batches(root / "batches")
    for family, model in tiny_models.items():
        for layout, flags in LAYOUTS.items():
            export = ["--export_path", root / f"{family}-{layout}"] if layout in EXPORT_LAYOUTS else []
            runs.add(f"{family}-{layout}", ["verify", "--model_name_or_path", model, *flags, *export], nproc_of(flags))
    for family, model in vl_verify_models.items():
        runs.add(f"{family}-pp2", ["verify", "--model_name_or_path", model, *LAYOUTS["pp2"],
                                   "--export_path", root / f"{family}-pp2"], 2)
    runs.add("tolerance", ["verify", "--model_name_or_path", tiny_models["llama"], "--tolerance", "-1"], 1)
    return runs, root


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_verify_matches_transformers(tiny_models, verify_runs, family, layout):
    runs, root = verify_runs
    result = runs.get(f"{family}-{layout}")
    assert result.returncode == 0, result.stderr[-3000:]
    diffs = parse_diffs(result.stdout)
    assert diffs["max_abs_diff"] <= 1e-4 and diffs["tolerance"] == 1e-4
    if layout in EXPORT_LAYOUTS:
        source, exported = all_tensors(tiny_models[family]), all_tensors(root / f"{family}-{layout}")
        assert source.keys() == exported.keys()
        for name, tensor in source.items():
            assert tensor.dtype == exported[name].dtype and torch.equal(tensor, exported[name]), name
        config = json.loads((root / f"{family}-{layout}" / "config.json").read_text())
        assert config["model_type"] == family and config["dtype"] == "float32"


def test_export_shards_with_index_and_honours_dtype(tiny_models, tmp_path):
    """In-process, one rank: small shard limit forces several files; bf16 export casts."""
    from megatune.config import load_config, validate
    from megatune.distributed import init_distributed, shutdown
    from megatune.models.build import build_model
    from megatune.models.weights import export_hf, load_hf_weights

    config = load_config(None, {"model_name_or_path": tiny_models["qwen3"]})
    init_distributed(validate(config, 1), seed=0)
    try:
        bundle = build_model(config, tiny_models["qwen3"])
        load_hf_weights(bundle, tiny_models["qwen3"])
        export_hf(bundle, tiny_models["qwen3"], str(tmp_path), torch.bfloat16, max_shard_bytes=20_000)
    finally:
        shutdown()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not list(tmp_path.glob("*.tmp"))
    source = all_tensors(tiny_models["qwen3"])
    exported = {}
    for f in files:
        exported.update(load_file(tmp_path / f))
    assert exported.keys() == source.keys()
    for name, tensor in source.items():
        assert exported[name].dtype == torch.bfloat16
        assert torch.equal(exported[name], tensor.to(torch.bfloat16)), name
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path).dtype == torch.bfloat16


def test_verify_fails_when_a_mapping_is_wrong(tiny_models, monkeypatch):
    """The check must catch a bridge bug: swap key and value heads in the fused QKV."""
    from megatune import models
    from megatune.config import load_config, validate
    from megatune.distributed import init_distributed, shutdown
    from megatune.models.build import build_model
    from megatune.models.mappings import FusedQKV
    from megatune.verify import run_verify

    provider = models.PROVIDERS["qwen3"]
    broken = tuple(
        dataclasses.replace(m, k=m.v, v=m.k) if isinstance(m, FusedQKV) else m for m in provider.decoder_mappings
    )
    monkeypatch.setitem(models.PROVIDERS, "qwen3", dataclasses.replace(provider, decoder_mappings=broken))
    config = load_config(None, {"model_name_or_path": tiny_models["qwen3"]})
    init_distributed(validate(config, 1), seed=0)
    try:
        result = run_verify(build_model(config, tiny_models["qwen3"]), tiny_models["qwen3"], torch.float32, None)
    finally:
        shutdown()
    assert not result.passed and result.max_abs_diff > 1e-2


def test_verify_exit_code_is_1_above_tolerance(verify_runs):
    result = verify_runs[0].get("tolerance")
    assert result.returncode == 1
    assert result.stdout.strip().splitlines()[-1].endswith("tolerance=-1 FAIL")


def test_unsupported_model_type_lists_supported(tmp_path, megatune_in_process):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "num_attention_heads": 4}))
    result = megatune_in_process("verify", "--model_name_or_path", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"megatune: error: {tmp_path}/config.json: model_type 'gpt2' is not supported; "
        "supported: llama, mixtral, qwen2, qwen2_5_vl, qwen2_moe, qwen2_vl, qwen3, qwen3_moe"
    )


def test_pytorch_bin_checkpoint_gets_a_clear_error(tmp_path):
    from megatune.models.hf_io import CheckpointError

    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="found pytorch_model.bin.*safe_serialization=True"):
        SafetensorsSource(tmp_path)


def test_env_reports_versions_and_backend(megatune_env):
    result = megatune_env
    assert result.returncode == 0
    out = result.stdout
    assert f"torch: {torch.__version__}" in out
    assert "megatron-core: 0." in out
    expected = "layer backend: te" if torch.cuda.is_available() and "transformer-engine: not" not in out else "layer backend: torch"
    assert expected in out and "attention: " in out


def test_unsupported_variant_of_a_family_is_refused(tmp_path, megatune_in_process):
    hf = {"model_type": "llama", "num_attention_heads": 4, "attention_bias": True, "rope_parameters": {"rope_type": "yarn"}}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    result = megatune_in_process("verify", "--model_name_or_path", str(tmp_path))
    assert result.returncode == 2
    assert "rope type 'yarn' is not supported yet" in result.stderr
    assert "llama with attention_bias: true (bias on o_proj too) is not supported" in result.stderr


@pytest.fixture(scope="module")
def vl_verify_models(tmp_path_factory):
    from megatune.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("vl_verify")
    return {family: make_tiny_model(family, str(root / family), seed=2) for family in ("qwen2_vl", "qwen2_5_vl")}


@pytest.mark.parametrize("layout", ["pp2"])
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_verify_vision_language_models(vl_verify_models, verify_runs, family, layout):
    """`megatune verify` on a VL checkpoint runs a synthetic image and tokens through both sides;
    with --export_path the written checkpoint is bit-identical, in the layout it was read in.
    (1 process and TP=2+SP parity of the same model class: tests/test_vision_language.py.)"""
    runs, root = verify_runs
    result = runs.get(f"{family}-{layout}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert parse_diffs(result.stdout)["max_abs_diff"] <= 1e-4
    if layout == "pp2":
        source, exported = all_tensors(vl_verify_models[family]), all_tensors(root / f"{family}-{layout}")
        assert source.keys() == exported.keys() and any(k.startswith("visual.") for k in source)
        assert all(torch.equal(source[k], exported[k]) for k in source)
