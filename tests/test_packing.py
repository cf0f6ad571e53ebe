"""Packing: bounds, per-document shifting, and the model honouring document boundaries."""

import pytest
import torch

from megatune.data.collator import collate, collate_packed, pad_multiple_for
from megatune.data.processors import IGNORE, Sample, chunk_documents, infer_seqlen, pack_samples, supervised_sample


def doc(tokens, learn_from=0):
    return Sample(list(tokens), [IGNORE] * learn_from + list(tokens[learn_from:]))


def test_pack_keeps_every_document_whole_and_under_cutoff():
    samples = [doc(range(n)) for n in (7, 3, 5, 9, 2, 6)]
    packed = pack_samples(samples, cutoff_len=10)
    assert all(len(p.input_ids) <= 10 for p in packed)
    assert sorted(n for p in packed for n in p.doc_lens) == [2, 3, 5, 6, 7, 9]
    assert sum(len(p.input_ids) for p in packed) == 32
    assert len(packed) == 4  # 9+ , 7+3, 6+2 , 5 ... first-fit decreasing


def test_collate_packed_shifts_inside_documents_only():
    packed = Sample([1, 2, 3, 4, 5], [IGNORE, 2, 3, IGNORE, 5], doc_lens=[3, 2])
    batch = collate_packed([packed], pad_id=0, pad_multiple=4)
    assert batch.tokens.tolist() == [[1, 2, 3, 4, 5, 0, 0, 0]]
    # doc 1: positions 0,1 learn 2,3; its last token must not learn doc 2's first token
    assert batch.labels.tolist() == [[2, 3, IGNORE, 5, IGNORE, IGNORE, IGNORE, IGNORE]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch.cu_seqlens.tolist() == [0, 3, 5, 8]


def test_collate_pads_to_multiple_and_masks_padding():
    batch = collate([doc([5, 6, 7]), doc([8, 9])], pad_id=0, pad_multiple=pad_multiple_for(tp=2, cp=2, sequence_parallel=True))
    assert batch.tokens.shape == (2, 8)
    assert batch.labels.tolist()[1] == [9, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE]
    assert batch.num_loss_tokens == 2 + 1


def test_infer_seqlen_keeps_a_sensible_ratio():
    assert infer_seqlen(10, 10, 100) == (10, 10)
    assert infer_seqlen(500, 20, 100) == (80, 20)  # short answer kept whole
    assert infer_seqlen(20, 500, 100) == (20, 80)  # short prompt kept whole
    p, r = infer_seqlen(300, 100, 100)
    assert p + r == 100 and (p, r) == (75, 25)


def test_supervised_sample_masks_prompts_and_history():
    turns = [([1, 2], [3, 4]), ([5], [6, 7])]
    s = supervised_sample(turns, cutoff_len=100)
    assert s.input_ids == [1, 2, 3, 4, 5, 6, 7]
    assert s.labels == [IGNORE, IGNORE, 3, 4, IGNORE, 6, 7]
    assert supervised_sample(turns, 100, mask_history=True).labels == [IGNORE] * 5 + [6, 7]
    assert supervised_sample(turns, 100, train_on_prompt=True).labels == [1, 2, 3, 4, 5, 6, 7]
    cut = supervised_sample(turns, cutoff_len=5)
    assert cut.truncated and len(cut.input_ids) == 5


def test_pretrain_concatenates_with_eos_and_chunks():
    blocks = list(chunk_documents([[1, 2, 3], [4, 5]], eos_id=0, cutoff_len=3))
    assert [b.input_ids for b in blocks] == [[1, 2, 3], [0, 4, 5]]  # trailing eos dropped
    assert blocks[0].labels == blocks[0].input_ids


@pytest.fixture(scope="module")
def megatron_qwen3(tmp_path_factory):
    from megatune.config import load_config, validate
    from megatune.distributed import init_distributed, shutdown
    from megatune.models.build import build_model
    from megatune.models.weights import load_hf_weights
    from megatune.tiny import make_tiny_model

    path = make_tiny_model("qwen3", str(tmp_path_factory.mktemp("packing") / "m"), seed=3)
    config = load_config(None, {"model_name_or_path": path})
    init_distributed(validate(config, 1), seed=0)
    bundle = build_model(config, path)
    load_hf_weights(bundle, path)
    model = bundle.chunks[0].eval()
    yield model, bundle.provider
    shutdown()


def token_losses(megatron, batch, device):
    """Per-token cross-entropy [b, s] through the family's forward, zero where nothing is learned."""
    model, provider = megatron
    labels = batch.labels.to(device)
    mask = labels != IGNORE
    return provider.forward(model, batch, device, labels=torch.where(mask, labels, torch.zeros_like(labels))).float() * mask


def test_packed_loss_equals_documents_run_separately(megatron_qwen3):
    gen = torch.Generator().manual_seed(0)
    docs = [doc(torch.randint(0, 256, (n,), generator=gen).tolist(), learn_from=n // 3) for n in (11, 6, 15)]
    cpu = torch.device("cpu")
    with torch.no_grad():
        separate = [token_losses(megatron_qwen3, collate([d], pad_id=0), cpu)[0] for d in docs]
        packed = token_losses(megatron_qwen3, collate_packed(pack_samples(docs, 64), pad_id=0, pad_multiple=8), cpu)[0]
    # Same per-token losses, in packing order (longest first), and the same token-weighted mean.
    order = sorted(range(3), key=lambda i: len(docs[i].input_ids), reverse=True)
    expected = torch.cat([separate[i] for i in order])
    assert torch.allclose(packed[: expected.numel()], expected, atol=1e-5)
    assert torch.all(packed[expected.numel():] == 0)
    n_tokens = sum(collate([d], 0).num_loss_tokens for d in docs)
    assert abs(packed.sum() / n_tokens - torch.cat(separate).sum() / n_tokens) < 1e-6


def test_packing_without_boundaries_would_differ(megatron_qwen3):
    """Control: the same tokens as one plain sequence give different losses (cross-document attention)."""
    docs = [doc(list(range(1, 12))), doc(list(range(20, 30)))]
    cpu = torch.device("cpu")
    with torch.no_grad():
        packed = token_losses(megatron_qwen3, collate_packed(docs, pad_id=0), cpu)
        plain = collate_packed(docs, pad_id=0)
        plain.cu_seqlens = None
        plain.position_ids = torch.arange(plain.tokens.shape[1]).unsqueeze(0)
        merged = token_losses(megatron_qwen3, plain, cpu)
    assert torch.allclose(packed[0, :10], merged[0, :10], atol=1e-5)  # first document unaffected
    assert not torch.allclose(packed[0, 11:20], merged[0, 11:20], atol=1e-3)
