"""``dart`` selector: duplication-aware token reduction around pivot tokens (DART).

Paper: "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
More" (DART, EMNLP 2025), arXiv 2502.11494.  Official code: ``ZichenWen1/DART``; the
re-implementation in ``ModelTC/llmc`` (``llmc/compression/token_reduction/dart.py``,
``get_retained_image_token``) was read to pin down the details (read for understanding only,
nothing copied).

Pivots: the visual and text tokens with the largest key L1 norm at layer K-1; each pivot then
claims its share of the budget among the visual tokens least similar to it.  ``layer_offset=0``
(an extension) reads the cut layer's keys and allows a cut at layer 0.  Details and deviations:
``docs/strategies/dart.md``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from tokenreduce.core.cost import Cost, StageCostInput, key_flops
from tokenreduce.core.strategy import Selector
from tokenreduce.core.types import Need, Selection, TokenView


def text_after_visual(view: TokenView) -> tuple[Tensor, Tensor]:
    """Text slots after each sample's last visual candidate.

    Returns ``slots`` ``[B, T]`` long (ascending; padded with the sample's last valid slot) and
    ``valid`` ``[B, T]`` bool.  A sample without visual candidates gets every valid slot.
    """
    valid = view.valid  # [B, S]
    b, s = valid.shape
    dev = valid.device
    positions = torch.arange(s, device=dev).unsqueeze(0)  # [1, S]
    last_visual = torch.where(view.visual_valid, view.visual_index, torch.full_like(view.visual_index, -1))
    last_visual = last_visual.max(-1).values if last_visual.shape[1] else torch.full((b,), -1, device=dev)
    after = valid & (positions > last_visual.unsqueeze(1))  # [B, S]
    counts = after.sum(-1)
    t = max(int(counts.max()), 1)
    order = torch.argsort((~after).to(torch.int8), dim=-1, stable=True)[:, :t]  # after-slots first, ascending
    text_valid = torch.arange(t, device=dev).unsqueeze(0) < counts.unsqueeze(1)
    last_valid = torch.where(valid, positions, torch.zeros_like(positions)).max(-1).values
    slots = torch.where(text_valid, order, last_valid.unsqueeze(1))
    return slots, text_valid


def _top(values: Tensor, count: int) -> list[int]:
    """Indices of the ``count`` largest entries of a 1-D tensor, ties to the lower index."""
    if count <= 0:
        return []
    order = torch.sort(values, descending=True, stable=True).indices
    return order[:count].tolist()


def claim_quota(claims: int, pivots: int) -> list[int]:
    """How many pool tokens each of ``pivots`` pivots claims: ``claims`` spread evenly, the first
    ``claims mod pivots`` pivots one more."""
    if pivots <= 0:
        return []
    base, extra = divmod(max(claims, 0), pivots)
    return [base + (1 if i < extra else 0) for i in range(pivots)]


class DARTSelector(Selector):
    """Pivot tokens by key L1 norm, then the tokens least similar to them (DART, arXiv 2502.11494)."""

    pivot_image: int = Field(4, ge=1, description="image pivots: visual tokens with the largest key L1 norm")
    pivot_text: int = Field(
        4, ge=0, description="text pivots: text tokens after the image with the largest key L1 norm"
    )
    layer_offset: Literal[-1, 0] = Field(
        -1,
        description="-1: key states of layer K-1 (the paper); 0: of the cut layer K on its input "
        "(an extension that allows a cut at layer 0)",
    )

    needs = Need.HIDDEN | Need.KEY_STATES
    needs_scores = False

    def check_stage(self, layer: int, n_layers: int) -> str | None:
        if self.layer_offset == -1 and layer < 1:
            return (
                "DART picks pivots by the key states of the layer before the cut (layer K-1), so it needs "
                "a cut at layer >= 1 (the paper's default is layer 2); got layer 0 "
                "(layer_offset=0 takes the cut layer's own keys and allows layer 0)"
            )
        return None

    def cost(self, c: StageCostInput) -> Cost:
        """The keys of the ``S`` tokens of the layer it reads (none for layer K-1, read from the KV
        cache: :func:`~tokenreduce.core.cost.key_flops`); its cosine similarities are element-wise
        products, not counted."""
        s, nv = c.tokens_at(self.layer_offset)
        d = c.dims.hidden
        where = "read from the KV cache" if self.layer_offset == -1 else "recomputed"
        note = (
            f"dart: keys of the S={s} tokens of layer {c.layer + self.layer_offset}, {where} "
            "(cosine similarities: element-wise, not counted)"
        )
        return Cost(key_flops(s, c.dims, self.layer_offset), float(nv * d * d), note)

    @torch.no_grad()
    def select(self, view: TokenView, scores: Tensor | None, keep: Tensor) -> Selection:
        """Exactly ``keep[b]`` (clamped to ``[0, n_visual[b]]``) ascending candidate indices per sample."""
        keys = view.signals.key_states(layer_offset=self.layer_offset)  # [B, H_kv, S, hd]
        key_norm = keys.float().abs().sum(dim=(1, 3))  # [B, S] L1 over heads and dims
        feats = view.signals.final_norm(view.hidden).float()  # [B, S, d]
        text_slots, text_valid = text_after_visual(view)
        n_visual = view.n_visual.tolist()
        rows = []
        for b, (n, k) in enumerate(zip(n_visual, keep.tolist())):
            k = min(max(int(k), 0), n)
            if k >= n:
                rows.append(list(range(n)))
                continue
            vis_slots = view.visual_index[b, :n]  # [n] positions of the candidates
            rows.append(self._select_one(key_norm[b], feats[b], vis_slots, text_slots[b][text_valid[b]], k))
        return Selection.from_lists(rows, device=view.hidden.device)

    def _select_one(self, key_norm: Tensor, feats: Tensor, vis_slots: Tensor, text_slots: Tensor, k: int) -> list[int]:
        """One sample: ``key_norm`` ``[S]``, ``feats`` ``[S, d]`` float32, ``vis_slots`` ``[n]``,
        ``text_slots`` ``[T]``; returns ``k`` candidate indices (0..n-1)."""
        n = vis_slots.numel()
        n_img = min(self.pivot_image, k)
        image_pivots = _top(key_norm[vis_slots], n_img)  # candidate indices
        if n_img == k:
            return image_pivots
        text_pivots = [int(text_slots[i]) for i in _top(key_norm[text_slots], min(self.pivot_text, text_slots.numel()))]
        # visiting order: ascending sequence position (image pivots as slots for the ordering)
        pivot_slots = sorted([int(vis_slots[i]) for i in image_pivots] + text_pivots)
        quota = claim_quota(k - n_img, len(pivot_slots))
        in_pool = torch.ones(n, dtype=torch.bool, device=feats.device)
        in_pool[image_pivots] = False
        pool_feats = feats[vis_slots]  # [n, d]
        kept = list(image_pivots)
        for slot, q in zip(pivot_slots, quota):
            if q == 0:
                continue
            sim = F.cosine_similarity(feats[slot].unsqueeze(0), pool_feats, dim=-1)  # [n]
            sim = sim.masked_fill(~in_pool, float("inf"))
            least = torch.sort(sim, stable=True).indices[:q]  # least similar first, ties to the lower index
            kept += least.tolist()
            in_pool[least] = False
        return kept
