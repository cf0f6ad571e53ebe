"""Multimodal rotary positions (M-RoPE) of Qwen2-VL and Qwen2.5-VL, per document.

Qwen2-VL rotates each query/key with three position ids (temporal, height, width), each driving
its own slice of the rotary channels (`mrope_section`). Text tokens carry the same id in all three
rows (plain 1-D RoPE); the tokens of an image carry its grid coordinates after the 2x2 patch
merge, offset by the position where the image starts; the text after an image resumes at that
start plus max(merged height, merged width). This reproduces transformers' `get_rope_index`
(`Qwen2VLModel` / `Qwen2_5_VLModel`, transformers 5.24) for images, with two differences that
matter for training:

* positions restart at 0 at every document start, so packed samples get the positions each
  sample would get alone (transformers computes one sequence per batch row);
* two images with no text between them are still two images (transformers groups runs of
  image tokens, so adjacent images would be read as one and fail).

Videos are not supported yet (their temporal spacing depends on the frame rate).
"""

from __future__ import annotations

from typing import Sequence

import torch

GridLike = Sequence[Sequence[int]] | torch.Tensor


def _as_list(values) -> list:
    if isinstance(values, torch.Tensor):
        return values.tolist()
    return list(values)


def image_token_count(grid_thw: Sequence[int], spatial_merge_size: int) -> int:
    """Placeholder tokens one image takes in the text: t * h * w / merge^2 (grid in patches)."""
    t, h, w = (int(x) for x in grid_thw)
    return t * h * w // (spatial_merge_size * spatial_merge_size)


def _image_positions(grid_thw: Sequence[int], merge: int, start: int) -> torch.Tensor:
    """[3, t*(h/merge)*(w/merge)] ids of one image's tokens, in the merger's row-major order."""
    t, h, w = (int(x) for x in grid_thw)
    gh, gw = h // merge, w // merge
    temporal = torch.arange(t).repeat_interleave(gh * gw)
    height = torch.arange(gh).repeat_interleave(gw).repeat(t)
    width = torch.arange(gw).repeat(t * gh)
    return torch.stack([temporal, height, width]) + start


def mrope_position_ids(
    input_ids: Sequence[int] | torch.Tensor,
    image_grid_thw: GridLike = (),
    *,
    spatial_merge_size: int,
    image_token_id: int,
    video_token_id: int | None = None,
    document_lengths: Sequence[int] | None = None,
    where: str = "sample",
) -> torch.LongTensor:
    """M-RoPE position ids of one (possibly packed) token sequence.

    Args:
        input_ids: the sequence's token ids, length `seq` (list or 1-D tensor).
        image_grid_thw: one (t, h, w) per image, in patches before merging (the image
            processor's `image_grid_thw`), in the order the images appear in `input_ids`.
        spatial_merge_size: the vision config's `spatial_merge_size` (2 for Qwen2-VL).
        image_token_id: the config's `image_token_id` (`<|image_pad|>`).
        video_token_id: the config's `video_token_id`; a video token raises (not supported).
        document_lengths: lengths of the packed documents, summing to `seq`; positions restart
            at 0 at each document. None = one document.
        where: names the sample in error messages (e.g. "dataset foo, row 12").

    Returns:
        LongTensor [3, seq]: rows are the temporal, height and width position ids.

    Raises:
        ValueError: when the image placeholders do not match the grids (a run of image tokens
            shorter than its image, or a different number of images than grids), when a grid
            is not divisible by the merge size, or when `document_lengths` does not sum to seq.
        NotImplementedError: on a video token.
    """
    ids = _as_list(input_ids)
    grids = [tuple(int(x) for x in g) for g in _as_list(image_grid_thw)]
    merge = int(spatial_merge_size)
    lengths = [len(ids)] if document_lengths is None else [int(n) for n in document_lengths]
    if sum(lengths) != len(ids):
        raise ValueError(f"{where}: document lengths sum to {sum(lengths)}, but the sequence has {len(ids)} tokens")
    special = {image_token_id} if video_token_id is None else {image_token_id, video_token_id}
    out = torch.empty(3, len(ids), dtype=torch.long)
    image = 0
    doc_start = 0
    for length in lengths:
        end = doc_start + length
        pos, i = 0, doc_start
        while i < end:
            token = ids[i]
            if token == image_token_id:
                if image >= len(grids):
                    raise ValueError(
                        f"{where}: more image placeholders than images ({len(grids)} image grids given); "
                        "each <image> must have exactly one image"
                    )
                grid = grids[image]
                if grid[1] % merge or grid[2] % merge:
                    raise ValueError(f"{where}: image {image} grid {grid} is not divisible by spatial_merge_size {merge}")
                count = image_token_count(grid, merge)
                run_end = i + count
                if run_end > end or any(ids[j] != image_token_id for j in range(i, run_end)):
                    raise ValueError(
                        f"{where}: image {image} (grid {grid}) needs {count} consecutive image tokens "
                        f"from position {i}, but the run of image tokens there is shorter"
                    )
                out[:, i:run_end] = _image_positions(grid, merge, pos)
                pos += max(grid[1], grid[2]) // merge
                image += 1
                i = run_end
            elif token in special:
                raise NotImplementedError(f"{where}: video inputs are not supported yet")
            else:
                j = i + 1
                while j < end and ids[j] not in special:
                    j += 1
                out[:, i:j] = torch.arange(pos, pos + j - i)
                pos += j - i
                i = j
        doc_start = end
    if image != len(grids):
        raise ValueError(
            f"{where}: {len(grids)} images given but only {image} have placeholder tokens; "
            "each image needs one <image> placeholder"
        )
    return out


def batch_mrope_position_ids(
    input_ids: torch.Tensor,
    image_grid_thw: GridLike | None,
    *,
    spatial_merge_size: int,
    image_token_id: int,
    attention_mask: torch.Tensor | None = None,
    video_token_id: int | None = None,
) -> torch.LongTensor:
    """M-RoPE ids of a padded batch, as transformers' `get_rope_index` gives them.

    Args:
        input_ids: LongTensor [b, s].
        image_grid_thw: [num_images, 3] for all rows, row-major (row 0's images first), or None.
        attention_mask: [b, s], 1 at real tokens. Real tokens get consecutive ids as if the
            padding were absent; padding gets 0 (transformers' convention). None = no padding.

    Returns:
        LongTensor [3, b, s].

    Raises:
        ValueError / NotImplementedError: as `mrope_position_ids`, naming the batch row.
    """
    grids = [] if image_grid_thw is None else [tuple(int(x) for x in g) for g in _as_list(image_grid_thw)]
    out = torch.zeros(3, *input_ids.shape, dtype=torch.long)
    used = 0
    for row in range(input_ids.shape[0]):
        keep = torch.ones_like(input_ids[row], dtype=torch.bool) if attention_mask is None else attention_mask[row].bool()
        ids = input_ids[row][keep].tolist()
        n_images = _count_images(ids, grids[used:], spatial_merge_size, image_token_id)
        out[:, row, keep] = mrope_position_ids(
            ids,
            grids[used:used + n_images],
            spatial_merge_size=spatial_merge_size,
            image_token_id=image_token_id,
            video_token_id=video_token_id,
            where=f"batch row {row}",
        )
        used += n_images
    if used != len(grids):
        raise ValueError(f"{len(grids)} images given for the batch but its rows hold placeholders for {used}")
    return out


def _count_images(ids: list[int], grids: list[tuple], merge: int, image_token_id: int) -> int:
    """How many of `grids` (taken in order) the image tokens of `ids` consume."""
    remaining = sum(1 for t in ids if t == image_token_id)
    count = 0
    while remaining > 0 and count < len(grids):
        remaining -= image_token_count(grids[count], merge)
        count += 1
    return count
