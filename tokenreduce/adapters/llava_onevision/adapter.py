"""Adapter for LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``, ``model_type`` "llava_onevision").

The language model is a Qwen2 decoder with the Llama layer layout and 1-D RoPE; the vision tower
is SigLIP (no CLS token, ``vision_feature_select_strategy`` "full": every patch reaches the
projector).  An image becomes, in this order (transformers' ``pack_image_features``; Li et al.,
"LLaVA-OneVision: Easy Visual Task Transfer", arXiv 2408.03326, section 3):

* a prompt with **one** image (anyres-max): the base image's ``side x side`` patch grid, then the
  high-resolution crop grid with the padding removed and, when it holds more than about
  ``1.1**2 * max`` crops of patches, bilinearly downscaled (``H' x W'``, row-major), one learned
  ``image_newline`` token after every row;
* a prompt with **several** images: each image's ``side x side`` base grid followed by one
  ``image_newline`` token.

All of these positions hold ``image_token_id`` in ``input_ids``.  The candidate set is the whole
span (patches and newline tokens, with ``N`` the sample's actual count) as for LLaVA-NeXT;
``adapter: {keep_newlines: true}`` makes the newline tokens non-candidates that always survive.

The visual grid (``Need.VISUAL_GRID``): image ``i``'s base grid is panel ``2i``, its crop grid
panel ``2i + 1``; a newline token sits at column ``W'`` of its row (the newline after a base
grid: panel ``2i``, row ``side - 1``, column ``side``).

Refused: video inputs (``pixel_values_videos``, video tokens), with the reason; vision-tower
signals (``missing_reasons``).  Details: ``docs/adapters.md``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from tokenreduce.core.errors import UnsupportedModelError
from tokenreduce.core.types import Need

from ..layout import runs
from ..llama_signals import LlamaSignals
from ..llava_next.adapter import LlavaNextAdapter

NAME = "llava_onevision"


def onevision_grid(media: Tensor, newline: Tensor, side: int) -> Tensor:
    """``[B, S, 3]`` (panel, row, col) of each OneVision image token.

    Each sample's image tokens are read in order: ``side * side`` base patches (image ``i``: panel
    ``2i``); then either one newline token (an image of a multi-image prompt; placed at row
    ``side - 1``, column ``side``) or the crop grid up to the end of the run (panel ``2i + 1``),
    whose rows end at the newline tokens.  A crop row always holds a patch before its newline,
    so a newline right after the base grid marks the multi-image layout.
    """
    b, s = media.shape
    grid = torch.zeros(b, s, 3, dtype=torch.long, device=media.device)
    base = side * side
    k = torch.arange(base, device=media.device)
    base_rows, base_cols = k // side, k % side
    for sample, spans in enumerate(runs(media)):
        image = 0
        for start, end in spans:
            pos = start
            while pos < end:
                if end - pos < base or bool(newline[sample, pos : pos + base].any()):
                    raise UnsupportedModelError(
                        f"{NAME}: sample {sample} has an image of fewer than {side}x{side} base patches at "
                        f"position {pos} (the layout is not LLaVA-OneVision's)"
                    )
                grid[sample, pos : pos + base] = torch.stack(
                    [torch.full_like(k, 2 * image), base_rows, base_cols], dim=-1
                )
                pos += base
                if pos < end and bool(newline[sample, pos]):  # multi-image: base grid + one newline
                    grid[sample, pos] = torch.tensor([2 * image, side - 1, side], device=media.device)
                    pos += 1
                elif pos < end:  # the crop grid: the rest of the run
                    rest = newline[sample, pos:end].long()  # [n_rest]
                    row = rest.cumsum(0) - rest  # newlines before each token = its row
                    first = torch.nonzero(torch.nn.functional.pad(row[1:] != row[:-1], (1, 0), value=True)).flatten()
                    col = torch.arange(rest.numel(), device=media.device) - first[row]
                    grid[sample, pos:end] = torch.stack([torch.full_like(row, 2 * image + 1), row, col], -1)
                    pos = end
                image += 1
    return grid


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: SigLIP tower on anyres-max crops + projector + Qwen2 decoder (1-D RoPE)."""

    model_types: ClassVar[tuple[str, ...]] = (NAME,)
    provides: ClassVar[Need] = LlamaSignals.provides
    missing_reasons: ClassVar[dict[Need, str]] = {
        Need.VISION_CLS_ATTENTION: "LLaVA-OneVision's SigLIP vision tower has no CLS token (use a method that "
        "scores patches by the attention they receive, or a decoder-side method)",
        Need.VISION_KEYS: "vision-tower keys are not wired for LLaVA-OneVision: its visual tokens are not the "
        "tower's patches one to one (the crop grid is unpadded, bilinearly downscaled for large images and "
        "interleaved with image_newline tokens), and the vision signals map candidates to CLS-first patches",
        Need.VISION_FEATURES: "vision-tower features are not wired for LLaVA-OneVision: its visual tokens are not "
        "the tower's patches one to one (the crop grid is unpadded, bilinearly downscaled for large images and "
        "interleaved with image_newline tokens), and the vision signals map candidates to CLS-first patches",
        Need.VISION_ATTENTION: "attention received per patch is not wired for LLaVA-OneVision: its visual tokens "
        "are not the tower's patches one to one (unpadded, downscaled, interleaved with image_newline tokens)",
    }

    def __init__(self, model, settings=None) -> None:
        super().__init__(model, settings)
        self.video_token = int(model.config.video_token_id)
        vision = model.config.vision_config
        self.side = int(vision.image_size) // int(vision.patch_size)

    def is_media_token(self, ids: Tensor) -> Tensor:
        """Image and video tokens (a decode step must have neither)."""
        return (ids == self.image_token) | (ids == self.video_token)

    def visual_mask(self, ids: Tensor, context: dict) -> Tensor:
        # the image span only: videos are refused in check_call before the prefill reaches here
        media = super().visual_mask(ids, context)
        return media & (ids == self.image_token)

    def visual_grid(self, ids: Tensor, visual: Tensor, context: dict) -> Tensor:
        return onevision_grid(ids == self.image_token, context["newline"], self.side)

    def check_call(self, kwargs: dict) -> str | None:
        """Video inputs are refused: OneVision pools each frame's patches 2x2 and appends a
        single newline token after the whole video, a layout this adapter does not describe."""
        ids = kwargs.get("input_ids")
        encoded = kwargs.get("mm_encoder_outputs") or {}
        has_video = (
            kwargs.get("pixel_values_videos") is not None
            or (isinstance(encoded, dict) and encoded.get("video") is not None)
            or (ids is not None and bool((ids == self.video_token).any()))
        )
        if has_video:
            return (
                f"{NAME}: video inputs (pixel_values_videos / video tokens, id {self.video_token}) are not supported "
                "while tokenreduce is attached: the adapter does not describe OneVision's video layout (frames "
                "pooled 2x2, one newline token after the whole video); pass images, or detach to run videos "
                "unreduced"
            )
        return None
