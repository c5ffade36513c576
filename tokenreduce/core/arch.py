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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import UnsupportedModelError

if TYPE_CHECKING:  # pragma: no cover
    from torch import Generator, Tensor

__all__ = ["ArchSpec", "SyntheticImage", "TinyCommon", "VisionCost"]


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


@dataclass(frozen=True)
class TinyCommon:
    """What every tiny test model shares, handed to :meth:`ArchSpec.tiny_config` (so that an
    architecture folder needs nothing from the test helpers): the special tokens of the shared
    tiny tokenizer in id order, the vocabulary size and the standard deviation of the weights.
    The values in use are :data:`tokenreduce.testing.tiny.TINY`.
    """

    special_tokens: tuple[str, ...]
    vocab_size: int = 1000
    init_std: float = 0.2
    pad_token: str = "<pad>"
    bos_token: str = "<s>"
    eos_token: str = "</s>"

    def id(self, token: str) -> int:
        """The id of a special token (its index in :attr:`special_tokens`)."""
        if token not in self.special_tokens:
            raise KeyError(f"{token!r} is not a special token of the tiny tokenizer ({', '.join(self.special_tokens)})")
        return self.special_tokens.index(token)

    @property
    def pad_id(self) -> int:
        return self.id(self.pad_token)

    @property
    def bos_id(self) -> int:
        return self.id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self.id(self.eos_token)


class ArchSpec:
    """One architecture's spec: a class whose instance is registered with
    ``registry.architecture(spec)`` (one per ``model_type``).

    Subclasses set :attr:`model_type` and :attr:`adapter` and override what their architecture
    supports.  Every method has a documented default; the ones that cannot have a sensible
    default raise :class:`UnsupportedModelError` with the architecture's name.
    """

    #: the Hugging Face ``config.model_type`` this spec describes (also its registry name)
    model_type: ClassVar[str] = ""
    #: a human name for messages (e.g. "LLaVA-1.5"); empty: the model type
    display_name: ClassVar[str] = ""
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

    def config_class(self) -> type:
        """The ``transformers`` config class (default: the model class's ``config_class``)."""
        model_class: Any = self.model_class()
        return model_class.config_class

    def load_processor(self, source: Any, **kwargs: Any) -> Any:
        """The processor of a checkpoint (``kwargs``: ``revision``, ``local_files_only``).
        Default: ``AutoProcessor.from_pretrained``; when that fails or gives no full processor
        (a folder saved from an image-only processor) and :meth:`image_only_processor` gives a
        class, that class's ``from_pretrained``."""
        from transformers import AutoProcessor, ProcessorMixin

        fallback = self.image_only_processor()
        if fallback is None:
            return AutoProcessor.from_pretrained(source, **kwargs)
        try:
            processor = AutoProcessor.from_pretrained(source, **kwargs)
        except Exception:  # noqa: BLE001 - e.g. a video processor that needs torchvision
            processor = None
        if isinstance(processor, ProcessorMixin):
            return processor
        return fallback.from_pretrained(source, **kwargs)

    def image_only_processor(self) -> Any:
        """A processor class to load when the stock processor cannot be built (its video
        processor needs torchvision, which has no CPU wheel beside the project's torch), or None
        (the default).  Imported when asked, so loading the registry stays cheap."""
        return None

    # -- prompts ----------------------------------------------------------------------------------
    def default_prompt(self) -> str:
        """The prompt template (image placeholder + ``{question}``) used when neither the model
        conf (``model.prompt``) nor the root config (``prompts.<model_type>``) gives one: a
        LLaVA-style single turn with the short-answer instruction."""
        return (
            f"USER: {self.image_placeholder}\n{{question}}\nAnswer the question using a single word or phrase. "
            "ASSISTANT:"
        )

    def prompt_images(self, n_images: int) -> str:
        """The placeholders of ``n_images`` images, as they stand together in a prompt."""
        return self.placeholder_separator.join([self.image_placeholder] * n_images)

    # -- synthetic inputs -------------------------------------------------------------------------
    def synthetic_image(
        self, config: Any, batch_size: int, n_visual: int | None, generator: Generator
    ) -> SyntheticImage:
        """One random image per sample for ``config``, with ``n_visual`` LLM visual tokens when
        the architecture allows it (a wish: fixed-size towers ignore it).  The generic code in
        :func:`tokenreduce.models.synthetic_inputs` builds the text around it."""
        raise self._missing("synthetic_image() (random inputs for bench/flops)")

    def token_inputs(self, config: Any, input_ids: Tensor) -> dict[str, Tensor]:
        """Per-token model inputs a processor writes beside ``input_ids`` ``[B, S]`` (e.g. which
        tokens are image tokens), added to synthetic inputs; none by default."""
        return {}

    # -- FLOPs ------------------------------------------------------------------------------------
    def vision_flops(
        self,
        config: Any,
        n_visual: int,
        *,
        vision_crops: int | None = None,
        vision_grid: tuple[int, int] | None = None,
    ) -> VisionCost:
        """Closed-form true FLOPs of the vision tower and projector for ``n_visual >= 1`` LLM
        visual tokens (``vision_crops`` / ``vision_grid``: how the image was cut, where the
        architecture has such a choice; see :func:`tokenreduce.measure.flops.account`)."""
        raise self._missing("vision_flops() (vision-side FLOPs)")

    def count_vision_flops(
        self, model: Any, config: Any, cost: VisionCost, counted: Callable[[Callable[[], Any]], int]
    ) -> tuple[int, int]:
        """``(tower, projector)`` FLOPs counted on a meta-device ``model`` with ``counted(fn)``
        (``FlopCounterMode`` around ``fn``), for the inputs ``cost.detail`` describes."""
        raise self._missing("count_vision_flops() (the meta-device FLOP cross-check)")

    # -- viz --------------------------------------------------------------------------------------
    @staticmethod
    def denormalize(pixels: Tensor, processor: Any) -> Any:
        """``[3, H, W]`` normalised pixels -> an RGB PIL picture (the processor's mean/std and
        rescaling undone), for :meth:`panel_pictures`."""
        import torch
        from PIL import Image

        ip = getattr(processor, "image_processor", processor)
        mean = torch.tensor(getattr(ip, "image_mean", None) or [0.0, 0.0, 0.0]).view(3, 1, 1)
        std = torch.tensor(getattr(ip, "image_std", None) or [1.0, 1.0, 1.0]).view(3, 1, 1)
        x = pixels.detach().float().cpu()
        if getattr(ip, "do_normalize", True):
            x = x * std + mean
        if not getattr(ip, "do_rescale", True):
            x = x / 255.0
        arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return Image.fromarray(arr, "RGB")

    def panel_pictures(
        self, inputs: Mapping[str, Any], processor: Any, sample: int, panels: Sequence[int]
    ) -> dict[int, Any]:
        """The picture the model sees under each grid panel of one sample, as PIL images, from
        the processor's ``pixel_values`` (normalisation undone).  Panels missing from the result
        are drawn on the original image.  Default: none."""
        return {}

    # -- tiny test models -------------------------------------------------------------------------
    @property
    def has_tiny(self) -> bool:
        """Whether this spec builds a tiny test model (it overrides :meth:`tiny_config`)."""
        return type(self).tiny_config is not ArchSpec.tiny_config

    def tiny_config(self, common: TinyCommon, **kwargs: Any) -> Any:
        """A tiny ``transformers`` config with ``common``'s token ids, vocabulary size and weight
        std; keywords: ``text_layers`` and :attr:`tiny_options`."""
        raise self._missing("tiny_config() (a tiny random-weight test model)")

    def tiny_processor(self, tokenizer: Any, **kwargs: Any) -> Any:
        """A local processor around ``tokenizer`` for the tiny model (:attr:`tiny_options`)."""
        raise self._missing("tiny_processor() (a local processor for the tiny model)")

    def tiny_prompt(self, prompt: str) -> str:
        """A test prompt written with ``<image>`` placeholders, in this architecture's form (a
        prompt that already holds :attr:`image_placeholder` is kept as it is)."""
        return prompt if self.image_placeholder in prompt else prompt.replace("<image>", self.image_placeholder)

    def __repr__(self) -> str:
        return f"<ArchSpec {self.model_type!r} ({type(self).__module__}.{type(self).__name__})>"
