"""The tiny random-weight LLaVA-NeXT of the tests: its config and its local processor.

The towers of the tiny LLaVA-1.5 (:mod:`tokenreduce.adapters.llava.tiny`) on a 56 px base image,
with anyres grid pinpoints ``[[56, 112], [112, 56], [112, 112]]``.
"""

from __future__ import annotations

from typing import Any

from tokenreduce.core.arch import TinyCommon

from ..llava.tiny import llava_style_kwargs

#: anyres grid pinpoints (height, width) of the tiny model: multiples of its 56 px base
PINPOINTS = [[56, 112], [112, 56], [112, 112]]


def tiny_config(
    config_class: type,
    common: TinyCommon,
    *,
    image_size: int = 56,
    patch: int = 14,
    text_layers: int = 4,
    **text_kw: Any,
) -> Any:
    """Config of a tiny LLaVA-NeXT: the tiny LLaVA-1.5's towers with the pinpoints above.

    ``image_size`` must stay 56 for the pinpoints to be multiples of it (the processor assumes 56).
    """
    return config_class(
        **llava_style_kwargs(common, image_size, patch, text_layers, **text_kw),
        image_grid_pinpoints=PINPOINTS,
        image_seq_length=(image_size // patch) ** 2,
    )


def tiny_processor(tokenizer: Any) -> Any:
    """``LlavaNextProcessor`` with the PIL anyres image processor (56 px base, the pinpoints
    above); ``<image>`` expands to the number of visual tokens of the image's size."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 56},
        crop_size={"height": 56, "width": 56},
        image_grid_pinpoints=PINPOINTS,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )
