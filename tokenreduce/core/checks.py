"""Output checks of the strategy contract: what a scorer returns and what a selector returns.

The cut engine calls these on every stage, so a component that breaks the contract fails with
a message that names the stage and the component.  The contract itself is described in
``docs/writing-a-strategy.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .types import Selection

if TYPE_CHECKING:  # pragma: no cover
    from .plan import CompiledStage

__all__ = ["check_scores", "check_selection"]


def _component_name(cs: CompiledStage, part: str) -> str:
    ref = getattr(cs.spec, part)
    name = getattr(ref, "name", None) if ref is not None else None
    return name or "?"


def check_scores(cs: CompiledStage, scores: Any, shape: tuple[int, ...] | torch.Size) -> None:
    """Raise ``RuntimeError`` unless ``scores`` is a tensor of ``shape`` (``[B, N_visual]``)."""
    if not isinstance(scores, Tensor) or tuple(scores.shape) != tuple(shape):
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise RuntimeError(
            f"stages.{cs.index}.scorer {_component_name(cs, 'scorer')!r} returned scores of shape {got}; "
            f"expected {tuple(shape)} ([B, N_visual])"
        )


def check_selection(cs: CompiledStage, sel: Any, keep: Tensor, n_vis: Tensor) -> None:
    """Raise ``RuntimeError`` unless ``sel`` is a :class:`Selection` that keeps exactly ``keep``
    candidates per sample, with strictly ascending indices in ``0..n_vis-1`` and, when it merges,
    hidden states of shape ``[B, k, d]``."""
    name = _component_name(cs, "selector")
    if not isinstance(sel, Selection):
        raise RuntimeError(f"stages.{cs.index}.selector {name!r} returned {type(sel).__name__}, not a Selection")
    counts = sel.valid.sum(-1)
    if not torch.equal(counts, keep):
        raise RuntimeError(
            f"stages.{cs.index}.selector {name!r} kept {counts.tolist()} tokens per sample; "
            f"the plan asks for {keep.tolist()}"
        )
    bad = sel.valid & ((sel.index < 0) | (sel.index >= n_vis.unsqueeze(1)))
    if bool(bad.any()):
        raise RuntimeError(f"stages.{cs.index}.selector {name!r} returned indices outside 0..N_visual-1")
    if sel.hidden is not None:
        hidden = sel.hidden
        if not isinstance(hidden, Tensor) or hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(sel.index.shape):
            got = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
            raise RuntimeError(
                f"stages.{cs.index}.selector {name!r} returned merged hidden states of shape {got}; "
                f"expected {tuple(sel.index.shape)} + (d,) ([B, k, d])"
            )
    steps = sel.index[:, 1:] - sel.index[:, :-1]
    if bool(((steps <= 0) & sel.valid[:, 1:]).any()):
        raise RuntimeError(f"stages.{cs.index}.selector {name!r} returned indices that are not strictly ascending")
