"""A LLaVA-OneVision processor that works on machines without torchvision.

transformers' ``LlavaOnevisionProcessor`` always builds a video processor, and the OneVision video
processor needs torchvision, which has no CPU-only wheel on some platforms.
:class:`ImageOnlyLlavaOnevisionProcessor` is the same processor without the video part: images
and text only (tokenreduce refuses video inputs on this architecture anyway, ``docs/adapters.md``).
"""

from __future__ import annotations

from transformers import LlavaOnevisionProcessor


class ImageOnlyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` without a video processor (no torchvision needed).

    transformers 5.x derives a processor's sub-processors from its ``__init__`` signature;
    leaving ``video_processor`` out of it leaves the video processor out of loading and saving.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
        **kwargs,
    ):
        # the settings are named here (not in **kwargs) so that save_pretrained writes them
        super().__init__(
            image_processor,
            tokenizer,
            None,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )
