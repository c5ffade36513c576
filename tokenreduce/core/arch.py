"""What the project knows about one VLM architecture, beside its adapter: :class:`ArchSpec`.

An architecture is registered once, by its Hugging Face ``config.model_type``, with a spec
object; every part of tokenreduce that must know something model-specific asks the registry
for the spec (``get_registry().spec_for(model_type)``) instead of naming model types:

* the model loader (:mod:`tokenreduce.models`): the ``transformers`` class, the processor;
* synthetic inputs of the right shapes (``bench`` and ``flops`` on random weights);
* vision-side FLOPs (closed form and the meta-device cross-check);
* ``viz``: the picture under each grid panel (the processor's normalisation undone);
* the lmms-eval bridge: the prompt's image placeholder;
* tiny random-weight test models and their local processors.

A third-party plugin that registers an architecture gets all of these for free.  The defaults
here raise :class:`~tokenreduce.core.errors.UnsupportedModelError` naming the architecture and
the missing method, so a partial spec fails clearly where it is used.  Writing one:
``docs/writing-an-adapter.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

from .errors import UnsupportedModelError

if TYPE_CHECKING:  # pragma: no cover
    from torch import Generator, Tensor

__all__ = ["ArchSpec", "SyntheticImage", "VisionCost"]


@dataclass(frozen=True)
class SyntheticImage:
    """What :meth:`ArchSpec.synthetic_image` returns for a batch of one random image per sample.

    Attributes:
        inputs: the processor-style tensors: ``pixel_values`` and the architecture's extras
            (``image_sizes``, ``image_grid_thw``), float32 / long on the CPU.
        n_visual: image tokens per sample in ``input_ids``.
        before: token ids written just before the image tokens (e.g. a vision-start token).
        after: token ids written just after them (e.g. a vision-end token).
        bos: whether a prompt starts with the tokenizer's ``bos_token_id``.
    """

    inputs: dict
    n_visual: int
    before: tuple[int, ...] = ()
    after: tuple[int, ...] = ()
    bos: bool = True


@dataclass(frozen=True)
class VisionCost:
    """True FLOPs (2 per multiply-add) of the vision side of one sample.

    Attributes:
        tower: the vision encoder's FLOPs.
        projector: the projector's (LLaVA) or patch merger's (Qwen) FLOPs.
        detail: plain facts of how they were counted (crops, grid, layers), for results files.
    """

    tower: int
    projector: int
    detail: dict = field(default_factory=dict)


class ArchSpec:
    """One architecture's spec: a class whose instance is registered with
    ``registry.architecture(spec)`` (one per ``model_type``).

    Subclasses set :attr:`model_type` and :attr:`adapter` and override what their architecture
    supports.  Every method has a documented default; the ones that cannot have a sensible
    default raise :class:`UnsupportedModelError` with the architecture's name.
    """

    #: the Hugging Face ``config.model_type`` this spec describes (also its registry name)
    model_type: ClassVar[str] = ""
    #: the :class:`~tokenreduce.core.interfaces.ModelAdapter` class that attaches plans to it
    adapter: ClassVar[type | None] = None
    #: the prompt text of one image, expanded by the processor into the visual tokens
    image_placeholder: ClassVar[str] = "<image>"
    #: what joins the placeholders of several images in one prompt
    placeholder_separator: ClassVar[str] = " "
    #: extra keyword options the tiny builder and processor accept (model conf keys, e.g. image_size)
    tiny_options: ClassVar[tuple[str, ...]] = ()
    #: ``(width, height)`` of the tiny test images
    tiny_image_size: ClassVar[tuple[int, int]] = (56, 56)
    #: a chat template in the style of the real checkpoints', for tiny checkpoints (None: none)
    tiny_chat_template: ClassVar[str | None] = None

    # -- identity ---------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.model_type

    def _missing(self, what: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"architecture {self.model_type!r} ({type(self).__module__}.{type(self).__name__}) does not provide "
            f"{what}; implement it in its ArchSpec (docs/writing-an-adapter.md)"
        )

    # -- loading ----------------------------------------------------------------------------------
    def model_class(self) -> type:
        """The ``transformers`` model class (``from_pretrained`` / ``_from_config``)."""
        raise self._missing("model_class() (the transformers model class)")

    def load_processor(self, source: Any, **kwargs: Any) -> Any:
        """The processor of a checkpoint (``kwargs``: ``revision``, ``local_files_only``).
        Default: ``AutoProcessor.from_pretrained``."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(source, **kwargs)

    # -- prompts ----------------------------------------------------------------------------------
    def prompt_images(self, n_images: int) -> str:
        """The placeholders of ``n_images`` images, as they stand together in a prompt."""
        return self.placeholder_separator.join([self.image_placeholder] * n_images)

    # -- synthetic inputs -------------------------------------------------------------------------
    def synthetic_image(
        self, config: Any, batch_size: int, n_visual: int | None, generator: "Generator"
    ) -> SyntheticImage:
        """One random image per sample for ``config``, with ``n_visual`` LLM visual tokens when
        the architecture allows it (a wish: fixed-size towers ignore it).  The generic code in
        :func:`tokenreduce.models.synthetic_inputs` builds the text around it."""
        raise self._missing("synthetic_image() (random inputs for bench/flops)")

    # -- FLOPs ------------------------------------------------------------------------------------
    def vision_flops(
        self,
        config: Any,
        n_visual: int,
        *,
        vision_crops: int | None = None,
        vision_grid: tuple[int, int] | None = None,
    ) -> VisionCost:
        """Closed-form true FLOPs of the vision tower and projector for ``n_visual`` LLM tokens."""
        raise self._missing("vision_flops() (vision-side FLOPs)")

    def count_vision_flops(
        self, model: Any, config: Any, cost: VisionCost, counted: Callable[[Callable[[], Any]], int]
    ) -> tuple[int, int]:
        """``(tower, projector)`` FLOPs counted on a meta-device ``model`` with ``counted(fn)``
        (``FlopCounterMode`` around ``fn``), for the inputs ``cost.detail`` describes."""
        raise self._missing("count_vision_flops() (the meta-device FLOP cross-check)")

    # -- viz --------------------------------------------------------------------------------------
    def panel_pictures(
        self, inputs: Mapping[str, Any], processor: Any, sample: int, panels: Sequence[int]
    ) -> dict[int, Any]:
        """The picture the model sees under each grid panel of one sample, as PIL images, from
        the processor's ``pixel_values`` (normalisation undone).  Panels missing from the result
        are drawn on the original image.  Default: none."""
        return {}

    # -- tiny test models -------------------------------------------------------------------------
    def tiny_config(self, **kwargs: Any) -> Any:
        """A tiny ``transformers`` config (``text_layers=...`` and :attr:`tiny_options`)."""
        raise self._missing("tiny_config() (a tiny random-weight test model)")

    def tiny_processor(self, tokenizer: Any, **kwargs: Any) -> Any:
        """A local processor around ``tokenizer`` for the tiny model (:attr:`tiny_options`)."""
        raise self._missing("tiny_processor() (a local processor for the tiny model)")

    def tiny_prompt(self, prompt: str) -> str:
        """A test prompt written with ``<image>`` placeholders, in this architecture's form."""
        return prompt if self.image_placeholder == "<image>" else prompt.replace("<image>", self.image_placeholder)

    def __repr__(self) -> str:
        return f"<ArchSpec {self.model_type!r} ({type(self).__module__}.{type(self).__name__})>"
