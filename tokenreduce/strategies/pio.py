"""``pio`` scorer: gradient saliency from a layer-local, self-supervised proxy loss.

Paper: "PIO-FVLM: Rethinking Training-Free Visual Token Reduction for VLM Acceleration from an
Inference-Objective Perspective", arXiv 2602.04657 (v3 renamed "TRIO: Token Reduction via
Inference-Objective Guidance for Efficient Vision-Language Models").  Official code:
``ocy1/PIO-FVLM`` / ``ocy1/TRIO`` (read for understanding only; nothing copied).  Algorithm per
``pio-spec.md`` §4-§5; docs page ``docs/strategies/pio.md``.

What it computes, per stage (cut before decoder layer K, hidden states ``H`` entering layer K):

1. ``P = H.detach().requires_grad_()`` in the model dtype (cloned out of inference mode first).
2. One decoder layer on ``P`` (``layer_offset=0``: layer K, "the next layer", the official
   LLaVA choice; ``-1``: layer K-1 re-applied to its own output, the official Qwen choice),
   causal, current positions, no KV cache; then the final norm and the LM head (logit lens);
   logits cast to float32.
3. Loss positions, per sample: the last ``loss_positions`` (4) positions of the shifted
   sequence, i.e. valid slots ``S-5 .. S-2`` (the last prompt token is excluded by the shift).
   They must lie after the last visual token (earlier positions have no gradient path to later
   visual tokens); when fewer exist, the ones that do are used; with none, an error.
4. Pseudo-labels: the argmax of those same logits (detached).  Loss: mean cross-entropy over the
   sample's positions, summed over the batch (samples never interact).
5. ``G = autograd.grad(loss, P)`` (never ``.backward()``: no ``.grad`` on any parameter).
6. Saliency of each visual candidate, in float32: ``reduction="l2"`` (default, the paper's)
   ``||G_j||_2``; ``reduction="grad_x_input"``: ``|sum_d G_j * P_j|``.

Probe modes: ``fast`` (default) computes queries, ``o_proj``, the MLP, the final norm and the
LM head only at the loss positions (keys and values at every position): the gradient is
mathematically identical to the full layer's, at under half the cost of one plain layer
forward (``benchmarks/bench_probe.py``).  ``exact``
runs the model's own decoder-layer module over the whole sequence and then picks the rows.
Neither materialises an attention matrix of the model nor changes its attention implementation.

Defaults: ``loss_positions=4``, ``layer_offset=0``, ``probe=fast``, ``reduction=l2``.

Deviations from the official code (all deliberate, see the docs page):

* the saliency norm is taken in float32 (official LLaVA: in fp16; Qwen: in bf16, then cast);
* any batch size, left padding, ragged visual counts (official: batch size 1, asserted);
* loss positions are clipped to the text after the last visual token (official: always the last
  4 shifted positions, whatever they are);
* the probe layer is a setting (official: next layer for LLaVA, same layer for Qwen);
* the full visual span is the candidate set (official LLaVA-NeXT path caps it at 576);
* ties in the ranking are broken by the selector deterministically (official: unstable argsort).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from tokenreduce.core.errors import UnsupportedCallError
from tokenreduce.core.types import Need, TokenView


def loss_rows(view: TokenView, loss_positions: int) -> tuple[Tensor, Tensor]:
    """Slots the proxy loss reads, per sample, and their weights.

    Returns ``rows`` ``[B, R]`` long (ascending slots, padded with the sample's last valid slot)
    and ``weight`` ``[B, R]`` float32 (``1/m_b`` at the ``m_b`` used slots, 0 elsewhere; all 0 for
    a sample without visual candidates).  ``m_b = min(loss_positions, available_b)`` where
    ``available_b`` is the number of valid slots after the last visual candidate, minus the last
    valid slot (excluded by the shift).

    Raises:
        UnsupportedCallError: a sample with visual candidates has no such slot.
    """
    valid = view.valid  # [B, S]
    b, s = valid.shape
    dev = valid.device
    slots = torch.arange(s, device=dev)
    has_visual = view.visual_valid.any(-1)  # [B]
    last_visual = torch.where(view.visual_valid, view.visual_index, torch.full_like(view.visual_index, -1))
    last_visual = last_visual.max(-1).values if last_visual.shape[1] else torch.full((b,), -1, device=dev)
    after = valid & (slots.unsqueeze(0) > last_visual.unsqueeze(1))  # [B, S]
    available = after.sum(-1) - 1  # [B]
    bad = has_visual & (available < 1)
    if bool(bad.any()):
        sample = int(torch.nonzero(bad)[0, 0])
        n_after = int(after[sample].sum())
        raise UnsupportedCallError(
            f"pio scorer: sample {sample} has {n_after} text token(s) after its last visual token; the proxy "
            "loss needs at least 2 (it reads the positions before the last prompt token, which the shift "
            "excludes; pio-spec §4). Put text after the image or use another scorer for this input."
        )
    m = torch.where(has_visual, available.clamp(max=loss_positions), torch.zeros_like(available))  # [B]
    from_end = valid.long().flip(-1).cumsum(-1).flip(-1)  # [B, S] valid slots at or after each slot
    chosen = valid & (from_end >= 2) & (from_end <= (m + 1).unsqueeze(1))  # [B, S]
    r = max(int(m.max()), 1)
    order = torch.argsort((~chosen).to(torch.int8), dim=-1, stable=True)[:, :r]  # chosen slots first, ascending
    used = torch.arange(r, device=dev).unsqueeze(0) < m.unsqueeze(1)  # [B, R]
    last_valid = torch.where(valid, slots.unsqueeze(0), torch.full_like(slots.unsqueeze(0), -1)).max(-1).values
    rows = torch.where(used, order, last_valid.clamp(min=0).unsqueeze(1))
    weight = used.float() / m.clamp(min=1).unsqueeze(1).float()
    return rows, weight


def proxy_gradient(
    view: TokenView, *, loss_positions: int = 4, layer_offset: int = 0, probe: str = "fast"
) -> tuple[Tensor, Tensor]:
    """Gradient of the PIO proxy loss with respect to the hidden states at the cut.

    Returns ``(grad, probe_input)``, both ``[B, S, d]`` in the model dtype and detached:
    ``grad = dL/dP`` with ``L = sum_b mean_{p in rows_b} CE(logits_p, argmax logits_p)`` and
    ``probe_input = P`` (the hidden states at the cut, cloned out of inference mode if needed).
    Model parameters get no ``.grad`` (``torch.autograd.grad`` with respect to ``P`` only) and
    keep their ``requires_grad``.
    """
    hidden = view.hidden  # [B, S, d] model dtype
    with torch.inference_mode(False), torch.enable_grad():
        # computed out of inference mode: tensors autograd saves must not be inference tensors
        rows, weight = loss_rows(view, loss_positions)  # [B, R], [B, R]
        base = hidden.clone() if hidden.is_inference() else hidden
        p = base.detach().requires_grad_(True)
        if probe == "fast":
            out = view.signals.layer_forward(p, rows, layer_offset=layer_offset)  # [B, R, d]
        elif probe == "exact":
            full = view.signals.layer_module_forward(p, layer_offset=layer_offset)  # [B, S, d]
            out = full.gather(1, rows.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
        else:
            raise ValueError(f"probe must be 'fast' or 'exact'; got {probe!r}")
        logits = view.signals.lm_logits(out).float()  # [B, R, V]
        target = logits.detach().argmax(-1)  # [B, R] pseudo-labels
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view_as(target)
        loss = (ce * weight.to(ce.device)).sum()
        (grad,) = torch.autograd.grad(loss, p, allow_unused=True)
    if grad is None:  # no path from P to the loss (cannot happen with a Llama layer; be safe)
        grad = torch.zeros_like(p)
    return grad.detach(), p.detach()


class PIOScorer:
    """Gradient saliency of a layer-local self-supervised proxy loss (PIO-FVLM, arXiv 2602.04657)."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")

        loss_positions: int = Field(4, ge=1, description="last positions of the shifted prompt the proxy loss reads")
        layer_offset: Literal[0, -1] = Field(
            0,
            description="probe layer: 0 = the cut layer K (next layer, official LLaVA); -1 = layer K-1 (official Qwen)",
        )
        probe: Literal["fast", "exact"] = Field(
            "fast", description="fast: loss rows only (identical gradient); exact: the model's full layer module"
        )
        reduction: Literal["l2", "grad_x_input"] = Field(
            "l2", description="l2: ||G_j||_2 (paper); grad_x_input: |sum_d G_j * H_j|"
        )

    needs: ClassVar[Need] = Need.LAYER_PROBE

    def __init__(self, settings: Settings):
        self.settings = settings

    def check_stage(self, layer: int, n_layers: int) -> str | None:
        if self.settings.layer_offset == -1 and layer < 1:
            return (
                "layer_offset=-1 re-runs the layer before the cut, and a cut at layer 0 has none; "
                "cut at layer >= 1 or use layer_offset=0"
            )
        return None

    def score(self, view: TokenView) -> Tensor:
        """``[B, N]`` float32 saliency of the visual candidates (0 where ``visual_valid`` is False)."""
        st = self.settings
        grad, probe_input = proxy_gradient(
            view, loss_positions=st.loss_positions, layer_offset=st.layer_offset, probe=st.probe
        )
        idx = view.visual_index.unsqueeze(-1).expand(-1, -1, grad.shape[-1])  # [B, N, d]
        g = grad.gather(1, idx).float()  # [B, N, d] float32, whatever the model dtype
        if st.reduction == "l2":
            sal = g.norm(dim=-1)
        else:
            sal = (g * probe_input.gather(1, idx).float()).sum(-1).abs()
        return sal.masked_fill(~view.visual_valid, 0.0)  # [B, N]
