"""Qwen3-MoE: parity with transformers under expert, tensor(+sequence) and pipeline parallelism,
bit-exact export round trips, and a short expert-parallel training run whose loss falls.

Experts run on Megatron's SequentialMLP (`moe_grouped_gemm: false`) and on megatune's
GroupedExperts (`moe_grouped_gemm: true`, layers/experts.py; its per-expert matmul path on CPU),
with the allgather and the alltoall token dispatchers (the latter through compat/cpu.py's
dispatcher patches).
"""

import json

import pytest
import torch

from megatune.tiny import make_tiny_model
from tests.conftest import REPO, run_megatune
from tests.test_verify import all_tensors, parse_diffs

MOE = ["--moe_grouped_gemm", "false", "--moe_token_dispatcher_type", "allgather"]
GROUPED = ["--moe_grouped_gemm", "true", "--moe_token_dispatcher_type", "allgather"]
EXPERTS = {  # flags, and what the run says computes the experts
    "sequential": (MOE, "MoE experts: Megatron SequentialMLP"),
    "grouped": (GROUPED, "MoE experts: megatune GroupedExperts"),
}
ALLTOALL = ["--moe_token_dispatcher_type", "alltoall"]
LAYOUTS = {
    "ep1": [],
    "ep2": ["--expert_model_parallel_size", "2", "--nproc_per_node", "2"],
    "ep2_alltoall": ["--expert_model_parallel_size", "2", "--nproc_per_node", "2", *ALLTOALL],
    "tp2_sp": ["--tensor_model_parallel_size", "2", "--sequence_parallel", "true", "--nproc_per_node", "2"],
    "pp2": ["--pipeline_model_parallel_size", "2", "--nproc_per_node", "2"],
}


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    return make_tiny_model("qwen3_moe", str(tmp_path_factory.mktemp("moe") / "tiny"), seed=5, with_tokenizer=True)


@pytest.mark.parametrize("experts", EXPERTS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_qwen3_moe_matches_transformers_and_round_trips(moe_model, layout, experts, tmp_path):
    flags, says = EXPERTS[experts]
    result = run_megatune("verify", "--model_name_or_path", moe_model, *flags, *LAYOUTS[layout],
                          "--export_path", str(tmp_path / "export"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert says in result.stdout
    diffs = parse_diffs(result.stdout)
    assert diffs["max_abs_diff"] <= 1e-4
    source, exported = all_tensors(moe_model), all_tensors(tmp_path / "export")
    assert source.keys() == exported.keys()
    assert any(".mlp.experts.3.down_proj." in k for k in source)  # experts of both EP ranks written
    for name, tensor in source.items():
        assert torch.equal(tensor, exported[name]), name


def test_moe_config_translation(moe_model):
    from megatune.config import load_config
    from megatune.models.build import load_hf_config, transformer_config
    from megatune.models import get_family

    _, hf = load_hf_config(moe_model)
    config = load_config(None, {"moe_aux_loss_coeff": 0.01})
    tc = transformer_config(config, hf, get_family(hf))
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size) == (4, 2, 32)
    assert tc.moe_layer_freq == [1, 0, 1, 1]  # layer 1 is in mlp_only_layers
    assert tc.moe_router_pre_softmax is False  # norm_topk_prob: softmax over the chosen k
    assert tc.moe_aux_loss_coeff == 0.01  # the YAML wins over router_aux_loss_coef
    assert tc.calculate_per_token_loss  # read by the router at construction to scale the aux loss
    assert transformer_config(load_config(None, {}), hf, get_family(hf)).moe_aux_loss_coeff == hf["router_aux_loss_coef"]


@pytest.mark.parametrize("experts", EXPERTS)
def test_expert_parallel_training_loss_falls(moe_model, experts, tmp_path):
    args = ["train", "--model_name_or_path", moe_model, *EXPERTS[experts][0], *ALLTOALL, "--expert_model_parallel_size", "2",
            "--nproc_per_node", "2", "--dataset", "megatune_identity", "--dataset_dir", str(REPO / "data"),
            "--template", "qwen3_nothink", "--cutoff_len", "96", "--max_steps", "12", "--learning_rate", "3e-3",
            "--logging_steps", "1", "--save_steps", "6", "--output_dir", str(tmp_path / "out")]
    result = run_megatune(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and rows[-1]["loss"] < rows[0]["loss"] - 0.5
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))  # the exported MoE loads
    export = run_megatune("export", "--checkpoint_path", str(tmp_path / "out" / "checkpoint-12"),
                          "--output_path", str(tmp_path / "ep1"))
    assert export.returncode == 0, export.stderr[-3000:]
    final, resharded = all_tensors(tmp_path / "out"), all_tensors(tmp_path / "ep1")
    assert all(torch.equal(final[k], resharded[k]) for k in final)  # EP=2 checkpoint -> EP=1
