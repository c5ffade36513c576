"""The tiny random-weight Qwen2.5-VL of the tests: its config and its local processor."""

from __future__ import annotations

from typing import Any

from tokenreduce.core.arch import TinyCommon

#: Qwen's ChatML with a system prompt, for tiny checkpoints
CHAT_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ item['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_config(config_class: type, common: TinyCommon, *, text_layers: int = 4, vocab_size: int | None = None) -> Any:
    """Config of a tiny Qwen2.5-VL: 2-block windowed ViT (width 32, 14 px patches, 2x2 merge,
    window 56 px, block 1 full attention) + ``text_layers``-layer Qwen2 decoder (width 64, 4 heads,
    2 KV heads, head_dim 16).

    M-RoPE needs ``head_dim == 2 * sum(mrope_section)``: 16 = 2 * (2 + 3 + 3).
    """
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[1],
        out_hidden_size=64,
        tokens_per_second=2,
        initializer_range=common.init_std,
    )
    return qwen_family_config(config_class, common, vision, qwen_text_config(common, text_layers, vocab_size))


def qwen_text_config(common: TinyCommon, text_layers: int, vocab_size: int | None, **changes: Any) -> dict:
    """The tiny Qwen decoder of the Qwen-family test models (width 64, 4 heads, 2 KV heads,
    head_dim 16, M-RoPE sections [2, 3, 3]); ``changes`` replace or add keys (Qwen3-VL)."""
    text = dict(
        vocab_size=common.vocab_size if vocab_size is None else vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=common.bos_id,
        eos_token_id=common.eos_id,
        pad_token_id=common.pad_id,
        initializer_range=common.init_std,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
    )
    return {**text, **changes}


def qwen_family_config(config_class: type, common: TinyCommon, vision: dict, text: dict) -> Any:
    """``config_class`` with the Qwen family's special tokens from ``common``'s tokenizer."""
    return config_class(
        vision_config=vision,
        text_config=text,
        image_token_id=common.id("<|image_pad|>"),
        video_token_id=common.id("<|video_pad|>"),
        vision_start_token_id=common.id("<|vision_start|>"),
        vision_end_token_id=common.id("<|vision_end|>"),
    )


def tiny_processor(tokenizer: Any) -> Any:
    """An image-only ``Qwen2_5_VLProcessor`` (the video processor needs torchvision, which has no
    CPU wheel) with the PIL image processor (56^2 to 112^2 pixels, 14 px patches, 2x2 merge);
    ``<|image_pad|>`` expands to the number of merged tokens."""
    from transformers import Qwen2VLImageProcessorPil

    from .processor import ImageOnlyQwen2_5_VLProcessor

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    return ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer)
