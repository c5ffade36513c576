"""Prefill FLOPs (true and paper convention) and KV cache from a plan or a trace, and their
cross-check with ``FlopCounterMode``.  Conventions, formulas and checks: ``docs/measurement.md``.

* :mod:`.formulas`: per-layer formulas, decoder sizes, the vision side (asked of the
  architecture's spec);
* :mod:`.accounting`: :func:`account` and its result, :class:`Accounting` (the strategies'
  own costs come from their classes, :meth:`tokenreduce.core.strategy.Strategy.cost`);
* :mod:`.counter`: :func:`count_with_flop_counter` on the meta device.
"""

from tokenreduce.core.cost import Cost, StageCostInput

from .accounting import (
    KV_CONVENTION,
    PAPER_CONVENTION,
    PAPER_PROBE_BACKWARD_FACTOR,
    TRUE_CONVENTION,
    Accounting,
    StageCost,
    account,
    probe_rule,
)
from .counter import count_with_flop_counter
from .formulas import (
    GATED_DECODERS,
    TextDims,
    VisionCost,
    attention_row_flops,
    layer_flops_paper,
    layer_flops_true,
    text_dims,
    vision_flops,
)

__all__ = [
    "GATED_DECODERS",
    "KV_CONVENTION",
    "PAPER_CONVENTION",
    "PAPER_PROBE_BACKWARD_FACTOR",
    "TRUE_CONVENTION",
    "Accounting",
    "Cost",
    "StageCost",
    "StageCostInput",
    "TextDims",
    "VisionCost",
    "account",
    "attention_row_flops",
    "count_with_flop_counter",
    "layer_flops_paper",
    "layer_flops_true",
    "probe_rule",
    "text_dims",
    "vision_flops",
]
