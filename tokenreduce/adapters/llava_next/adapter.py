"""Adapter for LLaVA-NeXT (``LlavaNextForConditionalGeneration``, ``model_type`` "llava_next").

An anyres image becomes, in this order (transformers' ``pack_image_features``): the base
image's ``side x side`` patch grid, then the high-resolution crop grid with the padding
removed (``H' x W'`` patches, row-major) with one learned ``image_newline`` token after every
row.  All of these positions hold ``image_token_id`` in ``input_ids``.

Candidate set: the **whole anyres span** (base + crops + newline tokens), with ``N`` = the
sample's actual count, which depends on the image size, so samples of one batch differ (ragged
batches are handled by the cut).  The official PIO-FVLM code caps the candidate span at its
first ``image_token_list[0]`` = 576 tokens, i.e. the base image only, and passes every crop
and newline token through as if it were text; we do not copy that defect.

Option ``keep_newlines`` (plan ``adapter: {keep_newlines: true}``): the newline tokens are not
candidates and always survive, as the official encoder-side reducer does for NeXT; budgets then
count patch tokens only.

The visual grid (``Need.VISUAL_GRID``) gives the base image panel ``2i`` and the crop grid of
the same image panel ``2i + 1``; newline tokens sit at column ``W'``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from tokenreduce.core.errors import UnsupportedModelError
from tokenreduce.core.types import Need

from ..cut import DecoderAdapter
from ..layout import runs
from ..llama_signals import LlamaSignals


def anyres_grid(media: Tensor, newline: Tensor, config) -> Tensor:
    """``[B, S, 3]`` (panel, row, col) of each anyres token.

    Each run of image tokens is one image: the base grid (``side x side``, panel ``2i``), then
    the crop grid (panel ``2i + 1``) whose rows end at the ``image_newline`` tokens; a newline
    token sits at column ``W'`` of its row.  The newline tokens are recognised by their input
    embedding, which is exactly the learned ``image_newline`` vector (generate() passes no
    ``image_sizes`` to the prefill call, so the layout is read from what the decoder receives).
    """
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    b, s = media.shape
    grid = torch.zeros(b, s, 3, dtype=torch.long, device=media.device)
    for sample, spans in enumerate(runs(media)):
        for image, (start, end) in enumerate(spans):
            if end - start < side * side:
                raise UnsupportedModelError(
                    f"llava_next: an image of {end - start} tokens is shorter than the {side}x{side} base grid"
                )
            k = torch.arange(side * side, device=media.device)
            grid[sample, start : start + side * side] = torch.stack(
                [torch.full_like(k, 2 * image), k // side, k % side], dim=-1
            )
            rest = newline[sample, start + side * side : end].long()  # [n_rest]
            row = rest.cumsum(0) - rest  # newlines before each token = its row
            first = torch.nonzero(torch.nn.functional.pad(row[1:] != row[:-1], (1, 0), value=True)).flatten()
            col = torch.arange(rest.numel(), device=media.device) - first[row]
            grid[sample, start + side * side : end] = torch.stack([torch.full_like(row, 2 * image + 1), row, col], -1)
    return grid


class LlavaNextSettings(BaseModel):
    """Options of the LLaVA-NeXT adapter (``Plan.adapter``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    keep_newlines: bool = Field(
        default=False, description="the image_newline tokens are never candidates and always survive"
    )


class LlavaNextAdapter(DecoderAdapter):
    """LLaVA-NeXT: CLIP vision tower on anyres crops + projector + Llama/Vicuna/Mistral decoder."""

    model_types: ClassVar[tuple[str, ...]] = ("llava_next",)
    provides: ClassVar[Need] = LlamaSignals.provides
    missing_reasons: ClassVar[dict[Need, str]] = {
        flag: "vision-tower signals are not implemented for LLaVA-NeXT's anyres layout yet (base image + "
        "unpadded crops + newline tokens); encoder-side methods run on LLaVA-1.5"
        for flag in (Need.VISION_CLS_ATTENTION, Need.VISION_KEYS, Need.VISION_FEATURES, Need.VISION_ATTENTION)
    }
    Settings: ClassVar[type[BaseModel] | None] = LlavaNextSettings
    settings: LlavaNextSettings

    def __init__(self, model, settings: LlavaNextSettings | None = None) -> None:
        super().__init__(model, settings)
        self.newline_vector = getattr(model.model, "image_newline", None)

    def visual_mask(self, ids: Tensor, context: dict) -> Tensor:
        """The anyres span; without the ``image_newline`` tokens under ``keep_newlines``.  Stashes
        the newline tokens (recognised by their input embedding) in ``context["newline"]``."""
        media = self.is_media_token(ids)
        embeds = context.get("inputs_embeds")
        if self.newline_vector is not None and embeds is not None:
            newline = media & (embeds == self.newline_vector.to(embeds.dtype)).all(-1)
        else:
            newline = torch.zeros_like(media)
        context["newline"] = newline
        return media & ~newline if self.settings.keep_newlines else media

    def visual_grid(self, ids: Tensor, visual: Tensor, context: dict) -> Tensor:
        return anyres_grid(self.is_media_token(ids), context["newline"], self.model.config)

    def visual_newlines(self, context: dict) -> Tensor | None:
        return context.get("newline")
