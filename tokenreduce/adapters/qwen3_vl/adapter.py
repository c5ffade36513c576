"""Adapter for Qwen3-VL (``Qwen3VLForConditionalGeneration``, ``model_type`` "qwen3_vl").

The language model (``model.model.language_model``) is a Qwen3 decoder: the Llama layer layout
with a per-head RMSNorm on queries and keys (``q_norm``, ``k_norm``, applied before RoPE), and
3-D multimodal RoPE whose (temporal, height, width) frequencies are interleaved
(``mrope_section``; the model's rotary embedding does the interleaving).  Qwen3-VL adds
**DeepStack** (Meng et al., "DeepStack: Deeply Stacking Visual Tokens is Surprisingly Simple
and Effective for LMMs", arXiv 2406.04334): the outputs of a few intermediate ViT blocks, each
through its own 2x2 merger, are added to the hidden states of the visual positions after each
of the first decoder layers (one layer per tapped block).

What the cut does here (the generic mechanics are in :mod:`tokenreduce.adapters.cut`; the
page is ``docs/adapters.md``):

* candidates, grid, positions and decode ids are Qwen2.5-VL's
  (:class:`~tokenreduce.adapters.qwen2_5_vl.adapter.Qwen2_5_VLAdapter`): image and video tokens,
  original 3-D ids kept (``keep``) or renumbered, decode at ``text position + rope_deltas``;
* **DeepStack after a cut**: the language model adds row ``j`` of each DeepStack feature to the
  ``j``-th visual position of the full sequence, which no longer exists after a cut.  Through
  the cut engine's prefill hooks (:meth:`Qwen3VLAdapter.decoder_kwargs`,
  :meth:`Qwen3VLAdapter.layer_output`) the adapter leaves the model the injections after the
  layers before the first cut and performs the others itself, after each such layer, adding to every
  surviving visual token the DeepStack rows of *its own* original position (merged tokens carry
  the rows of the kept token they replace), per sample of a ragged batch;
* **signals** (PIO's probe, attention rows, keys): the shared
  :class:`~tokenreduce.adapters.llama_signals.LlamaSignals` apply a layer's ``q_norm``/``k_norm``
  when it has them, as the model does;
* **encoder-side signals** (the attention each visual token receives in a ViT block, the block
  keys, the main merger's input: ``Need.VISION_ATTENTION``, ``Need.VISION_KEYS``,
  ``Need.VISION_FEATURES``) are recomputed from captured block inputs by
  :mod:`..qwen_vision_signals` (every block is full attention: raster order).  The ViT has no CLS
  token, so CLS attention is refused when a plan is built.  An encoder-side stage (layer 0)
  removes visual tokens before the first decoder layer; every DeepStack injection then follows
  the cut (each kept token gets its own rows; a token that merged others in, e.g. a VisionZip
  contextual token or a PIO w/ VE merge target, gets the rows of the position it occupies,
  unmerged: the DeepStack features themselves are not merged).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from tokenreduce.core.types import Need

from ..llama_signals import LlamaSignals
from ..qwen2_5_vl.adapter import Qwen2_5_VLAdapter

if TYPE_CHECKING:  # pragma: no cover
    from ..cut.attachment import StageState

__all__ = ["Qwen3VLAdapter", "deepstack_rows"]


# -- DeepStack -----------------------------------------------------------------------------------
def deepstack_rows(visual_pos_masks: Tensor, orig: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Where the DeepStack rows go in a reduced sequence.

    Args:
        visual_pos_masks: ``[B, S]`` bool, the visual positions of the full prefill (the model's
            mask; DeepStack row ``j`` belongs to its ``j``-th True entry in row-major order).
        orig: ``[B, S']`` long, original position of each slot of the reduced sequence.
        valid: ``[B, S']`` bool, False at padding slots.

    Returns:
        ``(mask [B, S'] bool, rows [n] long)``: the slots that receive a row, and which row each
        receives, in the row-major order of ``mask`` (the order ``hidden[mask]`` reads them).
    """
    b, s = visual_pos_masks.shape
    row = (visual_pos_masks.reshape(-1).long().cumsum(0) - 1).view(b, s)  # [B, S]: row of each visual position
    mask = valid & visual_pos_masks.gather(1, orig)  # [B, S']
    return mask, row.gather(1, orig)[mask]


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    """Qwen3-VL: ViT with a 2x2 patch merger and DeepStack mergers + Qwen3 decoder (q/k norms,
    interleaved M-RoPE)."""

    model_types: ClassVar[tuple[str, ...]] = ("qwen3_vl",)
    #: vision-tower signals of the CLS-free full-attention ViT (attention received per visual token,
    #: keys, the main merger's input) are recomputed from captured block inputs (:mod:`..qwen_vision_signals`)
    provides: ClassVar[Need] = LlamaSignals.provides | Need.VISION_ATTENTION | Need.VISION_KEYS | Need.VISION_FEATURES
    missing_reasons: ClassVar[dict[Need, str]] = {
        Need.VISION_CLS_ATTENTION: "Qwen3-VL's vision tower has no CLS token (use a method that scores patches "
        "by the attention they receive: scorer vision_attn, selector pio_ve_qwen)",
    }

    def __init__(self, model: Any, settings: Any = None) -> None:
        super().__init__(model, settings)
        #: this prefill's DeepStack inputs the adapter injects itself: (visual_pos_masks, embeds)
        self._deepstack: tuple[Tensor, list[Tensor]] | None = None

    # -- DeepStack after a cut (the engine's prefill hooks) -----------------------------------------
    def decoder_kwargs(self, kwargs: dict, first_cut: int) -> dict | None:
        """The model keeps the injections after the layers before the first cut (the sequence is
        still whole there); :meth:`layer_output` does the others."""
        self._deepstack = None
        embeds = kwargs.get("deepstack_visual_embeds")
        if embeds is None or first_cut >= len(embeds):  # every injection before the cut: the model's own
            return None
        self._deepstack = (kwargs["visual_pos_masks"], list(embeds))
        return {**kwargs, "deepstack_visual_embeds": list(embeds[:first_cut])}

    def layer_output(self, layer_idx: int, hidden: Tensor, stage: StageState | None) -> Tensor | None:
        """After layer ``layer_idx`` (from the first cut on): ``h[mask] += embeds[i][rows]`` with
        the rows of each surviving token's own original position (:func:`deepstack_rows`),
        exactly as the model's ``_deepstack_process`` adds them (same dtype cast, same order)."""
        if self._deepstack is None:
            return None
        visual_pos_masks, embeds = self._deepstack
        if layer_idx >= len(embeds):
            return None
        if layer_idx == len(embeds) - 1:  # the last injection: nothing of this prefill is needed after it
            self._deepstack = None
        visual_pos_masks = visual_pos_masks.to(hidden.device)
        if stage is None:  # no stage has removed anything yet: the model's own mask and rows
            mask, rows = visual_pos_masks, embeds[layer_idx]
        else:
            mask, index = deepstack_rows(visual_pos_masks, stage.slots.orig, stage.slots.valid)
            rows = embeds[layer_idx].to(hidden.device)[index]
        rows = rows.to(hidden.device, hidden.dtype)
        hidden = hidden.clone()
        hidden[mask, :] = hidden[mask, :] + rows
        return hidden

    def check_model(self) -> None:
        super().check_model()
        attn = self.language_model.layers[0].self_attn
        if not (hasattr(attn, "q_norm") and hasattr(attn, "k_norm")):
            from tokenreduce.core.errors import UnsupportedModelError

            raise UnsupportedModelError(f"{self.name}: the decoder's attention has no q_norm/k_norm (not Qwen3)")

    def check_call(self, kwargs: dict) -> str | None:
        """Video is refused: Qwen3-VL lays a video out as one ``<|vision_start|>...<|vision_end|>``
        run per frame with timestamp text between frames, and its DeepStack features mix image
        and video rows; neither is covered by the oracle tests yet."""
        if kwargs.get("pixel_values_videos") is not None or kwargs.get("video_grid_thw") is not None:
            return (
                "qwen3_vl: video inputs (pixel_values_videos / video_grid_thw) are not supported yet; "
                "images only (several per prompt are fine)"
            )
        mm = kwargs.get("mm_encoder_outputs")
        if isinstance(mm, dict) and mm.get("video") is not None:
            return "qwen3_vl: video inputs (mm_encoder_outputs['video']) are not supported yet; images only"
        return None
