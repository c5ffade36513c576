"""Encoder-side signals and methods on Qwen2-VL and Qwen3-VL (full-attention ViTs without a CLS
token; raster order): the attention received per visual token against the towers' own eager
attention probabilities at a chosen block and the last block, keys and merger inputs, every
encoder-side method inside ``generate()`` with exact kept counts on a ragged batch, the CLS
refusals, and the ``qwen_*`` / ``qwen3_pio_ve_*`` presets at the real decoder depths.
(Qwen2.5-VL, with windowed blocks: ``test_qwen_encoder_side.py``; Qwen3-VL's DeepStack after an
encoder-side cut: ``test_qwen3_vl.py``.)"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from qwen_encoder_plans import plan_for
from registry_helpers import registry_with

import tokenreduce
from tokenreduce.core.errors import PlanError
from tokenreduce.core.presets import load_preset
from tokenreduce.core.registry import get_registry
from tokenreduce.core.types import Need, Selection
from tokenreduce.strategies.pio_ve import PIOVEQwenSelector
from tokenreduce.strategies.visionzip import ReceivedAttentionScorer
from tokenreduce.testing.tiny import TINY, build_tiny, make_inputs, tiny_spec

KINDS = ["qwen2_vl", "qwen3_vl"]
PROMPTS = ["USER: <image> what is it? ASSISTANT:", "USER: <image> and <image> colour? ASSISTANT:"]
#: (width, height) per kind: three merged grids of different shapes (Qwen2-VL: 28 px per visual
#: token, 2x4 / 4x3 / 2x3; Qwen3-VL: 32 px, 3x4 / 4x2 / 2x3)
SIZES = {"qwen2_vl": [(112, 56), (84, 112), (84, 56)], "qwen3_vl": [(128, 96), (64, 128), (96, 64)]}
#: the modelling module whose ``eager_attention_forward`` the vision attention calls
MODELING = {
    "qwen2_vl": "transformers.models.qwen2_vl.modeling_qwen2_vl",
    "qwen3_vl": "transformers.models.qwen3_vl.modeling_qwen3_vl",
}
DEPTH = {"qwen2_vl": 28, "qwen3_vl": 36}  # decoder layers of the 7B / 8B checkpoints
REGISTRY = (
    None
    if {("scorer", "vision_attn"), ("selector", "pio_ve_qwen")}
    <= {(c.kind, c.name) for c in get_registry().components()}
    else registry_with(
        "qwen_family", scorers={"vision_attn": ReceivedAttentionScorer}, selectors={"pio_ve_qwen": PIOVEQwenSelector}
    )
)


@pytest.fixture(scope="module", params=KINDS)
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def model(kind):
    return build_tiny(kind, attn_implementation="eager")


@pytest.fixture(scope="module")
def inputs(kind):
    return make_inputs(kind, PROMPTS, image_sizes=SIZES[kind])


def eager_reference(kind, model, inputs) -> dict:
    """The tower's own eager attention probabilities (per block, per image), every block's input,
    the merger's input and output, from one plain vision-tower call."""
    module = importlib.import_module(MODELING[kind])
    visual = model.model.visual
    probs: list = []
    block_in: list = []
    original = module.eager_attention_forward

    def recording(mod, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        out, weights = original(mod, query, key, value, attention_mask, scaling, dropout, **kw)
        probs[-1].append(weights[0].float())  # [H, L, L]
        return out, weights

    def pre(m, a, k):
        probs.append([])
        block_in.append(a[0] if a else k["hidden_states"])

    handles = [blk.register_forward_pre_hook(pre, with_kwargs=True) for blk in visual.blocks]
    merger_in: list = []
    handles.append(visual.merger.register_forward_pre_hook(lambda m, a: merger_in.append(a[0])))
    module.eager_attention_forward = recording
    try:
        with torch.no_grad():
            out = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    finally:
        module.eager_attention_forward = original
        for h in handles:
            h.remove()
    merged = out.pooler_output
    merged = torch.cat(list(merged)) if isinstance(merged, (tuple, list)) else merged
    return {"probs": probs, "block_in": block_in, "merger_in": merger_in[0], "merged": merged}


def received_reference(inputs, ref, block: int) -> torch.Tensor:
    """``[U]`` per merged token in raster order (no windows: the blocks' own order), from the eager
    probabilities: column sums over heads and query rows of each image, divided by the image's
    patch count, averaged over the 2x2 unit."""
    grid = inputs["image_grid_thw"]
    col = torch.cat([p.sum(0).sum(0) for p in ref["probs"][block]])  # [P]
    rows = torch.cat([torch.full((int(t * h * w) // 4,), float(h * w)) for t, h, w in grid.tolist()])
    return col.view(-1, 4).mean(1) / rows


class Recorder:
    """Records the Qwen vision signals and keeps the first ``keep`` candidates."""

    from pydantic import BaseModel as _B

    class Settings(_B):
        pass

    needs = Need.VISION_ATTENTION | Need.VISION_KEYS | Need.VISION_FEATURES
    needs_scores = False
    seen: dict = {}

    def __init__(self, settings):
        pass

    def vision_layers(self):
        return (0, -1)

    def select(self, view, scores, keep):
        src = view.signals._vision()
        Recorder.seen = {
            "valid": view.visual_valid.clone(),
            "recv0": src.attention_received(0, "sum"),
            "recv_last": src.attention_received(-1, "sum"),
            "recv_last_mean": src.attention_received(-1, "mean"),
            "keys": src.keys(0, "mean"),
            "keys_concat": src.keys(0, "concat"),
            "features": view.signals.vision_features(),
            "projected": view.signals.project_vision(view.signals.vision_features()),
            "hidden": view.visual_hidden().clone(),
        }
        return Selection.from_lists([list(range(int(k))) for k in keep], device=keep.device)


@pytest.fixture(scope="module")
def recorded(model, inputs):
    registry = registry_with("qwen_family_recorder", selectors={"rec": Recorder})
    with tokenreduce.apply(model, {"stages": [{"layer": 0, "keep": 4, "selector": "rec"}]}, registry=registry):
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    return dict(Recorder.seen)


@pytest.fixture(scope="module")
def reference(kind, model, inputs):
    return eager_reference(kind, model, inputs)


def flat(recorded, value):
    return value[recorded["valid"]]


@pytest.mark.parametrize("block", ["0", "last"])
def test_attention_received_equals_the_eager_attention(model, inputs, recorded, reference, block):
    n_blocks = len(model.model.visual.blocks)
    index = 0 if block == "0" else n_blocks - 1
    assert n_blocks > 1  # block 0 is not the last one
    want = received_reference(inputs, reference, index)
    got = flat(recorded, recorded["recv0" if block == "0" else "recv_last"])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # full attention over each image: the mean over its query rows sums to 1 per head over its patches
    heads = model.config.vision_config.num_heads
    per_image = [int(t * h * w // 4) for t, h, w in inputs["image_grid_thw"].tolist()]
    for chunk in torch.split(got, per_image):
        assert math.isclose(float(chunk.sum()) * 4, heads, rel_tol=1e-5)
    if block == "last":
        torch.testing.assert_close(flat(recorded, recorded["recv_last_mean"]), want / heads)
    # the scores are not uniform: a wrong mapping or normalisation would show
    assert float(got.std()) > 1e-3


def test_keys_and_features_map_to_the_merged_tokens(model, recorded, reference):
    merged = reference["merged"]
    torch.testing.assert_close(flat(recorded, recorded["projected"]), merged, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(flat(recorded, recorded["hidden"]), merged, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        flat(recorded, recorded["features"]), reference["merger_in"].reshape(merged.shape[0], -1)
    )
    blk = model.model.visual.blocks[0]
    x = reference["block_in"][0]
    with torch.no_grad():
        k = blk.attn.qkv(blk.norm1(x)).view(x.shape[0], 3, blk.attn.num_heads, -1)[:, 1]  # [P, H, hd], before RoPE
    want = k.mean(1).view(-1, 4, k.shape[-1]).mean(1)
    torch.testing.assert_close(flat(recorded, recorded["keys"]), want, atol=1e-6, rtol=1e-5)
    concat = k.reshape(x.shape[0], -1).view(-1, 4, x.shape[-1]).mean(1)
    torch.testing.assert_close(flat(recorded, recorded["keys_concat"]), concat, atol=1e-6, rtol=1e-5)


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
    assert all(len(k) == keep for k in st.kept)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


def test_cls_methods_stay_refused(model, kind):
    name = {"qwen2_vl": "Qwen2-VL", "qwen3_vl": "Qwen3-VL"}[kind]
    with pytest.raises(PlanError, match=f"{name}'s vision tower has no CLS token"):
        tokenreduce.apply(model, "visionzip_64")
    plan = plan_for("visionzip", 5)
    plan["stages"][0]["selector"]["keep_cls"] = True
    with pytest.raises(Exception, match="no CLS token"):
        with tokenreduce.apply(model, plan, registry=REGISTRY):
            model.generate(**make_inputs(kind, PROMPTS[:1], image_sizes=SIZES[kind][:1]), max_new_tokens=1)


# -- presets at the real decoder depth --------------------------------------------------------------
def deep_model(kind: str, text_layers: int, vision_depth: int):
    """A tiny model with ``text_layers`` decoder layers and ``vision_depth`` ViT blocks (the Qwen
    presets read ViT block 7)."""
    spec = tiny_spec(kind)
    config = spec.tiny_config(TINY, text_layers=text_layers)
    config.vision_config.depth = vision_depth
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return spec.model_class()._from_config(config, attn_implementation="sdpa").eval()


QWEN2_PRESETS = [f"qwen_{m}_{p}" for m in ("visionzip", "holov", "scope", "divprune", "pio_ve") for p in (33, 22, 11)]
QWEN3_PIO_VE = {33: 1 / 3, 22: 2 / 9, 11: 1 / 9}


def adapter_cls(kind):
    return get_registry().adapter_for(kind).cls


@pytest.mark.parametrize("preset", QWEN2_PRESETS)
def test_qwen_presets_build_on_qwen2_vl_at_28_layers(preset):
    plan = load_preset(preset)
    compiled = tokenreduce.build_plan(plan, n_layers=28, adapter=adapter_cls("qwen2_vl"))
    assert compiled.stages[0].layer == 0


@pytest.mark.parametrize("pct", list(QWEN3_PIO_VE))
def test_qwen3_pio_ve_presets_scale_the_cut_to_36_layers(pct):
    plan = load_preset(f"qwen3_pio_ve_{pct}")
    compiled = tokenreduce.build_plan(plan, n_layers=36, adapter=adapter_cls("qwen3_vl"))
    assert [cs.layer for cs in compiled.stages] == [0, 18]
    assert plan.layer_average_for(1296, 36) / 1296 == pytest.approx(QWEN3_PIO_VE[pct], abs=5e-4)
    counts = plan.keep_counts(1296, 36)
    # the official recipe's shape: the encoder keeps 1.5x the target, the LLM stage a third of that
    assert counts[0] / 1296 == pytest.approx(1.5 * QWEN3_PIO_VE[pct], abs=1e-3)
    assert counts[1] / counts[0] == pytest.approx(1 / 3, abs=5e-3)
    # the Qwen2.5-VL preset at 36 layers would cut at 14 and keep more before it: not the same recipe
    other = load_preset(f"qwen_pio_ve_{pct}").keep_counts(1296, 36)
    assert other[0] != counts[0]


@pytest.mark.parametrize(
    "kind_, preset",
    [("qwen2_vl", "qwen_pio_ve_33"), ("qwen2_vl", "qwen_visionzip_22"), ("qwen3_vl", "qwen3_pio_ve_33")],
)
def test_presets_run_inside_generate_at_the_real_depth(kind_, preset):
    model = deep_model(kind_, DEPTH[kind_], vision_depth=8)
    plan = load_preset(preset)
    inputs = make_inputs(kind_, PROMPTS, image_sizes=SIZES[kind_])
    with tokenreduce.apply(model, plan) as att:
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    for b, n in enumerate(att.trace.original_visual):
        assert [st.visual_after[b] for st in att.trace.stages] == plan.keep_counts(n, DEPTH[kind_])
