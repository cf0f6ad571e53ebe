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
    # and counted the same model FLOPs per step for them (decoder + vision tower)
    assert ours["tflops_per_gpu"] * ours["step_s"] == pytest.approx(hf["tflops_per_gpu"] * hf["step_s"])
    assert "vision tower" in ours["flop_formula"]
    assert all(loss == loss and 0 < loss < 20 for loss in ours["losses"])
    assert (tmp_path / "vl_data" / "dataset_info.json").is_file()
