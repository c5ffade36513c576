"""The base class of adapters whose language model is a Llama-family decoder.

An adapter is constructed per model (``Adapter(model, settings)``) and answers the questions
the cut engine asks about it: where the decoder is, which tokens are visual candidates, where
they sit on their images, which positions and rotary tables the decoder uses.  Every method has
a default for a Llama-family decoder; an architecture overrides what differs.  The class-level
entry points :meth:`DecoderAdapter.num_layers` and :meth:`DecoderAdapter.attach` are what the
registry and :func:`tokenreduce.apply` call.  Walkthrough: ``docs/writing-an-adapter.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel
from torch import Tensor

from tokenreduce.core.errors import UnsupportedModelError
from tokenreduce.core.types import Need

from ..llama_family import check_llama_family, generate_position_ids
from ..llama_family import image_token_id as config_image_token_id
from ..llama_signals import LlamaSignals

if TYPE_CHECKING:  # pragma: no cover
    from tokenreduce.core.plan import CompiledPlan

    from ..vision_signals import VisionTower
    from .attachment import CutAttachment, StageState

__all__ = ["DecoderAdapter"]


def _generation_class(model: Any) -> str:
    """The name of the transformers class with the LM head for ``model``'s model type."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names: Mapping[str, str] = {}
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as names
    except ImportError:  # pragma: no cover - the mapping moved
        pass
    found = names.get(model_type) if model_type else None
    return found if isinstance(found, str) else "the *ForConditionalGeneration model"


class DecoderAdapter:
    """A VLM whose language model is a Llama-family decoder, as the cut engine sees it.

    Class attributes (read by the registry and by plan building, before any model exists):

    * ``model_types``: the ``config.model_type`` values this adapter serves;
    * ``provides``: the signals it can supply (:class:`~tokenreduce.core.types.Need`);
    * ``missing_reasons``: why a signal it lacks is missing (shown when a plan needs it);
    * ``Settings``: a pydantic model of its options (``Plan.adapter``), or None for none.

    Positions are ``[A, B, S]`` tensors: ``A = 1`` axis for 1-D RoPE, ``A = 3`` for M-RoPE.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    #: the decoder signals of :class:`~tokenreduce.adapters.llama_signals.LlamaSignals`; add
    #: ``Need.VISUAL_GRID`` when :meth:`visual_grid` is implemented
    provides: ClassVar[Need] = LlamaSignals.provides & ~Need.VISUAL_GRID
    missing_reasons: ClassVar[dict[Need, str]] = {}
    Settings: ClassVar[type[BaseModel] | None] = None

    # -- optional prefill hooks (models that add to the sequence inside the decoder) -----------------
    def decoder_kwargs(self, kwargs: dict, first_cut: int) -> dict | None:
        """At each prefill, the language model's keyword arguments for a plan whose first cut is
        before layer ``first_cut``: a changed copy, or None (unchanged; the default).

        For models that add to the visual positions inside the decoder (Qwen3-VL's DeepStack):
        keep what happens before the cut, take the rest over in :meth:`layer_output`."""
        return None

    def layer_output(self, layer_idx: int, hidden: Tensor, stage: StageState | None) -> Tensor | None:
        """At a prefill, the hidden states layer ``layer_idx >= first cut`` produced, changed, or
        None (unchanged; the default).  ``stage`` is the cut state in force at that layer (its
        ``slots.orig``: the original position of each slot), None before any stage removed
        tokens.  Called only when a subclass overrides it."""
        return None

    @classmethod
    def uses_layer_output(cls) -> bool:
        """Whether this adapter overrides :meth:`layer_output` (the engine then hooks the layers'
        outputs; otherwise it registers no output hook)."""
        return cls.layer_output is not DecoderAdapter.layer_output

    # -- class-level entry points ------------------------------------------------------------------
    @classmethod
    def num_layers(cls, model: Any) -> int:
        """Number of decoder layers of the language model."""
        return int(model.config.text_config.num_hidden_layers)

    @classmethod
    def attach(cls, model: Any, plan: CompiledPlan) -> CutAttachment:
        """Attach a compiled plan to ``model``: the attachment (a context manager)."""
        from .attachment import CutAttachment

        return CutAttachment(cls(model, plan.adapter_settings), plan)

    # -- construction ------------------------------------------------------------------------------
    def __init__(self, model: Any, settings: BaseModel | None = None) -> None:
        self.model = model
        if settings is None and self.Settings is not None:
            settings = self.Settings()
        self.settings = settings
        self.language_model: Any = self._part("language model", self.decoder)
        self.check_model()
        self.head: Any = self._part("LM head", self.lm_head)
        self.image_token = self.image_token_id()

    def _part(self, what: str, find: Any) -> Any:
        """``find(model)``; a model without that part (e.g. the base ``LlavaModel`` instead of
        ``LlavaForConditionalGeneration``) is refused with the class to pass instead."""
        try:
            return find(self.model)
        except AttributeError as exc:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} has no {what} where the {self.name} adapter looks for it ({exc}); "
                f"pass the whole model, {_generation_class(self.model)} (as AutoModelForImageTextToText loads it), "
                "not its base model (model.model) or another part of it"
            ) from exc

    @property
    def name(self) -> str:
        """Short name used in messages: the first model type (or the class name)."""
        return self.model_types[0] if self.model_types else type(self).__name__

    def check_model(self) -> None:
        """Refuse models the cut cannot handle (called once the decoder is found).  Default: the
        decoder layers must have the Llama layout."""
        check_llama_family(self.language_model, self.name)

    # -- where things are --------------------------------------------------------------------------
    def decoder(self, model: Any) -> Any:
        """The language model (``.layers``, ``.norm``, ``.rotary_emb``)."""
        return model.model.language_model

    def lm_head(self, model: Any) -> Any:
        return model.lm_head

    @property
    def attn_implementation(self) -> str:
        impl: str = self.language_model.config._attn_implementation
        return impl

    def vision_tower(self) -> VisionTower | None:
        """The vision tower's handles, for plans that read vision-tower signals; None: none."""
        return None

    # -- visual tokens -----------------------------------------------------------------------------
    def image_token_id(self) -> int:
        """The id of the image placeholder tokens (default ``config.image_token_id``); read once,
        when the adapter is constructed."""
        return config_image_token_id(self.model.config)

    def is_media_token(self, ids: Tensor) -> Tensor:
        """``ids`` -> bool: tokens that carry visual features (a decode step must have none)."""
        return ids == self.image_token

    def visual_mask(self, ids: Tensor, context: dict) -> Tensor:
        """``[B, S]`` bool: the reduction candidates of a prefill.

        ``context`` holds the top-level forward kwargs plus ``"inputs_embeds"`` (``[B, S, d]``,
        what the decoder receives; dropped after this call) and ``"positions"`` (``[A, B, S]``).
        An adapter may stash in it what :meth:`visual_grid` needs later.  Default: the media
        tokens.
        """
        return self.is_media_token(ids)

    def visual_grid(self, ids: Tensor, visual: Tensor, context: dict) -> Tensor:
        """``[B, S, 3]`` long (image/panel, row, col) of every position (meaningful at the
        candidates ``visual``)."""
        raise NotImplementedError(f"the {self.name} adapter does not describe the visual grid")

    def visual_newlines(self, context: dict) -> Tensor | None:
        """``[B, S]`` bool: row-end tokens among the candidates (LLaVA-NeXT's ``image_newline``);
        None: none."""
        return None

    # -- positions ---------------------------------------------------------------------------------
    def positions(self, position_ids: Tensor | None, b: int, q: int, past: int, device: Any) -> Tensor:
        """``[A, B, q]``: the RoPE ids the decoder uses, from its ``position_ids`` kwarg
        (``arange`` from the cache length when the caller passed none, as ``LlamaModel`` does)."""
        if position_ids is None:
            position_ids = torch.arange(past, past + q, device=device).unsqueeze(0)
        return position_ids.reshape(1, -1, q).expand(1, b, q)

    def rotary(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` as the decoder computes them for ``positions`` ``[A, B, S]``."""
        return self.language_model.rotary_emb(hidden, positions[0])

    def decode_position_ids(self, mask2d: Tensor, q: int) -> Tensor | None:
        """The ``position_ids`` to pass to a decode step that has none (``mask2d`` ``[B, total]``):
        the ids ``generate()`` would pass.  None lets the model derive them."""
        return generate_position_ids(self.model, mask2d, q)

    # -- calls -------------------------------------------------------------------------------------
    def check_call(self, kwargs: dict) -> str | None:
        """A message when a top-level forward call is not supported (e.g. video); None: fine."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
