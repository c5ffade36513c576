"""``vision_cls`` scorer and ``visionzip`` selector: VisionZip's dominant + contextual tokens.

Paper: "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (CVPR 2025),
arXiv 2412.04467.  Official code: ``dvlab-research/VisionZip`` (and the copy in
``kinredon/SCOPE``'s ``scope/clip_encoder.py``); read for understanding only, nothing copied.

Encoder side (a stage at layer 0, the first of a plan): the dominant tokens are the best by the
scorer (``vision_cls``: CLS -> patch attention at vision layer -2, summed over heads); the
remaining tokens are merged into a few contextual tokens by key similarity in the
vision-feature space, each replacing its target token.  Details and deviations:
``docs/strategies/visionzip.md``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from tokenreduce.core.strategy import Scorer, Selector
from tokenreduce.core.types import Need, Selection, TokenView

from .topk import topk_mask

ENCODER_ONLY = (
    "{name} works on the vision tower's patches, so it needs an encoder-side stage: layer 0, the "
    "first stage of the plan; got layer {layer}"
)


def check_encoder_stage(name: str, layer: int) -> str | None:
    """The ``check_stage`` of every encoder-side component: only layer 0."""
    return ENCODER_ONLY.format(name=name, layer=layer) if layer != 0 else None


class CLSAttentionScorer(Scorer):
    """CLS -> patch attention at a vision-tower layer, reduced over heads (VisionZip, SCOPE, HoloV)."""

    layer: int = Field(default=-2, description="vision encoder layer (negative from the end)")
    heads: Literal["sum", "mean"] = Field(default="sum", description="reduction over heads")

    needs = Need.VISION_CLS_ATTENTION

    def check_stage(self, layer: int, n_layers: int) -> str | None:
        return check_encoder_stage("vision_cls", layer)

    def vision_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def score(self, view: TokenView) -> Tensor:
        """``[B, N]`` float32 CLS attention of each candidate (0 at invalid ones)."""
        scores = view.signals.vision_cls_attention(self.layer, self.heads)
        return scores.float().masked_fill(~view.visual_valid, 0.0)


def contextual_count(keep: int, n: int, ratio: float, fixed: int | None) -> int:
    """Contextual tokens of a sample keeping ``keep`` of its ``n`` candidates: ``fixed``, else
    ``round(ratio * keep)`` (half up), at most ``keep``.  (The ``keep - c`` dominant tokens leave
    ``n - keep + c >= c`` candidates, enough targets.)"""
    c = fixed if fixed is not None else int(ratio * keep + 0.5)
    return max(0, min(c, keep, n))


def uniform_targets(m: int, c: int) -> Tensor:
    """Positions (in ``0..m-1``) of the ``c`` targets among ``m`` remaining tokens (VisionZip's
    uniform stride): ``arange(0, m, max(1, m // c))[:c]``."""
    step = max(1, m // c)
    return torch.arange(0, m, step)[:c]


def merge_contextual(keys: Tensor, features: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """VisionZip's contextual merge for one sample.

    Args:
        keys: ``[M, h]`` keys of the remaining (non-dominant) tokens, in candidate order.
        features: ``[M, d_v]`` their vision features.
        c: number of contextual tokens (``1 <= c <= M``).

    Returns:
        (target positions ``[c]`` into ``0..M-1``, merged features ``[c, d_v]`` float32 =
        target + mean of the tokens assigned to it).
    """
    m = keys.shape[0]
    targets = uniform_targets(m, c).to(keys.device)
    is_target = torch.zeros(m, dtype=torch.bool, device=keys.device)
    is_target[targets] = True
    normed = keys.float() / keys.float().norm(dim=-1, keepdim=True)
    sim = normed[~is_target] @ normed[targets].T  # [M - c, c]
    assign = sim.argmax(dim=-1)  # first maximum
    feats = features.float()
    sums = torch.zeros(c, feats.shape[-1], dtype=feats.dtype, device=feats.device).index_add_(
        0, assign, feats[~is_target]
    )
    counts = torch.bincount(assign, minlength=c).clamp(min=1).unsqueeze(-1).to(feats.dtype)
    return targets, feats[targets] + sums / counts


class VisionZipSelector(Selector):
    """Dominant tokens by score + contextual tokens merged by key similarity (VisionZip)."""

    layer: int = Field(default=-2, description="vision encoder layer whose keys drive the contextual merge")
    contextual_ratio: float = Field(
        default=5 / 32, ge=0.0, lt=1.0, description="contextual share of the kept tokens (5/32: 162+30 of 192)"
    )
    contextual: int | None = Field(default=None, ge=0, description="fixed contextual count (overrides the ratio)")

    needs = Need.VISION_KEYS | Need.VISION_FEATURES
    needs_scores = True

    def check_stage(self, layer: int, n_layers: int) -> str | None:
        return check_encoder_stage("visionzip", layer)

    def vision_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def select(self, view: TokenView, scores: Tensor | None, keep: Tensor) -> Selection:
        """Exactly ``keep[b]`` tokens: dominant ∪ targets, ascending; ``hidden`` ``[B, k, d]``
        holds the projected merged features at the targets, the unchanged hidden states elsewhere."""
        n_vis = view.n_visual
        counts = [contextual_count(int(k), int(n), self.contextual_ratio, self.contextual) for k, n in zip(keep, n_vis)]
        dominant = topk_mask(scores, view.visual_valid, keep - torch.tensor(counts, device=keep.device))  # [B, N]
        if not any(counts):
            return Selection.from_mask(dominant)
        keys = view.signals.vision_keys(self.layer, "mean")  # [B, N, h]
        features = view.signals.vision_features()  # [B, N, d_v]
        keep_mask = dominant.clone()
        merged: list[tuple[Tensor, Tensor]] = []  # per sample: (candidate indices, features)
        for b, c in enumerate(counts):
            if c == 0:
                merged.append((torch.zeros(0, dtype=torch.long, device=keep.device), features[b, :0].float()))
                continue
            rest = torch.nonzero(view.visual_valid[b] & ~dominant[b]).flatten()  # [M] ascending
            pos, feats = merge_contextual(keys[b, rest], features[b, rest], c)
            keep_mask[b, rest[pos]] = True
            merged.append((rest[pos], feats))
        sel = Selection.from_mask(keep_mask)
        hidden = view.visual_hidden().gather(1, sel.index.unsqueeze(-1).expand(-1, -1, view.hidden.shape[-1])).clone()
        for b, (cand, feats) in enumerate(merged):
            if cand.numel() == 0:
                continue
            projected = view.signals.project_vision(feats.to(features.dtype).unsqueeze(0))[0]  # [c, d]
            slot = torch.searchsorted(sel.index[b, : int(keep[b])], cand)
            hidden[b, slot] = projected.to(hidden.dtype)
        sel.hidden = hidden
        return sel
