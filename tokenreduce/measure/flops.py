"""Prefill FLOPs and KV cache from a plan (or a trace) and a model config, in two conventions.

``account(config, plan, n_visual, n_text)`` turns the plan's budget arithmetic
(:meth:`~tokenreduce.core.plan.Plan.visual_per_layer`) or a :class:`~tokenreduce.core.types.Trace`
of a real run into per-layer token counts and reports, for one sample's prefill:

**True FLOPs** (``flops_true``): 2 FLOPs per multiply-add of every matrix product the Hugging
Face model runs, the convention of ``torch.utils.flop_counter.FlopCounterMode``.  Per decoder
layer with ``n`` input tokens (hidden ``d``, query width ``q = H * head_dim``, key/value width
``kv = H_kv * head_dim``, MLP width ``m``)::

    2 * (n*d*q + 2*n*d*kv + n*q*d)      q, k, v, o projections (exact under GQA)
    + 4 * n^2 * q                        Q K^T and A V over the full n x n square
    + 2 * 3 * n*d*m                      SwiGLU MLP (gate, up, down)

which is ``2*(4nd^2 + 2n^2d + 3ndm)`` for multi-head attention.  Added: the LM head at the
positions whose logits are computed (``generate()`` passes ``logits_to_keep=1``: the last one,
``2*d*V``), the vision tower and the projector (below), and the scorers' own work.
Element-wise work (norms, activations, softmax, RoPE, residuals) and bias additions are not
counted, as ``FlopCounterMode`` does not count them; causal masking does not halve the
attention term (``FlopCounterMode`` counts the full square too).

**Paper convention** (``flops_paper``): the FastV-style per-layer formula PIO-FVLM's profiler
uses (arXiv 2602.04657; ``pio-spec.md`` §11)::

    f(n) = 4*n*d^2 + 2*n^2*d + 2*n*d*m

summed over the decoder layers with ``n`` = the **visual** tokens entering each layer (text,
vision tower, projector and LM head excluded).  ``f`` counts multiply-adds of a layer with
multi-head attention and a two-matrix MLP; it is applied as stated also to grouped-query models
(Qwen2.5-VL) and SwiGLU MLPs.  It reproduces the paper's anchors: LLaVA-1.5-7B 32 f(576) =
2.986 T ("2.98"), LLaVA-NeXT-7B 32 f(2880) = 16.67 T.

Vision side (true convention only):

* CLIP towers (LLaVA-1.5, LLaVA-NeXT): the patch convolution ``2*P*(3*p^2)*D`` plus every
  encoder layer ``2*(4*t*D^2 + 2*t^2*D + 2*t*D*M)`` with ``t = P + 1`` tokens (CLS).  Hugging
  Face runs **all** ``num_hidden_layers`` layers (``output_hidden_states``) even though LLaVA
  reads layer -2, so all are counted.  LLaVA-NeXT runs the tower on the base image and on every
  crop (``vision_crops``, default ``round(n_visual / P)``: 5 for the nominal 2880).
  Projector: ``2*P*(D_in*d + d*d)`` per crop (CLS dropped by the "default" strategy).
* Qwen2.5-VL: the Conv3d patch embedding ``2*P*(3*T*p^2)*D``, 32 blocks of
  ``2*(3*P*D^2 + P*D^2 + 3*P*D*M) + 4*D*sum(len_w^2)`` where the attention runs per window
  (``window_size`` 112 px = 4x4 merged tokens = 64 patches; remainder windows at the grid edge)
  except in ``fullatt_block_indexes`` (one window = the whole image), then the 2x2 merger
  ``2*(P/4)*((4D)^2 + 4D*d)``.  ``P`` = patches, from ``vision_grid`` (patch rows, patch
  columns) or, by default, the most square factorisation of ``n_visual`` merged tokens.

The strategies' own work, per stage that removes tokens (a stage keeping everything runs
neither its scorer nor its selector).  Scorers (``scorer_flops_true`` / ``scorer_flops_paper``):

* ``pio`` (gradient probe, ``tokenreduce.strategies.pio``), ``S`` = tokens entering the stage,
  ``R`` = loss rows (``min(loss_positions, n_text - 1)``; assumes that many text tokens follow
  the image):

  - true, ``probe: fast``: forward = k, v projections on ``S`` + q, o, MLP and LM head on ``R``
    rows + ``4*R*S*q`` attention; backward to the hidden states only (``autograd.grad`` with
    respect to ``P``: no weight gradients) = the same products once more, the two attention
    products twice (both operands depend on ``P``);
  - true, ``probe: exact``: the full layer on ``S`` plus the LM head on ``R``, backward = the
    linear products once more and the attention products twice (math-path backward; fused
    kernels also recompute ``Q K^T``);
  - paper: the profiler's ``f(N_before) + gamma * f(N_before)`` with ``N_before`` the visual
    tokens entering the stage and ``gamma = probe_backward_factor`` (default 2, the profiler's
    ``backward_gamma``: "backward = 2x forward"), whatever the probe mode.  Forward only
    (``probe_backward_factor=0``) gives 0.442 T for ``pio_64`` on LLaVA-1.5, the README's "0.45".

* ``fastv`` / ``pdrop`` (one attention row recomputed at layer K-1 / K, or at the layer their
  ``layer_offset`` names,
  ``SignalSource.attention_rows``): true = keys of the ``S`` tokens that layer reads
  (``2*S*d*kv``), the last token's query (``2*d*q``) and its scores (``2*S*q``); paper =
  ``N*d^2 + N*d`` (keys of the ``N`` visual tokens and one query row's scores against them,
  multiply-adds under the MHA formula).
* ``norm``: element-wise only, 0.

Selectors (``selector_flops_true`` / ``selector_flops_paper``): ``topk``, ``random``,
``uniform``: 0; ``dart``: the keys of layer K-1 (K with ``layer_offset=0``; ``2*S*d*kv``; its cosine similarities are
element-wise and not counted, as ``FlopCounterMode`` does not count them); ``divprune``: the
``N x N`` similarity product ``2*N^2*d``.  Data-dependent work is not counted and is listed in
``Accounting.uncounted`` with the reason: ``nms`` (the similarities of the candidates it
examines, about ``E*(k+s)*d`` multiply-adds, ``pio-spec`` §6: < 0.5 GFLOPs per LLaVA-1.5
stage, under 0.05% of a prefill), ``sparsevlm`` (rater rows, clustering).  A component without
a cost model is listed there too; :func:`register_cost` adds one.

KV cache: ``sum_l 2 * n_l * kv * kv_dtype_bytes`` with ``n_l`` = text + visual tokens entering
layer ``l`` (:mod:`tokenreduce.measure.kv`).

:func:`count_with_flop_counter` counts the same quantities with ``FlopCounterMode`` on a model
built on the ``meta`` device (design.md §6): the decoder layers, the LM head, the vision tower
and the projector are called directly with meta tensors (the full VLM forward does not run on
meta).  The tests require agreement within 1e-3 (it is exact).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from transformers import PretrainedConfig

from tokenreduce.core.errors import PlanError, UnsupportedModelError
from tokenreduce.core.plan import CompiledPlan, Plan, build_plan
from tokenreduce.core.types import Trace

from .kv import kv_bytes as _kv_bytes

TRUE_CONVENTION = (
    "true FLOPs: 2 per multiply-add of every matrix product of the prefill (FlopCounterMode's "
    "convention): decoder layers on text + visual tokens (q,k,v,o exact under GQA, full n x n attention, "
    "3-matrix SwiGLU MLP) + LM head at the kept logit positions + vision tower + projector + the strategies' "
    "own work (scorers, selectors); element-wise work not counted"
)
PAPER_CONVENTION = (
    "paper convention (PIO-FVLM / FastV): sum over decoder layers of 4*n*d^2 + 2*n^2*d + 2*n*d*m with "
    "n = visual tokens entering the layer (multiply-adds, MHA and 2-matrix MLP formula, text, vision tower "
    "and LM head excluded) + the strategies' overhead in the same formula"
)
KV_CONVENTION = "bytes of K and V over all decoder layers after prefill: sum_l 2 * n_l * H_kv * head_dim * dtype bytes"

#: decoder model types whose layers are Llama-style (q/k/v/o + 3-matrix gated MLP)
GATED_DECODERS = frozenset({"llama", "qwen2", "qwen2_vl_text", "qwen2_5_vl_text", "mistral", "qwen3", "qwen3_vl_text"})
VISION_ARCHS = ("llava", "llava_next", "qwen2_5_vl")


# ---------------------------------------------------------------------------------------------
# dimensions and per-layer formulas


@dataclass(frozen=True)
class TextDims:
    """Sizes of a Llama-family decoder read from its config."""

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


def layer_flops_true(n: int, dims: TextDims) -> int:
    """True FLOPs (2 per multiply-add) of one decoder layer on ``n`` tokens."""
    d, q, kv, m = dims.hidden, dims.q_width, dims.kv_width, dims.intermediate
    projections = 2 * (n * d * q + 2 * n * d * kv + n * q * d)
    attention = 4 * n * n * q
    mlp = 2 * dims.mlp_matrices * n * d * m
    return projections + attention + mlp


def layer_flops_paper(n: int, hidden: int, intermediate: int) -> int:
    """The paper's per-layer formula ``4nd^2 + 2n^2d + 2ndm`` (pio-spec §11)."""
    d, m = hidden, intermediate
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


# ---------------------------------------------------------------------------------------------
# vision side


def _clip_layer_flops(t: int, width: int, mlp: int) -> int:
    return 2 * (4 * t * width * width + 2 * t * t * width + 2 * t * width * mlp)


def _most_square(n: int) -> tuple[int, int]:
    a = math.isqrt(n)
    while a > 1 and n % a:
        a -= 1
    return a, n // a


def qwen_window_lengths(grid_h: int, grid_w: int, merge: int, window_patches: int) -> list[int]:
    """Patch counts of the attention windows of a Qwen2.5-VL image (``grid_h x grid_w`` patches).

    Windows tile the merged grid in ``window_patches // merge`` merged units per side, the last
    window of a row/column holding the remainder (empty windows are dropped), as
    ``transformers.vision_utils.get_vision_window_index`` does."""
    mh, mw = grid_h // merge, grid_w // merge
    ws = max(1, window_patches // merge)

    def chunks(n: int) -> list[int]:
        return [ws] * (n // ws) + ([n % ws] if n % ws else [])

    unit = merge * merge
    return [ch * cw * unit for ch in chunks(mh) for cw in chunks(mw)]


@dataclass(frozen=True)
class VisionCost:
    """True FLOPs of the vision side of one sample."""

    tower: int
    projector: int
    detail: dict


def vision_flops(
    config: PretrainedConfig,
    n_visual: int,
    *,
    vision_crops: int | None = None,
    vision_grid: tuple[int, int] | None = None,
) -> VisionCost:
    """True FLOPs of the vision tower and the projector for ``n_visual`` LLM visual tokens.

    Args:
        config: a LLaVA, LLaVA-NeXT or Qwen2.5-VL config.
        n_visual: visual tokens entering the LLM (before any reduction).
        vision_crops: LLaVA(-NeXT): tower forwards (base image + crops); default
            ``max(1, round(n_visual / P))``, ``P`` = patches per crop.
        vision_grid: Qwen2.5-VL: ``(patch rows, patch columns)`` of the image (``image_grid_thw``
            without ``t``); default: the most square factorisation of ``n_visual`` merged tokens.
    """
    mt = config.model_type
    if n_visual <= 0:
        return VisionCost(0, 0, {"images": 0})
    if mt in ("llava", "llava_next"):
        vc = config.vision_config
        if getattr(vc, "model_type", "") not in ("clip_vision_model",):
            raise UnsupportedModelError(f"vision FLOPs of {mt} know CLIP towers only; got {vc.model_type!r}")
        width, mlp, depth = int(vc.hidden_size), int(vc.intermediate_size), int(vc.num_hidden_layers)
        patch, size, channels = int(vc.patch_size), int(vc.image_size), int(getattr(vc, "num_channels", 3))
        patches = (size // patch) ** 2
        tokens = patches + 1
        if vision_crops is None:
            crops = 1 if mt == "llava" else max(1, round(n_visual / patches))
        else:
            crops = int(vision_crops)
            if crops < 1:
                raise ValueError(f"vision_crops must be >= 1; got {vision_crops}")
        per_crop = 2 * patches * channels * patch * patch * width + depth * _clip_layer_flops(tokens, width, mlp)
        layers = config.vision_feature_layer
        n_feature_layers = len(layers) if isinstance(layers, (list, tuple)) else 1
        feat = patches if config.vision_feature_select_strategy == "default" else tokens
        d = int(config.get_text_config().hidden_size)
        proj = 2 * feat * (width * n_feature_layers * d + d * d)
        detail = {
            "tower": "CLIP",
            "crops": crops,
            "tokens_per_crop": tokens,
            "layers_run": depth,
            "vision_feature_layer": layers,
            "projector_tokens_per_crop": feat,
        }
        return VisionCost(crops * per_crop, crops * proj, detail)
    if mt == "qwen2_5_vl":
        vc = config.vision_config
        merge, patch = int(vc.spatial_merge_size), int(vc.patch_size)
        width, mlp, depth = int(vc.hidden_size), int(vc.intermediate_size), int(vc.depth)
        if vision_grid is None:
            mh, mw = _most_square(n_visual)
            grid = (mh * merge, mw * merge)
        else:
            grid = (int(vision_grid[0]), int(vision_grid[1]))
            if grid[0] % merge or grid[1] % merge or grid[0] * grid[1] != n_visual * merge * merge:
                raise ValueError(
                    f"vision_grid={tuple(vision_grid)} (patch rows, columns) must be multiples of the merge size "
                    f"{merge} with rows*cols = {merge * merge} * n_visual = {merge * merge * n_visual}"
                )
        patches = grid[0] * grid[1]
        windows = qwen_window_lengths(grid[0], grid[1], merge, int(vc.window_size) // patch)
        full = set(int(i) for i in vc.fullatt_block_indexes)
        embed = 2 * patches * int(vc.in_channels) * int(vc.temporal_patch_size) * patch * patch * width
        linear = 2 * (3 * patches * width * width + patches * width * width + 3 * patches * width * mlp)
        attn_window = 4 * width * sum(w * w for w in windows)
        attn_full = 4 * width * patches * patches
        blocks = sum(linear + (attn_full if i in full else attn_window) for i in range(depth))
        ctx = width * merge * merge
        merger = 2 * (patches // (merge * merge)) * (ctx * ctx + ctx * int(vc.out_hidden_size))
        detail = {
            "tower": "Qwen2.5-VL ViT",
            "grid_patches": list(grid),
            "patches": patches,
            "windows": len(windows),
            "full_attention_blocks": sorted(full),
        }
        return VisionCost(embed + blocks, merger, detail)
    raise UnsupportedModelError(
        f"vision FLOPs are known for model types {', '.join(VISION_ARCHS)}; got {mt!r} "
        "(pass include_vision=False to count the language model only)"
    )


# ---------------------------------------------------------------------------------------------
# the strategies' own costs


@dataclass(frozen=True)
class StageCostInput:
    """What a cost model sees for one component (scorer or selector) of one stage, one sample."""

    kind: str  # "scorer" | "selector"
    name: str
    settings: Any  # the component's validated pydantic settings (or None)
    layer: int  # cut layer K
    tokens_before: int  # S: text + visual tokens entering the stage
    visual_before: int
    visual_after: int
    tokens_at_previous_layer: int | None  # tokens entering layer K-1 (None when K = 0)
    visual_at_previous_layer: int | None
    n_text: int
    dims: TextDims
    probe_backward_factor: float


#: ``(true FLOPs, paper-convention FLOPs, one-line description)``; return ``None`` for a cost
#: that cannot be known from counts alone (listed in ``Accounting.uncounted``)
ComponentCost = Callable[[StageCostInput], "tuple[int, float, str] | None"]


def pio_probe_flops(s: int, rows: int, dims: TextDims, probe: str) -> tuple[int, int]:
    """True (forward, backward) FLOPs of the PIO probe on ``s`` tokens with ``rows`` loss rows.

    ``fast``: k, v on all ``s``; q, o, MLP, LM head and the attention at ``rows`` only.
    ``exact``: the whole layer on ``s``, the LM head at ``rows``.  Backward: gradient with
    respect to the hidden states only (no weight gradients): every linear product once more,
    attention products twice (both operands depend on the probe input)."""
    d, q, kv, m, v = dims.hidden, dims.q_width, dims.kv_width, dims.intermediate, dims.vocab
    head = 2 * rows * d * v
    if probe == "fast":
        linear = 2 * (2 * s * d * kv + rows * d * q + rows * q * d) + 2 * dims.mlp_matrices * rows * d * m
        attention = 4 * rows * s * q
    elif probe == "exact":
        linear = 2 * (s * d * q + 2 * s * d * kv + s * q * d) + 2 * dims.mlp_matrices * s * d * m
        attention = 4 * s * s * q
    else:
        raise ValueError(f"probe must be 'fast' or 'exact'; got {probe!r}")
    forward = linear + attention + head
    backward = linear + 2 * attention + head
    return forward, backward


def attention_row_flops(s: int, queries: int, dims: TextDims) -> int:
    """True FLOPs of recomputing ``queries`` attention rows over ``s`` keys at one layer
    (:meth:`SignalSource.attention_rows`): keys ``2*s*d*kv``, queries ``2*Q*d*q``, scores ``2*Q*s*q``."""
    d, q, kv = dims.hidden, dims.q_width, dims.kv_width
    return 2 * s * d * kv + 2 * queries * d * q + 2 * queries * s * q


def _tokens_at(c: StageCostInput, layer_offset: int) -> tuple[int, int]:
    """(tokens, visual tokens) of the hidden states a signal at ``layer_offset`` reads."""
    if layer_offset == 0:
        return c.tokens_before, c.visual_before
    if c.tokens_at_previous_layer is None:
        raise PlanError(f"{c.kind} {c.name!r} at layer {c.layer} reads layer K-1 and needs K >= 1")
    return c.tokens_at_previous_layer, c.visual_at_previous_layer or 0


def _pio_cost(c: StageCostInput) -> tuple[int, float, str]:
    st = c.settings
    probe = getattr(st, "probe", "fast")
    loss_positions = int(getattr(st, "loss_positions", 4))
    rows = max(1, min(loss_positions, c.n_text - 1))
    fwd, bwd = pio_probe_flops(c.tokens_before, rows, c.dims, probe)
    f = layer_flops_paper(c.visual_before, c.dims.hidden, c.dims.intermediate)
    paper = f * (1.0 + c.probe_backward_factor)
    detail = (
        f"pio probe={probe}: forward {fwd:.4g} + backward {bwd:.4g} on S={c.tokens_before} tokens, "
        f"{rows} loss rows; paper f({c.visual_before}) x (1 + {c.probe_backward_factor:g})"
    )
    return fwd + bwd, paper, detail


def _attention_row_cost(default_offset: int) -> ComponentCost:
    def cost(c: StageCostInput) -> tuple[int, float, str]:
        offset = int(getattr(c.settings, "layer_offset", default_offset))
        s, nv = _tokens_at(c, offset)
        d = c.dims.hidden
        paper = float(nv * d * d + nv * d)
        return attention_row_flops(s, 1, c.dims), paper, (
            f"{c.name}: attention row of the last token at layer {c.layer + offset} over S={s} keys"
        )

    return cost


def _dart_cost(c: StageCostInput) -> tuple[int, float, str]:
    offset = int(getattr(c.settings, "layer_offset", -1))
    s, nv = _tokens_at(c, offset)
    d = c.dims.hidden
    true = 2 * s * d * c.dims.kv_width
    return true, float(nv * d * d), (
        f"dart: keys of the S={s} tokens of layer {c.layer + offset} (cosine similarities: element-wise, not counted)"
    )


def _divprune_cost(c: StageCostInput) -> tuple[int, float, str]:
    n, d = c.visual_before, c.dims.hidden
    return 2 * n * n * d, float(n * n * d), f"divprune: {n}x{n} cosine similarities (X X^T)"


def _zero_cost(c: StageCostInput) -> tuple[int, float, str]:
    return 0, 0.0, f"{c.name}: no matrix products"


def _unknown_cost(reason: str) -> ComponentCost:
    def cost(c: StageCostInput) -> None:
        return None

    cost.reason = reason  # type: ignore[attr-defined]
    return cost


_COSTS: dict[tuple[str, str], ComponentCost] = {
    ("scorer", "pio"): _pio_cost,
    ("scorer", "fastv"): _attention_row_cost(-1),
    ("scorer", "pdrop"): _attention_row_cost(0),
    ("scorer", "norm"): _zero_cost,
    ("scorer", "sparsevlm"): _unknown_cost("rater rows and their relevance products depend on the data"),
    ("selector", "topk"): _zero_cost,
    ("selector", "random"): _zero_cost,
    ("selector", "uniform"): _zero_cost,
    ("selector", "dart"): _dart_cost,
    ("selector", "divprune"): _divprune_cost,
    ("selector", "nms"): _unknown_cost("the similarities of the candidates it examines depend on the data: about E*(k+s)*d multiply-adds"),
    ("selector", "sparsevlm"): _unknown_cost("DPC-KNN clustering of the recycled tokens depends on the data"),
}


def register_cost(kind: str, name: str, cost: ComponentCost) -> None:
    """Register the cost model of the component registered as ``(kind, name)`` (replaces one)."""
    if kind not in ("scorer", "selector"):
        raise ValueError(f"kind must be 'scorer' or 'selector'; got {kind!r}")
    if not callable(cost):
        raise TypeError(f"cost model for {kind} {name!r} must be callable")
    _COSTS[(kind, name)] = cost


def register_scorer_cost(name: str, cost: ComponentCost) -> None:
    """Register the cost model of the scorer registered as ``name``."""
    register_cost("scorer", name, cost)


# ---------------------------------------------------------------------------------------------
# the result


@dataclass(frozen=True)
class StageCost:
    """The strategy's own work at one stage for one sample (scorer and selector)."""

    stage: int
    layer: int
    scorer: str | None
    selector: str
    tokens_before: int
    visual_before: int
    visual_after: int
    scored: bool  # False when the stage removes nothing (the cut then runs neither component)
    scorer_flops_true: float
    scorer_flops_paper: float
    selector_flops_true: float
    selector_flops_paper: float
    detail: str = ""


@dataclass(frozen=True)
class Accounting:
    """FLOPs and KV cache of one sample's prefill (see the module docstring for the conventions).

    Attributes:
        per_layer_tokens: text + visual tokens entering each decoder layer.
        per_layer_visual: visual tokens entering each decoder layer.
        flops_true: decoder layers + LM head + vision tower + projector + the strategies' own
            work (scorers and selectors), true FLOPs.
        flops_paper: the paper's formula on visual tokens + the strategies' overhead in that
            formula.
        scorer_flops_true / scorer_flops_paper: the scorer parts of the two (PIO probe, FastV rows).
        selector_flops_true / selector_flops_paper: the selector parts (DART keys, DivPrune
            similarities; NMS is data-dependent and listed in ``uncounted``).
        uncounted: components whose work is not counted, with the reason.
        kv_bytes: K and V over all layers after prefill at ``kv_dtype_bytes`` per element.
        layer_average: mean of ``per_layer_visual``.
    """

    model: str
    n_layers: int
    n_visual: int
    n_text: int
    plan: str | None
    source: str  # "plan" | "trace" | "vanilla"
    per_layer_tokens: list[int]
    per_layer_visual: list[int]
    llm_flops_true: float
    lm_head_flops_true: float
    lm_head_positions: int
    vision_flops_true: float
    projector_flops_true: float
    scorer_flops_true: float
    selector_flops_true: float
    flops_true: float
    llm_flops_paper: float
    scorer_flops_paper: float
    selector_flops_paper: float
    flops_paper: float
    kv_bytes: int
    kv_dtype_bytes: int
    layer_average: float
    probe_backward_factor: float
    stages: list[StageCost] = field(default_factory=list)
    uncounted: list[str] = field(default_factory=list)
    vision: dict = field(default_factory=dict)

    @property
    def kv_mib(self) -> float:
        return self.kv_bytes / 2**20

    def ratios(self, baseline: "Accounting") -> dict[str, float]:
        """``baseline / self`` for each total (e.g. ``vanilla.flops_paper / reduced.flops_paper``)."""

        def r(a: float, b: float) -> float:
            return a / b if b else float("inf")

        return {
            "flops_true": r(baseline.flops_true, self.flops_true),
            "flops_paper": r(baseline.flops_paper, self.flops_paper),
            "kv_bytes": r(baseline.kv_bytes, self.kv_bytes),
            "llm_flops_true": r(baseline.llm_flops_true, self.llm_flops_true),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record, with the conventions spelled out."""
        out = asdict(self)
        out["kv_mib"] = self.kv_mib
        out["conventions"] = {
            "flops_true": TRUE_CONVENTION,
            "flops_paper": PAPER_CONVENTION
            + f" (PIO probe: forward f(N_before) + {self.probe_backward_factor:g} x forward for the backward)",
            "kv_bytes": KV_CONVENTION,
            "lm_head": f"logits at {self.lm_head_positions} position(s) (generate() uses logits_to_keep=1)",
        }
        return out


# ---------------------------------------------------------------------------------------------
# the entry point


def _resolve_config(config: Any) -> tuple[PretrainedConfig, dict]:
    """A transformers config plus the model YAML mapping it came from (empty if none)."""
    if isinstance(config, PretrainedConfig):
        return config, {}
    from .configs import hf_config, model_config

    if isinstance(config, str):
        spec = model_config(config)
        return hf_config(spec), spec
    if isinstance(config, Mapping):
        return hf_config(config), dict(config)
    raise TypeError(
        f"config must be a transformers PretrainedConfig, a conf/model name or a model mapping; got {type(config).__name__}"
    )


def _compile(plan: Any, n_layers: int) -> CompiledPlan | None:
    if plan is None:
        return None
    if isinstance(plan, CompiledPlan):
        if plan.n_layers is not None and plan.n_layers != n_layers:
            raise PlanError(
                f"the compiled plan was built for {plan.n_layers} decoder layers, the config has {n_layers}; "
                "compile it for this model (build_plan(..., n_layers=...)) or pass the Plan"
            )
        for cs in plan.stages:
            if cs.layer >= n_layers:
                raise PlanError(
                    f"stages.{cs.index}.layer={cs.layer} is out of range: the config has {n_layers} decoder layers"
                )
        return plan  # keep its components (it may come from another registry)
    if isinstance(plan, (Plan, dict, str)):
        return build_plan(plan, n_layers=n_layers)
    raise PlanError(f"plan must be None, a Plan, a CompiledPlan, a mapping or a preset name; got {type(plan).__name__}")


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


def account(
    config: PretrainedConfig | str | Mapping,
    plan: Plan | CompiledPlan | dict | str | None = None,
    n_visual: int | None = None,
    n_text: int | None = None,
    trace: Trace | None = None,
    kv_dtype_bytes: int = 2,
    include_vision: bool = True,
    *,
    sample: int = 0,
    lm_head_positions: int | None = 1,
    vision_crops: int | None = None,
    vision_grid: tuple[int, int] | None = None,
    probe_backward_factor: float = 2.0,
) -> Accounting:
    """FLOPs (two conventions) and KV cache of one sample's prefill under ``plan``.

    Args:
        config: a ``transformers`` config, a ``conf/model`` name (``"llava_1_5_7b"``) or a model
            YAML mapping (with ``hf_config``).
        plan: ``None`` (vanilla), a :class:`Plan`, a :class:`CompiledPlan`, a mapping or a preset
            name; validated and compiled for the config's depth.  With ``trace``, the plan supplies
            the scorers (their cost) and the trace the counts.
        n_visual: visual tokens of the sample before any stage.  Default: the model YAML's
            ``n_visual`` if ``config`` is a name/mapping, else 576; from ``trace`` when given.
        n_text: all non-visual tokens of the prompt (system prompt, BOS, question...).  Default:
            the YAML's ``n_text``, else 60; from ``trace`` when given.
        trace: a :class:`Trace` of a real prefill (``attachment.trace``): per-layer visual counts
            and per-stage token counts of sample ``sample`` are read from it.
        kv_dtype_bytes: bytes per cache element (2 for fp16/bf16, 4 for fp32).
        include_vision: count the vision tower and the projector in the true convention.
        sample: which sample of ``trace``.
        lm_head_positions: positions whose logits are computed (1: ``generate()``'s
            ``logits_to_keep=1``; ``None``: every position of the last layer, a plain forward).
        vision_crops / vision_grid: see :func:`vision_flops`.
        probe_backward_factor: paper convention, PIO backward = this x the probe forward.

    Raises:
        PlanError: an invalid plan, or one that does not fit the config's depth.
        ValueError: bad counts, or a trace that does not match the config.
    """
    cfg, spec = _resolve_config(config)
    dims = text_dims(cfg)
    L = dims.n_layers
    compiled = _compile(plan, L)
    if kv_dtype_bytes not in (1, 2, 4, 8):
        raise ValueError(f"kv_dtype_bytes must be 1, 2, 4 or 8; got {kv_dtype_bytes!r}")
    if probe_backward_factor < 0:
        raise ValueError(f"probe_backward_factor must be >= 0; got {probe_backward_factor}")

    stage_counts: list[tuple[int, int, int, int]] = []  # (stage index, tokens_before, visual_before, visual_after)
    if trace is not None:
        if trace.n_layers != L:
            raise ValueError(f"the trace is of a {trace.n_layers}-layer model; the config has {L} decoder layers")
        if not 0 <= sample < len(trace.original_visual):
            raise ValueError(f"sample={sample} is out of range: the trace has {len(trace.original_visual)} sample(s)")
        per_layer_visual = trace.visual_per_layer(sample)
        nv = int(trace.original_visual[sample])
        nt = len(trace.final_index[sample]) - per_layer_visual[-1] if trace.final_index else n_text
        if nt is None:
            raise ValueError("the trace has no final_index; pass n_text")
        for st in trace.stages:
            stage_counts.append((st.stage, st.tokens_before[sample], st.visual_before[sample], st.visual_after[sample]))
        source = "trace"
    else:
        nv = n_visual if n_visual is not None else int(spec.get("n_visual", 576))
        nt = n_text if n_text is not None else int(spec.get("n_text", 60))
        _check_count("n_visual", nv, 0)
        if compiled is not None:
            per_layer_visual = compiled.plan.visual_per_layer(nv, L)
            for cs in compiled.stages:
                before = per_layer_visual[cs.layer - 1] if cs.layer > 0 else nv
                stage_counts.append((cs.index, nt + before, before, per_layer_visual[cs.layer]))
        else:
            per_layer_visual = [nv] * L
        source = "plan" if compiled is not None else "vanilla"
    _check_count("n_text", nt, 0)
    per_layer_tokens = [nt + v for v in per_layer_visual]

    llm_true = sum(layer_flops_true(n, dims) for n in per_layer_tokens)
    llm_paper = sum(layer_flops_paper(v, dims.hidden, dims.intermediate) for v in per_layer_visual)
    positions = per_layer_tokens[-1] if lm_head_positions is None else _check_count("lm_head_positions", lm_head_positions, 0)
    head_true = 2 * positions * dims.hidden * dims.vocab

    vision = VisionCost(0, 0, {})
    if include_vision:
        vision = vision_flops(cfg, nv, vision_crops=vision_crops, vision_grid=vision_grid)

    stages: list[StageCost] = []
    uncounted: list[str] = []
    if compiled is not None:
        by_index = {cs.index: cs for cs in compiled.stages}
        for index, tokens_before, visual_before, visual_after in stage_counts:
            cs = by_index.get(index)
            if cs is None:
                raise ValueError(f"the trace has stage {index}, the plan has {len(compiled.stages)} stage(s)")
            ran = visual_after < visual_before  # a stage that removes nothing runs neither component
            prev = cs.layer - 1
            parts: dict[str, tuple[float, float]] = {"scorer": (0.0, 0.0), "selector": (0.0, 0.0)}
            details = []
            for kind, ref, comp in (("scorer", cs.spec.scorer, cs.scorer), ("selector", cs.spec.selector, cs.selector)):
                if ref is None or not ran:
                    continue
                cost = _COSTS.get((kind, ref.name))
                result = None
                if cost is not None:
                    result = cost(
                        StageCostInput(
                            kind=kind,
                            name=ref.name,
                            settings=getattr(comp, "settings", None),
                            layer=cs.layer,
                            tokens_before=tokens_before,
                            visual_before=visual_before,
                            visual_after=visual_after,
                            tokens_at_previous_layer=per_layer_tokens[prev] if prev >= 0 else None,
                            visual_at_previous_layer=per_layer_visual[prev] if prev >= 0 else None,
                            n_text=nt,
                            dims=dims,
                            probe_backward_factor=probe_backward_factor,
                        )
                    )
                if result is None:
                    why = getattr(cost, "reason", "no cost model registered (tokenreduce.measure.flops.register_cost)")
                    uncounted.append(f"stages.{index}.{kind} {ref.name!r}: not counted ({why})")
                    continue
                t_flops, p_flops, detail = result
                parts[kind] = (float(t_flops), float(p_flops))
                details.append(detail)
            stages.append(
                StageCost(
                    stage=index,
                    layer=cs.layer,
                    scorer=cs.spec.scorer.name if cs.spec.scorer is not None else None,
                    selector=cs.spec.selector.name,
                    tokens_before=tokens_before,
                    visual_before=visual_before,
                    visual_after=visual_after,
                    scored=ran,
                    scorer_flops_true=parts["scorer"][0],
                    scorer_flops_paper=parts["scorer"][1],
                    selector_flops_true=parts["selector"][0],
                    selector_flops_paper=parts["selector"][1],
                    detail="; ".join(details),
                )
            )
    elif trace is not None and trace.stages:
        uncounted.append("scorers and selectors: no plan given with the trace (not counted)")

    scorer_true = sum(st.scorer_flops_true for st in stages)
    scorer_paper = sum(st.scorer_flops_paper for st in stages)
    selector_true = sum(st.selector_flops_true for st in stages)
    selector_paper = sum(st.selector_flops_paper for st in stages)
    total_true = llm_true + head_true + vision.tower + vision.projector + scorer_true + selector_true
    name = spec.get("name") or getattr(cfg, "_name_or_path", "") or cfg.model_type
    plan_name = None
    if compiled is not None:
        plan_name = compiled.plan.name or (plan if isinstance(plan, str) else "custom")
    return Accounting(
        model=str(name),
        n_layers=L,
        n_visual=nv,
        n_text=nt,
        plan=plan_name,
        source=source,
        per_layer_tokens=per_layer_tokens,
        per_layer_visual=list(per_layer_visual),
        llm_flops_true=float(llm_true),
        lm_head_flops_true=float(head_true),
        lm_head_positions=positions,
        vision_flops_true=float(vision.tower),
        projector_flops_true=float(vision.projector),
        scorer_flops_true=float(scorer_true),
        selector_flops_true=float(selector_true),
        flops_true=float(total_true),
        llm_flops_paper=float(llm_paper),
        scorer_flops_paper=float(scorer_paper),
        selector_flops_paper=float(selector_paper),
        flops_paper=float(llm_paper + scorer_paper + selector_paper),
        kv_bytes=_kv_bytes(per_layer_tokens, dims.kv_width, kv_dtype_bytes),
        kv_dtype_bytes=kv_dtype_bytes,
        layer_average=sum(per_layer_visual) / L,
        probe_backward_factor=probe_backward_factor,
        stages=stages,
        uncounted=uncounted,
        vision=dict(vision.detail),
    )


# ---------------------------------------------------------------------------------------------
# cross-check: FlopCounterMode on the meta device


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
    ``include_vision``, the vision tower and projector (LLaVA: the CLIP model on ``crops`` 336 px
    images with ``output_hidden_states``, the projector on the selected features; Qwen2.5-VL:
    the patch embedding, one windowed and one full-attention block with the ``cu_seqlens`` of
    ``transformers.vision_utils``, each scaled by the number of blocks of its kind (the blocks of
    a kind are identical; counting all 32 on meta takes seconds longer), the merger).

    Returns ``{"decoder_layers", "lm_head", "vision_tower", "projector"}`` FLOPs.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForImageTextToText

    dims = text_dims(config)
    if len(per_layer_tokens) != dims.n_layers:
        raise ValueError(f"per_layer_tokens has {len(per_layer_tokens)} entries; the config has {dims.n_layers} layers")
    meta = torch.device("meta")
    with meta:
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
        total += counted(lambda: layer(h, attention_mask=None, position_ids=pos, position_embeddings=(cos, cos)))
    out["decoder_layers"] = total
    h_last = torch.empty(1, lm_head_positions, dims.hidden, device=meta)
    out["lm_head"] = counted(lambda: model.lm_head(h_last))
    out["vision_tower"] = out["projector"] = 0
    if include_vision and n_visual:
        mt = config.model_type
        cost = vision_flops(config, n_visual, vision_crops=vision_crops, vision_grid=vision_grid)
        if mt in ("llava", "llava_next"):
            vc = config.vision_config
            crops = cost.detail["crops"]
            pixels = torch.empty(crops, vc.num_channels, vc.image_size, vc.image_size, device=meta)
            tower = model.model.vision_tower
            holder: dict[str, Any] = {}

            def run_tower():
                holder["out"] = tower(pixels, output_hidden_states=True, return_dict=True)

            out["vision_tower"] = counted(run_tower)
            layer_sel = config.vision_feature_layer
            hs = holder["out"].hidden_states
            feats = torch.cat([hs[i] for i in layer_sel], -1) if isinstance(layer_sel, (list, tuple)) else hs[layer_sel]
            if config.vision_feature_select_strategy == "default":
                feats = feats[:, 1:]
            out["projector"] = counted(lambda: model.model.multi_modal_projector(feats))
        elif mt == "qwen2_5_vl":
            from transformers.vision_utils import get_vision_attention_seqlens, get_vision_window_index

            vc = config.vision_config
            visual = model.model.visual
            rows, cols = cost.detail["grid_patches"]
            grid_thw = torch.tensor([[1, rows, cols]])
            cu_full, _ = get_vision_attention_seqlens(grid_thw, vc)
            _, cu_window = get_vision_window_index(
                grid_thw, spatial_merge_size=vc.spatial_merge_size, window_size=vc.window_size, patch_size=vc.patch_size
            )
            patches = rows * cols
            flat = vc.in_channels * vc.temporal_patch_size * vc.patch_size * vc.patch_size
            pix = torch.empty(patches, flat, device=meta)
            hd = vc.hidden_size // vc.num_heads
            pe = (torch.empty(patches, hd, device=meta), torch.empty(patches, hd, device=meta))
            full = set(vc.fullatt_block_indexes)
            kinds = [i in full for i in range(len(visual.blocks))]
            x = torch.empty(patches, vc.hidden_size, device=meta)
            tower = counted(lambda: visual.patch_embed(pix))
            # blocks of one kind (windowed / full attention) are identical: count one of each and scale
            for is_full in (False, True):
                n_kind = kinds.count(is_full)
                if n_kind:
                    blk = visual.blocks[kinds.index(is_full)]
                    cu = cu_full if is_full else cu_window
                    tower += n_kind * counted(lambda: blk(x, cu_seqlens=cu, position_embeddings=pe))
            out["vision_tower"] = tower
            xs = torch.empty(patches, vc.hidden_size, device=meta)
            out["projector"] = counted(lambda: visual.merger(xs))
        else:
            raise UnsupportedModelError(f"no meta-device vision count for model type {mt!r}")
    return out
