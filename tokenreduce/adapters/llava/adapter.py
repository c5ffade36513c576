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

from tokenreduce.core.errors import UnsupportedModelError
from tokenreduce.core.plan import CompiledPlan
from tokenreduce.core.types import Need

from ..decoder_cut import ArchHandles, CutAttachment
from ..llama_signals import LlamaSignals
from ..llama_family import check_llama_family, generate_position_ids, image_token_id
from ..vision_signals import clip_tower


def square_grid(input_ids: Tensor, visual: Tensor, tokens_per_image: int) -> Tensor:
    """``[B, S, 3]`` (image, row, col) for images of ``tokens_per_image`` tokens on a square grid."""
    side = max(1, math.isqrt(tokens_per_image))
    rank = visual.long().cumsum(-1) - 1  # k-th visual token of its sample
    rank = rank.clamp(min=0)
    image = rank // tokens_per_image
    offset = rank % tokens_per_image
    return torch.stack([image, offset // side, offset % side], dim=-1)


class LlavaAdapter:
    """LLaVA-1.5: CLIP vision tower + projector + Llama language model."""

    model_types: ClassVar[tuple[str, ...]] = ("llava",)
    #: vision-tower signals (CLS attention, keys at a CLIP layer, the projector's input features)
    #: are recomputed from captured CLIP layer inputs (:mod:`.vision_signals`)
    provides: ClassVar[Need] = (
        LlamaSignals.provides | Need.VISION_CLS_ATTENTION | Need.VISION_KEYS | Need.VISION_FEATURES
    )

    @classmethod
    def num_layers(cls, model) -> int:
        return int(model.config.text_config.num_hidden_layers)

    @classmethod
    def handles(cls, model) -> ArchHandles:
        decoder = model.model.language_model
        check_llama_family(decoder, "llava")
        token = image_token_id(model.config)
        per_image = int(getattr(model.config, "image_seq_length", 0) or 576)
        return ArchHandles(
            top=model,
            decoder=decoder,
            lm_head=model.lm_head,
            visual_mask=lambda ids, kwargs: ids == token,
            visual_grid=lambda ids, vis, kwargs: square_grid(ids, vis, per_image),
            attn_implementation=decoder.config._attn_implementation,
            name="llava",
            decode_position_ids=generate_position_ids,
            vision=lambda: clip_tower(model, name="llava"),
        )

    @classmethod
    def attach(cls, model, plan: CompiledPlan) -> CutAttachment:
        return CutAttachment(cls.handles(model), plan)
