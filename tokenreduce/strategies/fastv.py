"""``fastv`` scorer: attention each visual token receives from the last prompt token at layer K-1.

Paper: "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for
Large Vision-Language Models" (FastV, ECCV 2024), arXiv 2403.06764.  Official code:
``pkunlp-icler/FastV`` (read for understanding only; nothing copied).

The attention row is recomputed from the layer's own projections
(:meth:`~tokenreduce.core.types.SignalSource.attention_rows`), so it runs under sdpa and
flash-attention.  ``layer_offset=0`` (an extension) ranks by the cut layer's own attention and
allows a cut at layer 0.  The same scorer ranks for PyramidDrop (``pdrop``, :mod:`.pdrop`) with
that method's default.  Defaults, deviations from the official code: ``docs/strategies/fastv.md``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from tokenreduce.core.cost import Cost, StageCostInput, attention_row_flops
from tokenreduce.core.strategy import Scorer
from tokenreduce.core.types import Need, TokenView


def last_valid_slot(valid: Tensor) -> Tensor:
    """``[B]`` long: the last slot where ``valid`` (``[B, S]`` bool) is True (0 if none)."""
    slots = torch.arange(valid.shape[1], device=valid.device).unsqueeze(0)
    return torch.where(valid, slots, torch.zeros_like(slots)).max(-1).values


class FastVScorer(Scorer):
    """Head-averaged attention from the last prompt token at layer K-1 (FastV, arXiv 2403.06764;
    also PDrop's scorer)."""

    layer_offset: Literal[-1, 0] = Field(
        -1,
        description="-1: layer K-1's attention (the paper); 0: the cut layer K's own attention on its "
        "input (an extension that allows a cut at layer 0)",
    )

    needs = Need.ATTENTION_ROWS

    def check_stage(self, layer: int, n_layers: int) -> str | None:
        if self.layer_offset == -1 and layer < 1:
            return (
                "layer_offset=-1 ranks visual tokens by the attention they receive in the layer before the cut "
                "(layer K-1), so it needs a cut at layer >= 1 (FastV's default is layer 2); got layer 0 "
                "(layer_offset=0 ranks by the cut layer's own attention, PDrop's choice, and allows layer 0)"
            )
        return None

    def score(self, view: TokenView) -> Tensor:
        """``[B, N]`` float32: mean over heads of the last query's attention to each candidate
        (0 where ``visual_valid`` is False)."""
        query = last_valid_slot(view.valid).unsqueeze(1)  # [B, 1]
        probs = view.signals.attention_rows(query, layer_offset=self.layer_offset)  # [B, H, 1, S] float32
        received = probs.mean(dim=1)[:, 0]  # [B, S]
        scores = received.gather(1, view.visual_index)  # [B, N]
        return scores.float().masked_fill(~view.visual_valid, 0.0)

    def cost(self, c: StageCostInput) -> Cost:
        """True: one query and its scores over the ``S`` tokens the layer reads, plus their keys
        unless they come from the KV cache (``layer_offset=-1``); paper: ``N*d^2 + N*d`` (keys of
        the ``N`` visual tokens and one row of scores)."""
        s, nv = c.tokens_at(self.layer_offset)
        d = c.dims.hidden
        note = f"{c.name}: attention row of the last token at layer {c.layer + self.layer_offset} over S={s} keys"
        if self.layer_offset == -1:
            note += " (keys from the KV cache)"
        return Cost(attention_row_flops(s, 1, c.dims, self.layer_offset), float(nv * d * d + nv * d), note)
