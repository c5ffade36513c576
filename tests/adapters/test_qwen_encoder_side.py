"""Encoder-side signals and methods on Qwen2.5-VL (no CLS token): the attention received per
visual token against the model's own eager attention probabilities (window order mapped back to
raster order on grids whose windows are not aligned), keys and merger inputs, every encoder-side
method inside ``generate()`` with exact kept counts, PIO w/ VE's Qwen recipe against an
independent reference, and the kept tokens' original 3-D M-RoPE ids."""

from __future__ import annotations

import math

import pytest
import torch
from qwen_encoder_plans import plan_for
from registry_helpers import registry_with
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mq
from transformers.vision_utils import get_vision_window_index

import tokenreduce
from tokenreduce.core.errors import PlanError
from tokenreduce.core.registry import get_registry
from tokenreduce.core.types import Need, Selection
from tokenreduce.strategies.pio_ve import PIOVEQwenSelector
from tokenreduce.strategies.visionzip import ReceivedAttentionScorer
from tokenreduce.testing.tiny import build_tiny, make_inputs

PROMPTS = ["USER: <image> what is it? ASSISTANT:", "USER: <image> and <image> colour? ASSISTANT:"]
#: (width, height): 3x5, 5x3 and 3x4 merged grids; the tiny tower's windows are 2x2 merged tokens,
#: so none of them is tiled by whole windows
SIZES = [(140, 84), (84, 140), (100, 80)]
#: the built-in registry once it registers vision_attn and pio_ve_qwen, else one with them added
REGISTRY = (
    None
    if {("scorer", "vision_attn"), ("selector", "pio_ve_qwen")}
    <= {(c.kind, c.name) for c in get_registry().components()}
    else registry_with(
        "qwen_encoder", scorers={"vision_attn": ReceivedAttentionScorer}, selectors={"pio_ve_qwen": PIOVEQwenSelector}
    )
)


@pytest.fixture(scope="module")
def model():
    return build_tiny("qwen2_5_vl", attn_implementation="eager")


@pytest.fixture(scope="module")
def inputs():
    return make_inputs("qwen2_5_vl", PROMPTS, image_sizes=SIZES)


def eager_reference(model, inputs) -> dict:
    """The tower's own eager attention probabilities (per block, per attention segment), the
    block inputs, the merger's input and output, from one plain vision-tower call."""
    visual = model.model.visual
    probs: list = []
    original = mq.eager_attention_forward

    def recording(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        out, weights = original(module, query, key, value, attention_mask, scaling, dropout, **kw)
        probs[-1].append(weights[0].float())  # [H, L, L]
        return out, weights

    handles = [
        blk.register_forward_pre_hook(lambda m, a, k: probs.append([]), with_kwargs=True) for blk in visual.blocks
    ]
    merger_in: list = []
    handles.append(visual.merger.register_forward_pre_hook(lambda m, a: merger_in.append(a[0])))
    mq.eager_attention_forward = recording
    try:
        with torch.no_grad():
            out = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    finally:
        mq.eager_attention_forward = original
        for h in handles:
            h.remove()
    return {"probs": probs, "merger_in": merger_in[0], "merged": out.pooler_output}


def received_reference(model, inputs, ref, block: int) -> torch.Tensor:
    """``[U]`` per merged token in raster order, from the eager probabilities: column sums over
    heads and query rows, divided by the image's patch count, averaged over the 2x2 unit."""
    grid = inputs["image_grid_thw"]
    col = torch.cat([p.sum(0).sum(0) for p in ref["probs"][block]])  # [P] block order
    index, _ = get_vision_window_index(grid, spatial_merge_size=2, window_size=56, patch_size=14)
    rows = torch.cat([torch.full((int(t * h * w),), float(h * w)) for t, h, w in grid.tolist()])  # raster order
    per_unit = col.view(-1, 4).mean(1)[torch.argsort(index)]
    return per_unit / rows.view(-1, 4)[:, 0]


class Recorder:
    """Records every Qwen vision signal and keeps the first ``keep`` candidates."""

    from pydantic import BaseModel as _B

    class Settings(_B):
        pass

    needs = Need.VISION_ATTENTION | Need.VISION_KEYS | Need.VISION_FEATURES
    needs_scores = False
    seen: dict = {}

    def __init__(self, settings):
        pass

    def vision_layers(self):
        return (0, 1)

    def select(self, view, scores, keep):
        src = view.signals._vision()
        Recorder.seen = {
            "valid": view.visual_valid.clone(),
            "recv0": src.attention_received(0, "sum"),
            "recv1": src.attention_received(1, "sum"),
            "recv1_mean": src.attention_received(1, "mean"),
            "keys": src.keys(1, "mean"),
            "keys_concat": src.keys(1, "concat"),
            "features": view.signals.vision_features(),
            "projected": view.signals.project_vision(view.signals.vision_features()),
            "hidden": view.visual_hidden().clone(),
        }
        rows = [list(range(int(k))) for k in keep]
        return Selection.from_lists(rows, device=keep.device)


@pytest.fixture(scope="module")
def recorded(model, inputs):
    registry = registry_with("qwen_recorder", selectors={"rec": Recorder})
    with tokenreduce.apply(model, {"stages": [{"layer": 0, "keep": 4, "selector": "rec"}]}, registry=registry):
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    return Recorder.seen


def flat_candidates(seen, value):
    return value[seen["valid"]]


def test_window_order_is_not_raster_order_on_these_grids(inputs):
    index, _ = get_vision_window_index(inputs["image_grid_thw"], spatial_merge_size=2, window_size=56, patch_size=14)
    assert not torch.equal(index, torch.arange(index.numel()))


@pytest.mark.parametrize("block", [0, 1])  # 0: windowed, 1: full attention
def test_attention_received_equals_the_eager_attention(model, inputs, recorded, block):
    ref = eager_reference(model, inputs)
    want = received_reference(model, inputs, ref, block)
    got = flat_candidates(recorded, recorded[f"recv{block}"])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # each image's full-attention columns average to 1 / unit over its own rows: the mean over
    # query rows of a row-stochastic matrix sums to 1 per image (x heads)
    if block == 1:
        heads = model.config.vision_config.num_heads
        per_image = [int(t * h * w // 4) for t, h, w in inputs["image_grid_thw"].tolist()]
        for chunk in torch.split(got, per_image):
            assert math.isclose(float(chunk.sum()) * 4, heads, rel_tol=1e-5)
        torch.testing.assert_close(flat_candidates(recorded, recorded["recv1_mean"]), want / heads)


def test_keys_and_features_map_to_the_merged_tokens(model, inputs, recorded):
    ref = eager_reference(model, inputs)
    # the merger applied to the recorded features gives the model's own visual tokens
    merged = torch.cat(ref["merged"]) if isinstance(ref["merged"], (tuple, list)) else ref["merged"]
    torch.testing.assert_close(flat_candidates(recorded, recorded["projected"]), merged, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(flat_candidates(recorded, recorded["hidden"]), merged, atol=1e-6, rtol=1e-5)
    # keys: block 1's key projection of its normed input, mean over heads and the 2x2 unit, raster order
    grid = inputs["image_grid_thw"]
    index, _ = get_vision_window_index(grid, spatial_merge_size=2, window_size=56, patch_size=14)
    captured = []
    blk = model.model.visual.blocks[1]
    h = blk.register_forward_pre_hook(
        lambda m, a, k: captured.append(a[0] if a else k["hidden_states"]), with_kwargs=True
    )
    with torch.no_grad():
        model.model.visual(inputs["pixel_values"], grid_thw=grid)
        h.remove()
        x = captured[0]
        k = blk.attn.qkv(blk.norm1(x)).view(x.shape[0], 3, blk.attn.num_heads, -1)[:, 1]  # [P, H, hd]
    want = k.mean(1).view(-1, 4, k.shape[-1]).mean(1)[torch.argsort(index)]
    torch.testing.assert_close(flat_candidates(recorded, recorded["keys"]), want, atol=1e-6, rtol=1e-5)
    assert recorded["keys_concat"].shape[-1] == model.config.vision_config.hidden_size


# -- the methods inside generate() --------------------------------------------------------------------
@pytest.mark.parametrize("method", ["visionzip", "holov", "scope", "divprune", "pio_ve_qwen"])
def test_methods_run_in_generate_with_exact_counts(model, inputs, method):
    keep = 5
    with tokenreduce.apply(model, plan_for(method, keep), registry=REGISTRY) as att:
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    st = att.trace.stages[0]
    n = [int(t * h * w // 4) for t, h, w in inputs["image_grid_thw"].tolist()]
    assert st.visual_before == [n[0], n[1] + n[2]]
    assert st.visual_after == [keep, keep]
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


def test_visionzip_keep_cls_is_refused_on_a_tower_without_cls(model, inputs):
    plan = plan_for("visionzip", 5)
    plan["stages"][0]["selector"]["keep_cls"] = True
    with pytest.raises(Exception, match="no CLS token"):
        with tokenreduce.apply(model, plan, registry=REGISTRY):
            model.generate(**inputs, max_new_tokens=1, do_sample=False)


def test_cls_methods_stay_refused_and_llava_does_not_provide_received_attention(model):
    with pytest.raises(PlanError, match="no CLS token"):
        tokenreduce.apply(model, "visionzip_64")
    llava = build_tiny("llava")
    with pytest.raises(PlanError, match="vision_attention"):
        tokenreduce.apply(llava, plan_for("scope", 4), registry=REGISTRY)


# -- PIO w/ VE, Qwen recipe, against an independent reference ------------------------------------------
def reference_pio_ve_qwen(local, glob, h, w, k, window):
    """PIO-FVLM's Qwen window selection, written from the description (docs/pio-fvlm.md)."""
    nh, nw = max(1, h // window), max(1, w // window)
    cap = math.ceil((k // 2) / (nh * nw))
    count = {}
    picked = []
    for i in sorted(range(h * w), key=lambda i: (-float(local[i]), i)):
        if len(picked) == k // 2:
            break
        cell = (min((i // w) // window, nh - 1), min((i % w) // window, nw - 1))
        if count.get(cell, 0) < cap:
            count[cell] = count.get(cell, 0) + 1
            picked.append(i)
    rest = [i for i in sorted(range(h * w), key=lambda i: (-float(glob[i]), i)) if i not in picked]
    return sorted(picked + rest[: k - len(picked)])


def test_pio_ve_qwen_matches_an_independent_reference(model):
    inputs = make_inputs("qwen2_5_vl", [PROMPTS[0]], image_sizes=[(196, 140)])  # 5x7 merged grid
    grid = inputs["image_grid_thw"]
    _, gh, gw = [int(v) // (2 if j else 1) for j, v in enumerate(grid[0].tolist())]
    ref = eager_reference(model, inputs)
    local = received_reference(model, inputs, ref, 1)
    glob = received_reference(model, inputs, ref, 1)
    local0 = received_reference(model, inputs, ref, 0)
    keep = 9
    plan = plan_for("pio_ve_qwen", keep)
    plan["stages"][0]["selector"]["local_layer"] = 0  # local and global from different blocks
    captured = []
    layer0 = model.model.language_model.layers[0]
    with tokenreduce.apply(model, plan, registry=REGISTRY) as att:
        hk = layer0.register_forward_pre_hook(
            lambda m, a, k: captured.append((a[0] if a else k["hidden_states"], k)), with_kwargs=True
        )
        try:
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        finally:
            hk.remove()
    want = reference_pio_ve_qwen(local0, glob, gh, gw, keep, 2)
    ids = inputs["input_ids"][0]
    visual_pos = torch.nonzero(ids == model.config.image_token_id).flatten()
    assert att.trace.stages[0].kept[0] == visual_pos[want].tolist()
    assert local.shape[0] == gh * gw
    # merged features: every dropped token averaged into its most cosine-similar kept token
    feats = ref["merged"][0] if isinstance(ref["merged"], (tuple, list)) else ref["merged"]
    normed = torch.nn.functional.normalize(feats, dim=-1)
    kept = torch.tensor(want)
    dropped = torch.tensor([i for i in range(gh * gw) if i not in want])
    assign = (normed[dropped] @ normed[kept].T).argmax(-1)
    merged = torch.stack(
        [(feats[kept[j]] + feats[dropped[assign == j]].sum(0)) / (1 + int((assign == j).sum())) for j in range(keep)]
    )
    hidden = captured[0][0][0]  # the prefill's layer-0 input
    first = int(visual_pos[0])
    torch.testing.assert_close(hidden[first : first + keep], merged, atol=1e-5, rtol=1e-5)
    # positions: the kept tokens keep their original 3-D M-RoPE ids, the removed ids are deleted
    # hand-written M-RoPE ids of the full prompt: text i -> (i, i, i); the image's tokens
    # (s0, s0 + row, s0 + col) from its first position s0; the text after it from s0 + max(h, w)
    s0, s_end = int(visual_pos[0]), int(visual_pos[-1]) + 1
    full = torch.zeros(3, ids.numel(), dtype=torch.long)
    for i in range(ids.numel()):
        if i < s0:
            full[:, i] = i
        elif i < s_end:
            r, c = divmod(i - s0, gw)
            full[:, i] = torch.tensor([s0, s0 + r, s0 + c])
        else:
            full[:, i] = s0 + max(gh, gw) + (i - s_end)
    full = full.unsqueeze(1)  # [3, 1, S]
    keep_pos = torch.ones(ids.numel(), dtype=torch.bool)
    keep_pos[visual_pos] = False
    keep_pos[visual_pos[want]] = True
    ids_kept = full[:, :, keep_pos]  # [3, 1, S']
    cos, sin = model.model.language_model.rotary_emb(hidden.unsqueeze(0), ids_kept)
    got_cos, got_sin = captured[0][1]["position_embeddings"]
    torch.testing.assert_close(got_cos, cos)
    torch.testing.assert_close(got_sin, sin)
