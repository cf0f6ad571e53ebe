"""M-RoPE position ids against transformers' own `get_rope_index` (Qwen2-VL and Qwen2.5-VL)."""

import pytest
import torch

from megatune.models.mrope import batch_mrope_position_ids, image_token_count, mrope_position_ids
from megatune.tiny import TINY_SHAPE, TINY_VISION, tiny_vl_token_ids

IDS = tiny_vl_token_ids()
IMG, VID, START, END = IDS["image_token_id"], IDS["video_token_id"], IDS["vision_start_token_id"], IDS["vision_end_token_id"]
MERGE = 2


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def hf_model(request):
    """A transformers Qwen2(.5)-VL base model; only its config and get_rope_index are used."""
    from transformers import AutoConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    text = {**TINY_SHAPE, "num_hidden_layers": 1, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]}}
    config = AutoConfig.for_model(request.param, text_config=text, vision_config=dict(TINY_VISION[request.param]), **{
        k: IDS[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    })
    cls = Qwen2VLModel if request.param == "qwen2_vl" else Qwen2_5_VLModel
    return cls(config).eval()


def text(n, seed):
    """n text tokens that are never vision tokens."""
    return torch.randint(20, 200, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def image(grid):
    return [START] + [IMG] * image_token_count(grid, MERGE) + [END]


def hf_positions(model, rows, grids, pad_side=None):
    """transformers' positions [3, b, s] for rows of token lists (padded to one length)."""
    longest = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        sl = slice(longest - len(r), longest) if pad_side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    mm_types = (ids == IMG).int()
    grid_t = torch.tensor(grids, dtype=torch.long) if grids else None
    pos, _ = model.get_rope_index(ids, mm_token_type_ids=mm_types, image_grid_thw=grid_t,
                                  attention_mask=mask if pad_side else None)
    return ids, mask, pos


CASES = {
    # one row, two images of different sizes (and a non-square one: height != width)
    "two_images": ([text(5, 0) + image((1, 6, 10)) + text(3, 1) + image((1, 8, 4)) + text(4, 2)], [(1, 6, 10), (1, 8, 4)]),
    # image first, then text
    "image_first": ([image((1, 4, 4)) + text(7, 3)], [(1, 4, 4)]),
    "text_only": ([text(9, 4)], []),
    # several rows; images counted row-major across the batch
    "batch": ([text(3, 5) + image((1, 2, 6)) + text(2, 6), text(4, 7), image((1, 10, 2)) + text(3, 8) + image((1, 2, 2))],
              [(1, 2, 6), (1, 10, 2), (1, 2, 2)]),
}


@pytest.mark.parametrize("case", CASES)
def test_single_rows_equal_get_rope_index(hf_model, case):
    rows, grids = CASES[case]
    used = 0
    for row in rows:
        n = sum(1 for t in row if t == IMG)
        mine_grids = []
        while n > 0:
            mine_grids.append(grids[used]); n -= image_token_count(grids[used], MERGE); used += 1
        _, _, expected = hf_positions(hf_model, [row], mine_grids)
        mine = mrope_position_ids(row, mine_grids, spatial_merge_size=MERGE, image_token_id=IMG, video_token_id=VID)
        assert mine.dtype == torch.long and mine.shape == (3, len(row))
        assert torch.equal(mine, expected[:, 0]), (mine, expected[:, 0])


@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_padded_batch_equals_get_rope_index(hf_model, pad_side):
    rows, grids = CASES["batch"]
    ids, mask, expected = hf_positions(hf_model, rows, grids, pad_side=pad_side)
    mine = batch_mrope_position_ids(ids, grids, spatial_merge_size=MERGE, image_token_id=IMG, attention_mask=mask)
    assert torch.equal(mine, expected)


def test_packed_documents_restart_positions(hf_model):
    """Packed: each document's ids equal transformers' ids of that document alone."""
    rows, grids = CASES["batch"]
    packed = [t for r in rows for t in r]
    mine = mrope_position_ids(packed, grids, spatial_merge_size=MERGE, image_token_id=IMG,
                              document_lengths=[len(r) for r in rows])
    alone = [hf_positions(hf_model, [r], g)[2][:, 0] for r, g in zip(rows, [[grids[0]], [], grids[1:]])]
    assert torch.equal(mine, torch.cat(alone, dim=1))


def test_adjacent_images_are_two_images():
    """No text between two images: still two grids (transformers would merge the runs)."""
    g1, g2 = (1, 2, 4), (1, 4, 2)
    ids = [1] + [IMG] * 2 + [IMG] * 2 + [3]
    pos = mrope_position_ids(ids, [g1, g2], spatial_merge_size=MERGE, image_token_id=IMG)
    # image 1 at start 1: t=1, h ids [1,1], w ids [1,2]; it advances by max(2,4)//2 = 2 -> image 2 at 3
    assert pos.tolist() == [[0, 1, 1, 3, 3, 5], [0, 1, 1, 3, 4, 5], [0, 1, 2, 3, 3, 5]]


def test_mismatched_placeholders_are_clear_errors():
    with pytest.raises(ValueError, match="row 3: image 0 .* needs 4 consecutive image tokens"):
        mrope_position_ids([1, IMG, IMG, 2], [(1, 4, 4)], spatial_merge_size=MERGE, image_token_id=IMG, where="row 3")
    with pytest.raises(ValueError, match="2 images given but only 1 have placeholder tokens"):
        mrope_position_ids([1, IMG, 2], [(1, 2, 2), (1, 2, 2)], spatial_merge_size=MERGE, image_token_id=IMG)
    with pytest.raises(ValueError, match="more image placeholders than images"):
        mrope_position_ids([1, IMG, 2], [], spatial_merge_size=MERGE, image_token_id=IMG)
    with pytest.raises(ValueError, match="document lengths sum to 2"):
        mrope_position_ids([1, 2, 3], [], spatial_merge_size=MERGE, image_token_id=IMG, document_lengths=[2])
    with pytest.raises(NotImplementedError, match="video"):
        mrope_position_ids([1, VID, 2], [], spatial_merge_size=MERGE, image_token_id=IMG, video_token_id=VID)
