"""A vocabulary that tensor parallelism does not divide (layers/vocab_padding.py): padded as
Megatron pads it, the padded logits kept out of every softmax, the padding dropped on export.

Ground truth is transformers on the unpadded model. The 2-process part runs this file under
torch.distributed.run (see `_worker`): two training runs and two `megatune verify` runs at TP=2
in one process group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from megatune.layers.cross_entropy import fused_linear_cross_entropy
from megatune.layers.vocab_padding import mask_padded_logits, padded_vocab_size, real_rows
from megatune.models.mappings import Shapes, VocabParallel

ODD_VOCAB = 515  # > the tiny tokenizer's 512 ids, and not divisible by 2


def _megatron_rule(vocab: int, multiple: int) -> int:
    """Megatron-LM's `_vocab_size_with_padding`, written as its loop."""
    after = vocab
    while after % multiple:
        after += 1
    return after


@pytest.mark.parametrize("vocab", [151669, 151936, 128256, ODD_VOCAB, 10])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_padded_vocab_size_is_megatrons_rule(vocab, tp):
    for divisible_by in (1, 64, 128):  # set: always Megatron's rule
        assert padded_vocab_size(vocab, tp, divisible_by) == _megatron_rule(vocab, divisible_by * tp)
    # default: untouched when TP divides it, else Megatron's rule with its default 128
    expected = vocab if vocab % tp == 0 else _megatron_rule(vocab, 128 * tp)
    assert padded_vocab_size(vocab, tp, None) == expected
    with pytest.raises(ValueError, match="at least 1"):
        padded_vocab_size(vocab, tp, 0)


@pytest.mark.parametrize("vocab, tp", [(ODD_VOCAB, 2), (10, 4), (ODD_VOCAB, 1)])
def test_vocab_parallel_mapping_zero_pads_reads_own_rows_and_unshards_exactly(vocab, tp):
    from tests.test_mappings import DictSource

    padded = padded_vocab_size(vocab, tp, None if tp > 1 else 64)
    shapes = Shapes(4, 2, 8, vocab, padded)
    table = torch.randn(vocab, 6, generator=torch.Generator().manual_seed(0))
    mapping = VocabParallel("embedding.word_embeddings.weight", "w")
    shards, per_rank = [], padded // tp
    for rank in range(tp):
        src = DictSource({"w": table})
        shard = mapping.load(src, None, rank, tp, shapes)
        first = rank * per_rank
        real = real_rows(vocab, per_rank, first)
        assert shard.shape == (per_rank, 6) and src.elements_read == real * 6  # only its real rows
        assert torch.equal(shard[:real], table[first:first + real])
        assert torch.count_nonzero(shard[real:]) == 0
        shards.append(shard)
    if vocab == 10:  # ranks 1-3 hold padding only
        assert [real_rows(vocab, per_rank, r * per_rank) for r in range(tp)] == [10, 0, 0, 0]
    rebuilt = mapping.unshard(shards, None, shapes)["w"]
    assert rebuilt.dtype == table.dtype and torch.equal(rebuilt, table)


def test_mask_padded_logits_only_touches_columns_past_the_vocabulary():
    logits = torch.randn(3, 2, 8)
    for first in (0, 8, 16):  # the shards of TP ranks 0, 1, 2 of a 24-row table for a vocabulary of 13
        masked = mask_padded_logits(logits, 13, first)
        column = torch.arange(first, first + 8)
        assert torch.equal(masked[..., column < 13], logits[..., column < 13])
        assert torch.all(masked[..., column >= 13] == float("-inf"))
    assert mask_padded_logits(logits, 13, 0) is logits  # a shard without padding is left alone


def _padded_problem(vocab=11, padded=16, h=8, s=5, b=2, seed=3):
    """hidden [s, b, h], a [padded, h] output weight whose padded rows are NOT zero (so a
    padded column that leaked into the softmax would change the loss), labels [b, s] < vocab."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(s, b, h, generator=gen)
    weight = torch.randn(padded, h, generator=gen)
    labels = torch.randint(0, vocab, (b, s), generator=gen)
    return hidden, weight, labels


def _reference(hidden, weight, labels, vocab):
    """Cross-entropy [b, s] over the real vocabulary only (what transformers computes)."""
    logits = hidden @ weight[:vocab].t()
    return F.cross_entropy(logits.permute(1, 2, 0), labels, reduction="none")


def _loss_and_grads(fn, hidden, weight):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = fn(h, w)
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(9))  # e.g. a loss mask, DPO sums
    (loss * upstream).sum().backward()
    return loss.detach(), h.grad, w.grad


def test_plain_path_padded_columns_get_zero_probability_and_gradient():
    """Megatron's vocab-parallel cross-entropy (GPTModel's plain path) on masked logits."""
    from megatron.core import tensor_parallel

    from megatune.config import load_config, validate
    from megatune.distributed import init_distributed, shutdown

    vocab, padded = 11, 16
    hidden, weight, labels = _padded_problem(vocab, padded)
    init_distributed(validate(load_config(None, {}), 1), seed=0)
    try:
        def plain(h, w):
            logits = mask_padded_logits(h @ w.t(), vocab, 0)  # [s, b, padded], as the output-layer hook
            return tensor_parallel.vocab_parallel_cross_entropy(logits, labels.t().contiguous()).t()

        loss, gh, gw = _loss_and_grads(plain, hidden, weight)
        probs = torch.softmax(mask_padded_logits(hidden @ weight.t(), vocab, 0), dim=-1)
    finally:
        shutdown()
    ref, rh, rw = _loss_and_grads(lambda h, w: _reference(h, w, labels, vocab), hidden, weight)
    assert torch.all(probs[..., vocab:] == 0)
    assert torch.allclose(loss, ref, rtol=1e-6, atol=1e-6)
    assert torch.allclose(gh, rh, rtol=1e-5, atol=1e-6) and torch.allclose(gw[:vocab], rw[:vocab], rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(gw[vocab:]) == 0


@pytest.mark.parametrize("chunk", [2, 4096])
def test_fused_path_leaves_padded_rows_out(chunk):
    """layers/cross_entropy.py's chunked path (its CPU formula) with `vocab_size`."""
    vocab, padded = 11, 16
    hidden, weight, labels = _padded_problem(vocab, padded)
    loss, gh, gw = _loss_and_grads(
        lambda h, w: fused_linear_cross_entropy(h, w, labels, chunk, vocab_size=vocab), hidden, weight)
    ref, rh, rw = _loss_and_grads(lambda h, w: _reference(h, w, labels, vocab), hidden, weight)
    assert torch.allclose(loss, ref, rtol=1e-6, atol=1e-6)
    assert torch.allclose(gh, rh, rtol=1e-5, atol=1e-6) and torch.allclose(gw[:vocab], rw[:vocab], rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(gw[vocab:]) == 0
    # without vocab_size every row is real: the nonzero padded rows then change the loss
    unpadded = fused_linear_cross_entropy(hidden, weight, labels, chunk)
    assert (unpadded - ref).abs().min() > 1e-3


def _hf(vocab=ODD_VOCAB) -> dict:
    return {"model_type": "qwen3", "vocab_size": vocab, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128, "head_dim": 32}


def test_launcher_accepts_a_vocabulary_tp_does_not_divide_and_says_it_pads(tmp_path):
    from megatune.config import ConfigError, load_config, validate
    from megatune.models import get_provider

    config = load_config(None, {"model_name_or_path": str(tmp_path), "tensor_model_parallel_size": 2})
    validate(config, 2, _hf())  # refused before: "vocab_size=515 is not divisible by tensor_model_parallel_size=2"
    notes = get_provider(_hf()).startup_notes(_hf(), config)
    assert any(f"vocabulary of {ODD_VOCAB} padded to 768 rows" in n for n in notes), notes
    assert not get_provider(_hf(512)).startup_notes(_hf(512), config)  # 512 splits over 2 ranks: no padding
    bad = load_config(None, {"model_name_or_path": str(tmp_path), "make_vocab_size_divisible_by": 0})
    with pytest.raises(ConfigError, match="make_vocab_size_divisible_by=0 must be at least 1"):
        validate(bad, 1, _hf())


# ---- two gloo processes: training steps, verify and export at TP=2 ---------------------------------


PADDED_MAX: dict = {}  # Megatron parameter name -> largest |padded row value| seen at export, this rank


def _export_checking_padding(original):
    """The trainer's final export, first recording on this rank the largest |value| in the
    padded rows of the embedding and output layer (they must still be exactly zero)."""
    from megatron.core import parallel_state as ps

    from megatune.layers.vocab_padding import real_rows as real
    from megatune.models.weights import EMBEDDING, OUTPUT_LAYER, global_params

    def export(bundle, *args, **kwargs):
        rank = ps.get_tensor_model_parallel_rank()
        for chunk in bundle.chunks:
            for name, param in global_params(chunk):
                if name in (EMBEDDING, OUTPUT_LAYER):
                    rows = param.shape[0]
                    pad = param.detach()[real(bundle.vocab_size, rows, rank * rows):]
                    PADDED_MAX[name] = max(PADDED_MAX.get(name, 0.0), float(pad.abs().max()) if pad.numel() else 0.0)
        return original(bundle, *args, **kwargs)

    return export


def _worker():
    """Under torch.distributed.run: argv = the test folder. Runs, in one process group: an lr-0
    training step on the plain path, two steps (lr > 0, weight decay) on the chunked
    cross-entropy path forced on for CPU, and `megatune verify --export_path` of an untied and
    a tied model. One RESULT line per rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    import megatune.distributed as md
    import megatune.layers.cross_entropy as ce
    import megatune.models.build as build
    import megatune.models.weights as weights
    from megatune.cli import main

    # One process group for all four runs: each run builds and drops only Megatron's groups.
    # (Re-creating the default group would reuse the first run's group names in torchrun's store.)
    dist.init_process_group("gloo")
    md.shutdown = lambda: ps.destroy_model_parallel() if ps.model_parallel_is_initialized() else None
    root = Path(sys.argv[1])
    result = {"codes": {}}
    weights.export_hf = _export_checking_padding(weights.export_hf)
    result["codes"]["plain"] = main(["train", str(root / "plain.yaml")])
    result["plain_padded_max"] = dict(PADDED_MAX)
    PADDED_MAX.clear()

    plain_config, calls = build.transformer_config, []

    def fused_config(*args, **kwargs):  # the chunked path is the GPU default; on CPU it must be asked for
        tc = plain_config(*args, **kwargs)
        tc.cross_entropy_loss_fusion = True
        return tc

    plain_forward = ce._LinearCrossEntropy.forward

    def counted(ctx, hidden, weight, target, chunk, tp_group, vocab_size):
        calls.append(vocab_size)
        return plain_forward(ctx, hidden, weight, target, chunk, tp_group, vocab_size)

    build.transformer_config, ce._LinearCrossEntropy.forward = fused_config, staticmethod(counted)
    result["codes"]["fused"] = main(["train", str(root / "fused.yaml")])
    build.transformer_config, ce._LinearCrossEntropy.forward = plain_config, staticmethod(plain_forward)
    result["fused_calls"], result["fused_padded_max"] = sorted(set(calls)), dict(PADDED_MAX)

    for name in ("untied", "tied"):
        result["codes"][f"verify_{name}"] = main([
            "verify", "--model_name_or_path", str(root / name), "--tensor_model_parallel_size", "2",
            "--export_path", str(root / f"{name}_export")])
    for rank in range(dist.get_world_size()):  # one write per line, in turn
        if rank == dist.get_rank():
            sys.stdout.write("RESULT " + json.dumps(result) + "\n")
            sys.stdout.flush()
        dist.barrier()
    dist.destroy_process_group()


def _tensors(folder) -> dict:
    from megatune.models.hf_io import SafetensorsSource

    src = SafetensorsSource(folder)
    return {n: src.read(n) for n in src.file_of}


def _export_alone(checkpoint, out) -> dict:
    """`megatune export` of a checkpoint in this process, as one rank (TP=1)."""
    from megatune.config import validate
    from megatune.distributed import init_distributed, shutdown
    from megatune.export import export_config, run_export

    config = export_config(str(checkpoint), {})
    init_distributed(validate(config, 1), seed=0)
    try:
        run_export(config, str(checkpoint), str(out), None)
    finally:
        shutdown()
    return _tensors(out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU gloo test")
def test_tp2_odd_vocabulary_trains_verifies_and_exports_like_transformers(tmp_path):
    from megatune.distributed import free_port
    from megatune.tiny import make_tiny_model
    from tests.test_train import BASE, hf_step, log_rows

    untied = make_tiny_model("qwen3", str(tmp_path / "untied"), seed=3, with_tokenizer=True, vocab_size=ODD_VOCAB)
    make_tiny_model("qwen2", str(tmp_path / "tied"), seed=4, vocab_size=ODD_VOCAB, tie_word_embeddings=True)
    layout = dict(nproc_per_node=2, tensor_model_parallel_size=2, max_steps=1, save_steps=1000)
    runs = {"plain": dict(learning_rate=0.0),
            # 1536 rows: TP rank 1 holds padding only (its log-sum-exp is -inf)
            "fused": dict(learning_rate=1e-2, weight_decay=0.1, max_steps=2, save_steps=2, sequence_parallel=True,
                          make_vocab_size_divisible_by=768)}
    values = {}
    for name, overrides in runs.items():
        values[name] = {**BASE, **layout, **overrides, "model_name_or_path": untied,
                        "output_dir": str(tmp_path / f"{name}_out")}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(values[name]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           __file__, str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 2, proc.stdout[-3000:]
    for r in results:
        assert set(r["codes"].values()) == {0}, r
        assert r["fused_calls"] == [ODD_VOCAB], r  # the chunked path ran, told the real vocabulary
        # padded rows are zero: as loaded (plain, lr 0) and after 2 AdamW steps with weight decay (fused)
        for key in ("plain_padded_max", "fused_padded_max"):
            assert r[key] and set(r[key].values()) == {0.0}, r
    assert f"vocabulary of {ODD_VOCAB} padded to 768 rows" in proc.stdout
    assert f"vocabulary of {ODD_VOCAB} padded to 1536 rows" in proc.stdout

    # one training step: loss and grad norm of transformers on the same global batch
    for name in runs:
        row = log_rows(tmp_path / f"{name}_out")[0]
        ref_loss, ref_norm, ref_tokens = hf_step(untied, values[name], 1)
        assert row["loss_tokens"] == ref_tokens
        assert row["loss"] == pytest.approx(ref_loss, rel=1e-5), name
        assert row["grad_norm"] == pytest.approx(ref_norm, rel=1e-4), name

    # learning rate 0 and verify's export: the HF checkpoint comes back bit for bit, padding stripped
    for model, exported in (("untied", "plain_out"), ("untied", "untied_export"), ("tied", "tied_export")):
        before, after = _tensors(tmp_path / model), _tensors(tmp_path / exported)
        assert before.keys() == after.keys(), exported
        assert all(torch.equal(before[k], after[k]) for k in before), exported
    trained = _tensors(tmp_path / "fused_out")  # trained weights: HF shapes, and they did change
    assert trained["model.embed_tokens.weight"].shape == (ODD_VOCAB, 64)
    assert not torch.equal(trained["lm_head.weight"], _tensors(tmp_path / "untied")["lm_head.weight"])
    # the TP=2 checkpoint (1536 padded rows) exported by one process (TP=1: 515 rows, no padding)
    # gives the same tensors as the trained model's own TP=2 export
    resharded = _export_alone(tmp_path / "fused_out" / "checkpoint-2", tmp_path / "tp1_export")
    assert resharded.keys() == trained.keys() and all(torch.equal(resharded[k], trained[k]) for k in trained)
    # verify: the real vocabulary's logits equal transformers'
    diffs = [line for line in proc.stdout.splitlines() if line.startswith("max_abs_diff=")]
    assert len(diffs) == 2 and all(line.endswith("PASS") for line in diffs), diffs
    assert all(float(line.split()[0].split("=")[1]) <= 1e-4 for line in diffs), diffs


if __name__ == "__main__":
    _worker()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU gloo test")
def test_resume_under_another_vocab_padding_continues_exactly(tmp_path):
    """A TP=2 checkpoint of an odd vocabulary (515 rows padded to 768) resumes under TP=1 (515
    rows, no padding): model and Adam state of the embedding and output layer load into the
    other shape, and steps 3-4 equal the uninterrupted TP=2 run's."""
    import shutil

    from megatune.tiny import make_tiny_model
    from tests.multirun import run_batch
    from tests.test_train import BASE, log_rows

    model = make_tiny_model("qwen3", str(tmp_path / "m"), seed=3, with_tokenizer=True, vocab_size=ODD_VOCAB)
    values = {**BASE, "model_name_or_path": model, "max_steps": 4, "save_steps": 2, "logging_steps": 1,
              "lr_scheduler_type": "constant", "tensor_model_parallel_size": 2, "nproc_per_node": 2,
              "output_dir": str(tmp_path / "tp2")}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(values))
    # the runs' workers call megatune's main directly (tests/multirun.py): no launcher to start
    first = run_batch({"tp2": ["train", str(tmp_path / "run.yaml")]}, 2, tmp_path / "batch2")["tp2"]
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"vocabulary of {ODD_VOCAB} padded to 768 rows" in first.stdout
    (tmp_path / "tp1").mkdir()
    shutil.copytree(tmp_path / "tp2" / "checkpoint-2", tmp_path / "tp1" / "checkpoint-2")
    resumed = run_batch({"tp1": ["train", str(tmp_path / "run.yaml"), "--output_dir", str(tmp_path / "tp1"),
                                 "--tensor_model_parallel_size", "1", "--nproc_per_node", "1",
                                 "--resume_from_checkpoint", "auto"]}, 1, tmp_path / "batch1")["tp1"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "padded to" not in resumed.stdout
    want = {r["step"]: r for r in log_rows(tmp_path / "tp2")}
    got = {r["step"]: r for r in log_rows(tmp_path / "tp1")}
    for step in (3, 4):  # step 4's loss depends on step 3's Adam update
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-6), step
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=1e-5), step
