"""Adapter for Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``, ``model_type`` "qwen2_5_vl").

The language model (``model.model.language_model``) is a Qwen2 decoder with the Llama layer
layout (q/k/v with biases) and 3-D multimodal RoPE (M-RoPE): every token carries a (temporal,
height, width) position id; text tokens have three equal ids, visual tokens their grid
coordinates offset by the text position of the image.

What the cut does here (the generic mechanics are in :mod:`tokenreduce.adapters.cut`):

* the visual candidates are the ``image_token_id`` tokens (every image of the prompt, dynamic
  resolution: each image has ``t*h*w / merge**2`` tokens) and the ``video_token_id`` tokens;
* survivors keep their original 3-D ids with gaps (``positions: keep``, the official Qwen
  code's behaviour).  ``renumber`` gives the survivors contiguous ids equal on all three axes,
  i.e. text-style positions (it discards the 2-D layout of the kept patches; provided for
  ablations, not what the official code does);
* decode steps use generate()'s ids, ``text position + rope_deltas``: ``rope_deltas`` is
  computed by the model before the decoder runs, from the full sequence, so it is unaffected
  by cuts;
* the per-layer-type mask dict that Qwen2.5-VL hands its layers is replaced, for the layers
  after a cut, by a mask rebuilt for the reduced sequence (full-attention layers; models with
  sliding-window layers are refused).

Qwen2.5-VL's vision tower has no CLS token, so strategies that need CLS attention fail when
the plan is built; encoder-side methods read the attention each visual token receives instead
(``Need.VISION_ATTENTION``, :mod:`..qwen_vision_signals`), with the keys and the merger's input.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from tokenreduce.core.errors import UnsupportedModelError
from tokenreduce.core.types import Need

from ..cut import DecoderAdapter
from ..layout import runs
from ..llama_family import generate_position_ids
from ..llama_signals import LlamaSignals
from ..qwen_vision_signals import qwen_vision_tower
from ..vision_signals import VisionTower


def mrope_positions(position_ids: Tensor | None, b: int, q: int, past: int, device) -> Tensor:
    """``[3, B, q]`` M-RoPE ids from what ``Qwen2_5_VLTextModel`` receives (None, 2-D text ids,
    3-D ids, or 4-D = text ids stacked on the 3-D ids), normalised as the model does."""
    if position_ids is None:
        position_ids = torch.arange(past, past + q, device=device).view(1, 1, q)
    elif position_ids.dim() == 2:
        position_ids = position_ids.unsqueeze(0)
    elif position_ids.dim() == 3 and position_ids.shape[0] == 4:
        position_ids = position_ids[1:]
    return position_ids.expand(3, b, q)


def mrope_grid(media: Tensor, positions: Tensor) -> Tensor:
    """``[B, S, 3]`` (panel, row, col) of each media token, read off its M-RoPE ids.

    An image's tokens carry ids ``(t0, t0 + row, t0 + col)`` (a video frame: ``t0 + frame *
    interval`` on the first axis); every image or video is its own run of media tokens between
    ``<|vision_start|>`` and ``<|vision_end|>``.  Panels count images and video frames within a
    sample.  (generate() passes no ``image_grid_thw`` to the prefill call, so the grid is taken
    from the positions the decoder receives.)
    """
    b, s = media.shape
    grid = torch.zeros(b, s, 3, dtype=torch.long, device=media.device)
    pos = positions.expand(-1, b, -1)
    for sample, spans in enumerate(runs(media)):
        panel = 0
        for start, end in spans:
            t, h, w = pos[:, sample, start:end]
            frames, frame = torch.unique(t, return_inverse=True)
            grid[sample, start:end, 0] = panel + frame
            grid[sample, start:end, 1] = h - h.min()
            grid[sample, start:end, 2] = w - w.min()
            panel += frames.numel()
    return grid


class Qwen2_5_VLAdapter(DecoderAdapter):
    """Qwen2.5-VL: windowed ViT with a 2x2 patch merger + Qwen2 decoder with M-RoPE.

    Qwen2-VL and Qwen3-VL subclass it: the candidates, the M-RoPE positions and decode ids and the
    vision-tower handles are the same across the family."""

    model_types: ClassVar[tuple[str, ...]] = ("qwen2_5_vl",)
    #: vision-tower signals of the CLS-free windowed ViT (attention received per visual token,
    #: keys, the merger's input) are recomputed from captured block inputs (:mod:`..qwen_vision_signals`)
    provides: ClassVar[Need] = LlamaSignals.provides | Need.VISION_ATTENTION | Need.VISION_KEYS | Need.VISION_FEATURES
    missing_reasons: ClassVar[dict[Need, str]] = {
        Need.VISION_CLS_ATTENTION: "Qwen2.5-VL's vision tower has no CLS token (use a method that scores "
        "patches by the attention they receive: scorer vision_attn, selector pio_ve_qwen)",
    }

    def __init__(self, model, settings=None) -> None:
        super().__init__(model, settings)
        self.video_token = int(model.config.video_token_id)

    def vision_tower(self) -> VisionTower:
        return qwen_vision_tower(self.model, name=self.name)

    def check_model(self) -> None:
        if getattr(self.model.config.text_config, "use_sliding_window", False):
            raise UnsupportedModelError(
                f"{self.name}: models with sliding-window attention layers are not supported yet "
                "(text_config.use_sliding_window is true)"
            )
        super().check_model()

    def is_media_token(self, ids: Tensor) -> Tensor:
        """Image and video tokens (every image of the prompt, and videos)."""
        return (ids == self.image_token) | (ids == self.video_token)

    def visual_grid(self, ids: Tensor, visual: Tensor, context: dict) -> Tensor:
        return mrope_grid(self.is_media_token(ids), context["positions"])

    def positions(self, position_ids: Tensor | None, b: int, q: int, past: int, device) -> Tensor:
        return mrope_positions(position_ids, b, q, past, device)

    def rotary(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.language_model.rotary_emb(hidden, positions)

    def decode_position_ids(self, mask2d: Tensor, q: int) -> Tensor:
        """generate()'s ids: text position + ``rope_deltas``, equal on the three axes."""
        text = generate_position_ids(self.model, mask2d, q)  # [B, q]
        deltas = getattr(self.model.model, "rope_deltas", None)
        if deltas is not None:
            text = text + deltas.to(text.device)
        return text.unsqueeze(0).expand(3, -1, -1)
