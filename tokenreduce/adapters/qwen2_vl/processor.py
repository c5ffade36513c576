"""A Qwen2-VL processor that works on machines without torchvision.

transformers' ``Qwen2VLProcessor`` always builds a video processor, which needs torchvision (no
CPU-only wheel on some platforms).  :class:`ImageOnlyQwen2VLProcessor` is the same processor
without the video part: images and text only.  It saves with ``save_pretrained`` and loads with
``from_pretrained`` (the PIL image processor is used when torchvision is missing).
"""

from __future__ import annotations

from transformers import Qwen2VLProcessor


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without a video processor (no torchvision needed).

    transformers 5.x derives a processor's sub-processors from its ``__init__`` signature;
    leaving ``video_processor`` out of it leaves the video processor out of loading and saving.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
