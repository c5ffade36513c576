"""The ``dart`` selector (DART, arXiv 2502.11494) against a slow reference, on synthetic tensors
and inside ``generate()`` with keys recomputed independently from the model's own modules."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from registry_helpers import registry_with
from strategies.baseline_fixtures import Layout, make_view, sample_slots

import tokenreduce
from tokenreduce.core.errors import PlanError
from tokenreduce.core.plan import build_plan
from tokenreduce.core.presets import load_preset
from tokenreduce.core.types import Need, Selection, TokenView
from tokenreduce.strategies.dart import DARTSelector, claim_quota, text_after_visual
from tokenreduce.testing.tiny import build_tiny, make_inputs


def reference_dart(
    key_l1: list[float], feats: list[list[float]], visual: list[int], text: list[int], k: int, p_img: int, p_txt: int
) -> list[int]:
    """DART for one sample, plain python (float64).

    ``key_l1[s]``: L1 norm of slot s's keys; ``feats[s]``: its final-norm'd hidden state;
    ``visual``/``text``: candidate slots and text slots after the image.  Returns candidate
    indices (positions in ``visual``), ascending."""

    def top(slots: list[int], count: int) -> list[int]:
        return sorted(slots, key=lambda s: (-key_l1[s], slots.index(s)))[:count]

    def cos(a: list[float], b: list[float]) -> float:
        na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
        return sum(x * y for x, y in zip(a, b)) / max(na * nb, 1e-8)

    n_img = min(p_img, k)
    image_pivots = top(visual, n_img)
    kept = set(image_pivots)
    if n_img < k:
        pivots = sorted(image_pivots + top(text, min(p_txt, len(text))))
        claims = k - n_img
        quota = [claims // len(pivots) + (1 if i < claims % len(pivots) else 0) for i in range(len(pivots))]
        pool = [s for s in visual if s not in kept]
        for pivot, q in zip(pivots, quota):
            ranked = sorted(pool, key=lambda s: (cos(feats[pivot], feats[s]), visual.index(s)))
            for s in ranked[:q]:
                kept.add(s)
                pool.remove(s)
    return sorted(visual.index(s) for s in kept)


def reference_for_view(view: TokenView, keys: torch.Tensor, normed: torch.Tensor, keep: list[int], p_img=4, p_txt=4):
    out = []
    for b, k in enumerate(keep):
        _, visual, text = sample_slots(view, b)
        key_l1 = [float(keys[b, :, s].double().abs().sum()) for s in range(keys.shape[2])]
        feats = [[float(v) for v in row] for row in normed[b].double()]
        out.append(reference_dart(key_l1, feats, visual, text, min(k, len(visual)), p_img, p_txt))
    return out


LAYOUTS = [Layout(3, 40, 6), Layout(1, 25, 2), Layout(2, 33, 0)]


@pytest.mark.parametrize("keep", [[30, 12, 5], [4, 2, 33], [28, 25, 9], [1, 1, 1]])
@pytest.mark.parametrize("pivots", [(4, 4), (2, 0), (3, 5)])
def test_equals_reference_on_synthetic_tensors(keep, pivots):
    view, signals = make_view(LAYOUTS, d=20, seed=sum(keep))
    sel = DARTSelector(DARTSelector.Settings(pivot_image=pivots[0], pivot_text=pivots[1]))
    out = sel.select(view, None, torch.tensor(keep))
    assert out.hidden is None
    assert out.valid.sum(-1).tolist() == [min(k, lay.n_visual) for k, lay in zip(keep, LAYOUTS)]
    normed = signals.final_norm(view.hidden).float()
    assert out.to_lists() == reference_for_view(view, signals.keys, normed, keep, *pivots)
    assert ("key_states", -1) in signals.calls and ("final_norm",) in signals.calls


def test_official_token_topk_counts_are_reproduced():
    """keep = pivot_image + P * TOKEN_TOPK: every pivot claims exactly TOKEN_TOPK tokens."""
    assert claim_quota(8 * 16, 8) == [16] * 8  # the official "128" setting: 4 + 128 = 132 kept
    assert claim_quota(26, 8) == [4, 4, 3, 3, 3, 3, 3, 3]  # dart_64: keep 30 = 4 + 26
    assert claim_quota(5, 0) == [] and claim_quota(0, 3) == [0, 0, 0]


def test_text_after_visual():
    view, _ = make_view(LAYOUTS)
    slots, valid = text_after_visual(view)
    for b in range(len(LAYOUTS)):
        _, _, text = sample_slots(view, b)
        assert slots[b][valid[b]].tolist() == text
    assert valid.sum(-1).tolist() == [6, 2, 0]


def test_settings_needs_and_k0():
    st = DARTSelector.Settings()
    assert (st.pivot_image, st.pivot_text) == (4, 4)
    assert DARTSelector.needs == Need.HIDDEN | Need.KEY_STATES and DARTSelector.needs_scores is False
    for bad in ({"pivot_image": 0}, {"pivot_text": -1}, {"pivots": 4}):
        with pytest.raises(ValidationError):
            DARTSelector.Settings(**bad)
    with pytest.raises(PlanError, match=r"stages\.0\.selector.*layer >= 1"):
        build_plan({"stages": [{"layer": 0, "keep": 4, "selector": "dart"}]}, n_layers=4)


@pytest.mark.parametrize("budget, keep, average", [(64, 30, 64.125), (128, 98, 127.875), (192, 166, 191.625)])
def test_presets(budget, keep, average):
    plan = load_preset(f"dart_{budget}")
    assert plan.positions == "keep"
    assert [(s.layer, s.scorer, s.selector.name) for s in plan.stages] == [(2, None, "dart")]
    assert plan.stages[0].selector.settings == {"pivot_image": 4, "pivot_text": 4}
    assert plan.keep_counts(576, 32) == [keep]
    assert plan.layer_average_for(576, 32) == average
    build_plan(plan, n_layers=32)


# -- inside generate(): keys recomputed independently from the model's own modules -----------------
RECORDS: list[dict] = []


class RecordingDART(DARTSelector):
    def select(self, view: TokenView, scores, keep) -> Selection:
        out = super().select(view, scores, keep)
        RECORDS.append({"view": view, "keep": keep.tolist(), "kept": out.to_lists()})
        return out


REGISTRY = registry_with("dart", selectors={"rec_dart": RecordingDART})
PROMPTS = ["USER: <image> what color is the shape? ASSISTANT:", "<image> what shape is it?"]


@pytest.mark.parametrize("layer, offset", [(2, -1), (2, 0), (0, 0)], ids=["K2", "K2-offset0", "K0-offset0"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_generate_selection_equals_reference_from_the_models_modules(kv_heads, layer, offset):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = build_tiny("llava", num_key_value_heads=kv_heads)
    decoder = model.model.language_model
    captured = {}

    def grab(module, args, kwargs):  # registered before the attachment: sees the model's own inputs
        if (args[0] if args else kwargs["hidden_states"]).shape[1] > 1:
            captured[module] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])

    handles = [decoder.layers[i].register_forward_pre_hook(grab, with_kwargs=True) for i in (0, 1, 2)]
    inputs = make_inputs("llava", PROMPTS)
    RECORDS.clear()
    try:
        selector = {"name": "rec_dart", "layer_offset": offset}
        with tokenreduce.apply(
            model, {"stages": [{"layer": layer, "keep": 7, "selector": selector}]}, registry=REGISTRY
        ) as att:
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        for h in handles:
            h.remove()
    rec = RECORDS[0]
    view = rec["view"]
    key_layer = decoder.layers[layer + offset]  # the layer whose keys pick the pivots
    h1, (cos, sin) = captured[key_layer]
    attn = key_layer.self_attn
    with torch.no_grad():
        x = key_layer.input_layernorm(h1)
        q = attn.q_proj(x).view(*x.shape[:2], -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(*x.shape[:2], -1, attn.head_dim).transpose(1, 2)
        _, keys = apply_rotary_pos_emb(q, k, cos, sin)  # [B, H_kv, S, hd]
        normed = decoder.norm(captured[decoder.layers[layer]][0]).float()
    assert keys.shape[1] == kv_heads
    torch.testing.assert_close(view.signals.key_states(offset), keys, atol=1e-5, rtol=0)
    assert rec["kept"] == reference_for_view(view, keys, normed, rec["keep"])
    assert att.trace.stages[0].visual_after == [7, 7]
