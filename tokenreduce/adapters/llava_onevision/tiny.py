"""The tiny random-weight LLaVA-OneVision of the tests: its config and its local processor.

A 2-layer SigLIP tower (width 32, 56 px crops of 14 px patches: 16 patches, no CLS token) and a
Qwen2 decoder (width 64, 4 heads, 2 key/value heads); anyres grid pinpoints up to 2x2 crops of
56 px and ``vision_aspect_ratio`` "anyres_max_2", so that the crop grids of the test images both
stay as they are and get the bilinear downscale the real "anyres_max_9" applies to large images.
The shared tokenizer and the weight initialisation are in :mod:`tokenreduce.testing.tiny`.
"""

from __future__ import annotations

from typing import Any

from tokenreduce.core.arch import TinyCommon

#: anyres grid pinpoints (height, width) of the tiny model: multiples of its 56 px crop
PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]
#: the crop grid is downscaled when it holds more than about 1.1**2 * 2 crops of patches
ASPECT_RATIO = "anyres_max_2"

#: ChatML turns in the style of the llava-hf OneVision checkpoints (no system prompt)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} {% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_config(config_class: type, common: TinyCommon, *, text_layers: int = 4, vocab_size: int | None = None) -> Any:
    """Config of a tiny LLaVA-OneVision: 2-layer SigLIP (width 32, 56 px, 14 px patches) + a
    ``text_layers``-layer Qwen2 decoder (width 64, 4 heads, 2 KV heads), the projector on the
    last layer's features ("full": every patch, SigLIP has no CLS token)."""
    from transformers import Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=common.vocab_size if vocab_size is None else vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=common.pad_id,
        bos_token_id=common.bos_id,
        eos_token_id=common.eos_id,
        initializer_range=common.init_std,
    )
    return config_class(
        vision_config=vision,
        text_config=text,
        image_token_index=common.id("<image>"),
        video_token_index=common.id("<|video_pad|>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=PINPOINTS,
        vision_aspect_ratio=ASPECT_RATIO,
    )


def tiny_processor(tokenizer: Any) -> Any:
    """An image-only ``LlavaOnevisionProcessor`` (the video processor needs torchvision) with the
    PIL anyres image processor (56 px crops, the pinpoints above); ``<image>`` expands to the
    number of visual tokens of the image's size."""
    from transformers import LlavaOnevisionImageProcessorPil

    from .processor import ImageOnlyLlavaOnevisionProcessor

    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 56, "width": 56}, image_grid_pinpoints=PINPOINTS)
    return ImageOnlyLlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        image_token="<image>",
        video_token="<|video_pad|>",
        vision_aspect_ratio=ASPECT_RATIO,
    )
