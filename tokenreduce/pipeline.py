"""One call from a model and a plan to an answer: :func:`pipeline`.

::

    import tokenreduce

    ask = tokenreduce.pipeline("easyvqa_llava", "ref_pio_11")  # a model conf name, folder or model
    result = ask(image, "what shape is it?")                    # a PIL image or an image file
    result.answer, result.trace                                 # the text, what each stage kept

The pipeline builds the prompt from the model's prompt template, runs the processor, calls
``model.generate()`` (greedy) under ``tokenreduce.apply(model, plan)`` and decodes the new
tokens: the same answer as doing those steps by hand.  Quickstart: ``docs/index.md``; plans and
traces: ``docs/concepts.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenreduce.core.errors import TokenReduceError
from tokenreduce.core.plan import Plan
from tokenreduce.core.types import Trace

__all__ = ["Pipeline", "PipelineResult", "pipeline"]

#: the model options a conf name or a checkpoint folder accepts as keyword arguments of :func:`pipeline`
_FOLDER_OPTIONS = ("revision", "dtype", "attn_implementation", "device")


@dataclass
class PipelineResult:
    """The answer to one question.

    Attributes:
        answer: the generated text (special tokens skipped, stripped).
        tokens: the generated token ids (without the prompt).
        trace: what each stage of the plan kept (:class:`~tokenreduce.core.types.Trace`); in a batch,
            the batch's trace, shared by its results (this one is sample :attr:`sample`); ``None``
            without a plan.
        sample: the index of this question in its batch (0 for a single question).
        prompt: the prompt the model was given.
        vanilla: the answer without the plan, when asked for (``vanilla=True``), else ``None``.
    """

    answer: str
    tokens: list[int]
    trace: Trace | None
    sample: int
    prompt: str
    vanilla: str | None = None

    @property
    def visual_per_layer(self) -> list[int] | None:
        """Visual tokens each decoder layer saw for this question (``None`` without a plan)."""
        return None if self.trace is None else self.trace.visual_per_layer(self.sample)


class Pipeline:
    """A model, its processor, a prompt template and a plan, ready to answer questions.

    Built by :func:`pipeline`; call it with an image and a question (or lists of both).

    Attributes:
        model: the Hugging Face VLM (eval mode).
        processor: its processor.
        plan: the validated :class:`~tokenreduce.core.plan.Plan`, or ``None`` (the unreduced model).
        template: the prompt template: the image placeholder and ``{question}``.
        max_new_tokens: the default generation length.
    """

    def __init__(self, model: Any, processor: Any, template: str, plan: Plan | None, max_new_tokens: int) -> None:
        self.model = model
        self.processor = processor
        self.template = template
        self.plan = plan
        self.max_new_tokens = max_new_tokens

    def __repr__(self) -> str:
        plan = self.plan.name if self.plan is not None else None
        return f"Pipeline(model={type(self.model).__name__}, plan={plan!r}, max_new_tokens={self.max_new_tokens})"

    def prompt(self, question: str) -> str:
        """The prompt for ``question``: the template with ``{question}`` replaced."""
        return self.template.replace("{question}", question)

    def inputs(self, images: Sequence[Any], questions: Sequence[str]) -> dict[str, Any]:
        """The processor's tensors for B images and B questions (left padding), on the model's device."""
        prompts = [self.prompt(q) for q in questions]
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"
        batch = self.processor(images=list(images), text=prompts, padding=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        out = {}
        for key, value in dict(batch).items():
            if isinstance(value, torch.Tensor):
                value = value.to(device, dtype=dtype if value.is_floating_point() else None)
            out[key] = value
        return out

    def __call__(
        self,
        image: Any,
        question: str | Sequence[str],
        *,
        max_new_tokens: int | None = None,
        vanilla: bool = False,
    ) -> PipelineResult | list[PipelineResult]:
        """Answer ``question`` about ``image``.

        Args:
            image: a PIL image or the path of an image file; or a list of them (a batch).
            question: a question (``str``); a list of as many questions as images for a batch
                (one question with a list of images asks it about each).
            max_new_tokens: generation length (default: the pipeline's).
            vanilla: also answer without the plan (``PipelineResult.vanilla``).

        Returns:
            a :class:`PipelineResult`; a list of them, in order, for a batch.

        Raises:
            TypeError / ValueError: a bad image, question or length (the message names it).
        """
        batched = isinstance(image, (list, tuple))
        images = [_load_image(img, f"image[{i}]") for i, img in enumerate(image)] if batched else [_load_image(image)]
        if not images:
            raise ValueError("image: an empty list; give at least one image")
        if isinstance(question, str):
            questions = [question] * len(images)
        elif isinstance(question, (list, tuple)) and batched:
            questions = list(question)
            if len(questions) != len(images):
                raise ValueError(f"question: got {len(questions)} questions for {len(images)} images; give one each")
        else:
            raise TypeError(
                f"question must be a str (or, with a list of images, a list of str); got {type(question).__name__}"
            )
        for i, q in enumerate(questions):
            if not isinstance(q, str) or not q.strip():
                where = "question" if isinstance(question, str) else f"question[{i}]"
                raise ValueError(f"{where} must be a non-empty str; got {q!r}")
        n_new = self.max_new_tokens if max_new_tokens is None else _check_length(max_new_tokens, "max_new_tokens")

        inputs = self.inputs(images, questions)
        n_prompt = inputs["input_ids"].shape[1]
        kw = {"max_new_tokens": n_new, "do_sample": False}
        plain: list[str] | None = None
        if vanilla or self.plan is None:
            with torch.no_grad():
                out = self.model.generate(**inputs, **kw)
            plain = self._decode(out[:, n_prompt:])
        trace: Trace | None = None
        if self.plan is None:
            new = out[:, n_prompt:]
        else:
            from tokenreduce.api import apply

            with apply(self.model, self.plan) as attachment, torch.no_grad():
                out = self.model.generate(**inputs, **kw)
            new, trace = out[:, n_prompt:], attachment.trace
        answers = self._decode(new)
        results = [
            PipelineResult(
                answer=answers[b],
                tokens=self._tokens(new[b]),
                trace=trace,
                sample=b,
                prompt=self.prompt(questions[b]),
                vanilla=plain[b] if vanilla and plain is not None else None,
            )
            for b in range(len(images))
        ]
        return results if batched else results[0]

    def _decode(self, ids: torch.Tensor) -> list[str]:
        return [text.strip() for text in self.processor.batch_decode(ids, skip_special_tokens=True)]

    def _tokens(self, ids: torch.Tensor) -> list[int]:
        """The generated ids up to and including the first end-of-sequence token (no padding after it)."""
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        stops = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        tokens: list[int] = []
        for token in ids.tolist():
            tokens.append(int(token))
            if token in stops:
                break
        return tokens


def pipeline(
    model_or_path: Any,
    plan: Plan | Mapping[str, Any] | str | None = None,
    *,
    processor: Any = None,
    prompt: str | None = None,
    max_new_tokens: int = 16,
    **load_kwargs: Any,
) -> Pipeline:
    """A callable that answers questions about images with ``plan``: ``pipeline(m, plan)(image, question)``.

    Args:
        model_or_path: one of

            * a loaded Hugging Face VLM of a supported architecture (``*ForConditionalGeneration``);
              give its ``processor``, or it is loaded from the model's local checkpoint folder;
            * the name of a model conf in ``conf/model`` (``"easyvqa_llava"``, ``"tiny_llava"``,
              ``"llava_1_5_7b"``, ...), loaded as ``tokenreduce run model=<name>`` loads it;
              ``load_kwargs`` override its keys (``text_layers=2``, ``device="cpu"``);
            * a local checkpoint folder or a Hugging Face Hub id (as
              :func:`tokenreduce.models.load_pretrained`; ``load_kwargs``: ``revision``, ``dtype``,
              ``attn_implementation``, ``device``).
        plan: a preset name, a plan dict or a :class:`~tokenreduce.core.plan.Plan`; ``None``: the
            unreduced model.  Validated here, against the model.
        processor: the model's processor (only with a loaded model).
        prompt: the prompt template, with the architecture's image placeholder and ``{question}``.
            Default: the model conf's prompt; else the processor's chat template when it has one;
            else the architecture's default prompt (``ArchSpec.default_prompt``).
        max_new_tokens: default generation length (greedy decoding).

    Returns:
        a :class:`Pipeline`.

    Raises:
        TokenReduceError: an unknown model conf or folder, a model without a processor, a plan that
            does not fit the model (a :class:`~tokenreduce.core.errors.PlanError`), a bad option.
    """
    _check_length(max_new_tokens, "max_new_tokens")
    if prompt is not None and (not isinstance(prompt, str) or "{question}" not in prompt):
        raise TokenReduceError(f"prompt must be a str with the placeholder {{question}}; got {prompt!r}")
    if isinstance(model_or_path, (str, Path)):
        if processor is not None:
            raise TokenReduceError("processor: give it only with a loaded model; a conf name or folder loads its own")
        model, processor, template = _load(model_or_path, load_kwargs)
    else:
        if load_kwargs:
            raise TokenReduceError(
                f"unexpected options {sorted(load_kwargs)}: with a loaded model, pipeline() takes only plan, "
                "processor, prompt and max_new_tokens"
            )
        if not hasattr(model_or_path, "generate") or not hasattr(model_or_path, "config"):
            raise TokenReduceError(
                "model_or_path must be a loaded Hugging Face VLM, a model conf name (tokenreduce list / conf/model), "
                f"a checkpoint folder or a Hub id; got {type(model_or_path).__name__}"
            )
        model = model_or_path
        processor = processor if processor is not None else _find_processor(model)
        template = None
    template = prompt or template or _default_template(model, processor)
    compiled = _compile(model, plan)
    model.eval()
    return Pipeline(model, processor, template, compiled, max_new_tokens)


# -- helpers ---------------------------------------------------------------------------------------
def _check_length(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}")
    return value


def _load_image(image: Any, name: str = "image") -> Any:
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"{name}: no image file at {str(path)!r}")
        try:
            with Image.open(path) as opened:
                return opened.convert("RGB")
        except OSError as exc:
            raise ValueError(f"{name}: {str(path)!r} is not an image PIL can read ({exc})") from None
    raise TypeError(f"{name} must be a PIL image or the path of an image file; got {type(image).__name__}")


def _load(source: str | Path, options: dict[str, Any]) -> tuple[Any, Any, str | None]:
    """``(model, processor, template)`` of a model conf name, a checkpoint folder or a Hub id."""
    from tokenreduce.core.presets import preset_names

    name = str(source)
    if not isinstance(source, Path) and name in preset_names("model"):
        return _load_conf(name, options)
    unknown = sorted(set(options) - set(_FOLDER_OPTIONS))
    if unknown:
        raise TokenReduceError(
            f"unexpected options {unknown} for the checkpoint {name!r}; allowed: {', '.join(_FOLDER_OPTIONS)} "
            f"(model conf names: {', '.join(preset_names('model'))})"
        )
    from tokenreduce.models import load_pretrained

    loaded = load_pretrained(source, prompt=None, **options)
    return loaded.model, loaded.processor, None


def _load_conf(name: str, options: dict[str, Any]) -> tuple[Any, Any, str | None]:
    from tokenreduce.core.presets import compose
    from tokenreduce.core.registry import get_registry
    from tokenreduce.models import ModelSettings, load_model

    raw = compose([f"model={name}"])
    unknown = sorted(set(options) - set(ModelSettings.model_fields))
    if unknown:
        raise TokenReduceError(
            f"unexpected options {unknown} for model conf {name!r}; allowed: {', '.join(ModelSettings.model_fields)}"
        )
    settings = {**raw["model"], **options}
    loaded = load_model(settings, name=name)
    if loaded.processor is None:
        raise TokenReduceError(
            f"model conf {name!r} (kind {loaded.kind}) has no processor: it runs on synthetic inputs only; "
            "use a tiny or pretrained model conf"
        )
    default = (raw.get("prompts") or {}).get(loaded.arch) or get_registry().spec_for(loaded.arch).default_prompt()
    return loaded.model, loaded.processor, loaded.prompt_template(default)


def _find_processor(model: Any) -> Any:
    """The processor saved beside a loaded model (its ``name_or_path`` folder), or a clear error."""
    from tokenreduce.core.registry import get_registry

    folder = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
    if folder and Path(folder).is_dir():
        spec = get_registry().spec_for(model.config.model_type, what="loading the processor")
        try:
            return spec.load_processor(folder, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - a folder without processor files fails in many ways
            raise TokenReduceError(f"processor: none given and none could be loaded from {folder}: {exc}") from None
    raise TokenReduceError(
        "processor: give the model's processor (pipeline(model, plan, processor=processor)); this model has no "
        "local checkpoint folder to load one from"
    )


def _default_template(model: Any, processor: Any) -> str:
    from tokenreduce.core.registry import get_registry
    from tokenreduce.models import chat_prompt_template

    if getattr(processor, "chat_template", None):
        return chat_prompt_template(processor, key="prompt")
    return get_registry().spec_for(model.config.model_type, what="the prompt template").default_prompt()


def _compile(model: Any, plan: Plan | Mapping[str, Any] | str | None) -> Plan | None:
    """The validated plan (checked against ``model``), or ``None``."""
    if plan is None:
        return None
    from tokenreduce.api import compile_for

    _, compiled = compile_for(model, plan)  # type: ignore[arg-type]
    return compiled.plan
