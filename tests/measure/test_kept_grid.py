"""``Trace.kept_grid()``: the kept tokens as (panel, row, col), checked on every tiny architecture
against grids computed here from the processor's outputs (not from the adapters)."""

import pytest
import torch

import tokenreduce
from tokenreduce.core.types import StageTrace, Trace
from tokenreduce.models import load_model
from tokenreduce.testing.tiny import make_image

PLAN = {
    "stages": [
        {"layer": 1, "keep": {"ratio": 0.5}, "selector": "random"},
        {"layer": 2, "keep": {"ratio": 0.25}, "scorer": "norm"},
    ]
}


def _llava_cells(loaded, inputs):
    """Each sample's image-token run is one square grid, row-major."""
    out = []
    image_id = loaded.model.config.image_token_id
    for ids in inputs["input_ids"]:
        pos = torch.nonzero(ids == image_id).flatten()
        side = int(round(len(pos) ** 0.5))
        k = torch.arange(len(pos))
        out.append({p: (0, r, c) for p, r, c in zip(pos.tolist(), (k // side).tolist(), (k % side).tolist())})
    return out


def _llava_next_cells(loaded, inputs):
    """Base grid (panel 0), then the unpadded crop grid (panel 1), a newline token ending each row;
    the crop grid's shape from the processor's own feature count (transformers)."""
    from transformers.image_processing_utils import select_best_resolution

    proc = loaded.processor
    vision = loaded.model.config.vision_config
    side = vision.image_size // vision.patch_size
    out = []
    for ids, (height, width) in zip(inputs["input_ids"], inputs["image_sizes"].tolist()):
        pos = torch.nonzero(ids == loaded.model.config.image_token_id).flatten().tolist()
        best_h, best_w = select_best_resolution([height, width], proc.image_processor.image_grid_pinpoints)
        size = vision.image_size
        unpadded, rows = proc._get_unpadded_features(height, width, side, side, best_h // size, best_w // size)
        cols = unpadded // rows
        cells = [(0, k // side, k % side) for k in range(side * side)]
        cells += [(1, r, c) for r in range(rows) for c in range(cols + 1)]  # c == cols: the newline token
        assert len(cells) == len(pos)
        out.append(dict(zip(pos, cells)))
    return out


def _qwen_cells(loaded, inputs):
    """``image_grid_thw`` patches merged ``spatial_merge_size``-square, row-major per image."""
    merge = loaded.model.config.vision_config.spatial_merge_size
    image_id = loaded.model.config.image_token_id
    grids = inputs["image_grid_thw"].tolist()
    out, g = [], 0
    for ids in inputs["input_ids"]:
        pos = torch.nonzero(ids == image_id).flatten().tolist()
        t, h, w = grids[g]
        g += 1
        hm, wm = h // merge, w // merge
        assert len(pos) == t * hm * wm
        out.append({p: (0, (k // wm) % hm, k % wm) for k, p in enumerate(pos)})
    return out


CASES = {
    "llava": ("USER: <image> what? ASSISTANT:", [(56, 56), (70, 40)], _llava_cells),
    "llava_next": ("USER: <image> what? ASSISTANT:", [(100, 80), (60, 60)], _llava_next_cells),
    "qwen2_5_vl": ("USER: <image> what? ASSISTANT:", [(100, 80), (56, 84)], _qwen_cells),
}


@pytest.mark.parametrize("arch", list(CASES))
def test_kept_grid_matches_the_grid_computed_from_the_processor(arch):
    prompt, sizes, cells_of = CASES[arch]
    loaded = load_model({"kind": "tiny", "arch": arch, "text_layers": 4})
    prompt = loaded.spec.tiny_prompt(prompt)
    inputs = loaded.processor_inputs([prompt] * len(sizes), [make_image(i, s) for i, s in enumerate(sizes)])
    with torch.no_grad(), tokenreduce.apply(loaded.model, PLAN) as att:
        loaded.model(**inputs, use_cache=False)
    trace = att.trace
    expected = cells_of(loaded, inputs)
    grids = trace.kept_grid()
    assert len(grids) == 2 and all(len(g) == len(sizes) for g in grids)
    for i, st in enumerate(trace.stages):
        for b, kept in enumerate(st.kept):
            assert 0 < len(kept) < len(expected[b])
            assert grids[i][b].shape == (len(kept), 3)
            assert [tuple(c) for c in grids[i][b].tolist()] == [expected[b][p] for p in kept]
    for b in range(len(sizes)):  # every visual token, not only the kept ones
        pos, cells = trace.visual_cells(b)
        assert pos.tolist() == sorted(expected[b])
        assert [tuple(c) for c in cells[:, :3].tolist()] == [expected[b][p] for p in pos.tolist()]
    if arch == "llava_next":  # the newline flag marks the crop grid's last column
        pos, cells = trace.visual_cells(0)
        crop = cells[cells[:, 0] == 1]
        assert torch.equal(crop[:, 3].bool(), crop[:, 2] == crop[:, 2].max())
        assert trace.kept_grid(with_newline=True)[0][0].shape[1] == 4


def test_kept_grid_of_a_trace_without_layout_says_why():
    trace = Trace(stages=[StageTrace(0, 1, [5], [4], [2], [1], [[3]])], n_layers=2, original_visual=[2])
    with pytest.raises(ValueError, match="no grid layout"):
        trace.kept_grid()
