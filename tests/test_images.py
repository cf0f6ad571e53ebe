"""Images of multimodal rows (data/images.py, data/multimodal.py): loading, LLaMA-Factory's resize,
the model's image processor, the qwen2_vl template against the real Qwen2-VL chat template, cutoff,
errors, collation, and LLaMA-Factory's / our own demo data."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megatune.data.conversation import Conversation, Message, Role
from megatune.data.converters import convert_rows, to_conversation
from megatune.data.images import (
    DEFAULT_IMAGE_MAX_PIXELS,
    DEFAULT_IMAGE_MIN_PIXELS,
    ImageProcessing,
    load_image_processor,
    open_image,
    regularize_image,
    regularized_size,
    to_image_ref,
)
from megatune.data.multimodal import (
    ImageSample,
    RowDropped,
    check_placeholders,
    collate_images,
    encode_image_conversation,
    encoded_image_features,
    refuse_images,
)
from megatune.data.processors import IGNORE
from megatune.data.registry import DataError, DatasetSpec, load_rows, resolve_datasets
from megatune.data.templates import get_template
from megatune.tiny_tokenizer import make_tiny_tokenizer

from .conftest import REPO, SHARED

U, A = Role.USER, Role.ASSISTANT
CHAT_TEMPLATE = SHARED / "fixtures" / "chat_templates" / "qwen2_5_vl.jinja"
LF_DATA = SHARED / "fixtures" / "lf_data"
OUR_DATA = REPO / "data"
QWEN2_VL = get_template("qwen2_vl")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A model folder with what the data side reads: Qwen2-VL's published image processor
    settings (patch 14, merge 2, temporal patch 2, 56*56..28*28*1280 pixels) and a tokenizer
    with the vision tokens."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    folder = tmp_path_factory.mktemp("vl_model")
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 1280).save_pretrained(folder)
    make_tiny_tokenizer(folder, chat_template=CHAT_TEMPLATE.read_text() if CHAT_TEMPLATE.exists() else "")
    return folder


@pytest.fixture(scope="module")
def processing(model_dir):
    return ImageProcessing.from_model_dir(model_dir)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _png(path: Path, size=(40, 30), colour=(200, 10, 10), mode="RGB") -> Path:
    Image.new(mode, size, colour if mode != "L" else 128).save(path)
    return path


def _pad_id(tok):
    return tok.convert_tokens_to_ids("<|image_pad|>")


# ---------------------------------------------------------------------------------------------
# Loading


def test_image_entry_forms_all_give_the_same_pixels(tmp_path, monkeypatch, processing):
    data_dir = tmp_path / "data"
    (data_dir / "imgs").mkdir(parents=True)
    _png(data_dir / "imgs" / "a.png")
    raw = (data_dir / "imgs" / "a.png").read_bytes()
    pil = Image.open(data_dir / "imgs" / "a.png")
    monkeypatch.chdir(tmp_path)  # "data/imgs/a.png" is found relative to the working directory
    entries = ["imgs/a.png", str(data_dir / "imgs" / "a.png"), "data/imgs/a.png", raw, {"bytes": raw, "path": None},
               {"path": "imgs/a.png", "bytes": None}, pil]
    refs = [to_image_ref(e, data_dir, "row 0") for e in entries]
    assert refs[0]["path"] == str((data_dir / "imgs" / "a.png").resolve())  # relative to dataset_dir, stored absolute
    assert refs[2]["path"] == refs[0]["path"] and refs[5]["path"] == refs[0]["path"]
    assert refs[6]["bytes"] and refs[6]["path"] is None
    expected = np.asarray(pil.convert("RGB"))
    for entry, ref in zip(entries, refs):
        assert np.array_equal(np.asarray(processing.load(ref, "row 0")), expected), type(entry)
    # dataset_dir wins over the working directory (LLaMA-Factory's order)
    (tmp_path / "imgs").mkdir()
    _png(tmp_path / "imgs" / "a.png", colour=(0, 0, 255))
    assert to_image_ref("imgs/a.png", data_dir)["path"] == refs[0]["path"]


def test_missing_image_file_names_row_and_places(tmp_path):
    with pytest.raises(DataError) as err:
        to_image_ref("imgs/nope.png", tmp_path, "dataset 'd', file d.json, row 4, image 1")
    msg = str(err.value)
    assert msg.startswith("dataset 'd', file d.json, row 4, image 1: image file 'imgs/nope.png' not found")
    assert str(tmp_path / "imgs" / "nope.png") in msg and "relative to dataset_dir" in msg


def test_unreadable_and_damaged_images(tmp_path, processing):
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DataError, match=r"row 2, image 0: cannot read '.*text\.png' as an image .*convert it"):
        processing.plan([to_image_ref("text.png", tmp_path)], "row 2")
    good = _png(tmp_path / "big.png", size=(300, 200)).read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2] if len(good) > 200 else good[:60])
    ref = to_image_ref("cut.png", tmp_path)
    # the header is intact, so planning works; decoding (at collate time) fails with the file named
    assert processing.plan([ref], "row 3")
    with pytest.raises(DataError, match=r"cannot (decode|read) '.*cut\.png'"):
        processing.process([ref], "row 3")
    with pytest.raises(DataError, match=r"row 1: an image must be a file path.*got int"):
        to_image_ref(5, tmp_path, "row 1")


# ---------------------------------------------------------------------------------------------
# LLaMA-Factory's resize


def _reference_size(w, h, max_pixels, min_pixels):
    """LLaMA-Factory's rule (mm_plugin.py _preprocess_image, base then Qwen2-VL plugin), written
    out independently with exact rational arithmetic where it can be."""
    if w * h > max_pixels:
        r = math.sqrt(max_pixels / (w * h))
        w, h = math.floor(w * r), math.floor(h * r)
    if w * h < min_pixels:
        r = math.sqrt(min_pixels / (w * h))
        w, h = math.floor(w * r), math.floor(h * r)
    w, h = max(w, 28) if min(w, h) < 28 else w, max(h, 28) if min(w, h) < 28 else h
    if w > 200 * h:
        w = 180 * h
    if h > 200 * w:
        h = 180 * w
    return w, h


SIZES = [(1024, 768), (4000, 3000), (769, 768), (768, 768), (20, 20), (1, 1), (5, 400), (100, 5),
         (30000, 40), (40, 30000), (333, 17), (640, 480), (28, 28), (31, 33)]


@pytest.mark.parametrize("limits", [(DEFAULT_IMAGE_MAX_PIXELS, DEFAULT_IMAGE_MIN_PIXELS), (262144, 1024), (5000, 4000)])
def test_resize_rule_matches_independent_computation(limits):
    max_pixels, min_pixels = limits
    for w, h in SIZES:
        want = _reference_size(w, h, max_pixels, min_pixels)
        assert regularized_size(w, h, max_pixels, min_pixels) == want, (w, h)
        got = regularize_image(Image.new("RGB", (w, h), (1, 2, 3)), max_pixels, min_pixels)
        assert got.size == want and got.mode == "RGB", (w, h)
    # what the rule guarantees
    for w, h in [(4000, 3000), (1920, 1080)]:
        nw, nh = regularized_size(w, h, max_pixels, min_pixels)
        assert nw * nh <= max_pixels and abs(nw / nh - w / h) < 0.01


def test_resize_runs_in_the_files_mode_then_rgb():
    """Palette images are shrunk in palette mode (PIL's default filter for it is NEAREST), then
    converted, as in LLaMA-Factory; RGBA loses its alpha channel; grey becomes RGB."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8))
    pal = rgb.quantize(16)
    size = regularized_size(120, 90, max_pixels=60 * 45)
    assert size == (60, 45)
    assert np.array_equal(np.asarray(regularize_image(pal, max_pixels=60 * 45)),
                          np.asarray(pal.resize(size, Image.Resampling.NEAREST).convert("RGB")))
    assert not np.array_equal(np.asarray(regularize_image(pal, max_pixels=60 * 45)),
                              np.asarray(pal.convert("RGB").resize(size)))  # the order shows
    assert np.array_equal(np.asarray(regularize_image(rgb, max_pixels=60 * 45)),
                          np.asarray(rgb.resize(size, Image.Resampling.BICUBIC)))
    rgba = Image.new("RGBA", (50, 50), (10, 20, 30, 0))
    assert regularize_image(rgba).getpixel((0, 0)) == (10, 20, 30)
    assert regularize_image(Image.new("L", (50, 50), 7)).getpixel((0, 0)) == (7, 7, 7)


# ---------------------------------------------------------------------------------------------
# The image processor


def test_image_processor_from_model_folder_without_torchvision(model_dir, processing):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    assert type(load_image_processor(model_dir)) is Qwen2VLImageProcessorPil
    assert processing.merge_size == 2 and processing.patch_dim == 3 * 2 * 14 * 14


@pytest.mark.parametrize("size", [(640, 480), (64, 96), (30000, 40), (3, 3), (1500, 900), (200, 28)])
def test_processor_shapes_token_counts_and_plan(tmp_path, processing, size):
    ref = to_image_ref(_png(tmp_path / "x.png", size=size, colour=(9, 99, 199)))
    (grid,) = processing.plan([ref])
    payload = processing.process([ref], expected_grids=[grid])
    t, h, w = grid
    assert payload.image_grid_thw.tolist() == [grid] and t == 1
    assert payload.pixel_values.shape == (t * h * w, 1176) and payload.pixel_values.dtype == torch.float32
    # the same numbers straight from transformers on the resized image
    resized = regularize_image(Image.open(tmp_path / "x.png"))
    direct = processing.processor(images=[resized], return_tensors="pt")
    assert torch.equal(direct["pixel_values"].float(), payload.pixel_values)
    assert direct["image_grid_thw"].tolist() == [grid]
    # token count: transformers' own patch count for that size, over merge_size**2
    patches = processing.processor.get_number_of_image_patches(resized.height, resized.width)
    assert processing.tokens(grid) == patches // 4 == t * h * w // 4


def test_limits_are_checked_and_missing_processor_is_explained(tmp_path, model_dir):
    with pytest.raises(DataError, match=r"image_min_pixels \(100\) must be .* at most image_max_pixels \(50\)"):
        ImageProcessing.from_model_dir(model_dir, max_pixels=50, min_pixels=100)
    with pytest.raises(DataError, match=r"no preprocessor_config\.json.*copy preprocessor_config\.json"):
        load_image_processor(tmp_path)
    # the cache fingerprint follows the limits and the processor's settings
    base = ImageProcessing.from_model_dir(model_dir)
    assert base.fingerprint() == ImageProcessing.from_model_dir(model_dir).fingerprint()
    assert base.fingerprint() != ImageProcessing.from_model_dir(model_dir, max_pixels=262144).fingerprint()
    shutil.copytree(model_dir, tmp_path / "m2")
    cfg = json.loads((tmp_path / "m2" / "preprocessor_config.json").read_text())
    cfg["size"]["longest_edge"] = 12845056
    (tmp_path / "m2" / "preprocessor_config.json").write_text(json.dumps(cfg))
    assert base.fingerprint() != ImageProcessing.from_model_dir(tmp_path / "m2").fingerprint()


# ---------------------------------------------------------------------------------------------
# qwen2_vl against the real chat template


def _conv(tmp_path, *turns, images=(), system=None):
    msgs = [Message(U if i % 2 == 0 else A, t) for i, t in enumerate(turns)]
    return Conversation(msgs, system=system, images=list(images), source="dataset 't', file t.json, row 0")


def test_qwen2_vl_equals_real_chat_template_with_images(tmp_path, tokenizer, processing):
    if not CHAT_TEMPLATE.exists():
        pytest.skip(f"{CHAT_TEMPLATE} not available")
    a = _png(tmp_path / "a.png", size=(100, 60))
    b = _png(tmp_path / "b.png", size=(64, 300), colour=(0, 255, 0))
    c = _png(tmp_path / "c.png", size=(500, 400), colour=(0, 0, 255))
    conv = _conv(tmp_path, "<image>What is this?<image>", "Two shapes.", "And here?\n<image>", "A blue one.",
                 images=["a.png", "b.png", "c.png"])
    sample = encode_image_conversation(conv, QWEN2_VL, tokenizer, processing, 4096, dataset_dir=tmp_path)

    # Reference: the model's chat template, then each <|image_pad|> repeated as Qwen2VLProcessor does
    # (grid.prod() // merge_size**2), with the grid from the image processor run on the resized images.
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}, {"type": "image"}]},
        {"role": "assistant", "content": "Two shapes."},
        {"role": "user", "content": [{"type": "text", "text": "And here?\n"}, {"type": "image"}]},
        {"role": "assistant", "content": "A blue one."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    grids = processing.processor(images=[regularize_image(Image.open(p)) for p in (a, b, c)],
                                 return_tensors="pt")["image_grid_thw"]
    pieces = text.split("<|image_pad|>")
    assert len(pieces) == 4
    expanded = pieces[0] + "".join("<|image_pad|>" * int(g.prod() // 4) + p for g, p in zip(grids, pieces[1:]))
    expected = tokenizer(expanded, add_special_tokens=False)["input_ids"]
    assert sample.input_ids == expected
    assert sample.image_grid_thw == grids.tolist()
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    # labels: exactly the two answers with their end of turn
    learned = [t for t, lab in zip(sample.input_ids, sample.labels) if lab != IGNORE]
    assert tokenizer.decode(learned) == "Two shapes.<|im_end|>\nA blue one.<|im_end|>\n"


def test_image_tokens_never_labelled_even_with_train_on_prompt(tmp_path, tokenizer, processing):
    _png(tmp_path / "a.png")
    conv = _conv(tmp_path, "<image>Colour?", "Red.", images=["a.png"])
    sample = encode_image_conversation(conv, QWEN2_VL, tokenizer, processing, 4096, dataset_dir=tmp_path,
                                       train_on_prompt=True)
    pad = _pad_id(tokenizer)
    assert pad in sample.input_ids
    assert all((lab == IGNORE) == (tid == pad) for tid, lab in zip(sample.input_ids, sample.labels))


# ---------------------------------------------------------------------------------------------
# Placeholders, videos, text-only models


def test_placeholder_errors(tmp_path, tokenizer, processing):
    _png(tmp_path / "a.png")
    cases = [
        (("<image><image>Two?", "No."), ["a.png"], r"row 0: 2 <image> placeholder\(s\) in the user turns but 1 image"),
        (("What?", "No."), ["a.png"], r"0 <image> placeholder\(s\) .* but 1 image\(s\).*put one <image>"),
        (("<image>What?", "No."), [], r"1 <image> placeholder\(s\) .* but 0 image"),
        (("<image>What?", "It is <image>."), ["a.png", "a.png"], r"message 1 \(assistant\) has an <image> placeholder"),
        (("<video>What?", "A dog."), [], r"message 0 has a <video> placeholder; videos are not supported yet"),
        (("<image>What is <|image_pad|>?", "No."), ["a.png"], r"2 image token\(s\) for 1 image.*only <image>"),
    ]
    for turns, images, pattern in cases:
        conv = _conv(tmp_path, *turns, images=images)
        with pytest.raises(DataError, match=pattern):
            encode_image_conversation(conv, QWEN2_VL, tokenizer, processing, 4096, dataset_dir=tmp_path)
    assert check_placeholders(_conv(tmp_path, "<image>a", "b", "c<image><image>", "d", images=[1, 2, 3])) == 3


def test_videos_column_refused():
    spec = DatasetSpec(name="v", formatting="sharegpt", columns={"messages": "messages", "videos": "videos"},
                       tags={"role_tag": "role", "content_tag": "content", "user_tag": "user",
                             "assistant_tag": "assistant"})
    row = {"messages": [{"role": "user", "content": "<video>What?"}, {"role": "assistant", "content": "A."}],
           "videos": ["v.mp4"]}
    with pytest.raises(DataError, match=r"row 3: column 'videos' holds videos, .*not support yet; remove `columns.videos`"):
        to_conversation(row, spec, "dataset 'v', file v.json, row 3")


def test_images_to_text_only_model_are_refused(tmp_path):
    conv = _conv(tmp_path, "<image>What?", "A.", images=["a.png"])
    with pytest.raises(DataError, match=r"row 0: the row has 1 image\(s\) but template 'qwen3' takes no images; "
                                        r"train a vision-language model"):
        refuse_images(conv, "template 'qwen3' takes no images")
    refuse_images(_conv(tmp_path, "What?", "A."), "template 'qwen3' takes no images")  # no images: fine


def test_datasets_image_feature_entries_convert(tmp_path):
    spec = DatasetSpec(name="p", formatting="sharegpt", columns={"messages": "messages", "images": "images"},
                       tags={"role_tag": "role", "content_tag": "content", "user_tag": "user",
                             "assistant_tag": "assistant"}, dataset_dir=str(tmp_path))
    raw = io.BytesIO()
    Image.new("RGB", (30, 30)).save(raw, format="PNG")
    row = {"messages": [{"role": "user", "content": "<image><image>?"}, {"role": "assistant", "content": "A."}],
           "images": [{"bytes": raw.getvalue(), "path": None}, Image.new("RGB", (8, 8))]}
    conv = to_conversation(row, spec, "row 0")
    assert len(conv.images) == 2
    with pytest.raises(DataError, match=r"row 0: image 0 of column 'images' is a float"):
        to_conversation({**row, "images": [1.5]}, spec, "row 0")


# ---------------------------------------------------------------------------------------------
# cutoff_len


def _block_ends(ids, pad, end):
    """Positions just after each image's run of image tokens, and whether each is closed by end."""
    ends = [i + 1 for i in range(len(ids)) if ids[i] == pad and (i + 1 == len(ids) or ids[i + 1] != pad)]
    return ends, all(i < len(ids) and ids[i] == end for i in ends)


def test_cutoff_drops_rows_whose_images_do_not_fit_and_never_cuts_one(tmp_path, tokenizer, processing):
    """At every cutoff_len: the row is kept iff its last image block (through <|vision_end|>)
    ends within cutoff_len; a kept row has every image whole; where the text budget split
    would cut into an image, the answer gives way instead."""
    _png(tmp_path / "a.png", size=(60, 60))
    _png(tmp_path / "b.png", size=(60, 90))
    conv = _conv(tmp_path, "<image>One.", "First answer here.", "Two.<image> What is it?",
                 "Second answer, which is a little longer than the first one.", images=["a.png", "b.png"])
    pad, end = _pad_id(tokenizer), tokenizer.convert_tokens_to_ids("<|vision_end|>")
    full = encode_image_conversation(conv, QWEN2_VL, tokenizer, processing, 100_000, dataset_dir=tmp_path)
    total = full.input_ids.count(pad)
    assert total == sum(processing.tokens(g) for g in full.image_grid_thw) == 4 + 6
    (_, last_end), closed = _block_ends(full.input_ids, pad, end)
    assert closed
    needed = last_end + 1  # through the second image's <|vision_end|>
    plain = QWEN2_VL.encode(tokenizer, conv)  # one image token per image; the text budget split alone:
    from megatune.data.multimodal import expand_image_tokens
    from megatune.data.processors import supervised_sample

    expanded = expand_image_tokens(plain, pad, [4, 6])
    gave_way = 0
    for cutoff in range(1, len(full.input_ids) + 1):
        try:
            s = encode_image_conversation(conv, QWEN2_VL, tokenizer, processing, cutoff, dataset_dir=tmp_path)
        except RowDropped as err:
            assert cutoff < needed, cutoff
            assert str(err).startswith(f"dataset 't', file t.json, row 0: its 2 image(s) take 10 tokens and its last "
                                       f"image ends at token {needed}, beyond cutoff_len={cutoff}")
            continue
        assert cutoff >= needed and len(s.input_ids) == cutoff
        ends, closed = _block_ends(s.input_ids, pad, end)
        assert s.input_ids.count(pad) == total and len(ends) == 2 and closed
        text_only = supervised_sample(expanded, cutoff)
        gave_way += text_only.input_ids.count(pad) < total
        if text_only.input_ids.count(pad) == total and _block_ends(text_only.input_ids, pad, end)[1]:
            assert s.input_ids == text_only.input_ids  # nothing to protect: the text rule as is
    assert gave_way > 0  # some budgets would have cut the image without the protection


def test_image_rows_truncate_like_text_rows_without_images(tokenizer, processing):
    """Without images the image path cuts exactly as the text path (one budget split for both),
    with and without train_on_prompt and mask_history."""
    from megatune.data.processors import supervised_sample

    conv = _conv(None, "Hello there, how are you?", "Fine, thanks. And you?", "Good.", "Nice to hear it.")
    turns = QWEN2_VL.encode(tokenizer, conv)
    n = sum(len(p) + len(r) for p, r in turns)
    for cutoff in range(1, n + 2):
        for top, mh in ((False, False), (True, False), (False, True)):
            want = supervised_sample(turns, cutoff, top, mh)
            try:
                got = encode_image_conversation(conv, QWEN2_VL, tokenizer, processing, cutoff, train_on_prompt=top,
                                                mask_history=mh)
            except DataError:
                assert want is None, (cutoff, top, mh)
                continue
            assert (got.input_ids, got.labels, got.truncated) == (want.input_ids, want.labels, want.truncated), (
                cutoff, top, mh)


def test_mask_history_serves_the_last_turn_first_and_never_cuts_an_image(tmp_path, tokenizer, processing):
    """mask_history with images: the budget goes to the last turn first (LLaMA-Factory's order);
    a row is kept iff the history turn holding the image still gets room for its image block,
    and a kept row has the image whole and learns the last answer."""
    from megatune.data.multimodal import expand_image_tokens
    from megatune.data.processors import infer_seqlen

    _png(tmp_path / "a.png", size=(60, 60))
    conv = _conv(tmp_path, "<image>What colour?", "Red, a bright and warm red.", "And its shape?",
                 "A square with four equal sides and four right angles.", images=["a.png"])
    pad, end = _pad_id(tokenizer), tokenizer.convert_tokens_to_ids("<|vision_end|>")
    turns = expand_image_tokens(QWEN2_VL.encode(tokenizer, conv), pad, [4])
    (p0, r0), (p1, r1) = turns
    image_end = p0.index(end) + 1
    full = len(p0) + len(r0) + len(p1) + len(r1)
    kept_rows = 0
    for cutoff in range(1, full + 2):
        last_p, last_r = infer_seqlen(len(p1), len(r1), cutoff)  # LLaMA-Factory: the last turn first
        room = cutoff - last_p - last_r
        try:
            s = encode_image_conversation(conv, QWEN2_VL, tokenizer, processing, cutoff, mask_history=True,
                                          dataset_dir=tmp_path)
        except RowDropped as err:
            assert room < image_end, cutoff
            assert "mask_history" in str(err) and f"cutoff_len={cutoff}" in str(err)
            assert "turn 1's images do not fit" in str(err)  # the image is in the first turn
            continue
        kept_rows += 1
        assert room >= image_end, cutoff
        assert s.input_ids.count(pad) == 4 and s.input_ids[:image_end] == p0[:image_end]
        assert s.input_ids[-(last_p + last_r):] == p1[:last_p] + r1[:last_r]  # the last turn as LF keeps it
        assert [t for t, lab in zip(s.input_ids, s.labels) if lab != IGNORE] == r1[:last_r]
    assert 0 < kept_rows < full + 1


# ---------------------------------------------------------------------------------------------
# Storage and collation


def test_samples_survive_arrow_storage(tmp_path, tokenizer, processing):
    import datasets

    _png(tmp_path / "a.png")
    raw = io.BytesIO()
    Image.new("RGB", (50, 40), (1, 2, 3)).save(raw, format="PNG")
    text_only = encode_image_conversation(_conv(tmp_path, "Hi", "Hello."), QWEN2_VL, tokenizer, processing, 512)
    with_images = encode_image_conversation(_conv(tmp_path, "<image><image>?", "Yes.", images=["a.png", raw.getvalue()]),
                                            QWEN2_VL, tokenizer, processing, 512, dataset_dir=tmp_path)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64")),
                                  "labels": datasets.Sequence(datasets.Value("int64")),
                                  "truncated": datasets.Value("bool"), **encoded_image_features()})
    stored = datasets.Dataset.from_list([text_only.as_row(), with_images.as_row()], features=features)
    stored.save_to_disk(tmp_path / "cache")
    back = datasets.load_from_disk(tmp_path / "cache")
    assert back[0]["images"] == [] and back[1]["image_grid_thw"] == with_images.image_grid_thw
    assert back[1]["images"] == with_images.images
    out = collate_images([back[0], back[1]], processing, _pad_id(tokenizer), back[0]["input_ids"] + back[1]["input_ids"])
    assert out["image_grid_thw"].tolist() == with_images.image_grid_thw


def test_collate_concatenates_in_order_and_checks(tmp_path, tokenizer, processing):
    for name, size in (("a", (60, 60)), ("b", (90, 40)), ("c", (40, 120))):
        _png(tmp_path / f"{name}.png", size=size, colour=(len(name) * 50, 0, 0))
    s1 = encode_image_conversation(_conv(tmp_path, "<image>x", "y", images=["a.png"]), QWEN2_VL, tokenizer,
                                   processing, 512, dataset_dir=tmp_path)
    s2 = encode_image_conversation(_conv(tmp_path, "<image><image>x", "y", images=["b.png", "c.png"]), QWEN2_VL,
                                   tokenizer, processing, 512, dataset_dir=tmp_path)
    s0 = encode_image_conversation(_conv(tmp_path, "x", "y"), QWEN2_VL, tokenizer, processing, 512)
    pad = _pad_id(tokenizer)
    ids = s1.input_ids + s0.input_ids + s2.input_ids  # e.g. a packed row
    out = collate_images([s1, s0, s2], processing, pad, ids)
    parts = [processing.process(s.images).pixel_values for s in (s1, s2)]
    assert torch.equal(out["pixel_values"], torch.cat(parts))
    assert out["image_grid_thw"].tolist() == s1.image_grid_thw + s2.image_grid_thw
    assert out["pixel_values"].shape[0] == int(out["image_grid_thw"].prod(-1).sum())
    empty = collate_images([s0], processing)
    assert empty["pixel_values"].shape == (0, 1176) and empty["image_grid_thw"].shape == (0, 3)
    with pytest.raises(DataError, match=r"micro-batch has \d+ image tokens but its images need \d+"):
        collate_images([s1, s2], processing, pad, s1.input_ids)
    stale = ImageSample(s1.input_ids, s1.labels, s1.images, [[1, 2, 2]])
    with pytest.raises(DataError, match=r"now gives patch grid \[1, 4, 4\], but the sample was encoded for "
                                        r"\[1, 2, 2\].*overwrite_cache"):
        collate_images([stale], processing)
    (tmp_path / "a.png").unlink()
    with pytest.raises(DataError, match=r"a\.png' no longer exists"):
        collate_images([s1], processing)


# ---------------------------------------------------------------------------------------------
# Real data: LLaMA-Factory's mllm_demo and our megatune_vision


def _encode_dataset(name, dataset_dir, tokenizer, processing, cutoff=4096):
    (spec,) = resolve_datasets(name, dataset_dir)
    convs, skipped = convert_rows(load_rows(spec), spec)
    assert skipped == 0
    return convs, [encode_image_conversation(c, QWEN2_VL, tokenizer, processing, cutoff, dataset_dir=spec.dataset_dir)
                   for c in convs]


def test_llamafactory_mllm_demo_loads_and_encodes(tokenizer, processing):
    if not (LF_DATA / "mllm_demo.json").exists():
        pytest.skip(f"{LF_DATA} not available")
    convs, samples = _encode_dataset("mllm_demo", LF_DATA, tokenizer, processing)
    rows = json.loads((LF_DATA / "mllm_demo.json").read_text())
    assert len(samples) == len(rows) == 6
    pad = _pad_id(tokenizer)
    for row, sample in zip(rows, samples):
        assert len(sample.images) == len(row["images"]) == sum(m["content"].count("<image>") for m in row["messages"])
        assert sample.input_ids.count(pad) == sum(processing.tokens(g) for g in sample.image_grid_thw)
        assert all(Path(r["path"]).is_file() for r in sample.images)
    out = collate_images(samples[:2], processing, pad, samples[0].input_ids + samples[1].input_ids)
    assert out["pixel_values"].shape[0] == int(out["image_grid_thw"].prod(-1).sum())


def test_megatune_vision_demo_set(tokenizer, processing):
    convs, samples = _encode_dataset("megatune_vision", OUR_DATA, tokenizer, processing)
    assert len(samples) >= 30
    assert any(len(s.images) == 2 and c.messages[0].content.count("<image>") == 2 for c, s in zip(convs, samples))
    assert any(len(c.messages) == 4 and len(s.images) == 2 for c, s in zip(convs, samples))
    colours = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 200, 20)}
    for conv, sample in zip(convs, samples):
        assert all(Path(r["path"]).stat().st_size < 4096 for r in sample.images)
        if conv.messages[0].content == "<image>What colour is the shape?":  # the answer is what the image shows
            image = Image.open(sample.images[0]["path"]).convert("RGB")
            centre = image.getpixel((image.width // 2, image.height * 2 // 3))
            (named,) = [c for c in colours if c in conv.messages[1].content]
            assert centre == colours[named]
    # the same question has different answers for different images: only the image tells them apart
    answers = {c.messages[1].content for c in convs if c.messages[0].content == "<image>What colour is the shape?"}
    assert len(answers) == 4
