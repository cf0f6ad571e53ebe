"""Engine pieces checked against their references without a distributed run: the LR schedules
against transformers' own schedulers, the FLOP count against the HF model's parameters, the
Megatron fixes against the failures they work around."""

import math

import pytest
import torch

from megatune.config import load_config
from megatune.engine.optim import build_scheduler
from megatune.models import get_provider


def matmul_params(hf: dict) -> int:
    return get_provider(hf).matmul_params(hf)


def step_flops(hf: dict, doc_lens: list[int]) -> float:
    return get_provider(hf).step_flops(hf, doc_lens)


class _Optimizer:
    """What Megatron's scheduler touches: param_groups."""

    def __init__(self):
        self.param_groups = [{"params": [], "lr": 0.0, "weight_decay": 0.0}]


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [dict(), dict(warmup_steps=3), dict(warmup_ratio=0.25)])
def test_lr_schedule_equals_transformers(name, warmup):
    from transformers import get_scheduler

    total, lr = 20, 3e-4
    config = load_config(None, {"lr_scheduler_type": name, "learning_rate": lr, **warmup})
    ours = build_scheduler(_Optimizer(), config, total)
    warm = warmup.get("warmup_steps", int(warmup.get("warmup_ratio", 0) * total + 0.999999))
    param = torch.nn.Parameter(torch.zeros(1))
    reference_opt = torch.optim.SGD([param], lr=lr)
    reference = get_scheduler(name, reference_opt, num_warmup_steps=warm, num_training_steps=total)
    for step in range(total):
        expected = reference_opt.param_groups[0]["lr"]
        assert ours.get_lr(ours.optimizer.param_groups[0]) == pytest.approx(expected, rel=1e-9, abs=1e-15), step
        ours.step(increment=1)
        reference_opt.step()
        reference.step()


def test_cosine_decays_to_min_lr():
    config = load_config(None, {"lr_scheduler_type": "cosine", "learning_rate": 1e-3, "min_lr": 1e-4})
    scheduler = build_scheduler(_Optimizer(), config, 10)
    lrs = []
    for _ in range(11):
        lrs.append(scheduler.get_lr(scheduler.optimizer.param_groups[0]))
        scheduler.step(increment=1)
    assert lrs[0] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_matmul_params_count_every_linear_weight(tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    from megatune.tiny import make_tiny_model

    make_tiny_model(model_type, str(tmp_path), tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    hf = model.config.to_dict()
    assert matmul_params(hf) == linear  # lm_head counted even when tied to the embedding
    # attention term: 6 * heads * head_dim * s^2 * layers; two documents cost less than one joined
    d = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    attention = 6 * hf["num_attention_heads"] * d * hf["num_hidden_layers"]
    assert step_flops(hf, [10]) == 6 * linear * 10 + attention * 100
    assert step_flops(hf, [5, 5]) == 6 * linear * 10 + attention * 50


def test_keep_adam_step_fills_in_the_missing_step():
    from megatune.compat.fixes import _keep_adam_step

    seen = {}
    main = torch.nn.Parameter(torch.zeros(2))
    step = torch.tensor(3.0)

    class Fake:
        model_param_group_index_map = {"p": (0, 0)}
        optimizer = type("O", (), {"param_groups": [{"params": [main]}], "state": {main: {"step": step}}})()

    _keep_adam_step(lambda self, p, tensors: seen.update(tensors))(Fake(), "p", {"param": torch.ones(2)})
    assert seen["step"] is step and torch.equal(seen["param"], torch.ones(2))


def test_own_adam_steps_unshares_the_step_tensor():
    from megatune.compat.fixes import _own_adam_steps

    shared = torch.tensor(3.0)
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))

    class Fake:
        optimizer = type("O", (), {"state": {a: {"step": shared}, b: {"step": shared}}})()

    fake = Fake()
    _own_adam_steps(lambda self, sd: None)(fake, {})
    steps = [s["step"] for s in fake.optimizer.state.values()]
    assert steps[0] is not steps[1] and all(float(s) == 3.0 for s in steps)
    steps[0].add_(1)
    assert float(steps[1]) == 3.0  # advancing one no longer advances the other


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_moe_matmul_params_count_active_experts_only(tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    from megatune.models.moe import moe_layer_freq
    from megatune.tiny import make_tiny_model

    make_tiny_model(model_type, str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    hf = model.config.to_dict()
    everything = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and "embed_tokens" not in n)
    per_expert = 3 * hf["hidden_size"] * (hf.get("moe_intermediate_size") or hf["intermediate_size"])
    sparse_layers = sum(moe_layer_freq(hf))
    assert 0 < sparse_layers
    inactive = sparse_layers * (hf["num_local_experts" if "num_local_experts" in hf else "num_experts"] - hf["num_experts_per_tok"]) * per_expert
    assert matmul_params(hf) == everything - inactive


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_zero_rewrites_the_tokenized_cache(monkeypatch, rank):
    """overwrite_cache: rank 0 re-encodes into tokenized_path first; the other ranks must then
    read what it wrote, not all rewrite the folder at once."""
    from types import SimpleNamespace

    import megatune.data.source as source
    from megatune.config import load_config
    from megatune.engine import trainer

    seen = []
    monkeypatch.setattr(trainer, "dist", SimpleNamespace(get_rank=lambda: rank, barrier=lambda: None))
    monkeypatch.setattr(source, "build_train_source", lambda config, *a: seen.append(config.data.overwrite_cache) or (1, 2, 3))
    config = load_config(None, {"tokenized_path": "/tmp/cache", "overwrite_cache": True})
    assert trainer._build_data(config, None, SimpleNamespace(global_batch_size=4)) == (1, 2, 3)
    assert seen == [rank == 0]
    assert config.data.overwrite_cache  # the caller's config is left as it was


@pytest.mark.parametrize("where", [None, 0, 37, 99], ids=["all_finite", "first", "middle", "last"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 3e38], ids=["nan", "inf", "-inf", "huge"])
@pytest.mark.parametrize("poisoned", [0, 1], ids=["dense_buffer", "expert_buffer"])
def test_grads_finite_checks_every_element(where, value, poisoned):
    """A non-finite element anywhere in any of DDP's buffers must be found; a huge finite one
    (whose square would overflow) is finite."""
    import types

    import torch.distributed as dist

    from megatune.engine import step

    from megatune.distributed import free_port

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    buffers = [types.SimpleNamespace(grad_data=torch.randn(n)) for n in (100, 100)]
    if where is not None:
        buffers[poisoned].grad_data[where] = value
    model = [types.SimpleNamespace(buffers=buffers[:1], expert_parallel_buffers=buffers[1:])]
    try:
        assert step._grads_finite(model) is (where is None or math.isfinite(value))
    finally:
        if own_group:
            dist.destroy_process_group()
