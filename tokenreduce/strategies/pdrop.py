"""``pdrop`` scorer: attention from the last instruction token at a stage boundary (PyramidDrop).

Paper: "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction" (PDrop, CVPR 2025), arXiv 2410.17247.  Official code:
``Cooperx521/PyramidDrop`` (``llava/model/modeling_llama_pdrop.py``: ``pdrop_forward``,
``pdrop_rank_drop``; read for understanding only, nothing copied).  Docs page:
``docs/strategies/pdrop.md``.

PyramidDrop splits the decoder into stages and, at the end of each stage, keeps a fraction
``lambda`` of the visual tokens entering it.  The ranking: the softmax attention probability from
the **last instruction token** (the last prompt token) to each visual token, **averaged over the
heads**, computed with the query/key projections of the **first layer of the next stage** (the
official ``pdrop_rank_drop`` is called after decoder layer ``i`` and uses ``self.layers[i + 1]``'s
``input_layernorm``, ``q_proj``, ``k_proj`` and RoPE on layer ``i``'s output).  A stage boundary
"after layer i" is our cut before layer ``K = i + 1``, so the default here is
``layer_offset=0``: the cut layer K's projections on the hidden states entering it.
``layer_offset=-1`` ranks by layer K-1 instead (FastV's choice; see :mod:`.fastv`).  Use with the
``topk`` selector; one ``pdrop`` stage per stage boundary.

The row is recomputed by :meth:`SignalSource.attention_rows` from the layer's own projections
(one query row, all keys, causal, padding masked): no ``output_attentions``, no switch to eager,
so it runs under sdpa and flash-attention.

Defaults of the paper (LLaVA-1.5): boundaries after layers 8, 16, 24 (stages ``layer: 8``,
``16``, ``24``), ``lambda = 0.5`` (keep 50%, 25%, 12.5% of the original count), positions
renumbered contiguously after each drop (``positions: renumber``; the official code rebuilds
``position_ids = arange(len)`` and shifts decode positions by the number dropped).

Deviations from the official code:

* any batch size and left padding: the query is each sample's last *valid* token and padding keys
  get probability 0 (official: per-sample loop over right-padded rows, the query found from a
  recorded prompt length);
* the visual span is found from the input ids (official: recorded image position and length);
* ties are broken deterministically by the selector (official: ``torch.topk``);
* keep counts come from the plan (``keep``), rounded half-up (official: ``int(N * ratio)``,
  truncation); with a ratio of the original count the two agree whenever ``N * ratio`` is an
  integer (576 x 0.5 / 0.25 / 0.125).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from tokenreduce.core.types import Need, TokenView

from .fastv import last_valid_slot


class PDropScorer:
    """Head-averaged attention from the last instruction token at the stage boundary (PDrop, arXiv 2410.17247)."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

        layer_offset: Literal[0, -1] = Field(
            0,
            description="0: the cut layer K's projections on its input (official PDrop); "
            "-1: layer K-1 (FastV's choice)",
        )

    needs: ClassVar[Need] = Need.ATTENTION_ROWS

    def __init__(self, settings: Settings):
        self.settings = settings

    def check_stage(self, layer: int, n_layers: int) -> str | None:
        if self.settings.layer_offset == -1 and layer < 1:
            return (
                "layer_offset=-1 ranks by the layer before the cut, and a cut at layer 0 has none; "
                "cut at layer >= 1 or use layer_offset=0 (the official PDrop choice)"
            )
        return None

    def score(self, view: TokenView) -> Tensor:
        """``[B, N]`` float32: mean over heads of the last valid token's attention to each
        candidate (0 where ``visual_valid`` is False)."""
        query = last_valid_slot(view.valid).unsqueeze(1)  # [B, 1]
        probs = view.signals.attention_rows(query, layer_offset=self.settings.layer_offset)  # [B, H, 1, S]
        received = probs.mean(dim=1)[:, 0]  # [B, S]
        scores = received.gather(1, view.visual_index)  # [B, N]
        return scores.float().masked_fill(~view.visual_valid, 0.0)
