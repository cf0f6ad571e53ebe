"""Qwen2-VL / Qwen2.5-VL on Megatron (`models/vision_language.py`) against transformers.

Logits of a batch with three images of different sizes (two in one row), text and padding,
fp32 on CPU: one process in-process; TP=2 + sequence parallel and PP=2 in two gloo processes,
running this file under torch.distributed.run (see `_worker`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megatune.tiny import tiny_vl_token_ids

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
IDS = tiny_vl_token_ids()
IMG, START, END = IDS["image_token_id"], IDS["vision_start_token_id"], IDS["vision_end_token_id"]
# Image sizes in pixels (h, w); the tiny processor (min 28x28, max 64 merged tokens) keeps these
# multiples of 28: grids (h/14, w/14) = (6, 10), (8, 4), (4, 4) -> 15, 8 and 4 merged tokens;
# Qwen2.5-VL's 2x2-merged-token windows then include partial ones.
IMAGE_SIZES = ((84, 140), (112, 56), (56, 56))
TOLERANCE = 1e-4
LAYOUTS = {"tp1": (1, 1, False), "tp2_sp": (2, 1, True), "pp2": (1, 2, False)}


def make_models(root) -> dict[str, str]:
    from megatune.tiny import make_tiny_model

    return {f: make_tiny_model(f, os.path.join(root, f), seed=3 + i) for i, f in enumerate(FAMILIES)}


def make_batch(model_dir: str) -> dict:
    """Two rows, right-padded to one length: row 0 = text, image 0, text, image 1, text;
    row 1 = text, image 2, text. Pixel values from the saved image processor (PIL path)."""
    from PIL import Image
    from transformers import AutoImageProcessor

    from megatune.models.mrope import batch_mrope_position_ids

    rng = torch.Generator().manual_seed(0)
    images = [
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=rng, dtype=torch.uint8).numpy())
        for h, w in IMAGE_SIZES
    ]
    processed = AutoImageProcessor.from_pretrained(model_dir)(images=images, return_tensors="pt")
    grids = processed["image_grid_thw"]
    merge = 2

    def text(n):
        return torch.randint(20, 200, (n,), generator=rng).tolist()

    def image(i):
        return [START] + [IMG] * (int(grids[i].prod()) // merge**2) + [END]

    rows = [text(5) + image(0) + text(3) + image(1) + text(4), text(6) + image(2) + text(7)]
    seq = max(len(r) for r in rows)
    seq += -seq % 2  # a multiple of tp for sequence parallelism
    input_ids = torch.zeros(len(rows), seq, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        attention_mask[i, : len(r)] = 1
    position_ids = batch_mrope_position_ids(
        input_ids, grids, spatial_merge_size=merge, image_token_id=IMG, attention_mask=attention_mask
    )
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        pixel_values=processed["pixel_values"],
        image_grid_thw=grids,
    )


def hf_logits(model_dir: str, batch: dict) -> torch.Tensor:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            mm_token_type_ids=(batch["input_ids"] == IMG).int(),
        )
    return out.logits.float()


def megatron_logits(bundle, batch: dict) -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, v] on the last pipeline stage (None elsewhere), through
    Megatron's schedule (so PP sends activations between stages)."""
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    captured = []

    def loss_func(output):
        captured.append(tensor_parallel.gather_from_tensor_model_parallel_region(output).float())
        return output.sum() * 0.0, {}

    def forward_step(data_iterator, model):
        out = model(
            batch["input_ids"],
            batch["position_ids"],
            None,  # causal; padding sits at the end, after every real token
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
        )
        return out, loss_func

    for chunk in bundle.chunks:
        chunk.eval()
    b, s = batch["input_ids"].shape
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([None]),
            model=bundle.chunks[0],
            num_microbatches=1,
            seq_length=s,
            micro_batch_size=b,
            forward_only=True,
        )
    return captured[0] if captured else None


def run_parity(model_dir: str, tp: int, pp: int, sp: bool) -> dict:
    """Build + load the Megatron model under (tp, pp, sp) and compare logits with transformers
    on the real (non-padding) tokens. Collective: every rank calls it."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatune.config import load_config, validate
    from megatune.distributed import init_distributed
    from megatune.models.vision_language import build_vl_bundle
    from megatune.models.weights import load_hf_weights

    world = dist.get_world_size() if dist.is_initialized() else 1
    config = load_config(None, {"model_name_or_path": model_dir})
    config.parallel.tensor_model_parallel_size = tp
    config.parallel.pipeline_model_parallel_size = pp
    config.parallel.sequence_parallel = sp
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    init_distributed(validate(config, world), seed=0)
    bundle = build_vl_bundle(config, model_dir)
    loaded = load_hf_weights(bundle, model_dir)
    batch = make_batch(model_dir)
    mine = megatron_logits(bundle, batch)
    result = {"rank": dist.get_rank(), "loaded": loaded, "has_vision": bundle.chunks[0].vision_model is not None}
    if mine is not None:
        ref = hf_logits(model_dir, batch)
        real = batch["attention_mask"].bool()
        diff = (mine[real] - ref[real]).abs()
        result.update(max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()), logit_scale=float(ref[real].abs().max()))
    return result


# ---- one process, in-process ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def vl_models(tmp_path_factory):
    return make_models(str(tmp_path_factory.mktemp("vl")))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_one_process(vl_models, family):
    from megatune.distributed import shutdown

    try:
        result = run_parity(vl_models[family], 1, 1, False)
    finally:
        shutdown()
    assert result["max_abs_diff"] < TOLERANCE, result
    assert result["logit_scale"] > 0.1  # the logits are not trivially small


def test_wrong_mrope_section_is_caught(vl_models, monkeypatch):
    """The comparison sees position errors: swapping M-RoPE's channel split moves the logits."""
    from megatune.distributed import shutdown
    from megatune.models import vision_language

    right = vision_language.mrope_section
    monkeypatch.setattr(vision_language, "mrope_section", lambda hf: list(reversed(right(hf))))
    try:
        result = run_parity(vl_models["qwen2_vl"], 1, 1, False)
    finally:
        shutdown()
    assert result["max_abs_diff"] > 1e-2, result


# ---- two gloo processes ---------------------------------------------------------------------------


def _worker():
    """Under torch.distributed.run: argv = model root, then layout names; one RESULT line per rank."""
    import torch.distributed as dist

    from megatune.distributed import shutdown

    dist.init_process_group("gloo")
    root, names = sys.argv[1], sys.argv[2].split(",")
    results = []
    for family in FAMILIES:
        for name in names:
            tp, pp, sp = LAYOUTS[name]
            try:
                results.append({"family": family, "layout": name, **run_parity(os.path.join(root, family), tp, pp, sp)})
            except Exception as exc:  # report every failing case, not only the first
                import traceback

                traceback.print_exc()
                results.append({"family": family, "layout": name, "rank": dist.get_rank(), "error": repr(exc)[:500]})
    for rank in range(dist.get_world_size()):  # one write per line, in turn
        if rank == dist.get_rank():
            sys.stdout.write("RESULT " + json.dumps(results) + "\n")
            sys.stdout.flush()
        dist.barrier()
    shutdown()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU gloo test")
def test_logits_match_transformers_tp2_sp_and_pp2(tmp_path):
    from megatune.distributed import free_port

    make_models(str(tmp_path))
    names = ["tp2_sp", "pp2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           __file__, str(tmp_path), ",".join(names)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [r for line in proc.stdout.splitlines() if line.startswith("RESULT ") for r in json.loads(line[7:])]
    assert len(results) == 2 * len(FAMILIES) * len(names), proc.stdout[-2000:] + proc.stderr[-4000:]
    compared = {}
    for r in results:
        assert "error" not in r, r
        key = (r["family"], r["layout"])
        if r["layout"] == "pp2":  # the vision tower lives on the first stage only
            assert r["has_vision"] == (r["rank"] == 0), r
        else:
            assert r["has_vision"], r
        if "max_abs_diff" in r:
            assert r["max_abs_diff"] < TOLERANCE and r["logit_scale"] > 0.1, r
            compared[key] = compared.get(key, 0) + 1
    # TP: both ranks gather the logits; PP: only the last stage has them.
    assert compared == {(f, n): 2 if n == "tp2_sp" else 1 for f in FAMILIES for n in names}, compared


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _worker()
