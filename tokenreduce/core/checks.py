"""Output checks of the strategy contract: what a scorer returns and what a selector returns.

The cut engine calls these on every stage, so a component that breaks the contract fails with
a message that names the stage and the component.  The contract itself is described in
``docs/writing-a-strategy.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .errors import ComponentOutputError
from .types import Selection

if TYPE_CHECKING:  # pragma: no cover
    from .plan import CompiledStage

__all__ = ["check_scores", "check_selection"]


def _component_name(cs: CompiledStage, part: str) -> str:
    ref = getattr(cs.spec, part)
    name = getattr(ref, "name", None) if ref is not None else None
    return name or "?"


def check_scores(
    cs: CompiledStage, scores: Any, shape: tuple[int, ...] | torch.Size, valid: Tensor | None = None
) -> None:
    """Raise :class:`~tokenreduce.core.errors.ComponentOutputError` (a ``RuntimeError``) unless
    ``scores`` is a floating-point tensor of ``shape`` (``[B, N_visual]``) whose values are finite
    at the valid candidates (``valid``, ``[B, N_visual]`` bool; None: every candidate).

    A NaN or infinite score would make ``topk`` keep arbitrary tokens (the first ones), and integer
    scores tie where the scorer meant an order, so both are refused rather than ranked."""
    where = f"stages.{cs.index}.scorer {_component_name(cs, 'scorer')!r} (cut before layer {cs.layer})"
    if not isinstance(scores, Tensor) or tuple(scores.shape) != tuple(shape):
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ComponentOutputError(f"{where} returned scores of shape {got}; expected {tuple(shape)} ([B, N_visual])")
    if not scores.is_floating_point():
        raise ComponentOutputError(
            f"{where} returned scores of dtype {scores.dtype}; expected a floating-point tensor "
            "(float32, higher = keep): convert with .float()"
        )
    bad = ~torch.isfinite(scores)
    if valid is not None:
        bad &= valid.to(device=bad.device, dtype=torch.bool)
    if bool(bad.any()):
        values = scores[bad]
        kinds = {
            "NaN": int(torch.isnan(values).sum()),
            "+inf": int((values == float("inf")).sum()),
            "-inf": int((values == float("-inf")).sum()),
        }
        counts = ", ".join(f"{n} {k}" for k, n in kinds.items() if n)
        b, j = (int(i) for i in torch.nonzero(bad)[0])
        raise ComponentOutputError(
            f"{where} returned non-finite scores at valid candidates ({counts}; first at sample {b}, "
            f"candidate {j}); scores must be finite floats (higher = keep), or a selector would keep "
            "arbitrary tokens"
        )


def check_selection(cs: CompiledStage, sel: Any, keep: Tensor, n_vis: Tensor) -> None:
    """Raise :class:`~tokenreduce.core.errors.ComponentOutputError` (a ``RuntimeError``) unless
    ``sel`` is a :class:`Selection` that keeps exactly ``keep`` candidates per sample, with strictly
    ascending indices in ``0..n_vis-1`` and, when it merges, hidden states of shape ``[B, k, d]``."""
    name = _component_name(cs, "selector")
    if not isinstance(sel, Selection):
        raise ComponentOutputError(
            f"stages.{cs.index}.selector {name!r} returned {type(sel).__name__}, not a Selection"
        )
    counts = sel.valid.sum(-1)
    if not torch.equal(counts, keep):
        raise ComponentOutputError(
            f"stages.{cs.index}.selector {name!r} kept {counts.tolist()} tokens per sample; "
            f"the plan asks for {keep.tolist()}"
        )
    bad = sel.valid & ((sel.index < 0) | (sel.index >= n_vis.unsqueeze(1)))
    if bool(bad.any()):
        raise ComponentOutputError(f"stages.{cs.index}.selector {name!r} returned indices outside 0..N_visual-1")
    if sel.hidden is not None:
        hidden = sel.hidden
        if not isinstance(hidden, Tensor) or hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(sel.index.shape):
            got = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
            raise ComponentOutputError(
                f"stages.{cs.index}.selector {name!r} returned merged hidden states of shape {got}; "
                f"expected {tuple(sel.index.shape)} + (d,) ([B, k, d])"
            )
    steps = sel.index[:, 1:] - sel.index[:, :-1]
    if bool(((steps <= 0) & sel.valid[:, 1:]).any()):
        raise ComponentOutputError(
            f"stages.{cs.index}.selector {name!r} returned indices that are not strictly ascending"
        )
