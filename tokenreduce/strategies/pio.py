"""``pio`` scorer: gradient saliency from a layer-local, self-supervised proxy loss.

Paper: "PIO-FVLM: Rethinking Training-Free Visual Token Reduction for VLM Acceleration from an
Inference-Objective Perspective", arXiv 2602.04657 (v3 renamed "TRIO: Token Reduction via
Inference-Objective Guidance for Efficient Vision-Language Models").  Official code:
``ocy1/PIO-FVLM`` / ``ocy1/TRIO`` (read for understanding only; nothing copied).

One decoder layer, the final norm and the LM head run on the hidden states at the cut; the
cross-entropy of the last prompt positions against their own argmax is differentiated with
respect to those hidden states (``torch.autograd.grad``: no parameter gets a ``.grad``), and each
visual token scores the norm of its gradient, in float32.  The algorithm, the ``fast`` and
``exact`` probes and the deviations from the official code: ``docs/strategies/pio.md``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from tokenreduce.core.cost import Cost, StageCostInput, TextDims, layer_flops_paper
from tokenreduce.core.errors import UnsupportedCallError
from tokenreduce.core.strategy import Scorer
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
            "excludes; docs/strategies/pio.md). Put text after the image or use another scorer for this input."
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


def pio_probe_flops(s: int, rows: int, dims: TextDims, probe: str) -> tuple[int, int]:
    """True (forward, backward) FLOPs of the PIO probe on ``s`` tokens with ``rows`` loss rows.

    ``fast``: k, v on all ``s``; q, o, MLP, LM head and the attention at ``rows`` only.
    ``exact``: the whole layer on ``s``, the LM head at ``rows``.  Backward: gradient with
    respect to the hidden states only (no weight gradients): every linear product once more,
    attention products twice (both operands depend on the probe input)."""
    d, q, kv, m, v = dims.hidden, dims.q_width, dims.kv_width, dims.intermediate, dims.vocab
    head = 2 * rows * d * v
    if probe == "fast":
        linear = 2 * (2 * s * d * kv + rows * d * q + rows * q * d) + 2 * dims.mlp_matrices * rows * d * m
        attention = 4 * rows * s * q
    elif probe == "exact":
        linear = 2 * (s * d * q + 2 * s * d * kv + s * q * d) + 2 * dims.mlp_matrices * s * d * m
        attention = 4 * s * s * q
    else:
        raise ValueError(f"probe must be 'fast' or 'exact'; got {probe!r}")
    forward = linear + attention + head
    backward = linear + 2 * attention + head
    return forward, backward


class PIOScorer(Scorer):
    """Gradient saliency of a layer-local self-supervised proxy loss (PIO-FVLM, arXiv 2602.04657)."""

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

    needs = Need.LAYER_PROBE

    def check_stage(self, layer: int, n_layers: int) -> str | None:
        if self.layer_offset == -1 and layer < 1:
            return (
                "layer_offset=-1 re-runs the layer before the cut, and a cut at layer 0 has none; "
                "cut at layer >= 1 or use layer_offset=0"
            )
        return None

    def score(self, view: TokenView) -> Tensor:
        """``[B, N]`` float32 saliency of the visual candidates (0 where ``visual_valid`` is False)."""
        grad, probe_input = proxy_gradient(
            view, loss_positions=self.loss_positions, layer_offset=self.layer_offset, probe=self.probe
        )
        idx = view.visual_index.unsqueeze(-1).expand(-1, -1, grad.shape[-1])  # [B, N, d]
        g = grad.gather(1, idx).float()  # [B, N, d] float32, whatever the model dtype
        if self.reduction == "l2":
            sal = g.norm(dim=-1)
        else:
            sal = (g * probe_input.gather(1, idx).float()).sum(-1).abs()
        return sal.masked_fill(~view.visual_valid, 0.0)  # [B, N]

    def cost(self, c: StageCostInput) -> Cost:
        """True: the probe's forward and input-gradient backward on the ``S`` tokens entering the
        stage (``R = min(loss_positions, n_text - 1)`` loss rows), as they run; paper: the probe
        forward ``f(N)``, the paper's rule, plus ``probe_backward_factor x f(N)`` for the backward
        when that factor is set (default 0; ``docs/measurement.md``)."""
        rows = max(1, min(self.loss_positions, c.n_text - 1))
        fwd, bwd = pio_probe_flops(c.tokens_before, rows, c.dims, self.probe)
        paper = layer_flops_paper(c.visual_before, c.dims.hidden, c.dims.intermediate) * (1.0 + c.probe_backward_factor)
        backward = (
            f" x (1 + {c.probe_backward_factor:g}) with the backward" if c.probe_backward_factor else " (forward)"
        )
        note = (
            f"pio probe={self.probe}: forward {fwd:.4g} + backward {bwd:.4g} on S={c.tokens_before} tokens, "
            f"{rows} loss rows; paper f({c.visual_before}){backward}"
        )
        return Cost(fwd + bwd, paper, note)
