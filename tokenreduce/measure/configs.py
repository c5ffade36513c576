"""Model configs without weights: ``conf/model/<name>.yaml`` -> ``transformers`` config objects.

A model YAML (Hydra config group ``model``) describes a model for tokenreduce.  The keys read
here (the model loader validates the rest)::

    kind: config          # tiny | config | pretrained
    arch: llava           # llava | llava_next | qwen2_5_vl
    text_layers: null     # optional: build with fewer decoder layers
    path: null            # a local folder for kind: pretrained
    n_visual: 576         # nominal visual tokens entering the LLM
    n_text: 60            # nominal text tokens of a prompt
    hf_config: {...}      # the full Hugging Face config dict (model_type, text_config, vision_config, ...)

``conf/model`` ships the real configs of LLaVA-1.5-7B, LLaVA-NeXT-7B (vicuna) and
Qwen2.5-VL-7B (``llava_1_5_7b``, ``llava_next_7b``, ``qwen2_5_vl_7b``): FLOPs and KV cache of
the real sizes can be accounted, and the models built on the ``meta`` device, with no download.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from tokenreduce.core.errors import PlanError
from tokenreduce.core.presets import compose, conf_dir, preset_names

#: ``arch`` values and the ``model_type`` of their Hugging Face config
ARCH_MODEL_TYPES = {"llava": "llava", "llava_next": "llava_next", "qwen2_5_vl": "qwen2_5_vl"}
KINDS = ("tiny", "config", "pretrained")


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
      (``text_layers``, ``image_size``, ``patch`` forwarded when present).

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
    if arch is not None and arch not in ARCH_MODEL_TYPES:
        raise ValueError(f"model.arch={arch!r} is not one of {', '.join(ARCH_MODEL_TYPES)}")
    text_layers = model_cfg.get("text_layers")
    if text_layers is not None and (isinstance(text_layers, bool) or not isinstance(text_layers, int) or text_layers < 1):
        raise ValueError(f"model.text_layers must be null or an integer >= 1; got {text_layers!r}")

    raw = model_cfg.get("hf_config")
    if raw is not None:
        if not isinstance(raw, Mapping) or "model_type" not in raw:
            raise ValueError("model.hf_config must be a mapping with a 'model_type' key (the Hugging Face config dict)")
        data = copy.deepcopy(dict(raw))
        model_type = data.pop("model_type")
        if arch is not None and ARCH_MODEL_TYPES[arch] != model_type:
            raise ValueError(
                f"model.arch={arch!r} does not match model.hf_config.model_type={model_type!r} "
                f"(arch {arch!r} needs model_type {ARCH_MODEL_TYPES[arch]!r})"
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
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"model.hf_config: transformers could not build a {model_type!r} config: {exc}") from None

    if kind == "pretrained":
        source = model_cfg.get("path") or model_cfg.get("repo")
        if not source:
            raise ValueError(
                "model.kind=pretrained needs model.path (a local folder with config.json), model.repo (a Hugging Face "
                "Hub id) or model.hf_config"
            )
        from tokenreduce.models import pretrained_config

        config, _ = pretrained_config(source, None if model_cfg.get("path") else model_cfg.get("revision"))
    elif kind == "tiny":
        if arch is None:
            raise ValueError(f"model.kind=tiny needs model.arch (one of {', '.join(ARCH_MODEL_TYPES)})")
        from tokenreduce.testing import tiny

        kw: dict[str, Any] = {}
        if text_layers is not None:
            kw["text_layers"] = text_layers
        if arch in ("llava", "llava_next"):
            kw.update({k: model_cfg[k] for k in ("image_size", "patch") if model_cfg.get(k) is not None})
        builder = {"llava": tiny.llava_config, "llava_next": tiny.llava_next_config, "qwen2_5_vl": tiny.qwen2_5_vl_config}
        return builder[arch](**kw)
    else:
        raise ValueError("model.hf_config is required for model.kind=config (the Hugging Face config dict)")
    if text_layers is not None:
        config.get_text_config().num_hidden_layers = text_layers
    return config


def real_config(name: str) -> PretrainedConfig:
    """The ``transformers`` config of ``conf/model/<name>.yaml`` (e.g. ``"llava_1_5_7b"``), no weights."""
    return hf_config(model_config(name))
