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

from .decoder_cut import ArchHandles, CutAttachment
from .llama_signals import LlamaSignals
from .vision_signals import clip_tower


def image_token_id(config) -> int:
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    raise UnsupportedModelError(f"{config.model_type} config has no image_token_id")


def check_llama_family(decoder, name: str) -> None:
    """Refuse decoders whose layers do not have the Llama layout the cut relies on."""
    layer = decoder.layers[0]
    needed = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")
    attn_needed = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
    if not all(hasattr(layer, a) for a in needed) or not all(hasattr(layer.self_attn, a) for a in attn_needed):
        raise UnsupportedModelError(f"{name}: the language model's decoder layers do not have the Llama layout")
    if not all(hasattr(decoder, a) for a in ("norm", "rotary_emb", "layers")):
        raise UnsupportedModelError(f"{name}: the language model lacks norm/rotary_emb/layers")
    window = getattr(decoder.config, "sliding_window", None)
    if window and getattr(decoder.config, "use_sliding_window", True) and getattr(decoder.config, "layer_types", None):
        if any(t != "full_attention" for t in decoder.config.layer_types):
            raise UnsupportedModelError(f"{name}: sliding-window attention layers are not supported yet")


def square_grid(input_ids: Tensor, visual: Tensor, tokens_per_image: int) -> Tensor:
    """``[B, S, 3]`` (image, row, col) for images of ``tokens_per_image`` tokens on a square grid."""
    side = max(1, math.isqrt(tokens_per_image))
    rank = visual.long().cumsum(-1) - 1  # k-th visual token of its sample
    rank = rank.clamp(min=0)
    image = rank // tokens_per_image
    offset = rank % tokens_per_image
    return torch.stack([image, offset // side, offset % side], dim=-1)


def generate_position_ids(top, mask2d: Tensor, q: int) -> Tensor:
    """``[B, q]``: the 1-D position ids ``generate()`` passes for the last ``q`` tokens."""
    pos = mask2d.long().cumsum(-1) - 1
    return pos.masked_fill(mask2d == 0, 1)[:, -q:]


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
