"""The tiny random-weight Qwen2-VL of the tests: its config and its local processor."""

from __future__ import annotations

from typing import Any

from tokenreduce.core.arch import TinyCommon

from ..qwen2_5_vl.tiny import qwen_family_config, qwen_text_config


def tiny_config(config_class: type, common: TinyCommon, *, text_layers: int = 4, vocab_size: int | None = None) -> Any:
    """Config of a tiny Qwen2-VL: 2-block ViT with full attention in every block (width 32, 2
    heads, LayerNorm + QuickGELU MLP of ratio 2, 14 px patches, temporal patch 2, 2x2 merge into
    width 64) + ``text_layers``-layer Qwen2 decoder (width 64, 4 heads, 2 KV heads, head_dim 16).

    M-RoPE needs ``head_dim == 2 * sum(mrope_section)``: 16 = 2 * (2 + 3 + 3).
    """
    vision = dict(
        depth=2,
        embed_dim=32,
        hidden_size=64,  # Qwen2-VL's vision hidden_size is the merger's output width (the decoder's)
        hidden_act="quick_gelu",
        mlp_ratio=2,
        num_heads=2,
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        initializer_range=common.init_std,
    )
    return qwen_family_config(config_class, common, vision, qwen_text_config(common, text_layers, vocab_size))


def tiny_processor(tokenizer: Any) -> Any:
    """An image-only ``Qwen2VLProcessor`` (the video processor needs torchvision, which has no
    CPU wheel) with the PIL image processor (56^2 to 112^2 pixels, 14 px patches, 2x2 merge);
    ``<|image_pad|>`` expands to the number of merged tokens."""
    from transformers import Qwen2VLImageProcessorPil

    from .processor import ImageOnlyQwen2VLProcessor

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)
