"""The cross-check of the closed forms: ``FlopCounterMode`` on a model built on the ``meta``
device (``docs/measurement.md``, "How it is checked")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from transformers import PretrainedConfig

from tokenreduce.core.errors import UnsupportedModelError
from tokenreduce.core.registry import get_registry

from .formulas import text_dims, vision_flops

__all__ = ["count_with_flop_counter"]


def count_with_flop_counter(
    config: PretrainedConfig,
    per_layer_tokens: Sequence[int],
    *,
    n_visual: int | None = None,
    lm_head_positions: int = 1,
    include_vision: bool = True,
    vision_crops: int | None = None,
    vision_grid: tuple[int, int] | None = None,
) -> dict[str, int]:
    """Count true FLOPs with ``torch.utils.flop_counter.FlopCounterMode`` on the ``meta`` device.

    Builds the model from ``config`` on ``meta`` (no memory, no weights) and calls its parts
    directly with meta tensors (batch 1): decoder layer ``i`` on ``per_layer_tokens[i]`` tokens
    (causal sdpa, no mask), the LM head on ``lm_head_positions`` positions, and, with
    ``include_vision``, the vision tower and projector as the architecture's spec runs them
    (:meth:`~tokenreduce.core.arch.ArchSpec.count_vision_flops`).

    Returns ``{"decoder_layers", "lm_head", "vision_tower", "projector"}`` FLOPs.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForImageTextToText

    dims = text_dims(config)
    if len(per_layer_tokens) != dims.n_layers:
        raise ValueError(f"per_layer_tokens has {len(per_layer_tokens)} entries; the config has {dims.n_layers} layers")
    try:
        spec = get_registry().spec_for(config.model_type, what="the meta-device vision FLOP count")
    except UnsupportedModelError:
        spec = None  # the decoder and the LM head can still be counted
    meta = torch.device("meta")
    with meta:
        if spec is not None:
            model = spec.model_class()._from_config(config)
        else:
            model = AutoModelForImageTextToText.from_config(config)
    lm = model.model.language_model
    out: dict[str, int] = {}

    def counted(fn: Callable[[], Any]) -> int:
        with FlopCounterMode(display=False) as counter:
            with torch.no_grad():
                fn()
        return int(counter.get_total_flops())

    total = 0
    for layer, n in zip(lm.layers, per_layer_tokens):
        h = torch.empty(1, n, dims.hidden, device=meta)
        cos = torch.empty(1, n, dims.head_dim, device=meta)
        pos = torch.arange(n, device=meta).unsqueeze(0)
        total += counted(lambda: layer(h, attention_mask=None, position_ids=pos, position_embeddings=(cos, cos)))  # noqa: B023
    out["decoder_layers"] = total
    h_last = torch.empty(1, lm_head_positions, dims.hidden, device=meta)
    out["lm_head"] = counted(lambda: model.lm_head(h_last))
    out["vision_tower"] = out["projector"] = 0
    if include_vision and n_visual:
        cost = vision_flops(config, n_visual, vision_crops=vision_crops, vision_grid=vision_grid)
        assert spec is not None  # vision_flops found it
        out["vision_tower"], out["projector"] = spec.count_vision_flops(model, config, cost, counted)
    return out
