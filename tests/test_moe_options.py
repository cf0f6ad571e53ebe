"""MoE run options: token-dropping keys reach Megatron. (The EP=2 run checking that `moe_log_load`
logs each MoE layer's expert load in trainer_log.jsonl is in tests/test_moe.py, batched with that
file's runs: test_expert_load_is_logged_per_moe_layer.)"""

import pytest

from megatune.tiny import make_tiny_model


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
