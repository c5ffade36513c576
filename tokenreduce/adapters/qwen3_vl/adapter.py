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
  ``j``-th visual position of the full sequence, which no longer exists after a cut.  The
  attachment (:class:`DeepStackCutAttachment`) leaves the model the injections after the layers
  before the first cut and performs the others itself, after each such layer, adding to every
  surviving visual token the DeepStack rows of *its own* original position (merged tokens carry
  the rows of the kept token they replace), per sample of a ragged batch;
* **signals** (PIO's probe, attention rows, keys): the shared
  :class:`~tokenreduce.adapters.llama_signals.LlamaSignals` apply a layer's ``q_norm``/``k_norm``
  when it has them, as the model does.

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

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from tokenreduce.core.types import Need

from ..cut import DecoderAdapter
from ..cut.attachment import CutAttachment
from ..llama_family import generate_position_ids
from ..llama_signals import LlamaSignals
from ..qwen2_5_vl.adapter import mrope_grid, mrope_positions
from ..qwen_vision_signals import qwen_vision_tower
from ..vision_signals import VisionTower

if TYPE_CHECKING:  # pragma: no cover
    from tokenreduce.core.plan import CompiledPlan

__all__ = ["DeepStackCutAttachment", "Qwen3VLAdapter", "deepstack_rows"]


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


class DeepStackCutAttachment(CutAttachment):
    """The shared cut plus what Qwen3-VL needs: DeepStack injections that follow the cut, and
    q/k-normed signals.

    At a prefill whose language model receives ``deepstack_visual_embeds`` (``n`` tensors, one
    per tapped ViT block), the model keeps the injections after layers ``< first`` (the first
    cut layer: the sequence is still whole there); the injection after each layer ``i`` in
    ``[first, n)`` is done by a forward hook on layer ``i``, on the sequence that layer produced:
    ``h[mask] += embeds[i][rows]`` (:func:`deepstack_rows`), exactly as the model's own
    ``_deepstack_process`` adds them (same dtype cast, same order).
    """

    def __init__(self, adapter: Any, plan: CompiledPlan) -> None:
        self._first_cut = min((cs.layer for cs in plan.stages), default=None)
        self._deepstack: tuple[object, Tensor, Sequence[Tensor]] | None = None  # (forward, mask, embeds)
        super().__init__(adapter, plan)

    def _attach(self) -> None:
        super()._attach()
        if self._first_cut is None:
            return
        with self._hooks.installing() as hooks:
            hooks.on_remove(self._forget_deepstack)
            for i in range(self._first_cut, self.n_layers):
                handle = self.layers[i].register_forward_hook(self._make_deepstack_hook(i))
                hooks.on_remove(handle.remove)

    def _forget_deepstack(self) -> None:
        self._deepstack = None

    def _decoder_hook(self, module, args, kwargs):
        super()._decoder_hook(module, args, kwargs)
        embeds = kwargs.get("deepstack_visual_embeds")
        fwd = self._fwd
        if fwd is None or not fwd.prefill or embeds is None or self._first_cut is None:
            self._deepstack = None
            return None
        first = self._first_cut
        if first >= len(embeds):  # every injection happens before the first cut: the model's own
            self._deepstack = None
            return None
        self._deepstack = (fwd, kwargs["visual_pos_masks"], list(embeds))
        return args, {**kwargs, "deepstack_visual_embeds": list(embeds[:first])}

    def _make_deepstack_hook(self, layer_idx: int):
        def hook(module, args, output):
            return self._inject(layer_idx, output)

        return hook

    def _inject(self, layer_idx: int, output):
        ds = self._deepstack
        if ds is None or ds[0] is not self._fwd:  # a decode step, or no DeepStack in this prefill
            return None
        _, visual_pos_masks, embeds = ds
        if layer_idx >= len(embeds):
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        visual_pos_masks = visual_pos_masks.to(hidden.device)
        state = self._current_stage(layer_idx)
        if state is None:  # no stage has removed anything yet: the model's own mask and rows
            mask, rows = visual_pos_masks, embeds[layer_idx]
        else:
            mask, index = deepstack_rows(visual_pos_masks, state.slots.orig, state.slots.valid)
            rows = embeds[layer_idx].to(hidden.device)[index]
        rows = rows.to(hidden.device, hidden.dtype)
        hidden = hidden.clone()
        hidden[mask, :] = hidden[mask, :] + rows
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class Qwen3VLAdapter(DecoderAdapter):
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

    @classmethod
    def attach(cls, model: Any, plan: CompiledPlan) -> CutAttachment:
        """Attach a compiled plan: the shared cut with DeepStack and q/k-norm handling."""
        return DeepStackCutAttachment(cls(model, plan.adapter_settings), plan)

    def __init__(self, model: Any, settings: Any = None) -> None:
        super().__init__(model, settings)
        self.video_token = int(model.config.video_token_id)

    def is_media_token(self, ids: Tensor) -> Tensor:
        """Image and video tokens (a decode step must have none)."""
        return (ids == self.image_token) | (ids == self.video_token)

    def visual_grid(self, ids: Tensor, visual: Tensor, context: dict) -> Tensor:
        """``[B, S, 3]`` (image, row, col) read off the M-RoPE ids, as for Qwen2.5-VL."""
        return mrope_grid(self.is_media_token(ids), context["positions"])

    def positions(self, position_ids: Tensor | None, b: int, q: int, past: int, device: Any) -> Tensor:
        """``[3, B, q]`` M-RoPE ids (the 4-axis form ``generate()`` passes loses its text row)."""
        return mrope_positions(position_ids, b, q, past, device)

    def rotary(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """The model's own rotary embedding on ``[3, B, S]`` ids: it interleaves the three axes."""
        return self.language_model.rotary_emb(hidden, positions)

    def decode_position_ids(self, mask2d: Tensor, q: int) -> Tensor:
        """generate()'s ids: text position + ``rope_deltas``, equal on the three axes."""
        text = generate_position_ids(self.model, mask2d, q)  # [B, q]
        deltas = getattr(self.model.model, "rope_deltas", None)
        if deltas is not None:
            text = text + deltas.to(text.device)
        return text.unsqueeze(0).expand(3, -1, -1)

    def vision_tower(self) -> VisionTower:
        """The ViT's handles for the encoder-side signals (raster order; the DeepStack mergers are
        not read: the signals describe the main merger's tokens)."""
        return qwen_vision_tower(self.model, name=self.name)

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
