"""Encoding image + text conversations into training samples, and their images per micro-batch.

The encoded sample keeps image *references*, not pixels (see `ImageSample`): an image's
pixel_values are large (Qwen2-VL, 512x512: 1296 patches x 1176 floats = 6 MB in fp32; at the
default image_max_pixels 768*768: 14 MB), so a data set's worth does not fit in memory or in the
tokenized cache, while its files do. Encoding reads only each image's header to know its patch
grid, hence its token count; `collate_images` decodes and processes the micro-batch's images when
the batch is built. LLaMA-Factory does the same in effect: it runs the processor during
preprocessing only to count tokens, stores the image paths, and processes again in its collator.

Rules (LLaMA-Factory's, except where noted):
- "<image>" placeholders sit in user turns; their count must equal the row's images, taken in
  order. Each becomes `<|vision_start|>` + `<|image_pad|>` x N + `<|vision_end|>` with
  N = t*h*w / merge_size**2 of the processed image.
- A row whose image tokens do not fit `cutoff_len` is left out (`RowDropped`, warned and
  counted by the caller); truncation never cuts into an image's tokens: where the text budget
  split would, the answer gives way. (LLaMA-Factory's supervised processor truncates through
  image tokens, which transformers' Qwen2-VL then rejects at forward time, "Image features and
  image tokens do not match"; its packing path drops rows longer than cutoff_len with a warning.)
- Labels at image tokens are always -100, also with train_on_prompt (they carry vision
  features, not text to predict); LLaMA-Factory would label them with train_on_prompt.
- Videos are refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from megatune.data.conversation import Conversation, Role
from megatune.data.images import (
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    ImageProcessing,
    ImageRef,
    to_image_ref,
)
from megatune.data.processors import IGNORE, assemble_turns, keep_lengths
from megatune.data.registry import DataError

TokenTurns = list[tuple[list[int], list[int]]]


class RowDropped(DataError):
    """A row left out on purpose (its images do not fit cutoff_len), not bad data: the caller
    counts it as dropped and warns, whatever `skip_invalid` says."""


@dataclass
class ImageSample:
    """An encoded multimodal sample.

    input_ids / labels: as `processors.Sample` (labels aligned with inputs, -100 = no loss);
    each image occupies t*h*w / merge_size**2 consecutive image-token ids.
    images: one reference per image, in the order their tokens appear:
        {"path": absolute path | None, "bytes": encoded image | None}.
    image_grid_thw: the (t, h, w) patch grid planned for each image, [n_images][3].
    """

    input_ids: list[int]
    labels: list[int]
    images: list[ImageRef] = field(default_factory=list)
    image_grid_thw: list[list[int]] = field(default_factory=list)
    truncated: bool = False

    def as_row(self) -> dict:
        """The columns to store (datasets.map output; see `ENCODED_IMAGE_COLUMNS`)."""
        return {"input_ids": self.input_ids, "labels": self.labels, "truncated": self.truncated,
                "images": self.images, "image_grid_thw": self.image_grid_thw}


ENCODED_IMAGE_COLUMNS = ("images", "image_grid_thw")


def encoded_image_features():
    """`datasets.Features` of the image columns, to pass to `datasets.map(features=...)` together
    with the text columns: without them a batch of text-only rows would infer a null type that
    later image rows cannot extend."""
    import datasets

    return {
        # a list of structs (datasets.Sequence of a dict would store a struct of lists instead)
        "images": [{"path": datasets.Value("string"), "bytes": datasets.Value("binary")}],
        "image_grid_thw": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
    }


# ---------------------------------------------------------------------------------------------
# Checks


def check_placeholders(conversation: Conversation, where: str = "") -> int:
    """Count the "<image>" placeholders of user turns and check them against the row's images.

    Returns the number of placeholders. Raises DataError: a count different from the images'
    (LLaMA-Factory's check), a placeholder outside a user turn, or a "<video>" placeholder.
    """
    where = where or conversation.source
    count = 0
    for pos, msg in enumerate(conversation.messages):
        if VIDEO_PLACEHOLDER in msg.content:
            raise DataError(f"{where}: message {pos} has a {VIDEO_PLACEHOLDER} placeholder; videos are not supported "
                            f"yet: remove the video or the row")
        if IMAGE_PLACEHOLDER in msg.content and msg.role != Role.USER:
            raise DataError(f"{where}: message {pos} ({msg.role.value}) has an {IMAGE_PLACEHOLDER} placeholder; "
                            f"images can only be given in user turns")
        count += msg.content.count(IMAGE_PLACEHOLDER) if msg.role == Role.USER else 0
    if conversation.system and IMAGE_PLACEHOLDER in conversation.system:
        raise DataError(f"{where}: the system prompt has an {IMAGE_PLACEHOLDER} placeholder; put images in user turns")
    if count != len(conversation.images):
        raise DataError(
            f"{where}: {count} {IMAGE_PLACEHOLDER} placeholder(s) in the user turns but {len(conversation.images)} "
            f"image(s) in the images column; put one {IMAGE_PLACEHOLDER} in the text where each image belongs, "
            f"in the order of the images column"
        )
    return count


def refuse_images(conversation: Conversation, reason: str) -> None:
    """For a text-only model or template: raise DataError if the row has images (they would
    otherwise be silently ignored). `reason` names the model/template, e.g. "template 'qwen3'
    takes no images" or "model ./m has no vision tower"."""
    if conversation.images:
        raise DataError(
            f"{conversation.source}: the row has {len(conversation.images)} image(s) but {reason}; train a "
            f"vision-language model (e.g. Qwen2-VL with template: qwen2_vl) or remove `columns.images` "
            f"from the dataset's entry in dataset_info.json"
        )


# ---------------------------------------------------------------------------------------------
# Encoding


def image_token_id(tokenizer, template) -> int:
    """The id of the template's image token (Qwen2-VL: <|image_pad|>). Raises ValueError when
    the template takes no images or the tokenizer does not know the token."""
    token = getattr(template, "image_token", None)
    if not token:
        raise ValueError(f"template '{template.name}' takes no images; use a vision-language template (qwen2_vl)")
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(tid) != token:
        raise ValueError(f"template '{template.name}' needs the token {token!r}, which this tokenizer lacks; "
                         f"use the tokenizer of the vision-language model")
    return tid


def _block_end_ids(tokenizer, template) -> list[int]:
    """Ids of what follows the image token in the template's image text (Qwen2-VL: <|vision_end|>)."""
    tail = template.image_text.split(template.image_token, 1)[1] if template.image_text else ""
    return tokenizer.encode(tail, add_special_tokens=False) if tail else []


def expand_image_tokens(turns: TokenTurns, pad_id: int, counts: list[int], where: str = "") -> TokenTurns:
    """Repeat the k-th occurrence of `pad_id` counts[k] times (turns rendered with one image
    token per image, as the chat template renders them). Raises DataError when the number of
    occurrences differs from len(counts) (e.g. the text holds the image token literally) or one
    sits in an answer."""
    out, k = [], 0
    for prompt, response in turns:
        if pad_id in response:
            raise DataError(f"{where}: an answer contains the image token; images can only be given in user turns")
        expanded = []
        for tid in prompt:
            if tid == pad_id:
                if k >= len(counts):
                    k += 1
                    continue
                expanded += [pad_id] * counts[k]
                k += 1
            else:
                expanded.append(tid)
        out.append((expanded, list(response)))
    if k != len(counts):
        raise DataError(f"{where}: the encoded text has {k} image token(s) for {len(counts)} image(s); the text must "
                        f"not contain the model's image tokens itself, only {IMAGE_PLACEHOLDER} placeholders")
    return out


def _image_blocks_end(turns: TokenTurns, pad_id: int, end_ids: list[int]) -> list[int]:
    """Per turn, the prompt length that keeps its images whole: the index after the last image
    token's closing ids (Qwen2-VL: <|vision_end|>); 0 for a prompt without images."""
    out = []
    for prompt, _ in turns:
        last = max((i for i, t in enumerate(prompt) if t == pad_id), default=-1)
        if last < 0:
            out.append(0)
            continue
        n = len(end_ids) if prompt[last + 1:last + 1 + len(end_ids)] == end_ids else 0
        out.append(last + 1 + n)
    return out


def encode_image_conversation(
    conversation: Conversation,
    template,
    tokenizer,
    images: ImageProcessing,
    cutoff_len: int,
    *,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    enable_thinking: bool = True,
    dataset_dir: str | os.PathLike = "",
) -> ImageSample:
    """One conversation (with or without images) -> `ImageSample`, for a vision-language model.

    Steps: check placeholders; resolve the images (`to_image_ref`) and plan their grids from
    the file headers; render and tokenize with one image token per image (the template's
    `image_text`, as the model's chat template renders it); repeat each image token
    t*h*w / merge_size**2 times; mask and truncate as text rows (`processors.keep_lengths`,
    `assemble_turns`) except that a prompt is never cut inside its images (each prompt's floor
    is the end of its last image block, up to <|vision_end|>); mask the image tokens in labels.
    The row is kept iff every image block survives whole: without mask_history, iff the last
    one ends within cutoff_len; with mask_history (the last turn is served first), iff each
    turn with images still gets room for them.

    Raises DataError (bad placeholders, missing/unreadable image, nothing to learn) and
    RowDropped (the images' tokens would be cut by cutoff_len).
    """
    where = conversation.source
    check_placeholders(conversation, where)
    pad_id = image_token_id(tokenizer, template)
    refs = [to_image_ref(item, dataset_dir, f"{where}, image {k}") for k, item in enumerate(conversation.images)]
    grids = images.plan(refs, where)
    counts = [images.tokens(g) for g in grids]
    turns = template.encode(tokenizer, conversation, enable_thinking=enable_thinking)
    turns = expand_image_tokens(turns, pad_id, counts, where)
    protect = _image_blocks_end(turns, pad_id, _block_end_ids(tokenizer, template))
    kept = keep_lengths([(len(p), len(r)) for p, r in turns], cutoff_len, mask_history, protect)
    if any(keep_p < floor for (keep_p, _), floor in zip(kept, protect)):
        keep_it = "raise cutoff_len or lower image_max_pixels to keep it"
        if mask_history:  # the budget went to later turns first
            failing = next(i for i, ((keep_p, _), floor) in enumerate(zip(kept, protect)) if keep_p < floor)
            which = "the last turn's images" if failing == len(turns) - 1 else f"turn {failing + 1}'s images"
            raise RowDropped(
                f"{where}: its {len(counts)} image(s) take {sum(counts)} tokens and with mask_history (later turns "
                f"keep their tokens first) {which} do not fit cutoff_len={cutoff_len}; the row is "
                f"left out (an image is never cut): {keep_it}"
            )
        # In dialogue order, earlier turns are whole up to the failing image, which ends at the
        # sum of the earlier turns' lengths + its floor.
        offset, needed = 0, 0
        for (prompt, response), floor in zip(turns, protect):
            needed = max(needed, offset + floor) if floor else needed
            offset += len(prompt) + len(response)
        raise RowDropped(
            f"{where}: its {len(counts)} image(s) take {sum(counts)} tokens and its last image ends at token "
            f"{needed}, beyond cutoff_len={cutoff_len}; the row is left out (an image is never cut): {keep_it}"
        )
    sample = assemble_turns(turns, kept, train_on_prompt, mask_history)
    if sample is None:
        raise DataError(f"{where}: nothing left to learn after truncation to cutoff_len={cutoff_len}")
    labels = [IGNORE if tid == pad_id else label for tid, label in zip(sample.input_ids, sample.labels)]
    return ImageSample(sample.input_ids, labels, refs, [list(g) for g in grids], sample.truncated)


# ---------------------------------------------------------------------------------------------
# Collation


def collate_images(samples: list[Any], images: ImageProcessing, pad_id: int | None = None,
                   input_ids=None) -> dict:
    """The image inputs of one micro-batch: every sample's images, sample after sample, in order.

    samples: `ImageSample`s or stored rows (dicts with "images" and "image_grid_thw"), in the
    order their tokens appear in the micro-batch (packed documents: document order).
    Returns {"pixel_values": float32 [sum t*h*w, C*T*P*P] (images' patches concatenated),
    "image_grid_thw": int64 [n_images, 3]}; both empty when no sample has images.
    With `pad_id` and `input_ids` (the micro-batch's token ids, any shape) the number of image
    tokens is checked against the grids.

    Raises DataError: an image that cannot be read or decoded now, a grid that differs from the
    one planned at encoding (the file or processor changed), a token count mismatch.
    """
    refs, grids = [], []
    for s in samples:
        row_images = s["images"] if isinstance(s, dict) else s.images
        row_grids = s["image_grid_thw"] if isinstance(s, dict) else s.image_grid_thw
        refs += list(row_images or [])
        grids += [list(g) for g in (row_grids or [])]
    if pad_id is not None and input_ids is not None:
        import torch

        ids = torch.as_tensor(input_ids)
        found, want = int((ids == pad_id).sum()), sum(images.tokens(g) for g in grids)
        if found != want:
            raise DataError(f"micro-batch has {found} image tokens but its images need {want}; the samples' "
                            f"images and input_ids are out of step (packing or padding lost track of them)")
    payload = images.process(refs, "micro-batch", expected_grids=grids)
    return {"pixel_values": payload.pixel_values, "image_grid_thw": payload.image_grid_thw}
