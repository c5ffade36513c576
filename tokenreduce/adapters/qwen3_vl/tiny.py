"""The tiny random-weight Qwen3-VL of the tests: its config and its local processor."""

from __future__ import annotations

from typing import Any

from tokenreduce.core.arch import TinyCommon

from ..qwen2_5_vl.tiny import CHAT_TEMPLATE, qwen_family_config, qwen_text_config

__all__ = ["CHAT_TEMPLATE", "TINY_DEEPSTACK", "tiny_config", "tiny_processor"]

#: the tiny vision tower's DeepStack taps: the outputs of ViT blocks 0, 1 and 2 are added to the
#: visual positions after decoder layers 0, 1 and 2 (the 8B checkpoint: blocks 8/16/24)
TINY_DEEPSTACK = [0, 1, 2]


def tiny_config(config_class: type, common: TinyCommon, *, text_layers: int = 4, vocab_size: int | None = None) -> Any:
    """Config of a tiny Qwen3-VL: 3-block ViT (width 32, 16 px patches, 2x2 merge, a 4x4 learned
    position grid, DeepStack taps after blocks 0/1/2) + ``text_layers``-layer Qwen3 decoder
    (width 64, 4 heads, 2 KV heads, head_dim 16, q/k RMSNorm, interleaved M-RoPE).

    M-RoPE needs ``head_dim == 2 * sum(mrope_section)``: 16 = 2 * (4 + 2 + 2).
    """
    vision = dict(
        depth=3,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        in_channels=3,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=64,
        num_position_embeddings=16,
        deepstack_visual_indexes=list(TINY_DEEPSTACK),
        initializer_range=common.init_std,
    )
    text = qwen_text_config(
        common,
        text_layers,
        vocab_size,
        head_dim=16,
        rope_parameters={
            "rope_type": "default",
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
            "rope_theta": 10000.0,
        },
    )
    return qwen_family_config(config_class, common, vision, text)


def tiny_processor(tokenizer: Any) -> Any:
    """An image-only ``Qwen3VLProcessor`` (the video processor needs torchvision, which has no
    CPU wheel) with the PIL image processor (64^2 to 160^2 pixels, 16 px patches, 2x2 merge: one
    visual token per 32 px cell); ``<|image_pad|>`` expands to the number of merged tokens."""
    from transformers import Qwen2VLImageProcessorPil

    from .processor import ImageOnlyQwen3VLProcessor

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=64 * 64,
        max_pixels=160 * 160,
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return ImageOnlyQwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer)
