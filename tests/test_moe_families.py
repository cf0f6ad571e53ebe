"""Mixtral and Qwen2-MoE: parity with transformers and bit-exact export round trips under expert
parallelism (alltoall dispatcher, megatune GroupedExperts), tensor+sequence parallelism (Megatron
SequentialMLP) and pipeline parallelism, plus one single-process run each; an EP=2 training
step (with its load-balancing loss) against transformers; and the config translation.

On disk (transformers 5 save_pretrained): Mixtral keeps `block_sparse_moe.gate` and per-expert
`block_sparse_moe.experts.{E}.w1/w3/w2`; Qwen2-MoE keeps per-expert `mlp.experts.{E}.*_proj`,
`mlp.shared_expert.*_proj` and `mlp.shared_expert_gate`.

The `megatune` runs are batched per world size (tests/multirun.py); each test asserts on its own
case's outputs.
"""

import pytest
import torch

from megatune.tiny import make_tiny_model
from tests.multirun import Batches, nproc_of
from tests.test_moe import check_training_step, training_step_config
from tests.test_verify import all_tensors, parse_diffs

LAYOUTS = {
    "1proc": ["--moe_grouped_gemm", "false", "--moe_token_dispatcher_type", "allgather"],
    "ep2_alltoall": ["--moe_grouped_gemm", "true", "--moe_token_dispatcher_type", "alltoall",
                     "--expert_model_parallel_size", "2", "--nproc_per_node", "2"],
    "tp2_sp": ["--moe_grouped_gemm", "false", "--moe_token_dispatcher_type", "allgather",
               "--tensor_model_parallel_size", "2", "--sequence_parallel", "true", "--nproc_per_node", "2"],
    # 2 layers per stage: Qwen2-MoE's dense layer 2 opens stage 1, so the layer pattern must be
    # read with the stage's offset
    "pp2": ["--moe_grouped_gemm", "true", "--moe_token_dispatcher_type", "alltoall",
            "--pipeline_model_parallel_size", "2", "--nproc_per_node", "2"],
}
EXPECTED = {  # an HF tensor that only a correct expert/shared-expert mapping writes
    "mixtral": "model.layers.3.block_sparse_moe.experts.3.w2.weight",
    "qwen2_moe": "model.layers.3.mlp.shared_expert_gate.weight",
}


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_families")
    return {t: make_tiny_model(t, str(root / t), seed=7, with_tokenizer=True) for t in EXPECTED}


@pytest.fixture(scope="module")
def family_runs(moe_models, tmp_path_factory):
    """Every `megatune` run of this file; a case's outputs live in `root / case`."""
    root = tmp_path_factory.mktemp("moe_family_runs")
    runs = Batches(root / "batches")
    for family, model in moe_models.items():
        for layout, flags in LAYOUTS.items():
            name = f"verify-{family}-{layout}"
            runs.add(name, ["verify", "--model_name_or_path", model, *flags, "--export_path", root / name / "export"],
                     nproc_of(flags))
        name = f"train-{family}"
        runs.add(name, ["train", training_step_config(model, dict(nproc_per_node=2, expert_model_parallel_size=2),
                                                      root / name)], 2)
    return runs, root


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", EXPECTED)
def test_moe_family_matches_transformers_and_round_trips(moe_models, family_runs, family, layout):
    model = moe_models[family]
    runs, root = family_runs
    result = runs.get(f"verify-{family}-{layout}")
    assert result.returncode == 0, result.stderr[-3000:]
    diffs = parse_diffs(result.stdout)
    print(family, layout, diffs)
    assert diffs["max_abs_diff"] <= 1e-4
    source, exported = all_tensors(model), all_tensors(root / f"verify-{family}-{layout}" / "export")
    assert source.keys() == exported.keys()
    assert EXPECTED[family] in source
    assert any(".experts.3." in k for k in source)  # experts of both EP ranks written
    for name, tensor in source.items():
        assert torch.equal(tensor, exported[name]), name


@pytest.mark.parametrize("family", EXPECTED)
def test_moe_family_training_step_matches_reference(moe_models, family_runs, family):
    """EP=2 SFT step: LM loss, load-balancing loss, grad norm and expert load equal a reference
    on transformers' model (tests/test_moe.py: reference_step)."""
    runs, root = family_runs
    check_training_step(runs.get(f"train-{family}"), moe_models[family], root / f"train-{family}")


def _translate(model_dir, **hf_overrides):
    from megatune.config import load_config
    from megatune.models import get_provider
    from megatune.models.build import load_hf_config, transformer_config

    _, hf = load_hf_config(model_dir)
    hf.update(hf_overrides)
    return hf, transformer_config(load_config(None, {}), hf, get_provider(hf))


def test_moe_family_config_translation(moe_models):
    from megatune.models import UnsupportedModelError, get_provider
    from megatune.models.moe import moe_layer_freq

    hf, tc = _translate(moe_models["mixtral"])
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size) == (4, 2, 48)
    assert tc.moe_layer_freq == [1, 1, 1, 1]  # every Mixtral layer is sparse
    assert tc.moe_router_pre_softmax is False  # Mixtral always renormalises the top-k
    assert tc.moe_shared_expert_intermediate_size is None and not tc.add_qkv_bias and not tc.qk_layernorm
    assert tc.moe_aux_loss_coeff == hf["router_aux_loss_coef"]
    with pytest.raises(UnsupportedModelError, match="sliding_window: 4096 is not supported"):
        get_provider({**hf, "sliding_window": 4096})
    with pytest.raises(UnsupportedModelError, match="router_jitter_noise"):
        get_provider({**hf, "router_jitter_noise": 0.01})

    hf, tc = _translate(moe_models["qwen2_moe"])
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size, tc.ffn_hidden_size) == (4, 2, 32, 128)
    assert tc.moe_shared_expert_intermediate_size == 48 and tc.moe_shared_expert_gate is True
    assert tc.moe_router_pre_softmax is True  # norm_topk_prob: false -> softmax over all experts first
    assert tc.moe_layer_freq == [1, 1, 0, 1]  # layer 2 is in mlp_only_layers
    assert tc.add_qkv_bias
    assert _translate(moe_models["qwen2_moe"], norm_topk_prob=True)[1].moe_router_pre_softmax is False
    assert moe_layer_freq({"num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3]}) == [0, 1, 0, 0, 0, 1]
    with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
        get_provider({**hf, "use_sliding_window": True})
    # the torch-native MoE spec carries the shared expert next to both expert kinds (MoELayer
    # builds it when moe_shared_expert_intermediate_size is set)
    from megatune.layers.experts import GroupedExperts
    from megatune.layers.spec import moe_spec

    for grouped in (False, True):
        spec = moe_spec(4, grouped)
        assert spec.submodules.shared_experts.module.__name__ == "SharedExpertMLP"
        assert (spec.submodules.experts.module is GroupedExperts) == grouped
