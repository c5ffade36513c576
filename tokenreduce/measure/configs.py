"""Model configs without weights: ``conf/model/<name>.yaml`` -> ``transformers`` config objects.

A model YAML (Hydra config group ``model``) describes a model for tokenreduce.  The keys read
here (the model loader validates the rest)::

    kind: config          # tiny | config | pretrained
    arch: llava           # a registered architecture (its config.model_type)
    text_layers: null     # optional: build with fewer decoder layers
    path: null            # a local folder for kind: pretrained
    n_visual: 576         # nominal visual tokens entering the LLM
    n_text: 60            # nominal text tokens of a prompt
    hf_config: {...}      # the full Hugging Face config dict (model_type, text_config, vision_config, ...)

``conf/model`` ships the real configs of LLaVA-1.5-7B, LLaVA-NeXT-7B (vicuna) and
Qwen2.5-VL-7B (``llava_1_5_7b``, ``llava_next_7b``, ``qwen2_5_vl_7b``): FLOPs and KV cache of
the real sizes can be accounted, and the models built on the ``meta`` device, with no download.

The configs of checkpoints (:func:`pretrained_config`: a local folder, ``pkg:...`` or a Hub id)
are read here too; :mod:`tokenreduce.models` loads the weights on top of these.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from tokenreduce.core.errors import PlanError, TokenReduceError, UnsupportedModelError
from tokenreduce.core.presets import compose, conf_dir, preset_names
from tokenreduce.core.registry import get_registry

KINDS = ("tiny", "config", "pretrained")
#: model conf keys that only some tiny models take (an architecture's ``ArchSpec.tiny_options``)
TINY_OPTION_KEYS = ("image_size", "patch")


def architectures() -> list[str]:
    """The registered architectures (``model.arch`` values = their ``config.model_type``), sorted."""
    return get_registry().names("architecture")


def check_arch(arch: str) -> str:
    """``arch`` if it is a registered architecture, else a ``ValueError`` listing them."""
    known = architectures()
    if arch not in known:
        raise ValueError(f"{arch!r} is not a registered architecture; registered architectures: {', '.join(known)}")
    return arch


def tiny_kwargs(arch: str, model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The keywords of the tiny ``arch`` model a model conf asks for: ``text_layers`` and the
    architecture's ``tiny_options`` that are set.

    Raises:
        ValueError: an option (``image_size``, ``patch``) this architecture's tiny model does not take.
    """
    spec = get_registry().spec_for(arch, what="a tiny model")
    kw: dict[str, Any] = {}
    if model_cfg.get("text_layers") is not None:
        kw["text_layers"] = model_cfg["text_layers"]
    for key in dict.fromkeys((*TINY_OPTION_KEYS, *spec.tiny_options)):
        if model_cfg.get(key) is None:
            continue
        if key not in spec.tiny_options:
            takes = ", ".join(f"model.{k}" for k in spec.tiny_options) or "none"
            raise ValueError(f"model.{key} does not apply to the tiny {arch!r} model (its options: {takes})")
        kw[key] = model_cfg[key]
    return kw


def __getattr__(name: str) -> Any:
    if name == "ARCH_MODEL_TYPES":  # deprecated (one release): the registry knows the architectures
        warnings.warn(
            "tokenreduce.measure.configs.ARCH_MODEL_TYPES is deprecated; use architectures()",
            DeprecationWarning,
            stacklevel=2,
        )
        return {arch: arch for arch in architectures()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def model_config(name: str) -> dict[str, Any]:
    """The composed ``conf/model/<name>.yaml`` as a plain dict (a fresh copy on every call).

    Raises:
        PlanError: unknown name (the message lists the known ones).
    """
    known = preset_names("model")
    if name not in known:
        raise PlanError(f"unknown model config {name!r}; known model configs (conf/model): {', '.join(known)}")
    return copy.deepcopy(_composed_model(name, str(conf_dir())))


@functools.lru_cache(maxsize=32)
def _composed_model(name: str, folder: str) -> dict[str, Any]:
    return compose([f"model={name}"])["model"]  # Hydra composition takes a few hundred ms: once per name


def hf_config(model_cfg: Mapping[str, Any]) -> PretrainedConfig:
    """Build the ``transformers`` config object described by a model YAML mapping.

    * ``hf_config`` given: ``AutoConfig.for_model(hf_config["model_type"], **rest)``;
    * else ``kind: pretrained`` with ``path``: ``AutoConfig.from_pretrained(path)`` (local files only);
    * else ``kind: tiny``: the tiny test config of ``tokenreduce.testing.tiny`` for ``arch``
      (``text_layers`` and the architecture's tiny options, e.g. ``image_size``, forwarded).

    ``text_layers`` (when not null) sets the decoder depth of the result.

    Raises:
        ValueError: a missing or malformed key (the message names it and what is allowed).
    """
    if not isinstance(model_cfg, Mapping):
        raise ValueError(f"model config must be a mapping; got {type(model_cfg).__name__}")
    kind = model_cfg.get("kind", "config")
    if kind not in KINDS:
        raise ValueError(f"model.kind={kind!r} is not one of {', '.join(KINDS)}")
    arch = model_cfg.get("arch")
    if arch is not None:
        try:
            check_arch(arch)
        except ValueError as exc:
            raise ValueError(f"model.arch: {exc}") from None
    text_layers = model_cfg.get("text_layers")
    if text_layers is not None and (
        isinstance(text_layers, bool) or not isinstance(text_layers, int) or text_layers < 1
    ):
        raise ValueError(f"model.text_layers must be null or an integer >= 1; got {text_layers!r}")

    raw = model_cfg.get("hf_config")
    if raw is not None:
        if not isinstance(raw, Mapping) or "model_type" not in raw:
            raise ValueError("model.hf_config must be a mapping with a 'model_type' key (the Hugging Face config dict)")
        data = copy.deepcopy(dict(raw))
        model_type = data.pop("model_type")
        if arch is not None and arch != model_type:
            raise ValueError(
                f"model.arch={arch!r} does not match model.hf_config.model_type={model_type!r} "
                "(model.arch is the model_type of the architecture)"
            )
        if text_layers is not None:
            text = data.get("text_config")
            if isinstance(text, Mapping):
                text = dict(text)
                text["num_hidden_layers"] = text_layers
                text.pop("layer_types", None)  # recomputed for the new depth
                data["text_config"] = text
            else:
                data["num_hidden_layers"] = text_layers
                data.pop("layer_types", None)
        try:
            return AutoConfig.for_model(model_type, **data)
        except Exception as exc:  # noqa: BLE001 - transformers' own validation errors are of many types
            raise ValueError(
                f"model.hf_config: transformers could not build a {model_type!r} config: {_first(exc)}"
            ) from None

    if kind == "pretrained":
        source = model_cfg.get("path") or model_cfg.get("repo")
        if not source:
            raise ValueError(
                "model.kind=pretrained needs model.path (a local folder with config.json), model.repo (a Hugging Face "
                "Hub id) or model.hf_config"
            )
        config, _ = pretrained_config(source, None if model_cfg.get("path") else model_cfg.get("revision"))
    elif kind == "tiny":
        if arch is None:
            raise ValueError(f"model.kind=tiny needs model.arch (one of {', '.join(architectures())})")
        from tokenreduce.testing import tiny

        return tiny.tiny_config(arch, **tiny_kwargs(arch, model_cfg))
    else:
        raise ValueError("model.hf_config is required for model.kind=config (the Hugging Face config dict)")
    if text_layers is not None:
        config.get_text_config().num_hidden_layers = text_layers
    return config


def real_config(name: str) -> PretrainedConfig:
    """The ``transformers`` config of ``conf/model/<name>.yaml`` (e.g. ``"llava_1_5_7b"``), no weights."""
    return hf_config(model_config(name))


# -- checkpoints ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceKeys:
    """How a caller names the settings of a checkpoint, so that an error names the caller's own
    key: the command line's ``model.*`` keys (:data:`CLI_KEYS`, the default), the arguments of
    :func:`tokenreduce.models.load_pretrained` (:data:`PYTHON_KEYS`) or lmms-eval's ``model_args``.

    ``use_folder`` says how to point at a local folder (shown in the hub's offline message).
    """

    path: str = "model.path"
    repo: str = "model.repo"
    revision: str = "model.revision"
    device: str = "model.device"
    dtype: str = "model.dtype"
    attn_implementation: str = "model.attn_implementation"
    prompt: str = "model.prompt"
    use_folder: str = "model.path=DIR on the command line"


#: the command line's model conf keys
CLI_KEYS = SourceKeys()
#: the arguments of :func:`tokenreduce.models.load_pretrained`
PYTHON_KEYS = SourceKeys(
    path="source",
    repo="source",
    revision="revision",
    device="device",
    dtype="dtype",
    attn_implementation="attn_implementation",
    prompt="prompt",
    use_folder="load_pretrained('DIR') in Python",
)
#: the files of a checkpoint's weights that ``from_pretrained`` reads (any one of them)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")


def resolve_path(path: str, key: str = "model.path") -> Path:
    """A model folder: ``pkg:<package>/<sub/folder>`` inside an installed package, else a local
    path (``~`` expanded; relative to the working directory).  ``key`` names the setting in errors.

    Raises:
        TokenReduceError: the package is not installed; no such folder; a file instead of a folder.
    """
    if path.startswith("pkg:"):
        package, _, sub = path[4:].partition("/")
        try:
            root = importlib.resources.files(package)
        except (ModuleNotFoundError, TypeError):
            raise TokenReduceError(f"{key}={path!r}: package {package!r} is not installed") from None
        folder = Path(str(root.joinpath(sub)))
    else:
        folder = Path(path).expanduser()
    if folder.is_file():
        raise TokenReduceError(
            f"{key}={path!r} is a file ({folder.resolve()}); give the checkpoint's folder (with config.json, the "
            "weights and the processor files)"
        )
    if not folder.is_dir():
        raise TokenReduceError(f"{key}={path!r}: no such folder ({folder.resolve()})")
    return folder


def pretrained_config(source: str | Path, revision: str | None = None, *, keys: SourceKeys = CLI_KEYS):
    """The ``transformers`` config of a checkpoint (a local folder, ``pkg:...`` or a Hub id),
    with the hub errors turned into messages that say what to do.

    A local folder (or ``pkg:``) is read with ``local_files_only``, after checking that its
    ``config.json`` is there, is valid JSON and names a ``model_type`` that transformers knows
    (:func:`read_local_config`); anything else is treated as a Hub repository id and resolved
    through the Hugging Face cache (downloading only ``config.json`` when the hub is reachable).
    ``keys`` names the caller's settings in the errors.

    Returns:
        ``(config, source)``: the config and the folder (a ``Path``) or the repository id.

    Raises:
        TokenReduceError: no such folder, or a folder that is no checkpoint (no or a corrupt
            ``config.json``, no ``model_type``); the hub is unreachable (offline) and the
            repository is not cached; the repository does not exist or needs a login.
        UnsupportedModelError: a ``model_type`` that transformers does not know.
    """
    from transformers import AutoConfig

    local = _local_folder(source, keys)
    if local is not None:
        return read_local_config(local, f"{keys.path}={str(source)!r}"), local
    repo = str(source)
    try:
        return AutoConfig.from_pretrained(repo, revision=revision), repo
    except OSError as exc:
        raise TokenReduceError(_hub_error(repo, revision, exc, keys)) from None
    except (ValueError, KeyError, TypeError) as exc:  # a config.json in the cache that transformers cannot read
        raise TokenReduceError(
            f"{keys.repo}={repo!r}: transformers could not read its config.json: {_first(exc)}"
        ) from None


def read_local_config(folder: Path, label: str) -> PretrainedConfig:
    """The config of the checkpoint folder ``folder``, with one-line errors (``label`` first) for
    a folder that is no checkpoint: no ``config.json``, a corrupt one, no ``model_type``, a
    ``model_type`` that transformers does not know."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    file = folder / "config.json"
    if not file.is_file():
        raise TokenReduceError(
            f"{label}: the folder {folder} has no config.json ({_contents(folder)}), so it is no Hugging Face "
            "checkpoint; a checkpoint folder holds config.json, the weights (*.safetensors) and the processor files "
            "(save_pretrained() of the model and its processor, or `hf download <repo> --local-dir DIR`)"
        )
    try:
        data = json.loads(file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" at line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
        raise TokenReduceError(
            f"{label}: {file} is not valid JSON ({reason}{where}); the checkpoint is corrupt or incomplete: copy or "
            "download its config.json again"
        ) from None
    if not isinstance(data, dict):
        raise TokenReduceError(f"{label}: {file} holds a JSON {type(data).__name__}, not an object (a model config)")
    model_type = data.get("model_type")
    supported = ", ".join(architectures())
    if not isinstance(model_type, str) or not model_type:
        raise TokenReduceError(
            f"{label}: {file} has no model_type (the architecture; supported model types: {supported}), so it is no "
            "transformers model config"
        )
    if model_type not in CONFIG_MAPPING:
        raise UnsupportedModelError(
            f"{label}: {file} has model_type {model_type!r}, which transformers does not know; supported model "
            f"types: {supported}"
        )
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to build the config from a present, parsed file
        raise TokenReduceError(f"{label}: transformers could not read {file}: {_first(exc)}") from None


def check_weights(folder: Path, label: str) -> None:
    """A one-line error (``label`` first) when the checkpoint folder ``folder`` holds no weight file."""
    if not any(p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) for p in folder.iterdir()):
        raise TokenReduceError(
            f"{label}: the folder {folder} has a config.json but no weights (no *.safetensors or pytorch_model.bin; "
            f"{_contents(folder)}); copy or download the checkpoint again"
        )


def _contents(folder: Path, limit: int = 6) -> str:
    """``"it is empty"`` or the first names in ``folder``."""
    try:
        names = sorted(p.name for p in folder.iterdir())
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    if not names:
        return "it is empty"
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return f"it holds {shown}"


def _first(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (lines joined, cut at ``limit`` characters; its type when
    it has none)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if not text:
        return type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _local_folder(source: str | Path, keys: SourceKeys = CLI_KEYS) -> Path | None:
    """``source`` as a local folder (``pkg:`` resolved), or ``None`` when it is a Hub id."""
    text = str(source)
    if isinstance(source, Path) or text.startswith(("pkg:", "/", ".", "~")) or Path(text).expanduser().exists():
        return resolve_path(text, keys.path)
    if text.count("/") > 1 or not text.strip("/") or not text.strip():
        raise TokenReduceError(
            f"{keys.path}={text!r} is neither a local folder nor a Hugging Face Hub id (org/name); models load from "
            "one of the two"
        )
    return None


def _hub_error(repo: str, revision: str | None, exc: OSError, keys: SourceKeys = CLI_KEYS) -> str:
    """A clear message for a failed hub lookup of ``repo`` (offline, unknown, gated)."""
    from huggingface_hub import constants

    message = str(exc)
    at = f" at revision {revision!r}" if revision else ""
    lowered = message.lower()
    if constants.HF_HUB_OFFLINE or "couldn't connect" in lowered or "offline" in lowered or "connection" in lowered:
        return (
            f"cannot load {repo!r}{at}: the Hugging Face Hub is unreachable (offline"
            f"{', HF_HUB_OFFLINE is set' if constants.HF_HUB_OFFLINE else ''}) and the checkpoint is not in the local "
            f"cache ({constants.HF_HUB_CACHE}). Download it where the hub is reachable (`hf download {repo} "
            f"--local-dir DIR`), copy DIR here and point at it with {keys.use_folder}; or set HF_HOME to a cache "
            "that holds it."
        )
    first = message.splitlines()[0] if message else repr(exc)
    return (
        f"cannot load {keys.repo}={repo!r}{at} from the Hugging Face Hub ({repo!r} is no local folder either): {first}"
    )
