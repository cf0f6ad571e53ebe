"""Images of multimodal rows: where they are, how they are resized, what the model gets.

A LLaMA-Factory multimodal row lists its images in the `images` column: file paths (relative
to `dataset_dir`, or absolute), or, from parquet/arrow data, `{"path", "bytes"}` dicts, raw
bytes or PIL images (what the `datasets` Image feature yields). Each image goes through:

1. `to_image_ref`: a storable reference, `{"path": str | None, "bytes": bytes | None}` (an
   Arrow struct, so it fits the tokenized cache); a missing file is an error here.
2. `regularize_image`: LLaMA-Factory's resize before the processor (mm_plugin.py,
   `_preprocess_image` of the base and the Qwen2-VL plugins): shrink to at most
   `image_max_pixels`, grow to at least `image_min_pixels` (both keep the aspect ratio and
   truncate to whole pixels), RGB, then Qwen2-VL's own rules: each side at least 28 pixels and
   an aspect ratio above 200 clamped to 180.
3. The image processor saved in the model folder (`AutoImageProcessor.from_pretrained`, the
   PIL implementation when torchvision is absent) -> `pixel_values` [patches, C*T*P*P] and
   `image_grid_thw` [images, 3]. The language model sees t*h*w / merge_size**2 `<|image_pad|>`
   tokens per image (each token is a merge_size x merge_size block of patches).

`ImageProcessing.plan` predicts each image's grid from the file header alone (no pixels
decoded) so samples can be encoded cheaply; `ImageProcessing.process` decodes and runs the
processor, at collate time, and checks that the grid it gets is the one planned.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

from megatune.data.registry import DataError

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"  # LLaMA-Factory's placeholder in user turns
VIDEO_PLACEHOLDER = "<video>"
DEFAULT_IMAGE_MAX_PIXELS = 768 * 768  # LLaMA-Factory's defaults (`image_max_pixels`, `image_min_pixels`)
DEFAULT_IMAGE_MIN_PIXELS = 32 * 32
# Qwen2-VL plugin rules (LLaMA-Factory): the vision tower needs a side of 28 (one merged 2x2 block of
# 14-pixel patches), and transformers' smart_resize refuses aspect ratios above 200.
QWEN_MIN_SIDE = 28
QWEN_MAX_RATIO = 200
QWEN_CLAMPED_RATIO = 180

ImageRef = dict  # {"path": str | None, "bytes": bytes | None}


# ---------------------------------------------------------------------------------------------
# References


def to_image_ref(item: Any, dataset_dir: str | os.PathLike = "", where: str = "") -> ImageRef:
    """One entry of a row's `images` column -> `{"path": str | None, "bytes": bytes | None}`.

    Accepted: a path (str or PathLike; a relative path is taken from `dataset_dir` when the file
    is there, else from the working directory, as LLaMA-Factory does; the stored path is
    absolute), raw bytes of an encoded image, a `{"path", "bytes"}` dict (the `datasets` Image
    feature undecoded; bytes win when both are set) or a PIL image (stored as PNG bytes, lossless).
    `where` ("dataset 'x', file f, row 3, image 0") prefixes error messages.

    Raises DataError: a path that does not exist, or an entry of another type.
    """
    from PIL import Image

    if isinstance(item, Image.Image):
        buffer = io.BytesIO()
        item.save(buffer, format="PNG")
        return {"path": None, "bytes": buffer.getvalue()}
    if isinstance(item, (bytes, bytearray)):
        return {"path": None, "bytes": bytes(item)}
    if isinstance(item, dict) and set(item) <= {"path", "bytes"} and (item.get("bytes") or item.get("path")):
        if item.get("bytes"):
            return {"path": item.get("path"), "bytes": bytes(item["bytes"])}
        item = item["path"]
    if isinstance(item, (str, os.PathLike)):
        return {"path": resolve_image_path(os.fspath(item), dataset_dir, where), "bytes": None}
    raise DataError(
        f"{where}: an image must be a file path, image bytes, a {{'path', 'bytes'}} dict or a PIL image; "
        f"got {type(item).__name__}: {str(item)[:80]!r}; fix the `images` column"
    )


def resolve_image_path(path: str, dataset_dir: str | os.PathLike = "", where: str = "") -> str:
    """The absolute path of an image file: `dataset_dir/path` when that file exists (LLaMA-Factory's
    rule), else `path` itself (absolute, or relative to the working directory).

    Raises DataError naming both places looked at when neither exists.
    """
    candidates = []
    if dataset_dir and not os.path.isabs(path):
        candidates.append(os.path.join(os.fspath(dataset_dir), path))
    candidates.append(path)
    for candidate in candidates:
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    looked = " and ".join(repr(os.path.abspath(c)) for c in candidates)
    raise DataError(
        f"{where}: image file {path!r} not found (looked at {looked}); image paths are relative to "
        f"dataset_dir ({os.fspath(dataset_dir) or 'not set'}) or absolute: fix the path or remove the row "
        f"(or set skip_invalid: true)"
    )


def describe_ref(ref: ImageRef) -> str:
    """A short name for an image in messages: its path, or "embedded image (N bytes)"."""
    if ref.get("path"):
        return repr(ref["path"])
    return f"embedded image ({len(ref.get('bytes') or b'')} bytes)"


def open_image(ref: ImageRef, where: str = ""):
    """Open an image reference with PIL. Only the header is read: pixels are decoded on first use.

    Raises DataError (naming the image and `where`) when PIL cannot identify the data.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        if ref.get("bytes"):
            return Image.open(io.BytesIO(ref["bytes"]))
        return Image.open(ref["path"])
    except FileNotFoundError:
        raise DataError(f"{where}: image file {ref['path']!r} no longer exists; restore it or re-encode the data "
                        f"(overwrite_cache: true)") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(
            f"{where}: cannot read {describe_ref(ref)} as an image ({err}); convert it to PNG or JPEG, "
            f"or remove the row (or set skip_invalid: true)"
        ) from None


# ---------------------------------------------------------------------------------------------
# LLaMA-Factory's resize before the processor


def _scale(width: int, height: int, target_pixels: int) -> tuple[int, int]:
    # Same aspect ratio, area ~ target_pixels, each side truncated to a whole pixel.
    factor = math.sqrt(target_pixels / (width * height))
    return int(width * factor), int(height * factor)


def regularized_size(width: int, height: int, max_pixels: int = DEFAULT_IMAGE_MAX_PIXELS,
                     min_pixels: int = DEFAULT_IMAGE_MIN_PIXELS) -> tuple[int, int]:
    """(width, height) after `regularize_image`, computed from the size alone (pixels)."""
    if width * height > max_pixels:
        width, height = _scale(width, height, max_pixels)
    if width * height < min_pixels:
        width, height = _scale(width, height, min_pixels)
    if min(width, height) < QWEN_MIN_SIDE:
        width, height = max(width, QWEN_MIN_SIDE), max(height, QWEN_MIN_SIDE)
    if width / height > QWEN_MAX_RATIO:
        width = height * QWEN_CLAMPED_RATIO
    if height / width > QWEN_MAX_RATIO:
        height = width * QWEN_CLAMPED_RATIO
    return width, height


def regularize_image(image, max_pixels: int = DEFAULT_IMAGE_MAX_PIXELS, min_pixels: int = DEFAULT_IMAGE_MIN_PIXELS):
    """A PIL image resized as LLaMA-Factory's Qwen2-VL plugin does before the image processor.

    Steps, in LLaMA-Factory's order (the order matters: the first resizes run in the file's own
    mode, e.g. palette images resample with NEAREST, PIL's default for them):
    area > max_pixels -> scale down to ~max_pixels; area < min_pixels -> scale up to ~min_pixels
    (sides truncated to whole pixels); convert to RGB (alpha is dropped, not blended); a side
    below 28 -> 28; aspect ratio above 200 -> the long side becomes 180 x the short one.
    Resizes use PIL's default filter for the mode (bicubic for RGB). Returns an RGB image.
    """
    width, height = image.size
    if width * height > max_pixels:
        image = image.resize(_scale(width, height, max_pixels))
    width, height = image.size
    if width * height < min_pixels:
        image = image.resize(_scale(width, height, min_pixels))
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    if min(width, height) < QWEN_MIN_SIDE:
        image = image.resize((max(width, QWEN_MIN_SIDE), max(height, QWEN_MIN_SIDE)))
    width, height = image.size
    if width / height > QWEN_MAX_RATIO:
        image = image.resize((height * QWEN_CLAMPED_RATIO, height))
    width, height = image.size
    if height / width > QWEN_MAX_RATIO:
        image = image.resize((width, width * QWEN_CLAMPED_RATIO))
    return image


# ---------------------------------------------------------------------------------------------
# The model's image processor


def load_image_processor(model_dir: str | os.PathLike):
    """The image processor saved in `model_dir` (preprocessor_config.json), via transformers'
    `AutoImageProcessor`. Without torchvision transformers returns the PIL implementation (same
    numbers up to float rounding); the full `AutoProcessor` is never built (its video part needs
    torchvision).

    Raises DataError when the folder has no image processor.
    """
    from transformers import AutoImageProcessor

    config = os.path.join(os.fspath(model_dir), "preprocessor_config.json")
    if not os.path.isfile(config):
        raise DataError(
            f"{model_dir} has no preprocessor_config.json, so there is no image processor for the images; "
            f"copy preprocessor_config.json from the original vision-language checkpoint into that folder"
        )
    return AutoImageProcessor.from_pretrained(os.fspath(model_dir))


@dataclass
class ImagePayload:
    """What the vision tower takes for a list of images, in order.

    pixel_values: float32 [sum_i t_i*h_i*w_i, C * temporal_patch_size * patch_size**2]
        (Qwen2-VL: C=3, T=2, P=14 -> 1176 columns); image_grid_thw: int64 [n_images, 3], the
        (t, h, w) patch grid of each image; rows of pixel_values are the images' patches, image
        after image.
    """

    pixel_values: Any
    image_grid_thw: Any


@dataclass
class ImageProcessing:
    """The image side of a vision-language model's data: resize rule + the model's image processor.

    processor: a transformers image processor (Qwen2-VL family: `patch_size`, `merge_size`,
    `temporal_patch_size`, `size` with `shortest_edge`/`longest_edge` in pixels).
    max_pixels / min_pixels: LLaMA-Factory's `image_max_pixels` / `image_min_pixels`.
    """

    processor: Any
    max_pixels: int = DEFAULT_IMAGE_MAX_PIXELS
    min_pixels: int = DEFAULT_IMAGE_MIN_PIXELS

    def __post_init__(self):
        if not (0 < self.min_pixels <= self.max_pixels):
            raise DataError(
                f"image_min_pixels ({self.min_pixels}) must be positive and at most image_max_pixels "
                f"({self.max_pixels}); fix them in the config"
            )

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike, max_pixels: int = DEFAULT_IMAGE_MAX_PIXELS,
                       min_pixels: int = DEFAULT_IMAGE_MIN_PIXELS) -> "ImageProcessing":
        """`load_image_processor(model_dir)` with the given resize limits."""
        return cls(load_image_processor(model_dir), max_pixels, min_pixels)

    @property
    def merge_size(self) -> int:
        """Patches merged per token along each side (Qwen2-VL: 2, so 4 patches per token)."""
        return int(getattr(self.processor, "merge_size", 1) or 1)

    def tokens(self, grid_thw) -> int:
        """Image tokens in the text for one image's (t, h, w) grid: t*h*w / merge_size**2."""
        t, h, w = (int(x) for x in grid_thw)
        return t * h * w // self.merge_size**2

    # -- from sizes alone -------------------------------------------------------------------------

    def grid_for_size(self, width: int, height: int) -> tuple[int, int, int] | None:
        """The (t, h, w) grid the processor will produce for an image of this size (before the
        LLaMA-Factory resize), without any pixels: `regularized_size`, then transformers'
        `smart_resize` with the processor's own limits. None when the processor is not of the
        Qwen2-VL kind (then `plan` processes the image instead)."""
        proc = self.processor
        size = getattr(proc, "size", None) or {}
        get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
        patch, merge = getattr(proc, "patch_size", None), getattr(proc, "merge_size", None)
        lo, hi = get("shortest_edge"), get("longest_edge")
        if not (patch and merge and lo and hi) or not getattr(proc, "do_resize", True):
            return None
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        width, height = regularized_size(width, height, self.max_pixels, self.min_pixels)
        resized_h, resized_w = smart_resize(height, width, factor=patch * merge, min_pixels=lo, max_pixels=hi)
        return (1, resized_h // patch, resized_w // patch)  # an image is one temporal patch

    def plan(self, refs: list[ImageRef], where: str = "") -> list[list[int]]:
        """The (t, h, w) grid of each image, reading only file headers where possible.

        Raises DataError for an unreadable image (naming it and `where`).
        """
        grids = []
        for k, ref in enumerate(refs):
            with open_image(ref, f"{where}, image {k}" if where else f"image {k}") as image:
                size = image.size  # the header only: no pixels decoded, the file closed at once
            grid = self.grid_for_size(*size)
            if grid is None:  # unknown processor: run it
                grid = [int(x) for x in self.process([ref], where).image_grid_thw[0]]
            grids.append(list(grid))
        return grids

    def fingerprint(self) -> dict:
        """What encoded image samples depend on, for the tokenized cache's fingerprint: the resize
        limits and the image processor's settings (a change alters token counts)."""
        settings = {k: v for k, v in self.processor.to_dict().items() if not k.startswith("_")}
        return {"image_max_pixels": self.max_pixels, "image_min_pixels": self.min_pixels,
                "image_processor": settings}

    # -- pixels ----------------------------------------------------------------------------------

    def load(self, ref: ImageRef, where: str = ""):
        """Decode one image and resize it (`regularize_image`). Raises DataError when PIL fails."""
        image = open_image(ref, where)
        try:
            image.load()
        except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt data
            raise DataError(
                f"{where}: cannot decode {describe_ref(ref)} ({err}); the file is damaged: replace it "
                f"or remove the row (or set skip_invalid: true)"
            ) from None
        return regularize_image(image, self.max_pixels, self.min_pixels)

    def process(self, refs: list[ImageRef], where: str = "",
                expected_grids: list[list[int]] | None = None) -> ImagePayload:
        """Decode, resize and run the image processor on `refs`, in order.

        Returns ImagePayload(pixel_values float32 [sum t*h*w, C*T*P*P], image_grid_thw int64 [n, 3]).
        With `expected_grids` (from `plan` at encoding time) a different grid raises DataError:
        the file or the processor changed since the data was encoded, and the text holds the
        wrong number of image tokens.
        """
        import torch

        if not refs:
            return ImagePayload(torch.zeros(0, self.patch_dim), torch.zeros(0, 3, dtype=torch.long))
        images = [self.load(ref, f"{where}, image {k}" if where else f"image {k}") for k, ref in enumerate(refs)]
        out = self.processor(images=images, return_tensors="pt")
        pixel_values = out["pixel_values"].to(torch.float32)
        grid = out["image_grid_thw"].to(torch.long)
        if expected_grids is not None:
            for k, (got, want) in enumerate(zip(grid.tolist(), expected_grids)):
                if list(got) != list(want):
                    raise DataError(
                        f"{where}, image {k}: {describe_ref(refs[k])} now gives patch grid {got}, but the sample "
                        f"was encoded for {list(want)}; the image or the image processor changed since encoding: "
                        f"re-encode the data (overwrite_cache: true)"
                    )
        return ImagePayload(pixel_values, grid)

    @property
    def patch_dim(self) -> int:
        """Columns of pixel_values: channels * temporal_patch_size * patch_size**2 (Qwen2-VL: 1176)."""
        proc = self.processor
        return 3 * int(getattr(proc, "temporal_patch_size", 1) or 1) * int(getattr(proc, "patch_size", 14)) ** 2
