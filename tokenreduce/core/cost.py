"""What a strategy's cost model sees and returns, and the per-layer FLOP formulas it may use.

Each scorer and selector declares its own work at a stage in its class
(:meth:`~tokenreduce.core.strategy.Strategy.cost`); :func:`tokenreduce.measure.flops.account`
calls it once per stage that removes tokens.  Conventions (true FLOPs, paper convention):
``docs/measurement.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from .errors import PlanError

__all__ = [
    "Cost",
    "StageCostInput",
    "TextDims",
    "attention_row_flops",
    "layer_flops_paper",
    "layer_flops_true",
]


@dataclass(frozen=True)
class TextDims:
    """Sizes of a Llama-family decoder (read from a config by ``tokenreduce.measure.flops.text_dims``)."""

    model_type: str
    n_layers: int
    hidden: int  # d
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int  # m
    vocab: int
    mlp_matrices: int = 3

    @property
    def q_width(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.n_kv_heads * self.head_dim


def layer_flops_true(n: int, dims: TextDims) -> int:
    """True FLOPs (2 per multiply-add) of one decoder layer on ``n`` tokens."""
    d, q, kv, m = dims.hidden, dims.q_width, dims.kv_width, dims.intermediate
    projections = 2 * (n * d * q + 2 * n * d * kv + n * q * d)
    attention = 4 * n * n * q
    mlp = 2 * dims.mlp_matrices * n * d * m
    return projections + attention + mlp


def layer_flops_paper(n: int, hidden: int, intermediate: int) -> int:
    """The paper convention's per-layer formula ``4nd^2 + 2n^2d + 2ndm`` (multiply-adds)."""
    d, m = hidden, intermediate
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def key_flops(s: int, dims: TextDims, layer_offset: int) -> int:
    """True FLOPs of the keys of ``s`` tokens a signal reads at ``layer_offset`` from the cut:
    ``2*s*d*kv`` when they are recomputed, 0 for layer K-1 (``layer_offset=-1``), whose keys the
    signals read from the prefill's KV cache (``generate()``, or any forward with
    ``use_cache=True``; a forward without a cache recomputes them)."""
    return 0 if layer_offset == -1 else 2 * s * dims.hidden * dims.kv_width


def attention_row_flops(s: int, queries: int, dims: TextDims, layer_offset: int = 0) -> int:
    """True FLOPs of ``queries`` attention rows over ``s`` keys at one layer
    (:meth:`~tokenreduce.core.types.SignalSource.attention_rows`): keys (:func:`key_flops`),
    queries ``2*Q*d*q``, scores ``2*Q*s*q``."""
    d, q = dims.hidden, dims.q_width
    return key_flops(s, dims, layer_offset) + 2 * queries * d * q + 2 * queries * s * q


@dataclass(frozen=True)
class StageCostInput:
    """What a cost model sees for one component (scorer or selector) of one stage, one sample."""

    kind: str  # "scorer" | "selector"
    name: str  # the registered name the plan used
    settings: Any  # the component's validated settings (for a built-in: the component itself)
    layer: int  # cut layer K
    tokens_before: int  # S: text + visual tokens entering the stage
    visual_before: int
    visual_after: int
    tokens_at_previous_layer: int | None  # tokens entering layer K-1 (None when K = 0)
    visual_at_previous_layer: int | None
    n_text: int
    dims: TextDims
    probe_backward_factor: float  # paper convention only: a probe backward = this x its forward (0: the paper's rule)

    def tokens_at(self, layer_offset: int) -> tuple[int, int]:
        """``(tokens, visual tokens)`` of the hidden states a signal at ``layer_offset`` reads
        (0: entering the cut layer K; -1: entering layer K-1)."""
        if layer_offset == 0:
            return self.tokens_before, self.visual_before
        if self.tokens_at_previous_layer is None:
            raise PlanError(f"{self.kind} {self.name!r} at layer {self.layer} reads layer K-1 and needs K >= 1")
        return self.tokens_at_previous_layer, self.visual_at_previous_layer or 0


class Cost(NamedTuple):
    """A component's own work at one stage, for one sample.

    ``true`` / ``paper``: FLOPs in the two conventions; ``None`` when the work cannot be known
    from token counts alone (it is then listed in ``Accounting.uncounted`` with ``note``).
    ``note``: one line saying what was counted (or why not).
    """

    true: float | None
    paper: float | None
    note: str = ""

    @classmethod
    def not_counted(cls, reason: str) -> Cost:
        return cls(None, None, reason)

    @classmethod
    def zero(cls, name: str) -> Cost:
        """No matrix products (element-wise work is not counted in either convention)."""
        return cls(0, 0.0, f"{name}: no matrix products")
