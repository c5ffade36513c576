"""Adapter for Qwen2-VL (``Qwen2VLForConditionalGeneration``, ``model_type`` "qwen2_vl").

Qwen2-VL (Wang et al., "Qwen2-VL: Enhancing Vision-Language Model's Perception of the World at
Any Resolution", arXiv 2409.12191) feeds its Qwen2 decoder exactly as Qwen2.5-VL does: the
``<|image_pad|>`` / ``<|video_pad|>`` tokens carry the 2x2-merged patch features, and every token
has a 3-D multimodal RoPE id (temporal, height, width).  The language model
(``model.model.language_model``) has the Llama layer layout with q/k/v biases and the same
``rope_deltas`` bookkeeping, so the cut reads the layout as for Qwen2.5-VL (the M-RoPE helpers of
:mod:`tokenreduce.adapters.qwen2_5_vl.adapter`):

* the visual candidates are the image tokens (every image of the prompt, dynamic resolution:
  ``t*h*w / 4`` tokens each) and the video tokens (each temporal slice its own grid panel; the
  frame ids advance by 1 per temporal patch, where Qwen2.5-VL scales them by the frame rate);
* survivors keep their original 3-D ids with gaps (``positions: keep``); ``renumber`` gives
  contiguous text-style ids (ablation only);
* decode steps use generate()'s ``text position + rope_deltas``.

What differs is the vision tower (full attention in every block, no windows; LayerNorm and a
QuickGELU MLP), which only the encoder-side signals read: the attention each visual token
receives, the block keys and the merger's input (``Need.VISION_ATTENTION``,
``Need.VISION_KEYS``, ``Need.VISION_FEATURES``) are recomputed from captured block inputs by
:mod:`..qwen_vision_signals`, in raster order (no windows).  The tower has no CLS token, so CLS
attention is refused when a plan is built (:attr:`Qwen2VLAdapter.missing_reasons`).  Docs:
``docs/adapters.md``.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from tokenreduce.core.errors import UnsupportedModelError
from tokenreduce.core.types import Need

from ..cut import DecoderAdapter
from ..llama_family import check_llama_family, generate_position_ids
from ..llama_signals import LlamaSignals
from ..qwen2_5_vl.adapter import mrope_grid, mrope_positions
from ..qwen_vision_signals import qwen_vision_tower
from ..vision_signals import VisionTower


class Qwen2VLAdapter(DecoderAdapter):
    """Qwen2-VL: full-attention ViT with a 2x2 patch merger + Qwen2 decoder with M-RoPE."""

    model_types: ClassVar[tuple[str, ...]] = ("qwen2_vl",)
    #: vision-tower signals of the CLS-free full-attention ViT (attention received per visual token,
    #: keys, the merger's input) are recomputed from captured block inputs (:mod:`..qwen_vision_signals`)
    provides: ClassVar[Need] = LlamaSignals.provides | Need.VISION_ATTENTION | Need.VISION_KEYS | Need.VISION_FEATURES
    missing_reasons: ClassVar[dict[Need, str]] = {
        Need.VISION_CLS_ATTENTION: "Qwen2-VL's vision tower has no CLS token (use a method that scores patches "
        "by the attention they receive: scorer vision_attn, selector pio_ve_qwen)",
    }

    def __init__(self, model, settings=None) -> None:
        super().__init__(model, settings)
        self.video_token = int(model.config.video_token_id)

    def vision_tower(self) -> VisionTower:
        """The ViT's handles for the encoder-side signals (raster order: no windows)."""
        return qwen_vision_tower(self.model, name=self.name)

    def check_model(self) -> None:
        if getattr(self.model.config.text_config, "use_sliding_window", False):
            raise UnsupportedModelError(
                f"{self.name}: models with sliding-window attention layers are not supported yet "
                "(text_config.use_sliding_window is true)"
            )
        check_llama_family(self.language_model, self.name)

    def is_media_token(self, ids: Tensor) -> Tensor:
        """Image and video tokens (every image of the prompt, and videos)."""
        return (ids == self.image_token) | (ids == self.video_token)

    def visual_grid(self, ids: Tensor, visual: Tensor, context: dict) -> Tensor:
        """``[B, S, 3]`` (panel, row, col) read off the M-RoPE ids (a video: one panel per temporal slice)."""
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
