"""``vision_cls`` scorer and ``visionzip`` selector: VisionZip's dominant + contextual tokens.

Paper: "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (CVPR 2025),
arXiv 2412.04467.  Official code: ``dvlab-research/VisionZip`` (and the copy in
``kinredon/SCOPE``'s ``scope/clip_encoder.py``); read for understanding only, nothing copied.

Encoder side (a stage at layer 0, the first of a plan): the dominant tokens are each image's CLS
token (``keep_cls``, as the official LLaVA path keeps it) and the best patches by the scorer
(``vision_cls``: CLS -> patch attention at vision layer -2, summed over heads); the remaining
patches are merged into a few contextual tokens by key similarity in the vision-feature space,
each replacing its target token.  The projected CLS feature goes first in its image's run.
Details and deviations: ``docs/strategies/visionzip.md``.
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


def vision_attention(view: TokenView, layer: int, heads: str) -> Tensor:
    """``[B, N]`` float32: the attention each candidate receives at vision layer ``layer``
    (``Need.VISION_ATTENTION``), from the signal source's ``vision_attention()``, else from its
    vision-tower signals' ``attention_received()``."""
    get = getattr(view.signals, "vision_attention", None)
    if get is None:
        source = getattr(view.signals, "_vision", None)
        if source is None:
            raise RuntimeError(
                f"the signal source {type(view.signals).__name__} provides no vision_attention() "
                "(the attention each patch receives in the vision tower)"
            )
        return source().attention_received(layer, heads)
    return get(layer, heads)


class ReceivedAttentionScorer(Scorer):
    """The attention each visual token receives in a CLS-free vision tower (Qwen family), reduced
    over heads: the stand-in for CLS attention of VisionZip, SCOPE and HoloV on those towers
    (``docs/strategies/visionzip.md``)."""

    layer: int = Field(default=-1, description="vision block (negative from the end; -1: the last, full attention)")
    heads: Literal["sum", "mean"] = Field(default="sum", description="reduction over heads")

    needs = Need.VISION_ATTENTION

    def check_stage(self, layer: int, n_layers: int) -> str | None:
        return check_encoder_stage("vision_attn", layer)

    def vision_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def score(self, view: TokenView) -> Tensor:
        """``[B, N]`` float32 attention received by each candidate (0 at invalid ones)."""
        return vision_attention(view, self.layer, self.heads).float().masked_fill(~view.visual_valid, 0.0)


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


def cls_anchors(kept: Tensor, valid: Tensor, image: Tensor, scores: Tensor, n_cls: int) -> list[tuple[int, int]]:
    """Slots for the CLS tokens of one sample's first ``n_cls`` images.

    The CLS token has no patch position, so it needs a free slot: for image ``i`` the first
    candidate of that image that is neither a dominant patch nor a contextual target (a patch that
    was merged away or dropped).  The selector then moves the CLS to the front of the image's kept
    run (:meth:`VisionZipSelector.select`).  An image without a free candidate (every patch of it
    kept, possible only with several images in one sample) gets no CLS; its slot goes to the
    best-scored free candidate of the sample, kept as it is, so the count stays exact.

    Args:
        kept: ``[N]`` bool, the dominant patches and contextual targets; the anchors (and any
            replacement) are set in place.
        valid: ``[N]`` bool candidate validity.  image: ``[N]`` long image index in the sample.
        scores: ``[N]`` the stage's scores.  n_cls: CLS tokens to place (images ``0..n_cls-1``).

    Returns:
        ``(image, anchor candidate)`` per placed CLS token, in image order.
    """
    anchors: list[tuple[int, int]] = []
    missing = 0
    for i in range(n_cls):
        free = torch.nonzero(valid & ~kept & (image == i)).flatten()
        if free.numel() == 0:
            missing += 1
            continue
        anchors.append((i, int(free[0])))
        kept[int(free[0])] = True
    if missing:
        extra = topk_mask(
            scores.unsqueeze(0), (valid & ~kept).unsqueeze(0), torch.tensor([missing], device=kept.device)
        )
        kept |= extra[0]
    return anchors


class VisionZipSelector(Selector):
    """Dominant tokens (each image's CLS + the best patches) + contextual tokens merged by key similarity
    (VisionZip)."""

    layer: int = Field(default=-2, description="vision encoder layer whose keys drive the contextual merge")
    contextual_ratio: float = Field(
        default=5 / 32, ge=0.0, lt=1.0, description="contextual share of the kept tokens (5/32: 162+30 of 192)"
    )
    contextual: int | None = Field(default=None, ge=0, description="fixed contextual count (overrides the ratio)")
    keep_cls: bool = Field(
        default=True,
        description="each image's CLS token (projected) takes one dominant slot, first in its image's run, as in "
        "the official LLaVA code; false: dominant patches only",
    )

    needs = Need.VISION_KEYS | Need.VISION_FEATURES | Need.VISUAL_GRID
    needs_scores = True

    def check_stage(self, layer: int, n_layers: int) -> str | None:
        return check_encoder_stage("visionzip", layer)

    def vision_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def select(self, view: TokenView, scores: Tensor | None, keep: Tensor) -> Selection:
        """Exactly ``keep[b]`` tokens: ``c`` contextual, ``keep[b] - c`` dominant = one CLS per image
        (``keep_cls``) + the best patches.  ``hidden`` ``[B, k, d]`` holds the projected merged
        features at the targets, the projected CLS first in each image's run (the kept tokens
        before the CLS's free slot move one slot on), the unchanged hidden states elsewhere."""
        assert scores is not None
        valid = view.visual_valid
        n_vis = view.n_visual
        counts = [contextual_count(int(k), int(n), self.contextual_ratio, self.contextual) for k, n in zip(keep, n_vis)]
        dominant_budget = keep - torch.tensor(counts, device=keep.device)
        image = torch.zeros_like(view.visual_index)
        n_cls = torch.zeros_like(keep)
        if self.keep_cls:
            image = view.signals.visual_grid()[..., 0].masked_fill(~valid, -1)  # [B, N] image in the sample
            n_cls = torch.minimum(image.amax(-1) + 1, dominant_budget)
        dominant = topk_mask(scores, valid, dominant_budget - n_cls)  # [B, N] dominant patches
        if not any(counts) and not bool(n_cls.any()):
            return Selection.from_mask(dominant)
        keep_mask = dominant.clone()
        merged: list[tuple[Tensor, Tensor] | None] = [None] * len(counts)  # per sample: (candidates, features)
        if any(counts):
            keys = view.signals.vision_keys(self.layer, "mean")  # [B, N, h]
            features = view.signals.vision_features()  # [B, N, d_v]
            for b, c in enumerate(counts):
                if c == 0:
                    continue
                rest = torch.nonzero(valid[b] & ~dominant[b]).flatten()  # [M] ascending
                pos, feats = merge_contextual(keys[b, rest], features[b, rest], c)
                keep_mask[b, rest[pos]] = True
                merged[b] = (rest[pos], feats.to(features.dtype))
        anchors = [cls_anchors(keep_mask[b], valid[b], image[b], scores[b], int(m)) for b, m in enumerate(n_cls)]
        sel = Selection.from_mask(keep_mask)
        hidden = view.visual_hidden().gather(1, sel.index.unsqueeze(-1).expand(-1, -1, view.hidden.shape[-1])).clone()
        for b, entry in enumerate(merged):
            if entry is not None:
                cand, feats = entry
                projected = view.signals.project_vision(feats.unsqueeze(0))[0]  # [c, d]
                hidden[b, torch.searchsorted(sel.index[b, : int(keep[b])], cand)] = projected.to(hidden.dtype)
        placed = [(b, i, anchor) for b, row in enumerate(anchors) for i, anchor in row]
        if placed:
            rows = torch.tensor([[b, anchor] for b, _, anchor in placed], device=keep.device)
            cls_rows = vision_cls_features(view)[rows[:, 0], rows[:, 1]]  # [n, d_v], one projector call
            projected = view.signals.project_vision(cls_rows.unsqueeze(0))[0].to(hidden.dtype)  # [n, d]
            for (b, i, anchor), row in zip(placed, projected):
                kept = sel.index[b, : int(keep[b])]
                first = int(torch.nonzero(image[b, kept] == i)[0, 0])  # the image's first kept slot
                at = int(torch.searchsorted(kept, torch.tensor(anchor, device=kept.device)))
                hidden[b, first + 1 : at + 1] = hidden[b, first:at].clone()  # the kept tokens before move on
                hidden[b, first] = row
        sel.hidden = hidden
        return sel


def vision_cls_features(view: TokenView) -> Tensor:
    """``[B, N, d_v]``: the CLS feature of each candidate's image at the projector's input layer,
    from the signal source's ``vision_cls_features()``."""
    get = getattr(view.signals, "vision_cls_features", None)
    if get is None:
        raise RuntimeError(
            f"visionzip keep_cls: the signal source {type(view.signals).__name__} provides no "
            "vision_cls_features() (the CLS token's feature before the projector); set "
            "selector.keep_cls=false to keep patches only"
        )
    return get()
