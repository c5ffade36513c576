"""The tiny random-weight LLaVA-1.5 of the tests: its config and its local processor.

A 2-layer CLIP tower (width 32) and a Llama decoder (width 64); the shared tokenizer and the
weight initialisation are in :mod:`tokenreduce.testing.tiny`.  LLaVA-NeXT reuses the two towers.
"""

from __future__ import annotations

from typing import Any

from tokenreduce.core.arch import TinyCommon

#: the llava-hf chat turn (``USER: <image>\n... ASSISTANT:``), for tiny checkpoints
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def llama_text_config(
    common: TinyCommon,
    *,
    vocab_size: int | None = None,
    hidden_size: int = 64,
    text_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 4,
    intermediate_size: int = 128,
) -> Any:
    """A tiny ``LlamaConfig`` with the shared tokenizer's pad/bos/eos ids."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=common.vocab_size if vocab_size is None else vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=text_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=2048,
        pad_token_id=common.pad_id,
        bos_token_id=common.bos_id,
        eos_token_id=common.eos_id,
        initializer_range=common.init_std,
    )


def clip_vision_config(*, image_size: int, patch: int, hidden_size: int = 32, layers: int = 2) -> Any:
    """A tiny ``CLIPVisionConfig``: ``(image_size // patch) ** 2`` patches plus CLS."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        projection_dim=hidden_size,
    )


def llava_style_kwargs(common: TinyCommon, image_size: int, patch: int, text_layers: int, **text_kw: Any) -> dict:
    """The config keywords LLaVA-1.5 and LLaVA-NeXT share: towers, image token, feature layer."""
    return dict(
        vision_config=clip_vision_config(image_size=image_size, patch=patch),
        text_config=llama_text_config(common, text_layers=text_layers, **text_kw),
        image_token_index=common.id("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def tiny_config(
    config_class: type,
    common: TinyCommon,
    *,
    image_size: int = 56,
    patch: int = 14,
    text_layers: int = 4,
    **text_kw: Any,
) -> Any:
    """Config of a tiny LLaVA-1.5: 2-layer CLIP (width 32) + ``text_layers``-layer Llama (width 64).

    ``image_size`` / ``patch``: square input and patch size in pixels (``(image_size // patch) ** 2``
    visual tokens); ``text_kw``: ``vocab_size``, ``hidden_size``, ``num_attention_heads``,
    ``num_key_value_heads``, ``intermediate_size`` of the decoder.
    """
    return config_class(
        **llava_style_kwargs(common, image_size, patch, text_layers, **text_kw),
        image_seq_length=(image_size // patch) ** 2,
    )


def tiny_processor(tokenizer: Any, *, image_size: int = 56, patch: int = 14) -> Any:
    """``LlavaProcessor`` with the PIL image processor (shortest edge to ``image_size``, centre
    crop); ``<image>`` expands to ``(image_size // patch) ** 2`` tokens.  Match the model's
    ``image_size`` / ``patch``."""
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,  # CLS, dropped by the "default" strategy
    )
