"""Plans, stages and budgets: validated with pydantic, compiled against the registry and a model.

A :class:`Plan` is an ordered list of :class:`Stage` s.  A stage cuts before decoder layer
``layer`` (K = 0 cuts before the first decoder layer; layer K is the first to see the reduced
sequence), keeps ``keep`` visual tokens chosen by an optional ``scorer`` and a ``selector``, and
gives the survivors positions by a policy: ``keep`` (their original RoPE ids, with gaps) or
``renumber`` (contiguous ids, PDrop/FastV style).

Budgets (``Stage.keep``):

* an integer or ``{tokens: n}``: keep ``n`` visual tokens (all of them if the stage has fewer);
* ``{ratio: r, of: current}``: keep ``round(r x tokens entering the stage)``;
* ``{ratio: r, of: original}``: keep ``round(r x the sample's visual tokens before any stage)``;
* ``{weight: w}``: a share of the plan's ``layer_average`` target.  With
  ``layer_average: {tokens: T}`` (or ``{ratio: t}``: ``T = t x N``) the counts are
  ``k_i = s x w_i`` with ``s`` chosen so that the average number of visual tokens per decoder
  layer over all L layers equals T (the papers' "64 tokens" is such an average; ``docs/concepts.md``).

Every form becomes an integer per stage and sample: ``1 <= k <= tokens entering the stage``
(rounding is half-up; a count above what the stage has keeps all of them, a ratio rounding to 0
keeps 1: documented, no error, but recorded in ``StageTrace.requested`` and warned once per plan
with :class:`ClampWarning`; :meth:`Plan.budget` gives the counts before and after the clamp).
A keep count of 0 or less is refused: use fewer stages or a smaller ratio instead.

Components are named (``"topk"``, ``{name: pio, loss_positions: 4}``) or given as objects
(``scorer=PIOScorer(loss_positions=4)``); either way the plan serializes to names + settings.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from .conf import compose, preset_names
from .errors import PlanError, UnknownComponentError
from .registry import Registry, get_registry
from .strategy import hook
from .types import Need

PositionPolicy = Literal["keep", "renumber"]


class ClampWarning(UserWarning):
    """A keep count was clamped to what a stage can keep (at least 1, at most the visual tokens
    entering it).  Warned once per compiled plan; ``StageTrace.requested`` records every case."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tokens(_Strict):
    """Keep an absolute number of visual tokens."""

    tokens: int = Field(ge=1, description="visual tokens to keep (>= 1)")


class Ratio(_Strict):
    """Keep a fraction of the visual tokens entering the stage (``current``) or of the sample's
    visual tokens before any stage (``original``)."""

    ratio: float = Field(gt=0.0, le=1.0, allow_inf_nan=False, description="fraction in (0, 1]")
    of: Literal["current", "original"] = "current"


class Weight(_Strict):
    """A share of the plan's ``layer_average`` target (only with ``Plan.layer_average``)."""

    weight: float = Field(gt=0.0, allow_inf_nan=False)


KEEP_FORMS = "an integer, {tokens: n}, {ratio: r, of: current|original} or {weight: w}"


def _float_keep_message(value: float) -> str:
    """Why ``keep: <float>`` is refused, with a suggestion that is itself valid."""
    ratio_or_tokens = "an integer token count (keep: 64, or {tokens: 64}) or {ratio: r} with 0 < r <= 1"
    if math.isnan(value):
        return f"keep={value} is not a number: write {ratio_or_tokens}"
    if math.isinf(value):
        return f"keep={value} is infinite: write {ratio_or_tokens}"
    if value <= 0:
        return f"keep={value} must be positive: write {ratio_or_tokens}"
    if value == 1:
        return "keep=1.0 is a float: write {tokens: 1} (or keep: 1) for one token, or {ratio: 1.0} for all of them"
    if value < 1:
        return f"keep={value} is a float: write {{ratio: {value}}} for that fraction, or an integer token count"
    if value.is_integer():
        n = int(value)
        return f"keep={value} is a float: write {{tokens: {n}}} (or keep: {n}) for {n} tokens"
    return f"keep={value} is a float: write {ratio_or_tokens}"


def _keep_form(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return type(value).__name__.lower()
    if isinstance(value, dict):
        for key in ("tokens", "ratio", "weight"):
            if key in value:
                return key
    return None


Keep = Annotated[
    Annotated[Tokens, Tag("tokens")] | Annotated[Ratio, Tag("ratio")] | Annotated[Weight, Tag("weight")],
    Discriminator(
        _keep_form,
        custom_error_type="keep_form",
        custom_error_message=f"keep must be {KEEP_FORMS}",
    ),
]


class LayerAverage(_Strict):
    """Target average visual tokens per decoder layer: ``{tokens: 64}`` or ``{ratio: 0.111}``
    (a fraction of the sample's original visual tokens)."""

    tokens: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    ratio: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_of(self) -> LayerAverage:
        if (self.tokens is None) == (self.ratio is None):
            raise ValueError("give exactly one of 'tokens' or 'ratio'")
        return self

    def target(self, n_visual: int) -> float:
        if self.tokens is not None:
            return float(self.tokens)
        return float(typing.cast(float, self.ratio)) * n_visual  # exactly one of the two is set


def _component_data(value: Any, kinds: Sequence[str] = ("scorer", "selector")) -> Any:
    """A component given as an object (``PIOScorer(loss_positions=4)``), as its settings object
    or as its class, turned into ``{name: <registered name>, **settings}`` (the settings that
    were set); any other value is returned unchanged for validation."""
    if value is None or isinstance(value, (str, Mapping, ComponentRef)):
        return value
    cls = value if isinstance(value, type) else type(value)
    entries = [c for c in get_registry().components() if cls is c.cls or cls is c.settings]
    found = [c for c in entries if c.kind in kinds]
    if len(found) != 1:
        if found:
            why = f"is registered under several names ({', '.join(repr(c.name) for c in found)})"
        elif entries:
            why = f"is a registered {entries[0].kind} ({entries[0].name!r}), not a {' or '.join(kinds)}"
        else:
            why = f"is not registered as a {' or '.join(kinds)}"
        raise ValueError(
            f"{cls.__module__}.{cls.__qualname__} {why}; name the component instead: {{name: ..., <settings>}}"
        )
    if isinstance(value, type):
        return {"name": found[0].name}
    settings = value if isinstance(value, BaseModel) else getattr(value, "settings", None)
    if not isinstance(settings, BaseModel):
        raise ValueError(f"{cls.__qualname__} object has no pydantic settings to record; name the component instead")
    return {"name": found[0].name, **settings.model_dump(mode="json", exclude_unset=True)}


class ComponentRef(BaseModel):
    """A registry name plus that component's settings: ``"topk"``, ``{name: pio, loss_positions: 4}``
    or a component object (``PIOScorer(loss_positions=4)``, recorded as its name and the settings
    that were set)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else _component_data(data)

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Stage(_Strict):
    """One cut: before decoder layer ``layer``, keep ``keep`` visual tokens."""

    layer: int = Field(ge=0, description="cut before this decoder layer (0 = before the first)")
    keep: Keep = Field(description=f"visual tokens to keep: {KEEP_FORMS}")
    scorer: ComponentRef | None = Field(
        default=None, description="registry name, or {name: ..., <settings>}; null: none (a score-free selector)"
    )
    selector: ComponentRef = Field(
        default=ComponentRef(name="topk"), description="registry name, or {name: ..., <settings>}"
    )
    positions: PositionPolicy | None = Field(default=None, description="overrides Plan.positions")

    @field_validator("keep", mode="before")
    @classmethod
    def _int_keep(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("keep must be a number of tokens or a mapping, not a boolean")
        if isinstance(value, int):
            return {"tokens": value}
        if isinstance(value, float):
            raise ValueError(_float_keep_message(value))
        return value

    @field_validator("scorer", mode="before")
    @classmethod
    def _scorer_object(cls, value: Any) -> Any:
        return _component_data(value, ("scorer",))

    @field_validator("selector", mode="before")
    @classmethod
    def _selector_object(cls, value: Any) -> Any:
        return _component_data(value, ("selector",))


class Plan(_Strict):
    """An ordered list of stages applied in one forward pass."""

    name: str | None = Field(default=None, description="shown in tables; default: the preset's name or file stem")
    description: str = Field(default="", description="one line on what the plan does")
    positions: PositionPolicy = Field(
        default="keep", description="positions of the kept tokens: keep (original ids, gaps) or renumber (contiguous)"
    )
    layer_average: LayerAverage | None = Field(
        default=None, description="target visual tokens per layer, {tokens: T} or {ratio: t}; with keep={weight: w}"
    )
    stages: list[Stage] = Field(default_factory=list, description="the cuts, in increasing layer order")
    adapter: dict[str, Any] = Field(
        default_factory=dict,
        description="options for the model's adapter (validated by its Settings when the plan is built), "
        "e.g. {keep_newlines: true} for LLaVA-NeXT",
    )

    @model_validator(mode="after")
    def _check(self) -> Plan:
        layers = [s.layer for s in self.stages]
        for i in range(1, len(layers)):
            if layers[i] <= layers[i - 1]:
                raise ValueError(
                    f"stages must cut at strictly increasing layers; got layers {layers} "
                    f"(stages.{i}.layer={layers[i]} is not greater than stages.{i - 1}.layer={layers[i - 1]})"
                )
        weighted = [isinstance(s.keep, Weight) for s in self.stages]
        if self.layer_average is not None and not all(weighted):
            bad = [i for i, w in enumerate(weighted) if not w]
            raise ValueError(f"with layer_average every stage's keep must be {{weight: w}}; stages {bad} are not")
        if self.layer_average is None and any(weighted):
            bad = [i for i, w in enumerate(weighted) if w]
            raise ValueError(f"stages {bad} use keep={{weight: ...}}, which needs plan.layer_average")
        return self

    def policy(self, stage: int) -> PositionPolicy:
        return self.stages[stage].positions or self.positions

    # -- budget arithmetic --------------------------------------------------------------------
    def keep_counts(self, n_visual: int, n_layers: int) -> list[int]:
        """Integer visual tokens kept by each stage for a sample with ``n_visual`` visual tokens
        in a model of ``n_layers`` decoder layers."""
        return self.budget(n_visual, n_layers)[1]

    def budget(self, n_visual: int, n_layers: int) -> tuple[list[int], list[int]]:
        """``(requested, kept)`` per stage for a sample with ``n_visual`` visual tokens:
        ``requested`` is the stage's ``keep`` as an integer before the clamp (the count, the
        rounded ratio, the rounded weighted share), ``kept`` that count clamped to at least 1 and
        at most the visual tokens entering the stage.  They differ where a clamp happened."""
        if n_visual <= 0:
            return [0] * len(self.stages), [0] * len(self.stages)
        scale = self._weight_scale(n_visual, n_layers) if self.layer_average is not None else None
        requested: list[int] = []
        counts, current = [], n_visual
        for stage in self.stages:
            k = stage.keep
            if isinstance(k, Tokens):
                want = k.tokens
            elif isinstance(k, Ratio):
                base = current if k.of == "current" else n_visual
                want = _round_half_up(k.ratio * base)
            else:  # Weight (the plan validator ensures layer_average, hence scale)
                want = _round_half_up(typing.cast(float, scale) * k.weight)
            requested.append(want)
            current = max(1, min(want, current))
            counts.append(current)
        return requested, counts

    def visual_per_layer(self, n_visual: int, n_layers: int) -> list[int]:
        """Visual tokens each decoder layer sees (length ``n_layers``)."""
        counts = self.keep_counts(n_visual, n_layers)
        per_layer, current, si = [], n_visual, 0
        for layer in range(n_layers):
            while si < len(self.stages) and self.stages[si].layer == layer:
                current = counts[si]
                si += 1
            per_layer.append(current)
        return per_layer

    def layer_average_for(self, n_visual: int, n_layers: int) -> float:
        """Average visual tokens per decoder layer (the layer-average convention, ``docs/concepts.md``)."""
        per_layer = self.visual_per_layer(n_visual, n_layers)
        return sum(per_layer) / n_layers

    def _weight_scale(self, n_visual: int, n_layers: int) -> float:
        target = typing.cast(LayerAverage, self.layer_average).target(n_visual)
        first = self.stages[0].layer
        bounds = [s.layer for s in self.stages] + [n_layers]
        weights = [typing.cast(Weight, s.keep).weight for s in self.stages]  # validated: all {weight: w}
        weighted_span = sum((bounds[i + 1] - bounds[i]) * w for i, w in enumerate(weights))
        budget = target * n_layers - first * n_visual
        if budget <= 0 or weighted_span <= 0:
            raise PlanError(self._unreachable(n_layers, n_visual))
        return budget / weighted_span

    def _unreachable(self, n_layers: int, n_visual: int | None = None) -> str:
        """Why the ``layer_average`` target cannot be met: the layers before the first cut see every
        visual token.  A ratio target is unreachable or not whatever the visual count; a token
        target is stated for the sample's actual count ``n_visual``."""
        avg = typing.cast(LayerAverage, self.layer_average)
        first = self.stages[0].layer
        fix = "cut earlier (stages.0.layer) or raise layer_average"
        if avg.ratio is not None:
            floor = first / n_layers
            return (
                f"layer_average {{ratio: {avg.ratio:g}}} is unreachable: stages.0 cuts before layer {first}, so the "
                f"first {first} of {n_layers} layers see every visual token and the average is at least "
                f"{floor:.4g} x the visual tokens; {fix}.ratio above {floor:.4g}"
            )
        floor_tokens = first * typing.cast(int, n_visual) / n_layers
        return (
            f"layer_average {{tokens: {avg.tokens:g}}} is unreachable for a sample with {n_visual} visual tokens: the "
            f"first {first} of {n_layers} layers see all {n_visual}, an average of at least {floor_tokens:g} per "
            f"layer; {fix}.tokens above {floor_tokens:g}"
        )


# -- names of composed plans ------------------------------------------------------------------------
def _method_label(stage: Stage) -> str:
    scorer = stage.scorer.name if stage.scorer is not None else None
    if scorer is None:
        return stage.selector.name
    return scorer if stage.selector.name == "topk" else f"{scorer}/{stage.selector.name}"


def _keep_label(keep: Tokens | Ratio | Weight) -> str:
    if isinstance(keep, Tokens):
        return str(keep.tokens)
    if isinstance(keep, Ratio):
        return f"{keep.ratio * 100:.4g}%" + ("orig" if keep.of == "original" else "")
    return f"w{keep.weight:.4g}"


def _keep_words(keep: Tokens | Ratio | Weight) -> str:
    if isinstance(keep, Tokens):
        return f"{keep.tokens} visual tokens"
    if isinstance(keep, Ratio):
        whose = "of the visual tokens entering the stage" if keep.of == "current" else "of the original visual tokens"
        return f"{keep.ratio * 100:.4g}% {whose}"
    return f"weight {keep.weight:.4g} of the layer-average target"


def _target_label(target: LayerAverage) -> str:
    return f"{target.tokens:.4g}" if target.tokens is not None else f"{(target.ratio or 0) * 100:.4g}%"


def derived_name(plan: Plan) -> str:
    """A name that says what ``plan`` does, from its stages: ``<method>@<layer>:<keep>`` per stage
    joined by ``+`` (method: the scorer, ``scorer/selector`` when the selector is not ``topk``,
    or the selector alone; keep: a count, ``25%`` of the tokens entering, ``25%orig`` of the
    original ones, ``w1`` a weight), ``~avg<target>`` with a layer-average target; ``no_cut`` for
    a plan without stages.  Used for a preset changed by overrides (``docs/cli.md``).

    >>> derived_name(Plan(stages=[{"layer": 2, "keep": 32, "scorer": "fastv"}]))
    'fastv@2:32'
    """
    name = "+".join(f"{_method_label(st)}@{st.layer}:{_keep_label(st.keep)}" for st in plan.stages) or "no_cut"
    if plan.layer_average is not None:
        name += f"~avg{_target_label(plan.layer_average)}"
    return name


def derived_description(plan: Plan) -> str:
    """One line that says what ``plan`` does, from its stages: per stage the cut layer, the budget,
    the scorer and the selector; then the position policy and the layer-average target."""
    parts = []
    for st in plan.stages:
        by = f"{st.scorer.name} scores, {st.selector.name} selector" if st.scorer else f"{st.selector.name} selector"
        where = f", positions {st.positions}" if st.positions else ""
        parts.append(f"before layer {st.layer} keep {_keep_words(st.keep)} ({by}{where})")
    text = "; ".join(parts) or "no cut (every visual token kept)"
    text += f"; positions {plan.positions}"
    if plan.layer_average is not None:
        text += f"; layer average {_target_label(plan.layer_average)}"
    return text


def _round_half_up(x: float) -> int:
    return int(math.floor(round(x, 9) + 0.5))  # round(x, 9): 0.29 * 50 = 14.499999999999998 is 14.5


# -- compilation ------------------------------------------------------------------------------
@dataclass
class CompiledStage:
    """A stage with its components instantiated."""

    index: int
    spec: Stage
    scorer: Any | None
    selector: Any
    policy: PositionPolicy

    @property
    def layer(self) -> int:
        return self.spec.layer

    @property
    def components(self) -> list[Any]:
        """The scorer (if any) and the selector."""
        return [c for c in (self.scorer, self.selector) if c is not None]

    @property
    def needs(self) -> Need:
        needs = Need.HIDDEN
        for comp in self.components:
            needs |= hook(comp, "needs")
        return needs

    def vision_layers(self) -> set[int] | None:
        """The vision-tower layers this stage's components read (None: every layer)."""
        layers: set[int] = set()
        for comp in self.components:
            got = hook(comp, "vision_layers")()
            if got is None:
                return None
            layers |= set(got)
        return layers


@dataclass
class CompiledPlan:
    """A plan checked against a registry and (optionally) a model depth and adapter."""

    plan: Plan
    stages: list[CompiledStage]
    n_layers: int | None = None
    adapter_settings: Any = None  # the adapter's validated Settings (None without an adapter)
    #: set once a :class:`ClampWarning` was shown for this plan (the attachments warn once per plan)
    clamp_warned: bool = dc_field(default=False, repr=False, compare=False)

    def keep_counts(self, n_visual: int) -> list[int]:
        return self.budget(n_visual)[1]

    def budget(self, n_visual: int) -> tuple[list[int], list[int]]:
        """``(requested, kept)`` per stage (:meth:`Plan.budget`)."""
        if self.n_layers is None and self.plan.layer_average is not None:
            raise PlanError("this plan's budget is a layer_average: build it with n_layers (the model depth)")
        return self.plan.budget(n_visual, self.n_layers or 0)


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (Optional/list/Annotated/Union: the first one)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


_KEEP_TAGS = ("tokens", "ratio", "weight")


def _allowed_keys(root: type[BaseModel] | None, loc: tuple) -> list[str] | None:
    """Field names of the model that holds the last key of ``loc`` (walking from ``root``);
    ``loc`` as pydantic reports it (with the keep-form tag after ``keep``)."""
    model: type[BaseModel] | None = root
    parts, i = loc[:-1], 0
    while i < len(parts) and model is not None:
        part = parts[i]
        if part == "keep" and i + 1 < len(parts):  # the discriminated keep union: next part is the form's tag
            forms: dict[str, type[BaseModel]] = {"tokens": Tokens, "ratio": Ratio, "weight": Weight}
            model = forms.get(parts[i + 1])
            i += 2
            continue
        if not isinstance(part, int):
            field = model.model_fields.get(part)
            model = _submodel(field.annotation) if field is not None else None
        i += 1
    return sorted(model.model_fields) if model is not None else None


def format_validation_error(exc: ValidationError, prefix: str = "", root: type[BaseModel] | None = None) -> str:
    """One line per error: ``path: message (got value)``; unknown keys list the allowed ones."""
    root = root if root is not None else Plan
    lines = []
    for err in exc.errors():
        raw = tuple(err["loc"])
        loc = raw
        # drop the keep-form tag pydantic inserts for the discriminated union: keep.ratio.ratio -> keep.ratio
        loc = tuple(
            p for i, p in enumerate(loc) if not (i and loc[i - 1] == "keep" and p in _KEEP_TAGS and i + 1 < len(loc))
        )
        path = ".".join(str(p) for p in ((prefix,) if prefix else ()) + loc)
        message = err["msg"]
        if err["type"] == "finite_number":
            bad = err.get("input")
            what = "infinite" if isinstance(bad, (int, float)) and math.isinf(bad) else "not a number"
            message = f"{what}; it must be a finite number"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(root, raw)
            message = f"unknown key {loc[-1]!r}" + (f"; allowed keys: {', '.join(allowed)}" if allowed else "")
        value = err.get("input")
        shown = f" (got {value!r})" if not isinstance(value, (dict, list)) and err["type"] != "extra_forbidden" else ""
        lines.append(f"  {path or '<plan>'}: {message}{shown}")
    return "invalid plan:\n" + "\n".join(lines)


def load_preset(name: str, overrides: Sequence[str] = ()) -> Plan:
    """The validated :class:`Plan` of preset ``name`` (``conf/plan/<name>.yaml``), composed by
    Hydra with command-line style ``overrides`` (``plan.stages.0.keep.ratio=0.25``)."""
    known = preset_names("plan")
    if name not in known:
        raise PlanError(f"unknown plan preset {name!r}; known presets: {', '.join(known)}")
    cfg = compose([f"plan={name}", *overrides])
    data = cfg["plan"]
    data.setdefault("name", name)
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        raise PlanError(f"preset {name!r}: " + format_validation_error(exc, prefix="plan")) from None


def parse_plan(spec: Plan | dict | str) -> Plan:
    """Turn a :class:`Plan`, a plain mapping, or a preset name into a validated :class:`Plan`."""
    if isinstance(spec, Plan):
        return spec
    if isinstance(spec, str):
        return load_preset(spec)
    if not isinstance(spec, dict):
        raise PlanError(f"a plan must be a Plan, a mapping or a preset name; got {type(spec).__name__}")
    try:
        return Plan.model_validate(spec)
    except ValidationError as exc:
        raise PlanError(format_validation_error(exc)) from None


def _instantiate(registry: Registry, kind: str, ref: ComponentRef, path: str):
    try:
        comp = registry.get(kind, ref.name, context=path + ".name")
    except UnknownComponentError as exc:
        raise PlanError(str(exc)) from None
    try:
        settings = comp.settings.model_validate(ref.settings)
    except ValidationError as exc:
        raise PlanError(format_validation_error(exc, prefix=path, root=comp.settings)) from None
    # a component based on Scorer/Selector is its own settings; a class without a base takes them
    return settings if isinstance(settings, comp.cls) else comp.cls(settings)


def build_plan(
    spec: Plan | dict | str,
    *,
    n_layers: int | None = None,
    adapter: type | None = None,
    registry: Registry | None = None,
) -> CompiledPlan:
    """Validate a plan, instantiate its components and (given ``n_layers`` / ``adapter``) check
    that it fits the model: cut layers in range, every needed signal provided."""
    plan = parse_plan(spec)
    registry = registry or get_registry()
    stages = []
    for i, st in enumerate(plan.stages):
        scorer = _instantiate(registry, "scorer", st.scorer, f"stages.{i}.scorer") if st.scorer else None
        selector = _instantiate(registry, "selector", st.selector, f"stages.{i}.selector")
        if hook(selector, "needs_scores") and scorer is None:
            raise PlanError(
                f"stages.{i}.selector: {st.selector.name!r} ranks by scores, but stages.{i}.scorer is empty; "
                f"add a scorer or use a selector that needs none ({_score_free(registry)})"
            )
        stages.append(CompiledStage(i, st, scorer, selector, plan.policy(i)))
    compiled = CompiledPlan(plan, stages, n_layers)
    if n_layers is not None:
        for cs in stages:
            if cs.layer >= n_layers:
                raise PlanError(
                    f"stages.{cs.index}.layer={cs.layer} is out of range: the model has {n_layers} decoder "
                    f"layers, so a cut layer must be in 0..{n_layers - 1}"
                )
            for part, comp in (("scorer", cs.scorer), ("selector", cs.selector)):
                if comp is None:
                    continue
                problem = hook(comp, "check_stage")(cs.layer, n_layers)
                if problem:
                    raise PlanError(f"stages.{cs.index}.{part} ({getattr(cs.spec, part).name}): {problem}")
        if plan.layer_average is not None and plan.layer_average.ratio is not None and plan.stages:
            # a ratio target r is reachable iff r x L > first cut layer, whatever the visual count
            if plan.layer_average.ratio * n_layers <= plan.stages[0].layer:
                raise PlanError(plan._unreachable(n_layers))
    if adapter is not None:
        provides = getattr(adapter, "provides", Need.HIDDEN)
        reasons = getattr(adapter, "missing_reasons", {})
        for cs in stages:
            missing = cs.needs & ~provides
            if missing:
                why = "; ".join(dict.fromkeys(reasons[m] for m in Need if m and m in missing and m in reasons))
                raise PlanError(
                    f"stages.{cs.index}: needs signals [{missing.describe()}] that the "
                    f"{adapter.__name__} adapter cannot provide (it provides: {provides.describe()})"
                    + (f": {why}" if why else "")
                )
        compiled.adapter_settings = _adapter_settings(adapter, plan.adapter)
    elif plan.adapter:
        compiled.adapter_settings = None
    return compiled


def _adapter_settings(adapter: type, options: dict[str, Any]) -> Any:
    """Validate ``Plan.adapter`` against the adapter's ``Settings`` (pydantic, extra=forbid)."""
    settings_cls = getattr(adapter, "Settings", None)
    if settings_cls is None:
        if options:
            raise PlanError(f"adapter: the {adapter.__name__} adapter takes no options; got {sorted(options)}")
        return None
    try:
        return settings_cls(**options)
    except ValidationError as exc:
        raise PlanError(
            format_validation_error(exc, "adapter", root=settings_cls) + f" (options of the {adapter.__name__} adapter)"
        ) from None


def _score_free(registry: Registry) -> str:
    names = [c.name for c in registry.components("selector") if not hook(c.cls, "needs_scores")]
    return ", ".join(names) or "none registered"
