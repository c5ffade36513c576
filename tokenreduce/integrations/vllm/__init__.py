"""tokenreduce on vLLM: a general plugin (entry point ``vllm.general_plugins``, extra ``.[vllm]``)
registering ``TokenReduceLlavaForConditionalGeneration`` and
``TokenReduceQwen2_5_VLForConditionalGeneration``, vLLM's LLaVA-1.5 and Qwen2.5-VL running a plan's
encoder-side stage inside ``embed_multimodal`` (``docs/vllm.md``).

Only encoder-side plans run there (one stage before decoder layer 0, reading vision-tower signals
or the visual embeddings: VisionZip, DivPrune, HoloV, SCOPE, uniform, random, norm/topk, PIO w/ VE's
encoder selector; on Qwen2.5-VL, whose tower has no CLS token, the CLS-attention methods in their
received-attention forms, as on transformers); a plan with a stage inside the decoder is refused
with the stages named (:func:`tokenreduce.core.static_budget.encoder_stage`): it runs on transformers.

Use::

    from vllm import LLM
    from tokenreduce.integrations.vllm import engine_overrides

    llm = LLM(model=path, hf_overrides=engine_overrides(path, "ref_visionzip_11"))
    llm.generate({"prompt": ..., "multi_modal_data": {"image": img},
                  "mm_processor_kwargs": {"tokenreduce_plan": "ref_divprune_22"}})   # per request
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenreduce.core.registry import get_registry

from .encoder import PLAN_KEY, compile_encoder_plan, plan_json

__all__ = ["ARCHITECTURES", "PLAN_KEY", "engine_overrides", "register"]

#: vLLM architecture name -> the class registered for it (module:Class)
ARCHITECTURES = {
    "TokenReduceLlavaForConditionalGeneration": "tokenreduce.integrations.vllm.llava:TokenReduceLlavaForConditionalGeneration",
    "TokenReduceQwen2_5_VLForConditionalGeneration": (
        "tokenreduce.integrations.vllm.qwen2_5_vl:TokenReduceQwen2_5_VLForConditionalGeneration"
    ),
}
_BASE_ARCH = {
    "llava": "TokenReduceLlavaForConditionalGeneration",
    "qwen2_5_vl": "TokenReduceQwen2_5_VLForConditionalGeneration",
}


def _load_config(model: str | Path | dict) -> dict:
    if isinstance(model, dict):
        return model
    path = Path(model)
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    from transformers import AutoConfig  # a hub id: the config as transformers reads it

    return AutoConfig.from_pretrained(str(model)).to_dict()


def engine_overrides(model: str | Path | dict, plan: Any = None) -> dict[str, Any]:
    """The ``hf_overrides`` that run ``plan`` (a preset name, a mapping, a :class:`~tokenreduce.Plan`,
    or None for every visual token) on ``model`` (a checkpoint folder, hub id, or its config as a
    mapping): the reduced architecture, the plan (validated here, against the model's
    transformers adapter), and for LLaVA M-RoPE with every frequency on its first axis (plain
    RoPE on that axis; the layout the ``keep`` position policy needs; Qwen2.5-VL has its own).

    Raises :class:`~tokenreduce.core.errors.PlanError` for an invalid plan and ``ValueError`` for a
    model type without a reduced class."""
    config = _load_config(model)
    model_type = config.get("model_type")
    if model_type not in _BASE_ARCH:
        raise ValueError(
            f"model_type {model_type!r} has no reduced vLLM class; supported: {', '.join(sorted(_BASE_ARCH))}"
        )
    text = config.get("text_config") or config
    spec = plan_json(plan)
    overrides: dict[str, Any] = {
        "architectures": [_BASE_ARCH[model_type]],
        PLAN_KEY: json.loads(spec) if spec else None,
    }
    adapter = get_registry().adapter_for(model_type)
    assert adapter is not None  # every model type with a reduced class has a transformers adapter
    compile_encoder_plan(spec, int(text["num_hidden_layers"]), adapter.cls)  # refuse what vLLM cannot run, here
    rope = dict(text.get("rope_parameters") or {"rope_type": "default", "rope_theta": text.get("rope_theta", 10000.0)})
    if "mrope_section" in rope:  # M-RoPE of its own (Qwen2.5-VL): the `keep` layout needs nothing more
        return overrides
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    rope["mrope_section"] = [head_dim // 2, 0, 0]
    rope.setdefault("mrope_interleaved", False)
    return {**overrides, "text_config": {"rope_parameters": rope}}


def register() -> None:
    """vLLM's ``general_plugins`` entry point: register the reduced model classes and turn on
    vLLM's recomputation of multimodal positions for them."""
    from vllm import ModelRegistry

    for arch, target in ARCHITECTURES.items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, target)
    _enable_position_recompute()


def _enable_position_recompute() -> None:
    """vLLM recomputes the positions of pruned multimodal tokens only while its video pruning (EVS)
    is configured, and its CPU runner never; the reduced classes need it for every request.  The
    runners' ``load_model`` is wrapped once to turn it on for a model that asks
    (``tokenreduce_recomputes_positions``); other models are untouched."""
    runners = []
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        runners.append(GPUModelRunner)
    except ImportError:  # pragma: no cover - a build without the GPU runner
        pass
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        runners.append(CPUModelRunner)
    except ImportError:  # pragma: no cover - a build without the CPU runner
        pass
    for cls in runners:
        load = cls.__dict__.get("load_model")
        if load is None or getattr(load, "_tokenreduce", False):
            continue

        def load_model(self, *args, _load=load, **kwargs):
            _load(self, *args, **kwargs)
            model = self.get_model()
            if getattr(model, "tokenreduce_recomputes_positions", False):
                self.is_multimodal_pruning_enabled = True

        load_model._tokenreduce = True  # type: ignore[attr-defined]
        cls.load_model = load_model
