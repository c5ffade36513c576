"""Deprecated: the cut engine moved to :mod:`tokenreduce.adapters.cut` (removed next release).

``ArchHandles`` (a record of callbacks) gave way to :class:`~tokenreduce.adapters.cut.DecoderAdapter`
(a base class with overridable methods, one instance per model); ``CutAttachment`` still
accepts an ``ArchHandles`` here.  Migration: ``docs/writing-an-adapter.md``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tokenreduce.core.plan import CompiledPlan

from .cut import VISION_NEEDS, DecoderAdapter
from .cut import CutAttachment as _CutAttachment
from .vision_signals import VisionTower

__all__ = ["VISION_NEEDS", "ArchHandles", "CutAttachment"]


def _llama_positions(position_ids: Tensor | None, b: int, q: int, past: int, device) -> Tensor:
    if position_ids is None:
        position_ids = torch.arange(past, past + q, device=device).unsqueeze(0)
    return position_ids.reshape(1, -1, q).expand(1, b, q)


@dataclass
class ArchHandles:
    """Deprecated: subclass :class:`~tokenreduce.adapters.cut.DecoderAdapter` instead.  The
    fields map onto its methods of the same names (``vision`` -> ``vision_tower``)."""

    top: torch.nn.Module
    decoder: torch.nn.Module
    lm_head: torch.nn.Module
    visual_mask: Callable[[Tensor, dict], Tensor]
    visual_grid: Callable[[Tensor, Tensor, dict], Tensor]
    attn_implementation: str
    name: str = "model"
    is_media_token: Callable[[Tensor], Tensor] | None = None
    rotary: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None
    positions: Callable[..., Tensor] = _llama_positions
    decode_position_ids: Callable[[torch.nn.Module, Tensor, int], Tensor] | None = None
    check_call: Callable[[dict], str | None] | None = None
    vision: Callable[[], VisionTower] | None = None

    def __post_init__(self) -> None:
        warnings.warn(
            "ArchHandles is deprecated; subclass tokenreduce.adapters.cut.DecoderAdapter",
            DeprecationWarning,
            stacklevel=3,
        )


class _HandlesAdapter(DecoderAdapter):
    """A :class:`DecoderAdapter` that answers from an :class:`ArchHandles`."""

    def __init__(self, h: ArchHandles) -> None:  # no model checks: the old adapters made their own
        self.h = h
        self.model = h.top
        self.settings = None
        self.language_model = h.decoder
        self.head = h.lm_head

    @property
    def name(self) -> str:
        return self.h.name

    @property
    def attn_implementation(self) -> str:
        return self.h.attn_implementation

    def vision_tower(self) -> VisionTower | None:
        return self.h.vision() if self.h.vision is not None else None

    def is_media_token(self, ids: Tensor) -> Tensor:
        if self.h.is_media_token is not None:
            return self.h.is_media_token(ids)
        return self.h.visual_mask(ids, {})

    def visual_mask(self, ids: Tensor, context: dict) -> Tensor:
        return self.h.visual_mask(ids, context)

    def visual_grid(self, ids: Tensor, visual: Tensor, context: dict) -> Tensor:
        return self.h.visual_grid(ids, visual, context)

    def visual_newlines(self, context: dict) -> Tensor | None:
        return context.get("newline")

    def positions(self, position_ids: Tensor | None, b: int, q: int, past: int, device: Any) -> Tensor:
        return self.h.positions(position_ids, b, q, past, device)

    def rotary(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        if self.h.rotary is not None:
            return self.h.rotary(hidden, positions)
        return super().rotary(hidden, positions)

    def decode_position_ids(self, mask2d: Tensor, q: int) -> Tensor | None:
        if self.h.decode_position_ids is None:
            return None
        return self.h.decode_position_ids(self.h.top, mask2d, q)

    def check_call(self, kwargs: dict) -> str | None:
        return self.h.check_call(kwargs) if self.h.check_call is not None else None


class CutAttachment(_CutAttachment):
    """Deprecated import path of :class:`tokenreduce.adapters.cut.CutAttachment`; also accepts an
    :class:`ArchHandles`."""

    def __init__(self, adapter: DecoderAdapter | ArchHandles, plan: CompiledPlan):
        super().__init__(_HandlesAdapter(adapter) if isinstance(adapter, ArchHandles) else adapter, plan)
