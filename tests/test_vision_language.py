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
GRAD_TOLERANCE = 1e-5  # relative to the largest gradient entry
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


def loss_weights(batch: dict, vocab: int) -> torch.Tensor:
    """A fixed random projection [b, s, vocab] of the logits, zero at padding: the test's loss
    is sum(logits * weights), so every real logit gets a distinct gradient."""
    w = torch.randn(*batch["input_ids"].shape, vocab, generator=torch.Generator().manual_seed(7))
    return w * batch["attention_mask"].unsqueeze(-1)


def hf_logits_and_grads(model_dir: str, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """transformers' logits [b, s, v] and the vision tower's gradients of the test loss, by
    parameter name relative to the tower."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
        mm_token_type_ids=(batch["input_ids"] == IMG).int(),
    )
    (out.logits * loss_weights(batch, out.logits.shape[-1])).sum().backward()
    grads = {name: p.grad for name, p in model.model.visual.named_parameters()}
    return out.logits.detach().float(), grads


def megatron_logits(bundle, batch: dict) -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, v] on the last pipeline stage (None elsewhere), through
    Megatron's schedule with a backward pass of the test loss (so PP sends activations and
    gradients between stages); parameter .grad fields hold the gradients afterwards."""
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    captured = []

    def loss_func(output):
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(output).float()
        captured.append(logits.detach())
        loss = (logits * loss_weights(batch, logits.shape[-1])).sum()
        return loss, torch.tensor(1), {}  # per-token-loss mode: Megatron divides by nothing

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
        chunk.zero_grad()
    b, s = batch["input_ids"].shape
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([None]),
        model=bundle.chunks[0],
        num_microbatches=1,
        seq_length=s,
        micro_batch_size=b,
        forward_only=False,
    )
    return captured[0] if captured else None


def run_parity(model_dir: str, tp: int, pp: int, sp: bool) -> dict:
    """Build + load the Megatron model under (tp, pp, sp); compare logits (real tokens only)
    and the vision tower's gradients with transformers'. Collective: every rank calls it."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatune.config import load_config, validate
    from megatune.distributed import init_distributed
    from megatune.models.build import build_model
    from megatune.models.weights import load_hf_weights

    world = dist.get_world_size() if dist.is_initialized() else 1
    config = load_config(None, {"model_name_or_path": model_dir})
    config.parallel.tensor_model_parallel_size = tp
    config.parallel.pipeline_model_parallel_size = pp
    config.parallel.sequence_parallel = sp
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    init_distributed(validate(config, world), seed=0)
    bundle = build_model(config, model_dir)
    loaded = load_hf_weights(bundle, model_dir)
    batch = make_batch(model_dir)
    mine = megatron_logits(bundle, batch)
    vision = bundle.chunks[0].vision_model
    result = {"rank": dist.get_rank(), "loaded": loaded, "has_vision": vision is not None}
    if mine is None and vision is None:
        return result
    ref, ref_grads = hf_logits_and_grads(model_dir, batch)
    if mine is not None:
        real = batch["attention_mask"].bool()
        diff = (mine[real] - ref[real]).abs()
        result.update(max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()), logit_scale=float(ref[real].abs().max()))
    if vision is not None:
        grads = dict(vision.named_parameters())
        assert grads.keys() == ref_grads.keys()
        result["grad_max_abs_diff"] = max(float((grads[n].grad - g).abs().max()) for n, g in ref_grads.items())
        result["grad_scale"] = max(float(g.abs().max()) for g in ref_grads.values())
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
    # The vision tower's gradients (through the image-token scatter) equal transformers'.
    assert result["grad_max_abs_diff"] < GRAD_TOLERANCE * result["grad_scale"], result


def test_wrong_mrope_section_is_caught(vl_models, monkeypatch):
    """The comparison sees position errors: swapping M-RoPE's channel split moves the logits."""
    from megatune.distributed import shutdown
    from megatune.models import qwen2_vl

    right = qwen2_vl.mrope_section
    monkeypatch.setattr(qwen2_vl, "mrope_section", lambda hf: list(reversed(right(hf))))
    try:
        result = run_parity(vl_models["qwen2_vl"], 1, 1, False)
    finally:
        shutdown()
    assert result["max_abs_diff"] > 1e-2, result


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents_match_transformers_rows(vl_models, family):
    """The batch's two rows packed into one "thd" sequence (M-RoPE restarting per document,
    Megatron's PackedSeqParams) give transformers' logits of each row alone."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatune.config import load_config, validate
    from megatune.distributed import init_distributed, shutdown
    from megatune.models.mrope import mrope_position_ids
    from megatune.models.build import build_model
    from megatune.models.weights import load_hf_weights

    model_dir = vl_models[family]
    batch = make_batch(model_dir)
    lens = batch["attention_mask"].sum(1).tolist()
    packed = torch.cat([batch["input_ids"][i, :n] for i, n in enumerate(lens)])
    positions = mrope_position_ids(packed, batch["image_grid_thw"], spatial_merge_size=2, image_token_id=IMG,
                                   document_lengths=lens)
    cu = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lens), max_seqlen_kv=max(lens))
    config = load_config(None, {"model_name_or_path": model_dir})
    init_distributed(validate(config, 1), seed=0)
    try:
        bundle = build_model(config, model_dir)
        load_hf_weights(bundle, model_dir)
        model = bundle.chunks[0].eval()
        with torch.no_grad():
            mine = model(packed[None], positions[:, None], None, pixel_values=batch["pixel_values"],
                         image_grid_thw=batch["image_grid_thw"], packed_seq_params=params)[0]
    finally:
        shutdown()
    ref, _ = hf_logits_and_grads(model_dir, batch)
    ref = torch.cat([ref[i, :n] for i, n in enumerate(lens)])
    assert mine.shape == ref.shape
    assert float((mine - ref).abs().max()) < TOLERANCE


def test_text_only_training_batch_touches_the_vision_tower(vl_models):
    """A text-only micro-batch in training mode gives every tower parameter a zero gradient
    (Megatron DDP's overlapped reduction waits for all of a bucket's parameters) and leaves the
    logits those of transformers' text-only forward."""
    from megatune.config import load_config, validate
    from megatune.distributed import init_distributed, shutdown
    from megatune.models.build import build_model
    from megatune.models.weights import load_hf_weights
    from transformers import AutoModelForImageTextToText

    model_dir = vl_models["qwen2_5_vl"]
    ids = torch.randint(20, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(12).expand(3, 2, 12)
    config = load_config(None, {"model_name_or_path": model_dir})
    init_distributed(validate(config, 1), seed=0)
    try:
        bundle = build_model(config, model_dir)
        load_hf_weights(bundle, model_dir)
        model = bundle.chunks[0].train()
        logits = model(ids, positions, None)
        logits.sum().backward()
        grads = [p.grad for p in model.vision_model.parameters()]
    finally:
        shutdown()
    assert all(g is not None and not g.any() for g in grads)
    with torch.no_grad():
        ref = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()(input_ids=ids).logits
    assert float((logits.detach() - ref).abs().max()) < TOLERANCE


def to_nested_layout(src: str, dst: str) -> str:
    """A copy of a published-layout checkpoint re-keyed to the nested layout."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))

    def nested(name):
        if name.startswith("visual."):
            return "model." + name
        if name.startswith("model."):
            return "model.language_model." + name[len("model."):]
        return name

    save_file({nested(k): v for k, v in tensors.items()}, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_detect_layout():
    from megatune.models.vision_language import detect_layout

    assert detect_layout(["visual.blocks.0.attn.qkv.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"]) == "published"
    assert detect_layout(["model.visual.merger.mlp.0.weight", "model.language_model.norm.weight", "lm_head.weight"]) == "nested"
    with pytest.raises(ValueError, match="ckpt: tensor names mix"):
        detect_layout(["visual.patch_embed.proj.weight", "model.language_model.norm.weight"], where="ckpt")
    with pytest.raises(ValueError, match="no Qwen2-VL tensors"):
        detect_layout(["transformer.h.0.attn.weight"])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["published", "nested"])
def test_both_layouts_load_and_export_bit_exact(vl_models, family, layout, tmp_path):
    """Every checkpoint tensor is read (a missing mapping would raise) and an export writes the
    same keys, in the layout read, bit-identical; the nested copy gives the same model."""
    from safetensors.torch import load_file

    from megatune.config import load_config, validate
    from megatune.distributed import init_distributed, shutdown
    from megatune.models.build import build_model
    from megatune.models.vision_language import param_group
    from megatune.models.weights import export_hf, load_hf_weights

    src = vl_models[family]
    if layout == "nested":
        src = to_nested_layout(src, str(tmp_path / "nested"))
    config = load_config(None, {"model_name_or_path": src})
    init_distributed(validate(config, 1), seed=0)
    try:
        bundle = build_model(config, src)
        load_hf_weights(bundle, src)
        export_hf(bundle, src, str(tmp_path / "export"), torch.float32)
        groups = {param_group(n) for n, _ in bundle.chunks[0].named_parameters()}
    finally:
        shutdown()
    source = load_file(os.path.join(src, "model.safetensors"))
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert exported.keys() == source.keys()
    for name, tensor in source.items():
        assert torch.equal(tensor, exported[name]), name
    assert groups == {"vision_tower", "multi_modal_projector", "language_model"}


def test_vision_flops_formula(vl_models):
    """FLOPs = 6 x matmul weights x tokens + 12 x width x sum of attention spans^2; the weights
    are counted from transformers' module and the spans from its own window index."""
    from transformers import AutoConfig
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index

    from megatune.models.vision_language import build_vision_tower, vision_flops

    grids = torch.tensor([[1, 6, 10], [1, 8, 4], [2, 4, 4]])
    for family in FAMILIES:
        hf = AutoConfig.from_pretrained(vl_models[family])
        c = hf.vision_config
        tower = build_vision_tower(hf, torch.float32)
        per_patch = sum(m.weight.numel() for name, m in tower.named_modules()
                        if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d)) and not name.startswith("merger"))
        merger = sum(m.weight.numel() for m in tower.merger.modules() if isinstance(m, torch.nn.Linear))
        patches = int(grids.prod(-1).sum())
        full = get_vision_cu_seqlens(grids).diff().double().pow(2).sum().item()
        if family == "qwen2_5_vl":
            _, cu = get_vision_window_index(grids, c.spatial_merge_size, c.window_size, c.patch_size)
            window = cu.diff().double().pow(2).sum().item()
            assert window < full  # the windows really split the images
            spans = [full if b in c.fullatt_block_indexes else window for b in range(c.depth)]
            width = c.hidden_size
        else:
            spans, width = [full] * c.depth, c.embed_dim
        expected = 6 * per_patch * patches + 6 * merger * patches / 4 + 12 * width * sum(spans)
        assert vision_flops(c, grids.tolist(), family) == pytest.approx(expected, rel=1e-12)


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
        if r["has_vision"]:  # gradients reach the replicated tower complete on every TP rank
            assert r["grad_max_abs_diff"] < GRAD_TOLERANCE * r["grad_scale"], r
        if "max_abs_diff" in r:
            assert r["max_abs_diff"] < TOLERANCE and r["logit_scale"] > 0.1, r
            compared[key] = compared.get(key, 0) + 1
    # TP: both ranks gather the logits; PP: only the last stage has them.
    assert compared == {(f, n): 2 if n == "tp2_sp" else 1 for f in FAMILIES for n in names}, compared


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _worker()
