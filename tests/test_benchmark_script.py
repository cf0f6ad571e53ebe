"""benchmarks/throughput.py's vision-language path, run on CPU with a tiny Qwen2-VL in place of
the 7B shape (the script only writes a model when --model_dir holds none): megatune's step and
the transformers baseline must train on the same multimodal global batches (same real tokens per
step), count the vision tower's FLOPs, and report finite losses. Numbers on CPU mean nothing;
what is checked is that the benchmark measures what it says."""

import json
import subprocess
import sys

import pytest

from megatune.tiny import make_tiny_model
from tests.conftest import REPO


def test_vl_benchmark_runs_megatune_and_transformers_on_the_same_batches(tmp_path):
    precision = "amp"
    model = make_tiny_model("qwen2_vl", str(tmp_path / "vl"), seed=3, with_tokenizer=True)
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--shape", "qwen2-vl-7b", "--model_dir", model,
           "--image_size", "56", "--seq_len", "1024", "--micro_batch", "2", "--grad_accum", "2", "--steps", "2",
           "--warmup", "1", "--paths", "plain", "--baseline", f"hf_{precision}", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["run"]: row for row in map(json.loads, out.read_text().splitlines())}
    hf, ours = rows[f"transformers {precision}"], rows["megatune plain"]
    assert "error" not in hf and "error" not in ours, (hf.get("error"), ours.get("error"))
    # tokens per step (real tokens, no padding) agree: both consumed the same global batches
    assert ours["tokens_per_s_per_gpu"] * ours["step_s"] == pytest.approx(hf["tokens_per_s_per_gpu"] * hf["step_s"])
    # and counted the same model FLOPs per step for them
    flops = ours["tflops_per_gpu"] * ours["step_s"] * 1e12
    assert flops == pytest.approx(hf["tflops_per_gpu"] * hf["step_s"] * 1e12)
    # which are the provider's decoder + vision-tower FLOPs of the timed (second and third) global
    # batches, recomputed here from the same data pipeline
    with_images, text_only = timed_step_flops(model, tmp_path / "vl_data56", steps=(1, 2))
    assert flops == pytest.approx(with_images) and with_images > text_only
    assert "vision tower" in ours["flop_formula"]
    assert all(loss == loss and 0 < loss < 20 for loss in ours["losses"])


def timed_step_flops(model: str, data_dir, steps: tuple[int, ...]) -> tuple[float, float]:
    """Mean model FLOPs of the given global batches of the benchmark's config (with the images'
    vision-tower FLOPs, and without them)."""
    from transformers import AutoTokenizer

    from megatune.config import derive_layout, load_config
    from megatune.data.source import build_train_source
    from megatune.models import get_provider
    from megatune.models.build import load_hf_config
    from megatune.stages import get_stage

    config = load_config(None, {"model_name_or_path": model, "stage": "sft", "dataset": "vl_bench",
                                "dataset_dir": str(data_dir), "template": "qwen2_vl", "cutoff_len": 1024,
                                "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2})
    tokenizer = AutoTokenizer.from_pretrained(model)
    get_stage(config).prepare_tokenizer(config, tokenizer)
    source = build_train_source(config, tokenizer, derive_layout(config, 1).global_batch_size)[0]
    _, hf = load_hf_config(model)
    provider = get_provider(hf)
    batches = [source.next_global_batch() for _ in range(max(steps) + 1)]
    with_images = text_only = 0.0
    for step in steps:
        doc_lens = [n for sample in batches[step] for n in sample.doc_lens]
        grids = [g for sample in batches[step] for g in sample.image_grid_thw]
        with_images += provider.step_flops(hf, doc_lens, grids) / len(steps)
        text_only += provider.step_flops(hf, doc_lens, []) / len(steps)
    return with_images, text_only


def test_profile_exposed_communication_is_the_part_no_other_kernel_covers():
    """The profile's `comms_exposed_ms`: communication time with no compute kernel beside it."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from throughput import exposed, merged

    assert merged([(5, 7), (0, 2), (1, 3), (7, 8)]) == [(0, 3), (5, 8)]
    compute = [(0, 10), (12, 14), (13, 20)]
    assert exposed([(8, 13)], compute) == 2  # 10..12 uncovered
    assert exposed([(8, 13), (9, 11), (25, 30)], compute) == 2 + 5
    assert exposed([(2, 4)], compute) == 0
    assert exposed([(0, 5)], []) == 5
    assert exposed([(1, 2), (3, 4), (11, 13)], [(0, 10), (12, 20)]) == 1  # one compute spans two comms
    assert merged([(0, 1), (1, 2)]) == [(0, 2)] and exposed([(0, 2)], [(0, 1), (1, 2)]) == 0  # touching
