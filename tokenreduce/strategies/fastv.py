"""``fastv`` scorer: attention each visual token receives from the last prompt token at layer K-1.

Paper: "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for
Large Vision-Language Models" (FastV, ECCV 2024), arXiv 2403.06764.  Official code:
``pkunlp-icler/FastV`` (read for understanding only; nothing copied).  Docs page:
``docs/strategies/fastv.md``.

Score of visual candidate j at a cut before decoder layer K: the softmax attention probability
from the last valid query (the last prompt token) to j in decoder layer K-1, averaged over the
heads.  The attention row is recomputed from layer K-1's own ``input_layernorm``, ``q_proj``,
``k_proj`` and RoPE on that layer's input (:meth:`SignalSource.attention_rows` with
``layer_offset=-1``): never ``output_attentions``, never a switch to eager, so it runs under
sdpa and flash-attention.  Use with the ``topk`` selector.

Defaults of the paper: K = 2 (stage ``layer: 2``), keep 50% (``keep: {ratio: 0.5}``), positions
of the survivors kept (the official in-place variant sets ``position_ids`` to the kept original
indices; the attention-mask variant never changes positions): policy ``keep``.

Deviations from the official code:

* any batch size and left padding: the query is each sample's last *valid* token, and padding
  keys get probability 0 (official: batch size 1, the row ``[-1]``);
* the visual span is found from the input ids, not from fixed ``SYS_LENGTH`` /
  ``IMAGE_TOKEN_LENGTH`` constants;
* ties are broken deterministically by the selector (official: ``torch.topk``, unspecified);
* K = 0 with the default ``layer_offset=-1`` is refused at plan build (official attention-mask
  variant: silently switches to a random selection; in-place variant: an assert).

Extension (not in the paper): ``layer_offset=0`` ranks by the cut layer K's own attention
recomputed from its projections on its input (the signal PDrop uses).  It is what makes a cut
at layer 0 possible, which the reference models' 4-layer decoders need for layer-average budgets
below 25% (``conf/plan/ref_fastv_*.yaml``, ``docs/results.md``).  At layer 0 the query is the last
prompt token's *embedding*, which has seen no other token yet.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from tokenreduce.core.types import Need, TokenView


def last_valid_slot(valid: Tensor) -> Tensor:
    """``[B]`` long: the last slot where ``valid`` (``[B, S]`` bool) is True (0 if none)."""
    slots = torch.arange(valid.shape[1], device=valid.device).unsqueeze(0)
    return torch.where(valid, slots, torch.zeros_like(slots)).max(-1).values


class FastVScorer:
    """Head-averaged attention from the last prompt token at layer K-1 (FastV, arXiv 2403.06764)."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

        layer_offset: Literal[-1, 0] = Field(
            -1,
            description="-1: layer K-1's attention (the paper); 0: the cut layer K's own attention on its "
            "input (an extension that allows a cut at layer 0)",
        )

    needs: ClassVar[Need] = Need.ATTENTION_ROWS

    def __init__(self, settings: Settings):
        self.settings = settings

    def check_stage(self, layer: int, n_layers: int) -> str | None:
        if self.settings.layer_offset == -1 and layer < 1:
            return (
                "FastV ranks visual tokens by the attention they receive in the layer before the cut "
                "(layer K-1), so it needs a cut at layer >= 1 (the paper's default is layer 2); got layer 0 "
                "(layer_offset=0 ranks by the cut layer's own attention and allows layer 0)"
            )
        return None

    def score(self, view: TokenView) -> Tensor:
        """``[B, N]`` float32: mean over heads of the last query's attention to each candidate."""
        query = last_valid_slot(view.valid).unsqueeze(1)  # [B, 1]
        probs = view.signals.attention_rows(query, layer_offset=self.settings.layer_offset)  # [B, H, 1, S] float32
        received = probs.mean(dim=1)[:, 0]  # [B, S]
        scores = received.gather(1, view.visual_index)  # [B, N]
        return scores.float().masked_fill(~view.visual_valid, 0.0)
