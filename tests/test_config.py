import json

import pytest

from megatune.config import ConfigError, derive_layout, load_config, parse_overrides, validate
from tests.conftest import run_megatune


def problems_of(fn):
    with pytest.raises(ConfigError) as info:
        fn()
    return info.value.problems


def test_yaml_and_overrides_are_typed(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stage: sft\nlearning_rate: 1.0e-5\nbf16: true\ndataset: [alpaca_en_demo, identity]\n")
    config = load_config(str(path), parse_overrides(["--learning_rate", "2e-5", "--sequence_parallel", "--tensor_model_parallel_size=2"]))
    assert config.training.learning_rate == 2e-5
    assert config.training.bf16 is True
    assert config.data.dataset == "alpaca_en_demo,identity"
    assert config.parallel.sequence_parallel is True
    assert config.parallel.tensor_model_parallel_size == 2


def test_unknown_key_names_it_and_suggests_closest(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("tensor_parallel_size: 2\nlearnig_rate: 1e-5\n")
    problems = problems_of(lambda: load_config(str(path)))
    assert problems == [
        f"{path}: unknown key 'tensor_parallel_size'; did you mean 'tensor_model_parallel_size'?",
        f"{path}: unknown key 'learnig_rate'; did you mean 'learning_rate'?",
    ]


def test_unsupported_keys_and_values_are_refused_with_reason():
    problems = problems_of(lambda: load_config(None, {"deepspeed": "ds.json", "finetuning_type": "lora", "bf16": "maybe"}))
    assert "command line: key 'deepspeed' is not supported" in problems[0]
    assert problems[1] == "command line: finetuning_type='lora' is not supported; choose one of: full"
    assert problems[2] == "command line: key 'bf16' expected true or false, got 'maybe'"


def test_world_size_must_divide_by_tp_pp_cp():
    config = load_config(None, {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2})
    problems = problems_of(lambda: validate(config, 6))
    assert problems == [
        "world size 6 is not divisible by tensor_model_parallel_size x pipeline_model_parallel_size "
        "x context_parallel_size = 2x2x1 = 4; start 8 processes with --nproc_per_node 8"
    ]


HF = {"model_type": "qwen3", "num_attention_heads": 12, "num_key_value_heads": 3, "num_hidden_layers": 6, "vocab_size": 1001}


@pytest.mark.parametrize(
    "overrides, hf, expected",
    [
        ({"tensor_model_parallel_size": 8}, HF, "num_attention_heads=12 is not divisible by tensor_model_parallel_size=8"),
        ({"tensor_model_parallel_size": 2}, HF, "num_key_value_heads=3 (query groups) is not divisible by tensor_model_parallel_size=2"),
        ({"pipeline_model_parallel_size": 4}, HF, "num_hidden_layers=6 is not divisible by pipeline_model_parallel_size x virtual_pipeline_model_parallel_size = 4x1"),
        ({"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}, HF, "num_hidden_layers=6 is not divisible by pipeline_model_parallel_size x virtual_pipeline_model_parallel_size = 2x2"),
        ({"expert_model_parallel_size": 4}, {**HF, "model_type": "qwen3_moe", "num_experts": 6}, "num_experts=6 is not divisible by expert_model_parallel_size=4"),
        ({"tensor_model_parallel_size": 3}, {**HF, "model_type": "qwen3_moe", "num_experts": 6}, "MoE models with tensor_model_parallel_size > 1 need sequence_parallel: true (a Megatron-core requirement)"),
        ({"expert_model_parallel_size": 2}, HF, "expert_model_parallel_size=2 but the model has no experts"),
    ],
)
def test_model_layout_problems(overrides, hf, expected):
    config = load_config(None, overrides)
    assert expected in problems_of(lambda: validate(config, 12, hf))


def test_missing_model_folder(tmp_path):
    config = load_config(None, {"model_name_or_path": str(tmp_path / "nope")})
    assert problems_of(lambda: validate(config, 1)) == [
        f"model_name_or_path: folder {tmp_path / 'nope'} does not exist (megatune loads local Hugging "
        "Face checkpoints only; download the model first)"
    ]


def test_all_problems_reported_together():
    config = load_config(None, {"tensor_model_parallel_size": 8, "sequence_parallel": True})
    problems = problems_of(lambda: validate(config, 8, HF))
    assert len(problems) == 2  # heads, query groups (a vocabulary TP does not divide is padded)


def test_data_parallel_size_follows_megatron_rule():
    # Expert parallelism does not shrink data parallelism (the reference's docs get this wrong).
    config = load_config(None, {
        "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2, "expert_model_parallel_size": 2,
        "per_device_train_batch_size": 3, "gradient_accumulation_steps": 5,
    })
    layout = derive_layout(config, 16)
    assert (layout.dp, layout.expert_dp, layout.etp) == (4, 2, 2)
    assert layout.global_batch_size == 3 * 5 * 4
    assert "data-parallel size 4" in layout.describe() and "= 60 sequences per step" in layout.describe()


def test_cli_prints_one_line_per_problem_without_traceback(tmp_path, megatune_in_process):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "qwen3", **HF}))
    result = run_megatune(
        "verify", "--model_name_or_path", str(tmp_path / "m"), "--tensor_model_parallel_size", "8",
        "--nproc_per_node", "8", "--sequence_paralel", "true",
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "megatune: error: command line: unknown key 'sequence_paralel'; did you mean 'sequence_parallel'?"
    ]
    # the launcher's layout checks (in this process: no worker may start, a traceback would fail the test)
    result = megatune_in_process("verify", "--model_name_or_path", str(tmp_path / "m"), "--tensor_model_parallel_size", "8",
                                 "--nproc_per_node", "8")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 2, result.stderr  # heads, query groups
    assert all(line.startswith("megatune: error: ") for line in lines)


def _config_only_model(path, model_type: str, **fields) -> dict:
    """A model folder holding only config.json (no weights): enough for config validation."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, **fields)
    config.save_pretrained(str(path))
    return config.to_dict()


# The real shapes of the reference examples' models (Qwen3-30B-A3B, Qwen2-VL-7B-Instruct config.json).
QWEN3_30B_A3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, tie_word_embeddings=False)
QWEN2_VL_7B = dict(
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4,
                     rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24])),
    vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16), tie_word_embeddings=False)


@pytest.mark.parametrize("example, model_type, fields, layout, fewer", [
    ("qwen3_moe_full.yaml", "qwen3_moe", QWEN3_30B_A3B, dict(tp=1, pp=4, ep=2, dp=2, global_batch_size=16),
     "start 8 processes with --nproc_per_node 8"),
    ("qwen2_vl_full.yaml", "qwen2_vl", QWEN2_VL_7B, dict(tp=4, pp=2, ep=1, dp=1, global_batch_size=2),
     "start 8 processes with --nproc_per_node 8"),
])
def test_reference_8_gpu_examples_are_accepted_for_their_models(tmp_path, example, model_type, fields, layout, fewer):
    """LLaMA-Factory's two Megatron examples (examples/, only model path and dataset changed) load
    with every key understood and validate on 8 ranks against the real models' shapes; on 4 ranks
    the error says how many processes to start."""
    from tests.conftest import REPO

    hf = _config_only_model(tmp_path / "model", model_type, **fields)
    config = load_config(str(REPO / "examples" / example), {"model_name_or_path": str(tmp_path / "model")})
    got = validate(config, 8, hf_config=hf)
    assert {k: getattr(got, k) for k in layout} == layout
    with pytest.raises(ConfigError) as info:
        validate(config, 4, hf_config=hf)
    assert any(fewer in p for p in info.value.problems), info.value.problems
