"""Per-layer FLOP formulas, the decoder sizes of a config, and the vision side (asked of the
architecture's spec).  Conventions: ``docs/measurement.md``."""

from __future__ import annotations

from transformers import PretrainedConfig

from tokenreduce.core.arch import VisionCost
from tokenreduce.core.cost import TextDims, attention_row_flops, layer_flops_paper, layer_flops_true
from tokenreduce.core.errors import UnsupportedModelError
from tokenreduce.core.registry import get_registry

__all__ = [
    "GATED_DECODERS",
    "TextDims",
    "VisionCost",
    "attention_row_flops",
    "layer_flops_paper",
    "layer_flops_true",
    "text_dims",
    "vision_flops",
]

#: decoder model types whose layers are Llama-style (q/k/v/o + 3-matrix gated MLP)
GATED_DECODERS = frozenset({"llama", "qwen2", "qwen2_vl_text", "qwen2_5_vl_text", "mistral", "qwen3", "qwen3_vl_text"})

_TEXT_ONLY = "pass include_vision=False to count the language model only"


def text_dims(config: PretrainedConfig) -> TextDims:
    """The decoder sizes of a (vision-)language model config."""
    text = config.get_text_config()
    mt = getattr(text, "model_type", "") or ""
    if mt not in GATED_DECODERS:
        raise UnsupportedModelError(
            f"FLOPs accounting knows Llama-style decoders (model types {', '.join(sorted(GATED_DECODERS))}); "
            f"the text config has model_type {mt!r}"
        )
    heads = int(text.num_attention_heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return TextDims(
        model_type=mt,
        n_layers=int(text.num_hidden_layers),
        hidden=int(text.hidden_size),
        n_heads=heads,
        n_kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim),
        intermediate=int(text.intermediate_size),
        vocab=int(text.vocab_size),
    )


def vision_flops(
    config: PretrainedConfig,
    n_visual: int,
    *,
    vision_crops: int | None = None,
    vision_grid: tuple[int, int] | None = None,
) -> VisionCost:
    """True FLOPs of the vision tower and the projector for ``n_visual`` LLM visual tokens, from
    the spec of the config's architecture (:meth:`~tokenreduce.core.arch.ArchSpec.vision_flops`).

    Args:
        config: a config of a registered architecture.
        n_visual: visual tokens entering the LLM (before any reduction).
        vision_crops: tower forwards (base image + crops) where the architecture crops.
        vision_grid: ``(patch rows, patch columns)`` of the image where the grid varies.
    """
    if n_visual <= 0:
        return VisionCost(0, 0, {"images": 0})
    try:
        spec = get_registry().spec_for(config.model_type, what="vision FLOPs")
        return spec.vision_flops(config, n_visual, vision_crops=vision_crops, vision_grid=vision_grid)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"{exc} ({_TEXT_ONLY})") from None
