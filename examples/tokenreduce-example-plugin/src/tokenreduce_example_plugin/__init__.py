"""tokenreduce-example-plugin: a third-party scorer that tokenreduce finds through an entry point.

This package is the template for shipping a new visual-token reduction method *outside* the
tokenreduce repository.  It contains one scorer, ``text_relevance``, and one hook
implementation that registers it.  ``pyproject.toml`` points the entry-point group
``tokenreduce`` at this module::

    [project.entry-points.tokenreduce]
    example_plugin = "tokenreduce_example_plugin"

After ``pip install``, ``tokenreduce.list_components()`` (and ``tokenreduce list``) show the
scorer with this distribution as its origin, and every plan can name it: in Python
(``tokenreduce.apply(model, {"stages": [{"layer": 2, "keep": 64, "scorer": "text_relevance"}]})``),
in a YAML plan, or as a Hydra override (``plan.stages.0.scorer=text_relevance``).  Its plan
preset ``conf/plan/text_relevance_25.yaml`` is found through the second entry-point group,
``tokenreduce.conf`` (``plan=text_relevance_25``, ``plans=[text_relevance_25,demo]``).

The method: ``text_relevance``
------------------------------

At a cut before decoder layer K, score each visual candidate by how similar its hidden state is
to the *question*, i.e. the text that follows the image (question + answer prompt), in the
language model's own hidden space at that depth.  With ``h_j`` the hidden state of visual token
``j`` entering layer K and ``t_1..t_T`` those of the question tokens::

    reduce="mean":  score_j = cos(h_j, mean_i t_i)
    reduce="max":   score_j = max_i cos(h_j, t_i)

Higher = more relevant = keep (use it with the ``topk`` selector).  With ``center=true`` the
sample's mean visual hidden state is subtracted from every hidden state first: LLM hidden states
share a large common direction (anisotropy), which otherwise pushes all cosines toward the same
value and leaves little to rank.

It is a *text-guided* criterion in the spirit of TRIM ("Less is More: A Simple yet Effective
Token Reduction Method for Efficient Multi-modal LLMs", Song et al., COLING 2025, arXiv
2409.10994), which ranks image tokens by their CLIP-space similarity to the question.  This
example is not a reproduction of TRIM: it needs no CLIP text encoder, no fine-tuning and no
outlier rule, and it measures the similarity inside the language model at the cut layer, so it
works for every architecture tokenreduce supports (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL) and at any
cut layer, including K = 0 (where it compares the projected image features with the question's
token embeddings).

Which tokens are "the question": the valid text tokens after the sample's last visual
candidate.  A sample whose prompt ends with the image (no text after it) uses all of its valid
text tokens instead; a sample without any text token gets score 0 for every candidate (the
``topk`` selector then keeps the earliest ones).  Everything is per sample: batches may be
left-padded and ragged (different visual counts), and a sample's scores never depend on the
other samples of its batch.

Cost per sample: ``O(N d)`` for ``reduce="mean"`` and ``O(N T d)`` for ``reduce="max"``
(N visual candidates, T question tokens, d hidden size); it reads only the hidden states at the
cut (``Need.HIDDEN``), so it needs no attention matrix and runs under sdpa and FlashAttention.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from tokenreduce import Need, TokenView, hookimpl

__version__ = "0.1.0"
__all__ = ["TextRelevanceScorer", "question_mask", "visual_slot_mask", "tokenreduce_register"]

#: Hydra search path of the plan presets shipped with this package (``conf/plan/*.yaml``).  Not
#: needed by tokenreduce, which finds them through the ``tokenreduce.conf`` entry point
#: (``tokenreduce run plan=text_relevance_25``); for a Hydra application of your own.
CONF_SEARCHPATH = "pkg://tokenreduce_example_plugin.conf"

_EPS = 1e-8  # norm floor of the cosine: a zero vector has cosine 0 with everything


def visual_slot_mask(view: TokenView) -> Tensor:
    """``[B, S]`` bool: True at the slots of the valid visual candidates of each sample."""
    counts = torch.zeros(view.valid.shape, dtype=torch.long, device=view.valid.device)
    # scatter_add (not scatter): padded candidates point at slot 0 with weight 0 and must not
    # overwrite a real candidate that sits at slot 0
    counts.scatter_add_(1, view.visual_index, view.visual_valid.long())
    return counts > 0


def question_mask(view: TokenView) -> Tensor:
    """``[B, S]`` bool: the text slots that form each sample's question.

    The valid slots after the sample's last valid visual candidate; for a sample with no such
    slot (the prompt ends with the image), all of its valid non-visual slots.  Padding slots are
    never included.  A sample without visual candidates gets all of its valid slots.
    """
    valid = view.valid  # [B, S]
    b, s = valid.shape
    positions = torch.arange(s, device=valid.device).unsqueeze(0)  # [1, S]
    if view.visual_index.shape[1]:
        last_visual = (
            torch.where(view.visual_valid, view.visual_index, torch.full_like(view.visual_index, -1)).max(-1).values
        )
    else:
        last_visual = torch.full((b,), -1, dtype=torch.long, device=valid.device)
    after = valid & (positions > last_visual.unsqueeze(1))  # [B, S]
    text = valid & ~visual_slot_mask(view)  # [B, S]
    return torch.where(after.any(-1, keepdim=True), after, text)


def _left_aligned(mask: Tensor) -> tuple[Tensor, Tensor]:
    """The True slots of each row of ``mask`` (``[B, S]`` bool), ascending and left-aligned:
    ``slots`` ``[B, T]`` long (0 where padded) and ``slot_valid`` ``[B, T]`` bool, with
    ``T = max(1, most True slots in a row)``."""
    counts = mask.sum(-1)  # [B]
    t = max(int(counts.max()) if counts.numel() else 0, 1)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[:, :t]  # True slots first
    slot_valid = torch.arange(t, device=mask.device).unsqueeze(0) < counts.unsqueeze(1)
    return torch.where(slot_valid, order, torch.zeros_like(order)), slot_valid


class TextRelevanceScorer:
    """Cosine similarity of each visual token's hidden state to the question's hidden states."""

    class Settings(BaseModel):
        """Settings of ``text_relevance`` (``{name: text_relevance, reduce: max, center: true}``)."""

        model_config = ConfigDict(extra="forbid")  # a typo in a YAML key fails with its path

        reduce: Literal["mean", "max"] = Field(
            "mean",
            description="mean: cosine with the mean question hidden state (one query vector, O(N d)); "
            "max: the largest cosine with any single question token (O(N T d))",
        )
        center: bool = Field(
            False,
            description="subtract the sample's mean visual hidden state from all hidden states before the cosine",
        )

    #: only the hidden states at the cut, which every adapter provides
    needs: ClassVar[Need] = Need.HIDDEN

    def __init__(self, settings: Settings):
        self.settings = settings

    @torch.no_grad()
    def score(self, view: TokenView) -> Tensor:
        """``[B, N]`` float32 relevance of each visual candidate, in ``[-1, 1]``; 0 where
        ``view.visual_valid`` is False and for samples without any text token."""
        hidden = view.hidden.float()  # [B, S, d]
        visual = view.visual_hidden().float()  # [B, N, d], zeros at invalid candidates
        visual_valid = view.visual_valid  # [B, N]
        if self.settings.center:
            n_visual = visual_valid.sum(-1, keepdim=True).clamp(min=1)  # [B, 1]
            mean_visual = (visual.sum(1) / n_visual).unsqueeze(1)  # [B, 1, d]
            hidden = hidden - mean_visual
            visual = visual - mean_visual
        query = question_mask(view)  # [B, S]
        visual_unit = F.normalize(visual, dim=-1, eps=_EPS)  # [B, N, d]
        if self.settings.reduce == "mean":
            weights = query.unsqueeze(-1).to(hidden.dtype)  # [B, S, 1]
            mean_query = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)  # [B, d]
            scores = (visual_unit * F.normalize(mean_query, dim=-1, eps=_EPS).unsqueeze(1)).sum(-1)  # [B, N]
        else:
            slots, slot_valid = _left_aligned(query)  # [B, T]
            question = hidden.gather(1, slots.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # [B, T, d]
            sims = visual_unit @ F.normalize(question, dim=-1, eps=_EPS).transpose(1, 2)  # [B, N, T]
            scores = sims.masked_fill(~slot_valid.unsqueeze(1), float("-inf")).max(-1).values  # [B, N]
        usable = visual_valid & query.any(-1, keepdim=True)  # [B, N]
        return scores.masked_fill(~usable, 0.0)


@hookimpl
def tokenreduce_register(registry) -> None:
    """Register this package's components (called once when tokenreduce builds its registry)."""
    registry.scorer("text_relevance", TextRelevanceScorer)
