"""Each CPU patch does what its Megatron call site needs (the TP/PP verify runs use them all)."""

import torch
import pytest

from megatune.compat import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is inactive with CUDA")


@pytest.fixture(scope="module", autouse=True)
def compat():
    applied = cpu.enable_cpu_compat()
    assert applied == cpu.PATCHES
    return applied


def test_current_device_is_cpu():
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"


def test_schedules_token_counter_lands_on_cpu():
    from megatron.core.pipeline_parallel import schedules

    t = schedules.torch.zeros([], dtype=torch.int, device="cuda")
    assert t.device.type == "cpu"
    assert schedules.torch.Tensor is torch.Tensor  # everything else is the real torch


def test_p2p_synchronize_is_a_no_op():
    from megatron.core.pipeline_parallel import p2p_communication

    assert p2p_communication.torch.cuda.synchronize() is None


def test_rng_tracker_uses_cpu_generator_and_is_deterministic(monkeypatch):
    from megatron.core.tensor_parallel import random as mrandom

    monkeypatch.setattr(mrandom, "get_expert_model_parallel_rank", lambda: 0, raising=False)
    mrandom.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = mrandom.get_cuda_rng_tracker()
    with tracker.fork():
        a = torch.rand(3)
    outside = torch.rand(3)
    mrandom.model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
    with tracker.fork():
        b = torch.rand(3)
    assert torch.equal(a, b)  # the tracked stream replays from its seed
    assert not torch.equal(a, outside)  # and is separate from the default stream


def test_language_module_sees_identity_cuda_only_inside():
    from megatron.core.models.common.language_module.language_module import LanguageModule

    seen = {}
    original = cpu._with_tensor_cuda_as_identity(lambda: seen.setdefault("t", torch.ones(2).cuda()))
    original()
    assert seen["t"].device.type == "cpu"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.ones(1).cuda()  # restored afterwards
    assert LanguageModule.setup_embeddings_and_output_layer.__name__ == "wrapper"
