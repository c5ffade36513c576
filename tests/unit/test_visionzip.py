"""``vision_cls`` + ``visionzip`` (VisionZip, arXiv 2412.04467) against a slow reference."""

from __future__ import annotations

import math

import pytest
import torch
from encoder_fixtures import make_encoder_view

from tokenreduce.adapters.llava import LlavaAdapter
from tokenreduce.adapters.llava_next import LlavaNextAdapter
from tokenreduce.adapters.qwen2_5_vl import Qwen2_5_VLAdapter
from tokenreduce.core.errors import PlanError
from tokenreduce.core.plan import build_plan
from tokenreduce.core.presets import load_preset
from tokenreduce.strategies.visionzip import CLSAttentionScorer, VisionZipSelector, contextual_count


def reference_visionzip(scores, keys, feats, hidden, projector, keep: int, c: int, cls=None, image=None):
    """Python loops, float64, written from the official ``CLIPVisionTower_VisionZip.forward``.

    Per sample: ``keep - c`` dominant tokens = each image's CLS (``cls`` given: ``{image: feature}``,
    at most one per dominant slot, first images first) + the top patches by score (ties: lower
    index); the other patches in order; targets at stride max(1, M // c); each other token joins
    the target with the largest key cosine (first one on ties); target feature + mean of its
    joiners, projected.  Layout (ours, documented): patches in image order with the contextual
    tokens at their targets; an image's projected CLS first in its run, in the slot of its first
    patch that is neither dominant nor a target (the patches before that slot move one on).
    Returns (kept candidate indices, ``[keep, d]`` hidden states)."""
    n = len(scores)
    image = [0] * n if image is None else [int(i) for i in image]
    images = sorted(set(image))
    with_cls = images[: keep - c] if cls is not None else []
    ranked = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    dominant = ranked[: keep - c - len(with_cls)]
    rest = [i for i in range(n) if i not in dominant]
    targets = [rest[p] for p in list(range(0, len(rest), max(1, len(rest) // c)))[:c]] if c else []
    k64 = keys.double()

    def cos(a, b):
        return float(k64[a] @ k64[b]) / (math.sqrt(float(k64[a] @ k64[a])) * math.sqrt(float(k64[b] @ k64[b])))

    joined = {t: [] for t in targets}
    for o in rest:
        if o in targets or not targets:
            continue
        best = max(targets, key=lambda t: (cos(o, t), -targets.index(t)))
        joined[best].append(o)
    content = {}  # kept patch -> its hidden state
    for i in dominant + targets:
        if i in joined:
            f = feats[i].double()
            if joined[i]:
                f = f + torch.stack([feats[o].double() for o in joined[i]]).mean(0)
            content[i] = projector(f.float()).detach()
        else:
            content[i] = hidden[i]
    index, out = [], []
    for img in images:
        run = sorted(i for i in content if image[i] == img)
        rows = [content[i] for i in run]
        if img in with_cls:
            free = [i for i in range(n) if image[i] == img and i not in content]
            assert free, "an image with every patch kept (not used below)"
            run = sorted(run + [free[0]])
            rows = [projector(cls[img].float()).detach()] + rows
        index += run
        out += rows
    return index, torch.stack(out)


def with_cls_features(sig, seed: int = 100):
    """Give the fake signal source a CLS feature per image (``[B, N, d_v]``, one row per image)."""
    g = torch.Generator().manual_seed(seed)
    images = sig.grid[..., 0]
    per_image = torch.randn(images.shape[0], int(images.max()) + 1, sig.features.shape[-1], generator=g)
    sig.cls_features = per_image.gather(1, images.unsqueeze(-1).expand(-1, -1, per_image.shape[-1]))
    sig.vision_cls_features = lambda: sig.cls_features
    return {b: {int(i): per_image[b, i] for i in images[b].unique()} for b in range(images.shape[0])}


@pytest.mark.parametrize("keep_cls", [True, False])
@pytest.mark.parametrize("keep,c", [(12, 3), (20, 5), (5, 0), (9, 9), (36, 6), (1, 0), (30, 6)])
def test_equals_reference(keep, c, keep_cls):
    view, sig = make_encoder_view([6], seed=keep)
    cls = with_cls_features(sig)[0]
    sel = VisionZipSelector(VisionZipSelector.Settings(contextual=c, keep_cls=keep_cls)).select(
        view, sig.vision_cls_attention(-2, "sum"), torch.tensor([keep])
    )
    index, hidden = reference_visionzip(
        sig.cls[(-2, "sum")][0],
        sig.keys[0],
        sig.features[0],
        view.visual_hidden()[0],
        sig.projector,
        keep,
        min(c, keep),
        cls=cls if keep_cls else None,
    )
    assert sel.to_lists() == [index]
    merges = c > 0 or (keep_cls and keep > c)
    assert (sel.hidden is None) == (not merges)  # nothing merged: the kept tokens stay as they are
    got = sel.hidden[0] if sel.hidden is not None else view.visual_hidden()[0, index]
    torch.testing.assert_close(got, hidden, atol=1e-5, rtol=1e-5)


def test_cls_token_is_first_and_the_official_split():
    """The official 64 = CLS + 53 dominant patches + 10 contextual: here on a 24x24 grid."""
    view, sig = make_encoder_view([24], seed=3)
    cls = with_cls_features(sig)[0]
    scores = sig.vision_cls_attention(-2, "sum")
    sel = VisionZipSelector(VisionZipSelector.Settings(contextual=10)).select(view, scores, torch.tensor([64]))
    torch.testing.assert_close(sel.hidden[0, 0], sig.projector(cls[0]).detach(), atol=1e-6, rtol=1e-6)
    kept = sel.index[0]
    original = view.visual_hidden()[0]
    top53 = set(torch.topk(scores[0], 53).indices.tolist())
    unchanged = {int(kept[j]) for j in range(64) if torch.equal(sel.hidden[0, j], original[kept[j]])}
    assert len(top53 - set(kept.tolist())) == 0 and int(torch.topk(scores[0], 54).indices[-1]) not in unchanged
    assert len(unchanged & top53) >= 53 - 3  # only the few patches before the CLS's slot move one on
    old = VisionZipSelector(VisionZipSelector.Settings(contextual=10, keep_cls=False)).select(
        view, scores, torch.tensor([64])
    )
    assert set(torch.topk(scores[0], 54).indices.tolist()) <= set(old.to_lists()[0])


def test_several_images_in_one_sample_get_one_cls_each():
    view, sig = make_encoder_view([6, 5], seed=11)
    view.signals.grid[0, 18:36, 0] = 1  # sample 0: two images of 18 patches; sample 1: one of 25
    cls = with_cls_features(sig)
    scores = sig.vision_cls_attention(-2, "sum")
    keep = torch.tensor([14, 9])
    sel = VisionZipSelector(VisionZipSelector.Settings(contextual=3)).select(view, scores, keep)
    for b, n in enumerate([36, 25]):
        index, hidden = reference_visionzip(
            scores[b, :n],
            sig.keys[b, :n],
            sig.features[b, :n],
            view.visual_hidden()[b, :n],
            sig.projector,
            int(keep[b]),
            3,
            cls=cls[b],
            image=sig.grid[b, :n, 0],
        )
        assert sel.to_lists()[b] == index
        torch.testing.assert_close(sel.hidden[b, : int(keep[b])], hidden, atol=1e-5, rtol=1e-5)
    first_of_image_1 = sel.to_lists()[0].index(next(i for i in sel.to_lists()[0] if i >= 18))
    torch.testing.assert_close(sel.hidden[0, first_of_image_1], sig.projector(cls[0][1]).detach())


def test_an_image_with_every_patch_kept_gives_its_slot_to_the_best_free_patch():
    view, sig = make_encoder_view([4], seed=5)
    view.signals.grid[0, 2:, 0] = 1  # image 0: 2 patches, image 1: 14
    with_cls_features(sig)
    scores = torch.zeros(1, 16)
    scores[0, :2] = 10.0  # both patches of image 0 dominant
    scores[0, 9] = 5.0  # the best remaining patch
    sel = VisionZipSelector(VisionZipSelector.Settings(contextual=0)).select(view, scores, torch.tensor([4]))
    # dominant budget 4 = 2 CLS + 2 patches (0, 1); image 0 has no free patch: no CLS for it, patch 9
    # instead; image 1's CLS in its first free patch (2)
    assert sel.to_lists() == [[0, 1, 2, 9]]
    torch.testing.assert_close(sel.hidden[0, 2], sig.projector(sig.cls_features[0, 2]).detach())
    torch.testing.assert_close(sel.hidden[0, [0, 1, 3]], view.visual_hidden()[0, [0, 1, 9]])


def test_a_signal_source_without_cls_features_is_refused_clearly():
    view, sig = make_encoder_view([4], seed=1)
    with pytest.raises(RuntimeError, match="vision_cls_features.*keep_cls=false"):
        VisionZipSelector(VisionZipSelector.Settings()).select(view, sig.cls[(-2, "sum")], torch.tensor([6]))


def test_ragged_batch_equals_single_runs_and_is_deterministic():
    view, sig = make_encoder_view([6, 4, 5], seed=7)
    cls = with_cls_features(sig)
    selector = VisionZipSelector(VisionZipSelector.Settings())
    scores = CLSAttentionScorer(CLSAttentionScorer.Settings()).score(view)
    keep = torch.tensor([16, 7, 13])
    sel = selector.select(view, scores, keep)
    again = selector.select(view, scores, keep)
    assert sel.to_lists() == again.to_lists() and torch.equal(sel.hidden, again.hidden)
    for b, side in enumerate([6, 4, 5]):
        n = side * side
        cs = contextual_count(int(keep[b]), n, 5 / 32, None)
        index, hidden = reference_visionzip(
            scores[b, :n],
            sig.keys[b, :n],
            sig.features[b, :n],
            view.visual_hidden()[b, :n],
            sig.projector,
            int(keep[b]),
            cs,
            cls=cls[b],
        )
        assert sel.to_lists()[b] == index
        torch.testing.assert_close(sel.hidden[b, : int(keep[b])], hidden, atol=1e-5, rtol=1e-5)
    assert sel.valid.sum(-1).tolist() == keep.tolist()


def test_scorer_reads_the_configured_layer_and_reduction():
    view, sig = make_encoder_view([4], seed=1, layers=(-2, 3))
    scores = CLSAttentionScorer(CLSAttentionScorer.Settings(layer=3, heads="mean")).score(view)
    assert torch.equal(scores, sig.cls[(3, "mean")])
    assert sig.calls == [("cls", 3, "mean")]


@pytest.mark.parametrize("keep,expected", [(192, 30), (128, 20), (64, 10), (1, 0), (7, 1)])
def test_default_split_matches_the_official_scripts(keep, expected):
    assert contextual_count(keep, 576, 5 / 32, None) == expected
    assert contextual_count(keep, 576, 5 / 32, 3) == min(3, keep)


def test_encoder_side_only():
    with pytest.raises(PlanError, match="layer 0"):
        build_plan({"stages": [{"layer": 2, "keep": 8, "scorer": "vision_cls", "selector": "visionzip"}]}, n_layers=4)


@pytest.mark.parametrize("adapter,reason", [(Qwen2_5_VLAdapter, "no CLS token"), (LlavaNextAdapter, "anyres")])
def test_unsupported_adapters_fail_at_plan_build(adapter, reason):
    with pytest.raises(PlanError, match=reason):
        build_plan("visionzip_64", n_layers=32, adapter=adapter)


@pytest.mark.parametrize(
    "name,dominant,contextual", [("visionzip_192", 162, 30), ("visionzip_128", 108, 20), ("visionzip_64", 54, 10)]
)
def test_presets(name, dominant, contextual):
    plan = load_preset(name)
    compiled = build_plan(plan, n_layers=32, adapter=LlavaAdapter)
    assert plan.keep_counts(576, 32) == [dominant + contextual]
    assert plan.layer_average_for(576, 32) == dominant + contextual
    assert compiled.stages[0].selector.settings.contextual == contextual
