"""Loading the models the command line and the measurements run on, from a model conf
(:class:`ModelSettings`): ``tiny`` (built in code), ``config`` (random weights of a real
architecture, synthetic inputs) or ``pretrained`` (a local folder or a Hub checkpoint, with its
processor; :func:`load_pretrained` for Python callers).  Everything model-specific comes from
the architecture's :class:`~tokenreduce.core.arch.ArchSpec`.  Kinds, prompts, device, dtype,
attention and the errors for broken folders: ``docs/cli.md`` (Models and prompts).
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from tokenreduce.core.arch import ArchSpec
from tokenreduce.core.errors import TokenReduceError, UnsupportedModelError
from tokenreduce.core.registry import get_registry
from tokenreduce.measure.configs import (
    CLI_KEYS,
    PYTHON_KEYS,
    SourceKeys,
    _first,
    _hub_error,
    _local_folder,
    architectures,
    check_arch,
    check_weights,
    hf_config,
    pretrained_config,
    resolve_path,
    tiny_kwargs,
)

__all__ = [
    "CHAT_TEMPLATE",
    "ModelSettings",
    "LoadedModel",
    "SourceKeys",
    "load_model",
    "load_pretrained",
    "pretrained_config",
    "resolve_device",
    "resolve_dtype",
    "resolve_attn_implementation",
    "resolve_path",
    "synthetic_inputs",
    "format_settings_error",
]

log = logging.getLogger("tokenreduce")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: ``prompt: chat_template``: build the prompt template from the processor's chat template
CHAT_TEMPLATE = "chat_template"
#: the user turn of a chat-template prompt: the short-answer instruction of LLaVA-1.5's evaluation
#: prompts (also used by lmms-eval's VQA tasks)
DEFAULT_CHAT_USER = "{question}\nAnswer the question using a single word or phrase."
_QUESTION_SENTINEL = "\x00tokenreduce-question\x00"


class ModelSettings(BaseModel):
    """One model conf (``conf/model/<name>.yaml``); unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["tiny", "config", "pretrained"] = Field(
        description="tiny: a small random model built in code; config: random weights of a Hugging Face config "
        "(hf_config); pretrained: a checkpoint (path or repo)"
    )
    arch: str = Field(description="a registered architecture: its config.model_type (tokenreduce list adapter)")
    name: str | None = Field(default=None, description="shown in tables; defaults to the conf's file name")
    text_layers: int | None = Field(
        default=None, ge=1, description="decoder layers (fewer than the real model's: faster)"
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        default="auto", description="attention kernel; auto: flash_attention_2 on CUDA when installed, else sdpa"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="weights and compute dtype; auto: the checkpoint's on GPU, float32 on CPU"
    )
    device: str = Field(default="auto", description="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    path: str | None = Field(
        default=None, description="kind pretrained: a local folder, or pkg:<package>/<folder> (wins over repo)"
    )
    repo: str | None = Field(
        default=None, description="kind pretrained: a Hugging Face Hub repository id (org/name), used when path is null"
    )
    revision: str | None = Field(default=None, description="kind pretrained with repo: a branch, tag or commit")
    n_visual: int | None = Field(
        default=None, ge=1, description="visual tokens per sample for synthetic inputs and FLOPs"
    )
    n_text: int | None = Field(default=None, ge=1, description="text tokens per sample for synthetic inputs and FLOPs")
    hf_config: dict[str, Any] | None = Field(default=None, description="kind config: the Hugging Face config dict")
    image_size: int | None = Field(default=None, ge=1, description="kind tiny: vision input size in pixels")
    patch: int | None = Field(default=None, ge=1, description="kind tiny: patch size in pixels")
    seed: int = Field(default=0, description="weight seed (tiny, config)")
    prompt: str | None = Field(
        default=None,
        description="prompt template with the image placeholder and {question}, or 'chat_template' (the processor's "
        "chat template with one user turn: the image, then chat_user); defaults to prompts.<arch> of the root config",
    )
    chat_user: str = Field(
        default=DEFAULT_CHAT_USER, description="prompt 'chat_template': the text of the user turn, with {question}"
    )

    @field_validator("arch")
    @classmethod
    def _registered_arch(cls, value: str) -> str:
        return check_arch(value)

    @model_validator(mode="after")
    def _kind_fields(self) -> ModelSettings:
        if self.kind == "config" and not self.hf_config:
            raise ValueError("kind 'config' needs hf_config (the Hugging Face config dict of the architecture)")
        if self.kind == "pretrained" and not (self.path or self.repo):
            raise ValueError(
                "kind 'pretrained' needs path (a local folder with the model and its processor) or repo (a Hugging Face "
                "Hub id such as llava-hf/llava-1.5-7b-hf)"
            )
        if self.kind == "tiny" and (self.hf_config or self.path or self.repo):
            raise ValueError(
                "kind 'tiny' is built in code: remove hf_config, path and repo (or use kind config/pretrained)"
            )
        if self.prompt is not None and self.prompt != CHAT_TEMPLATE and "{question}" not in self.prompt:
            raise ValueError(f"prompt must contain {{question}} or be {CHAT_TEMPLATE!r}; got {self.prompt!r}")
        if "{question}" not in self.chat_user:
            raise ValueError(f"chat_user must contain {{question}}; got {self.chat_user!r}")
        return self


@dataclass
class LoadedModel:
    """A model ready to run, with what the measurements need to know about it.

    Attributes:
        model: the Hugging Face VLM in eval mode, on ``device``.
        processor: its processor, or ``None`` for kind ``config`` (use :meth:`synthetic_inputs`).
        arch: the architecture (its ``config.model_type``; :attr:`spec` describes it).
        name: display name.
        settings: the validated conf.
        device, dtype, attn_implementation: what was actually used (after the fallbacks).
        keys: how the caller names the settings (``model.prompt`` on the command line,
            ``prompt`` for :func:`load_pretrained`), for error messages.
    """

    model: Any
    processor: Any | None
    arch: str
    name: str
    settings: ModelSettings
    device: torch.device
    dtype: torch.dtype
    attn_implementation: str
    keys: SourceKeys = field(default=CLI_KEYS)

    @property
    def kind(self) -> str:
        return self.settings.kind

    @property
    def spec(self) -> ArchSpec:
        """The registered :class:`~tokenreduce.core.arch.ArchSpec` of :attr:`arch`."""
        return get_registry().spec_for(self.arch)

    @property
    def n_layers(self) -> int:
        """Decoder layers of the language model."""
        return int(_text_config(self.model.config).num_hidden_layers)

    def describe(self) -> dict[str, Any]:
        """Plain facts for results files."""
        n_params = sum(p.numel() for p in self.model.parameters())
        return {
            "name": self.name,
            "kind": self.kind,
            "arch": self.arch,
            "model_type": self.model.config.model_type,
            "decoder_layers": self.n_layers,
            "hidden_size": int(_text_config(self.model.config).hidden_size),
            "parameters": n_params,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "requested_dtype": self.settings.dtype,
            "attn_implementation": self.attn_implementation,
            "requested_attn_implementation": self.settings.attn_implementation,
            "weights": "random" if self.kind in ("tiny", "config") else "pretrained",
        }

    def prompt_template(self, default: str | None = None) -> str:
        """The prompt template (image placeholder + ``{question}``) this model is asked with.

        The conf's ``prompt``; for ``prompt: chat_template`` the processor's chat template rendered
        with one user turn (the image, then ``chat_user``) and the generation prompt; when the conf
        has no prompt, ``default`` (the CLI passes ``prompts.<arch>``).
        """
        prompt = self.settings.prompt
        if prompt == CHAT_TEMPLATE:
            return chat_prompt_template(self.processor, self.settings.chat_user, self.name, self.keys.prompt)
        if prompt:
            return prompt
        if default is None:
            raise TokenReduceError(f"model {self.name!r} has no prompt template (set {self.keys.prompt})")
        return default

    def to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Tensors of ``batch`` moved to the model's device; floating tensors to its dtype."""
        out = {}
        for key, value in batch.items():
            if isinstance(value, Tensor):
                value = value.to(self.device, dtype=self.dtype if value.is_floating_point() else None)
            out[key] = value
        return out

    def processor_inputs(self, prompts: list[str], images: list[Any]) -> dict[str, Any]:
        """Run the processor on B prompts and B PIL images (left padding); on the model's device.

        Returns the processor's tensors: ``input_ids`` ``[B, S]``, ``attention_mask`` ``[B, S]``,
        ``pixel_values`` and the architecture's extras (``image_sizes``, ``image_grid_thw``).
        """
        if self.processor is None:
            raise TokenReduceError(
                f"model {self.name!r} (kind {self.kind}) has no processor: it runs on synthetic inputs only "
                "(bench, flops); use a tiny or pretrained model for prompts and images"
            )
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts for {len(images)} images")
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"
        batch = self.processor(images=list(images), text=list(prompts), padding=True, return_tensors="pt")
        return self.to_device(dict(batch))

    def synthetic_inputs(
        self, batch_size: int = 1, n_visual: int | None = None, n_text: int | None = None, seed: int = 0
    ) -> dict[str, Any]:
        """Random inputs of the right shapes for this model (see :func:`synthetic_inputs`)."""
        n_visual = n_visual if n_visual is not None else self.settings.n_visual
        n_text = n_text if n_text is not None else (self.settings.n_text or 60)
        return self.to_device(synthetic_inputs(self.model.config, self.arch, batch_size, n_visual, n_text, seed))


def format_settings_error(exc, prefix: str, root: type[BaseModel]) -> str:
    """A pydantic error on a settings section as lines ``prefix.key: message (got value)``;
    unknown keys list the allowed ones (the same format as plan errors)."""
    from tokenreduce.core.plan import format_validation_error

    body = format_validation_error(exc, prefix=prefix, root=root).split("\n", 1)[1].replace(": Value error, ", ": ")
    return (f"invalid {prefix} settings:\n" if prefix else "invalid config:\n") + body


# -- resolution of device, dtype, attention, path ------------------------------------------------
def resolve_device(device: str, key: str = "model.device") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else as given (checked; ``key``
    names the setting in errors)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise TokenReduceError(f"{key}={device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TokenReduceError(f"{key}={device!r} but CUDA is not available; use {key}=cpu or auto")
    return dev


def resolve_dtype(
    dtype: str, device: torch.device, checkpoint_dtype: Any = None, key: str = "model.dtype"
) -> torch.dtype:
    """``auto`` -> float32 on CPU; on CUDA the checkpoint's half precision (``checkpoint_dtype``,
    the ``torch_dtype``/``dtype`` of its config) when it is float16 or bfloat16, else bfloat16.
    Half precision on a CPU becomes float32 (with a warning): bf16/fp16 matmuls are 5-600x
    slower than fp32 there."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        if isinstance(checkpoint_dtype, str):
            checkpoint_dtype = _DTYPES.get(checkpoint_dtype.replace("torch.", ""))
        return checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    resolved = _DTYPES[dtype]
    if device.type == "cpu" and resolved != torch.float32:
        log.warning("%s=%s on a CPU: using float32 instead (half precision is 5-600x slower there)", key, dtype)
        return torch.float32
    return resolved


def resolve_attn_implementation(requested: str, device: torch.device, key: str = "model.attn_implementation") -> str:
    """``flash_attention_2`` only with CUDA and the ``flash_attn`` package, when asked for or
    ``auto``; ``auto`` otherwise means ``sdpa``; ``sdpa`` and ``eager`` as given."""
    if requested not in ("auto", "flash_attention_2"):
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    if requested == "flash_attention_2":
        log.warning("%s=flash_attention_2 needs CUDA and the flash_attn package; using sdpa", key)
    return "sdpa"


# -- loading ----------------------------------------------------------------------------------
def _text_config(config):
    return getattr(config, "text_config", None) or config


def chat_prompt_template(
    processor: Any, user: str = DEFAULT_CHAT_USER, name: str = "model", key: str = "model.prompt"
) -> str:
    """A prompt template from ``processor``'s chat template: one user turn (an image, then the
    text ``user``, which holds ``{question}``) followed by the generation prompt (``key`` names
    the prompt setting in errors).

    Raises:
        TokenReduceError: the processor has no chat template.
    """
    if processor is None or not getattr(processor, "chat_template", None):
        raise TokenReduceError(
            f"model {name!r}: prompt 'chat_template' needs a processor with a chat template, and this one has none; "
            f"set {key} to a template with the image placeholder and {{question}}"
        )
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _QUESTION_SENTINEL}]}]
    rendered = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    if isinstance(rendered, list):  # some processors return one string per conversation
        rendered = rendered[0]
    if rendered.count(_QUESTION_SENTINEL) != 1:
        raise TokenReduceError(f"model {name!r}: its chat template did not render the user text exactly once")
    return rendered.replace(_QUESTION_SENTINEL, user)


def _arch_of(config, source: Any) -> str:
    """The registered architecture of a checkpoint config (its ``model_type``), or a clear error."""
    model_type = getattr(config, "model_type", None)
    registry = get_registry()
    if model_type in registry.names("architecture"):
        return model_type
    why = (
        "has a tokenreduce adapter but no registered architecture (ArchSpec)"
        if model_type and registry.adapter_for(model_type) is not None
        else "has no tokenreduce adapter"
    )
    raise UnsupportedModelError(
        f"{source}: model_type {model_type!r} {why}; supported model types: {', '.join(architectures())}"
    )


def load_pretrained(
    source: str | Path,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    attn_implementation: str = "auto",
    device: str = "auto",
    prompt: str | None = CHAT_TEMPLATE,
    name: str | None = None,
    keys: SourceKeys = PYTHON_KEYS,
) -> LoadedModel:
    """Load a real checkpoint with its processor: ``LoadedModel``, ready for ``tokenreduce.apply``.

    Args:
        source: a local folder, ``pkg:<package>/<folder>``, or a Hugging Face Hub id such as
            ``"llava-hf/llava-1.5-7b-hf"``, ``"llava-hf/llava-v1.6-vicuna-7b-hf"`` or
            ``"Qwen/Qwen2.5-VL-7B-Instruct"``.
        revision: hub branch, tag or commit.
        dtype: ``auto`` (float32 on CPU, the checkpoint's half precision on CUDA), ``float32``,
            ``bfloat16``, ``float16``.
        attn_implementation: ``auto`` (flash_attention_2 with CUDA and flash-attn, else sdpa),
            ``sdpa``, ``eager``, ``flash_attention_2``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        prompt: ``chat_template`` (default), a template with the image placeholder and
            ``{question}``, or ``None``.
        name: display name (default: ``source``).
        keys: how errors name these settings (default: the argument names; the lmms-eval plugin
            passes its ``model_args`` keys).

    Raises:
        UnsupportedModelError: the checkpoint's ``model_type`` has no registered architecture (lists
            the supported ones).
        TokenReduceError: a bad argument (named); the folder is missing or is no checkpoint (no or
            a corrupt ``config.json``, no weights, no processor files: one line naming the folder
            and what is missing); the hub is unreachable and the checkpoint is not cached.
    """
    from pydantic import ValidationError

    if not isinstance(source, (str, Path)):
        raise TokenReduceError(
            f"{keys.path} must be a folder or a Hugging Face Hub id (a str or Path); got {type(source).__name__}"
        )
    config, _ = pretrained_config(source, revision, keys=keys)
    arch = _arch_of(config, source)
    local = _local_folder(source, keys)
    try:
        settings = ModelSettings(
            kind="pretrained",
            arch=arch,
            name=name or str(source),
            path=str(local) if local is not None else None,
            repo=None if local is not None else str(source),
            revision=revision,
            dtype=dtype,
            attn_implementation=attn_implementation,
            device=device,
            prompt=prompt,
        )
    except ValidationError as exc:
        raise TokenReduceError(_argument_errors(exc, keys)) from None
    return load_model(settings, keys=keys, label=f"{keys.path}={str(source)!r}")


def _argument_errors(exc, keys: SourceKeys) -> str:
    """A pydantic error on the settings :func:`load_pretrained` builds, with the caller's keys."""
    parts = []
    for err in exc.errors():
        field_name = str(err["loc"][0]) if err["loc"] else "settings"
        key = getattr(keys, field_name, field_name)
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"{key}={err.get('input')!r}: {message}")
    return "; ".join(parts)


def load_model(
    model_cfg: Mapping[str, Any] | ModelSettings,
    name: str | None = None,
    *,
    keys: SourceKeys = CLI_KEYS,
    label: str | None = None,
) -> LoadedModel:
    """Build or load the model a conf describes (see the module docstring).

    Args:
        model_cfg: a model conf mapping (validated here) or :class:`ModelSettings`.
        name: display name when the conf has none (the CLI passes the conf's file name).
        keys: how errors name the settings (default: the command line's ``model.*`` keys).
        label: how errors name the checkpoint (default: ``<keys.path>=<path>``).

    Returns:
        a :class:`LoadedModel` in eval mode.
    """
    settings = model_cfg if isinstance(model_cfg, ModelSettings) else _validate(model_cfg)
    device = resolve_device(settings.device, keys.device)
    attn = resolve_attn_implementation(settings.attn_implementation, device, keys.attn_implementation)
    display = settings.name or name or settings.arch
    if settings.kind == "tiny":
        dtype = resolve_dtype(settings.dtype, device, key=keys.dtype)
        model, processor = _load_tiny(settings, attn, dtype)
        model = model.to(device)
    elif settings.kind == "config":
        dtype = resolve_dtype(settings.dtype, device, key=keys.dtype)
        model, processor = _load_config(settings, attn, dtype, device), None
    else:
        model, processor, dtype = _load_pretrained(settings, attn, device, keys, label)
    model.eval()
    return LoadedModel(model, processor, settings.arch, display, settings, device, dtype, attn, keys)


def _validate(model_cfg: Mapping[str, Any]) -> ModelSettings:
    from pydantic import ValidationError

    try:
        return ModelSettings.model_validate(dict(model_cfg))
    except ValidationError as exc:
        raise TokenReduceError(format_settings_error(exc, "model", ModelSettings)) from None


def _load_tiny(settings: ModelSettings, attn: str, dtype: torch.dtype):
    from tokenreduce.testing.tiny import build_tiny, make_processor

    try:
        kw = tiny_kwargs(settings.arch, settings.model_dump())
    except ValueError as exc:
        raise TokenReduceError(str(exc)) from None
    options = {k: v for k, v in kw.items() if k != "text_layers"}  # the processor must match the model
    model = build_tiny(settings.arch, attn_implementation=attn, dtype=dtype, seed=settings.seed, **kw)
    return model, make_processor(settings.arch, **options)


def _load_config(settings: ModelSettings, attn: str, dtype: torch.dtype, device: torch.device):
    config = hf_config(settings.model_dump())
    if config.model_type != settings.arch:
        raise TokenReduceError(
            f"model.hf_config has model_type {config.model_type!r} but model.arch is {settings.arch!r}"
        )
    cls = get_registry().spec_for(settings.arch).model_class()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(settings.seed)
        with torch.device(device):
            model = cls._from_config(config, attn_implementation=attn, dtype=dtype)
    return model


def _load_pretrained(
    settings: ModelSettings, attn: str, device: torch.device, keys: SourceKeys = CLI_KEYS, label: str | None = None
):
    if settings.text_layers is not None:
        raise TokenReduceError("model.text_layers cannot shorten a pretrained model; use kind config for fewer layers")
    given = settings.path or settings.repo
    label = label or f"{keys.path if settings.path else keys.repo}={given!r}"
    source = resolve_path(settings.path, keys.path) if settings.path else settings.repo
    config, source = pretrained_config(source, None if settings.path else settings.revision, keys=keys)
    arch = _arch_of(config, source)
    if arch != settings.arch:
        raise TokenReduceError(f"{source}: model_type {arch!r} does not match model.arch={settings.arch!r}")
    dtype = resolve_dtype(
        settings.dtype, device, getattr(config, "dtype", None) or getattr(config, "torch_dtype", None), keys.dtype
    )
    # a hub repository is in the local cache now (config.json came from it), or the hub is reachable
    hub = {} if settings.path else {"revision": settings.revision}
    local = {"local_files_only": True} if settings.path else {}
    if settings.path:
        check_weights(Path(source), label)
    spec = get_registry().spec_for(arch)
    # the processor first: its files are small, so a folder without them fails before the weights load
    from transformers import ProcessorMixin

    try:
        processor = spec.load_processor(source, **hub, **local)
        problem = None if isinstance(processor, ProcessorMixin) else f"the loader gave a {type(processor).__name__}"
    except OSError as exc:
        if not settings.path:  # a hub repository: not cached and the hub unreachable, gated, ...
            raise TokenReduceError(_hub_error(str(source), settings.revision, exc, keys)) from None
        processor, problem = None, _first(exc)
    except Exception as exc:  # noqa: BLE001 - any failure of a processor's files or its dependencies
        processor, problem = None, _first(exc)
    if problem is not None:
        raise TokenReduceError(
            f"{label}: could not load the processor (tokenizer and image processor files) from {source}: {problem}"
        )
    cls = spec.model_class()
    try:
        model = cls.from_pretrained(source, dtype=dtype, attn_implementation=attn, **hub, **local)
    except TokenReduceError:
        raise
    except OSError as exc:
        if settings.path:
            raise TokenReduceError(f"{label}: could not load the weights from {source}: {_first(exc)}") from None
        raise TokenReduceError(_hub_error(str(source), settings.revision, exc, keys)) from None
    except Exception as exc:  # noqa: BLE001 - corrupt or truncated weight files fail in many ways
        raise TokenReduceError(
            f"{label}: the weights in {source} are corrupt or incomplete ({type(exc).__name__}: {_first(exc)}); "
            "copy or download the checkpoint again"
        ) from None
    model = model.to(device)
    return model, processor, dtype


# -- synthetic inputs -------------------------------------------------------------------------
def _special_ids(config) -> set[int]:
    ids = set()
    for cfg in (config, _text_config(config)):
        for attr in (
            "image_token_id",
            "image_token_index",
            "video_token_id",
            "vision_start_token_id",
            "vision_end_token_id",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
        ):
            value = getattr(cfg, attr, None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
    return ids


def _text_ids(config, n: int, generator: torch.Generator) -> Tensor:
    """``[n]`` random ordinary token ids: below every special id at the end of the vocabulary and
    above the first ten (control tokens sit at the ends in all three architectures)."""
    vocab = int(_text_config(config).vocab_size)
    specials = _special_ids(config)
    high = min([vocab] + [i for i in specials if i >= 10])
    low = min(10, max(0, high - 1))
    ids = torch.randint(low, high, (n,), generator=generator)
    for s in specials:  # in case a special id sits inside the range
        ids[ids == s] = low if low != s else low + 1
    return ids


def _image_token_id(config) -> int:
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    raise TokenReduceError(f"{config.model_type} config has no image_token_id")


def synthetic_inputs(
    config, arch: str, batch_size: int, n_visual: int | None, n_text: int, seed: int = 0
) -> dict[str, Tensor]:
    """Random inputs of the right shapes for a VLM config: what a processor would produce for one
    image and ``n_text`` text tokens per sample, with random pixels and random ordinary text ids.

    Layout of each sample: ``[bos] + 5 text tokens + image tokens + the remaining text tokens``,
    the image run framed by the tokens the architecture writes around it (Qwen2.5-VL: vision
    start/end, counted as text).  No padding: every sample has the same length.

    The image comes from the architecture's :meth:`~tokenreduce.core.arch.ArchSpec.synthetic_image`
    (``n_visual`` is a wish the architecture may not allow; each spec's docstring says what it
    does with it).

    Returns:
        ``input_ids`` ``[B, S]`` long, ``attention_mask`` ``[B, S]`` long (all ones),
        ``pixel_values`` and the architecture's extras (``image_sizes``, ``image_grid_thw``),
        float32 on the CPU.
    """
    spec = get_registry().spec_for(arch, what="synthetic inputs")
    if batch_size < 1 or n_text < 1:
        raise ValueError(f"batch_size and n_text must be >= 1; got {batch_size}, {n_text}")
    g = torch.Generator().manual_seed(seed)
    image = spec.synthetic_image(config, batch_size, n_visual, g)
    before, after = list(image.before), list(image.after)
    bos = _text_config(config).bos_token_id if image.bos else None
    head = [int(bos)] if isinstance(bos, int) else []
    n_free = n_text - len(head) - len(before) - len(after)
    if n_free < 1:
        raise ValueError(f"n_text={n_text} is too small for the {arch} layout (needs at least {n_text - n_free + 1})")
    n_pre = min(5, n_free // 2)
    token = _image_token_id(config)
    rows = []
    for _ in range(batch_size):
        text = _text_ids(config, n_free, g).tolist()
        rows.append(head + text[:n_pre] + before + [token] * image.n_visual + after + text[n_pre:])
    input_ids = torch.tensor(rows, dtype=torch.long)
    extra = spec.token_inputs(config, input_ids)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **extra, **image.inputs}


def __getattr__(name: str) -> Any:
    if name == "ARCHS":  # deprecated (one release): the registry knows the architectures
        warnings.warn(
            "tokenreduce.models.ARCHS is deprecated; use tokenreduce.measure.configs.architectures()",
            DeprecationWarning,
            stacklevel=2,
        )
        return tuple(architectures())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
