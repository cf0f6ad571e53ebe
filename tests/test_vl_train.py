"""Vision-language training end to end on CPU: a training step on a multimodal global batch
against transformers' Qwen2-VL on the same samples, export bit-exactness, refusing images for a
text-only model, learning on our bundled image set and LLaMA-Factory's mllm_demo, freezing.

The `megatune train` runs are batched per world size (tests/multirun.py); each test asserts on
its own case's outputs."""

import pytest
import torch

from megatune.tiny import make_tiny_model
from tests.conftest import REPO, SHARED
from tests.multirun import Batches
from tests.test_train import log_rows, weights, write_config

VL = dict(
    stage="sft",
    dataset="megatune_vision",
    dataset_dir=str(REPO / "data"),
    template="qwen2_vl",
    cutoff_len=256,
    per_device_train_batch_size=2,  # rows of different lengths: padding
    gradient_accumulation_steps=2,
    learning_rate=0.0,
    max_steps=1,
    logging_steps=1,
    save_steps=1000,
    seed=7,
)


@pytest.fixture(scope="module")
def vl_model(tmp_path_factory):
    return make_tiny_model("qwen2_vl", str(tmp_path_factory.mktemp("vl") / "tiny"), seed=5, with_tokenizer=True)


def hf_step(values: dict, world: int):
    """(loss, grad norm, loss tokens, images) transformers computes on the first global batch:
    each sample alone through Qwen2VLForConditionalGeneration, token mean over the batch."""
    import inspect

    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from megatune.config import derive_layout, load_config
    from megatune.data.collator import collate
    from megatune.data.source import build_train_source
    from megatune.stages import get_stage

    config = load_config(None, {k: v for k, v in values.items() if k != "nproc_per_node"})
    tokenizer = AutoTokenizer.from_pretrained(values["model_name_or_path"])
    stage = get_stage(config)
    stage.prepare_tokenizer(config, tokenizer)
    source, _, _ = build_train_source(config, tokenizer, derive_layout(config, world).global_batch_size)
    batch = source.next_global_batch()
    model = AutoModelForImageTextToText.from_pretrained(values["model_name_or_path"], dtype=torch.float32)
    takes_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters
    image_id = model.config.image_token_id
    total, count, images = 0.0, 0, 0
    for sample in batch:
        b = collate([sample], tokenizer.pad_token_id)
        pixels = stage.images.process(sample.images, "test")
        logits = model(input_ids=b.tokens, pixel_values=pixels.pixel_values, image_grid_thw=pixels.image_grid_thw,
                       **({"mm_token_type_ids": (b.tokens == image_id).int()} if takes_types else {})).logits
        total = total + torch.nn.functional.cross_entropy(logits[0], b.labels[0], ignore_index=-100, reduction="sum")
        count += int((b.labels != -100).sum())
        images += len(sample.images)
    loss = total / count
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    return loss.item(), norm.item(), count, images


LAYOUTS = {
    "1proc": dict(nproc_per_node=1),
    "tp2_sp": dict(nproc_per_node=2, tensor_model_parallel_size=2, sequence_parallel=True),
    "pp2": dict(nproc_per_node=2, pipeline_model_parallel_size=2),
}
MLLM_DEMO = SHARED / "fixtures" / "lf_data" / "mllm_demo.json"


@pytest.fixture(scope="module")
def vl_runs(vl_model, tmp_path_factory):
    """Every `megatune train` run of this file: the batches and {case: (folder, YAML values)};
    a case's output_dir is `folder / "out"`."""
    root = tmp_path_factory.mktemp("vl_runs")
    runs, cases = Batches(root / "batches"), {}

    def add(name, model, keys):
        (root / name).mkdir()
        config, values = write_config(root / name, model, **keys)
        runs.add(name, ["train", config], values.get("nproc_per_node", 1))
        cases[name] = (root / name, values)

    for layout, keys in LAYOUTS.items():
        add(f"step-{layout}", vl_model, {**VL, **keys})
    text_model = make_tiny_model("qwen3", str(root / "text"), with_tokenizer=True)
    add("text_only", text_model, {**VL, "template": "qwen3_nothink"})
    add("frozen_tower", vl_model, {**VL, "learning_rate": 1e-3, "max_steps": 30, "logging_steps": 5,
                                   "lr_scheduler_type": "constant", "freeze_vision_tower": True})
    if MLLM_DEMO.is_file():
        add("mllm_demo", vl_model, {**VL, "dataset": "mllm_demo", "dataset_dir": str(MLLM_DEMO.parent), "cutoff_len": 2048,
                                    "image_max_pixels": 128 * 128, "per_device_train_batch_size": 1,
                                    "learning_rate": 1e-3, "max_steps": 12, "logging_steps": 3,
                                    "lr_scheduler_type": "constant"})
    return runs, cases


def finished(vl_runs, name: str):
    """(result, output folder, YAML values) of a case that must have succeeded."""
    runs, cases = vl_runs
    result = runs.get(name)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result, cases[name][0] / "out", cases[name][1]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_step_matches_transformers_and_exports_bit_exact(vl_runs, vl_model, layout):
    _, out, values = finished(vl_runs, f"step-{layout}")
    row = log_rows(out)[0]
    loss, norm, tokens, images = hf_step(values, LAYOUTS[layout]["nproc_per_node"])
    assert images >= 4  # every row of megatune_vision has an image: several per step
    assert row["loss_tokens"] == tokens
    assert row["loss"] == pytest.approx(loss, rel=1e-5)
    assert row["grad_norm"] == pytest.approx(norm, rel=1e-4)
    before, after = weights(vl_model), weights(out)
    assert before.keys() == after.keys()  # the published layout (visual.*, model.layers.*) written back
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (out / "preprocessor_config.json").is_file()
    if layout == "1proc":
        generates_from_an_image(out)


def generates_from_an_image(folder):
    """The exported folder is a complete transformers checkpoint: model, image processor and
    tokenizer load, and it generates from an image."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    image = AutoImageProcessor.from_pretrained(str(folder))(images=[Image.new("RGB", (56, 56), (200, 30, 30))],
                                                             return_tensors="pt")
    n = int(image["image_grid_thw"][0].prod()) // 4
    c = model.config
    ids = torch.tensor([[c.vision_start_token_id] + [c.image_token_id] * n + [c.vision_end_token_id]
                        + tokenizer.encode("colour?", add_special_tokens=False)])
    out = model.generate(input_ids=ids, pixel_values=image["pixel_values"], image_grid_thw=image["image_grid_thw"],
                         max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3


def test_images_for_a_text_only_model_are_refused(vl_runs):
    result = vl_runs[0].get("text_only")
    assert result.returncode != 0
    assert "has no vision tower" in result.stderr and "megatune_vision" in result.stderr


def test_learns_the_bundled_images_with_a_frozen_tower(vl_runs, vl_model):
    result, out, _ = finished(vl_runs, "frozen_tower")
    assert "parameter tensors frozen" in result.stdout
    rows = log_rows(out)
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"], [r["loss"] for r in rows]
    before, after = weights(vl_model), weights(out)
    tower = [k for k in before if k.startswith("visual.") and not k.startswith("visual.merger.")]
    assert tower and all(torch.equal(before[k], after[k]) for k in tower)  # frozen: exported as loaded
    assert not torch.equal(before["visual.merger.mlp.0.weight"], after["visual.merger.mlp.0.weight"])  # projector trained
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.skipif(not MLLM_DEMO.is_file(), reason="needs ../shared fixtures")
def test_llama_factory_mllm_demo_trains(vl_runs):
    _, out, _ = finished(vl_runs, "mllm_demo")
    rows = log_rows(out)
    assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]


def test_rows_whose_images_overflow_cutoff_are_dropped_and_counted(vl_model, caplog):
    """LLaMA-Factory's rule for image rows that do not fit: left out with a warning and counted,
    never cut inside an image, never an error (whatever skip_invalid says)."""
    from transformers import AutoTokenizer

    from megatune.config import load_config
    from megatune.data.pipeline import build_samples

    tokenizer = AutoTokenizer.from_pretrained(vl_model)
    values = {**VL, "model_name_or_path": vl_model}
    full, _ = build_samples(load_config(None, {**values, "cutoff_len": 1024}), tokenizer)
    lengths = sorted(len(s.input_ids) for s in full)
    cutoff = lengths[len(lengths) // 2]  # about half the rows are longer
    samples, stats = build_samples(load_config(None, {**values, "cutoff_len": cutoff}), tokenizer)
    assert 0 < stats.dropped < len(full)
    assert stats.samples == len(samples) == len(full) - stats.dropped
    image_id = 11  # the tiny tokenizer's <|image_pad|>
    for s in samples:  # every kept row holds its images' tokens whole
        assert sum(t == image_id for t in s.input_ids) == sum(g[0] * g[1] * g[2] // 4 for g in s.image_grid_thw)
    assert any("left out" in r.message for r in caplog.records)
