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

from tokenreduce.core.types import Need

from ..qwen2_5_vl.adapter import Qwen2_5_VLAdapter

__all__ = ["Qwen2VLAdapter"]


class Qwen2VLAdapter(Qwen2_5_VLAdapter):
    """Qwen2-VL: full-attention ViT with a 2x2 patch merger + Qwen2 decoder with M-RoPE (the
    seam is Qwen2.5-VL's; the tower has no windows, so its signals are in raster order)."""

    model_types: ClassVar[tuple[str, ...]] = ("qwen2_vl",)
    missing_reasons: ClassVar[dict[Need, str]] = {
        Need.VISION_CLS_ATTENTION: "Qwen2-VL's vision tower has no CLS token (use a method that scores patches "
        "by the attention they receive: scorer vision_attn, selector pio_ve_qwen)",
    }
