"""MoE run options: token-dropping keys reach Megatron, and `moe_log_load` logs each MoE layer's
expert load (shares of routed tokens) in trainer_log.jsonl."""

import json

import pytest

from megatune.tiny import make_tiny_model
from tests.conftest import REPO, run_megatune


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    return make_tiny_model("qwen3_moe", str(tmp_path_factory.mktemp("moeopt") / "tiny"), seed=9, with_tokenizer=True)


def test_capacity_options_reach_megatron(moe_model):
    from megatune.config import load_config
    from megatune.models import get_provider
    from megatune.models.build import load_hf_config, transformer_config

    _, hf = load_hf_config(moe_model)
    config = load_config(None, {"moe_expert_capacity_factor": 1.5, "moe_token_drop_policy": "position",
                                "moe_pad_expert_input_to_capacity": True})
    tc = transformer_config(config, hf, get_provider(hf))
    assert (tc.moe_expert_capacity_factor, tc.moe_token_drop_policy, tc.moe_pad_expert_input_to_capacity) == (1.5, "position", True)
    with pytest.raises(Exception, match="moe_token_drop_policy='random' is not supported"):
        load_config(None, {"moe_token_drop_policy": "random"})


def test_expert_load_is_logged_per_moe_layer(moe_model, tmp_path):
    result = run_megatune(
        "train", "--model_name_or_path", moe_model, "--moe_grouped_gemm", "false",
        "--expert_model_parallel_size", "2", "--nproc_per_node", "2", "--moe_log_load", "true",
        "--moe_expert_capacity_factor", "2.0",
        "--dataset", "megatune_identity", "--dataset_dir", str(REPO / "data"), "--template", "qwen3_nothink",
        "--cutoff_len", "64", "--max_steps", "2", "--logging_steps", "1", "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "trainer_log.jsonl").read_text().splitlines()]
    for row in rows:
        load = row["expert_load"]
        assert sorted(load) == ["layer 1", "layer 3", "layer 4"]  # layer 2 is dense (mlp_only_layers)
        for shares in load.values():
            assert len(shares) == 4 and sum(shares) == pytest.approx(1.0, abs=1e-3)
        assert row["aux_loss"] > 0
