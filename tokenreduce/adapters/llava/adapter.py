"""Adapter for LLaVA-1.5 (``LlavaForConditionalGeneration``, ``model_type`` "llava").

The language model is a Llama-family decoder (``model.model.language_model``); visual tokens
are the positions whose input id equals ``config.image_token_id`` (one run of
``config.image_seq_length`` tokens per image, on a square grid in raster order).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from tokenreduce.core.types import Need

from ..cut import DecoderAdapter
from ..llama_signals import LlamaSignals
from ..vision_signals import VisionTower, clip_tower


def square_grid(input_ids: Tensor, visual: Tensor, tokens_per_image: int) -> Tensor:
    """``[B, S, 3]`` (image, row, col) for images of ``tokens_per_image`` tokens on a square grid."""
    side = max(1, math.isqrt(tokens_per_image))
    rank = visual.long().cumsum(-1) - 1  # k-th visual token of its sample
    rank = rank.clamp(min=0)
    image = rank // tokens_per_image
    offset = rank % tokens_per_image
    return torch.stack([image, offset // side, offset % side], dim=-1)


class LlavaAdapter(DecoderAdapter):
    """LLaVA-1.5: CLIP vision tower + projector + Llama language model."""

    model_types: ClassVar[tuple[str, ...]] = ("llava",)
    #: vision-tower signals (CLS attention, keys at a CLIP layer, the projector's input features)
    #: are recomputed from captured CLIP layer inputs (:mod:`..vision_signals`)
    provides: ClassVar[Need] = (
        LlamaSignals.provides | Need.VISION_CLS_ATTENTION | Need.VISION_KEYS | Need.VISION_FEATURES
    )
    missing_reasons: ClassVar[dict[Need, str]] = {
        Need.VISION_ATTENTION: "attention received per patch is the signal of towers without a CLS token (Qwen); "
        "LLaVA's CLIP tower has one: use the vision_cls scorer (and the pio_ve selector for PIO w/ VE)"
    }

    def __init__(self, model, settings=None) -> None:
        super().__init__(model, settings)
        self.tokens_per_image = int(getattr(model.config, "image_seq_length", 0) or 576)

    def visual_grid(self, ids: Tensor, visual: Tensor, context: dict) -> Tensor:
        return square_grid(ids, visual, self.tokens_per_image)

    def vision_tower(self) -> VisionTower:
        return clip_tower(self.model, name=self.name)
