"""FLOPs (two conventions) and KV cache of one sample's prefill from a plan or a trace:
:func:`account`.  Conventions and formulas: ``docs/measurement.md``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from transformers import PretrainedConfig

from tokenreduce.core.arch import VisionCost
from tokenreduce.core.cost import StageCostInput
from tokenreduce.core.errors import PlanError
from tokenreduce.core.plan import CompiledPlan, Plan, build_plan
from tokenreduce.core.strategy import hook
from tokenreduce.core.types import Trace

from ..kv import kv_bytes as _kv_bytes
from .formulas import layer_flops_paper, layer_flops_true, text_dims, vision_flops

__all__ = [
    "KV_CONVENTION",
    "PAPER_CONVENTION",
    "PAPER_PROBE_BACKWARD_FACTOR",
    "TRUE_CONVENTION",
    "Accounting",
    "StageCost",
    "account",
    "probe_rule",
]

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
#: the paper's own rule for a gradient probe in the paper convention: its forward only (PIO-FVLM's
#: reported 0.45 T for LLaVA-1.5-7B at 64 tokens); ``probe_backward_factor`` > 0 adds a backward
#: charged as that many forwards (the official profiler's ``backward_gamma`` = 2)
PAPER_PROBE_BACKWARD_FACTOR = 0.0
KV_CONVENTION = "bytes of K and V over all decoder layers after prefill: sum_l 2 * n_l * H_kv * head_dim * dtype bytes"


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
    """FLOPs and KV cache of one sample's prefill (conventions: ``docs/measurement.md``).

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
        probe_backward_factor: how ``flops_paper`` charged a gradient probe's backward, in probe
            forwards (0: not at all, the paper's rule); ``flops_true`` counts it as it runs.
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

    def ratios(self, baseline: Accounting) -> dict[str, float]:
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
            "flops_paper": PAPER_CONVENTION + f" ({probe_rule(self.probe_backward_factor)})",
            "kv_bytes": KV_CONVENTION,
            "lm_head": f"logits at {self.lm_head_positions} position(s) (generate() uses logits_to_keep=1)",
        }
        return out


def probe_rule(probe_backward_factor: float) -> str:
    """How the paper convention charges a gradient probe (PIO) at ``probe_backward_factor``."""
    if probe_backward_factor == PAPER_PROBE_BACKWARD_FACTOR:
        return "PIO probe: its forward f(N_before) only, the paper's rule"
    return (
        f"PIO probe: forward f(N_before) + {probe_backward_factor:g} x f(N_before) for the backward, "
        "not the paper's rule (probe_backward_factor=0)"
    )


def _check_factor(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(
            f"probe_backward_factor must be a finite number >= 0 (0: the paper's rule, the probe's forward only; "
            f"2: the official profiler's backward_gamma); got {value!r}"
        )
    return float(value)


def _resolve_config(config: Any) -> tuple[PretrainedConfig, dict]:
    """A transformers config plus the model YAML mapping it came from (empty if none)."""
    if isinstance(config, PretrainedConfig):
        return config, {}
    from ..configs import hf_config, model_config

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
    probe_backward_factor: float = PAPER_PROBE_BACKWARD_FACTOR,
) -> Accounting:
    """FLOPs (two conventions) and KV cache of one sample's prefill under ``plan``.

    Args:
        config: a ``transformers`` config, a ``conf/model`` name (``"llava_1_5_7b"``) or a model
            YAML mapping (with ``hf_config``).
        plan: ``None`` (vanilla), a :class:`Plan`, a :class:`CompiledPlan`, a mapping or a preset
            name; validated and compiled for the config's depth.  With ``trace``, the plan supplies
            the scorers (their cost) and the trace the counts.
        n_visual: visual tokens of the sample before any stage.  Default: the model YAML's
            ``n_visual`` if ``config`` is a name/mapping and sets it, else the config's
            ``image_seq_length``, else 576; from ``trace`` when given.
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
        probe_backward_factor: paper convention only: a gradient probe's (PIO's) backward is
            charged as this many probe forwards.  0 (default): the paper's rule, the forward only;
            2: the official profiler's ``backward_gamma``.  The true convention always counts the
            backward as it runs (input gradients only).

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
    probe_backward_factor = _check_factor(probe_backward_factor)

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
        # a YAML key set to null counts as absent
        nv = (
            n_visual
            if n_visual is not None
            else int(spec.get("n_visual") or getattr(cfg, "image_seq_length", 0) or 576)
        )
        nt = n_text if n_text is not None else int(spec.get("n_text") or 60)
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
    positions = (
        per_layer_tokens[-1] if lm_head_positions is None else _check_count("lm_head_positions", lm_head_positions, 0)
    )
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
                inp = StageCostInput(
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
                result = hook(comp, "cost")(inp)  # the component's own cost model
                if result is None or result[0] is None:
                    why = result[2] if result is not None else "no cost model"
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
