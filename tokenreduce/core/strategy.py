"""The strategy contract: the :class:`Scorer` and :class:`Selector` base classes.

A strategy is a pydantic model whose fields are its settings (unknown keys are refused), plus
the method that does the work and a few optional hooks, each declared here with its default:

* ``needs``: the signals it reads (:class:`~tokenreduce.core.types.Need`), default none;
* ``needs_scores`` (selectors): whether it ranks by a scorer's scores, default False;
* ``check_stage(layer, n_layers)``: why it cannot run at a stage (None: it can);
* ``vision_layers()``: the vision-tower layers whose signals it reads;
* ``cost(c)``: its own FLOPs at a stage (:class:`~tokenreduce.core.cost.Cost`).

``PIOScorer(loss_positions=2)`` is both the settings and the component, so it can stand in a
plan directly (``Stage(layer=2, keep=64, scorer=PIOScorer(loss_positions=2))``).  Classes
written before these bases existed (a ``Settings`` model, ``__init__(settings)``, ``score`` or
``select``, no base class) keep working: :func:`hook` serves the hooks they lack with the
defaults below.  Writing a strategy: ``docs/writing-a-strategy.md``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict
from torch import Tensor

from .cost import Cost, StageCostInput
from .types import VISION_NEEDS, Need, Selection, TokenView

__all__ = ["HOOKS", "Scorer", "Selector", "Strategy", "hook"]

#: what the engine asks a component beside ``score`` / ``select`` (each has a default here)
HOOKS = ("needs", "needs_scores", "check_stage", "vision_layers", "cost")


class Strategy(BaseModel):
    """What scorers and selectors share: settings as fields, declared needs, hooks with defaults."""

    model_config = ConfigDict(extra="forbid")

    #: the pydantic model that validates this component's settings: the class itself (the
    #: registry and plans read ``cls.Settings``, as for classes without a base)
    Settings: ClassVar[type[BaseModel]]
    #: the signals it reads beyond the hidden states; a plan is refused on a model whose
    #: adapter does not provide them
    needs: ClassVar[Need] = Need.NONE

    def __init__(self, settings: BaseModel | Mapping[str, Any] | None = None, /, **data: Any) -> None:
        """``X(threshold=0.9)``; also ``X(settings)`` with a settings object or a mapping (the
        form of classes without a base, ``X(X.Settings(...))``), keyword values winning."""
        if settings is not None:
            if isinstance(settings, BaseModel):
                # an object of this class keeps its set fields; another model's defaults count
                given = settings.model_dump(exclude_unset=isinstance(settings, type(self)))
            else:
                given = dict(settings)
            data = {**given, **data}
        super().__init__(**data)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls.Settings = cls

    @property
    def settings(self) -> Self:
        """The validated settings: the component itself."""
        return self

    def check_stage(self, layer: int, n_layers: int) -> str | None:
        """Why it cannot run at a stage cutting before ``layer`` of ``n_layers`` (checked when
        the plan is built for a model); None: it can."""
        return None

    def vision_layers(self) -> Iterable[int] | None:
        """The vision-tower layers whose signals it reads (negative: from the end), so that only
        those are captured; None: every layer.  Default: every layer if it reads vision-tower
        signals, none otherwise."""
        return None if getattr(self, "needs", Need.NONE) & VISION_NEEDS else ()

    def cost(self, c: StageCostInput) -> Cost | None:
        """Its own work at one stage for one sample, in true and paper-convention FLOPs
        (``docs/measurement.md``).  Default: not counted."""
        return Cost.not_counted("no cost model: its class declares no cost()")


class Scorer(Strategy):
    """Scores visual candidates: ``score(view)`` returns ``[B, N]`` float32, higher = keep.

    Values at invalid candidates (``view.visual_valid`` False) are ignored by selectors; at valid
    ones they must be finite (the engine refuses NaN, infinite and integer scores).  A subclass
    must define ``score`` itself: the stub below counts as missing when the class is registered.
    """

    def score(self, view: TokenView) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement score(view)")


class Selector(Strategy):
    """Chooses which visual candidates survive a cut.

    ``select(view, scores, keep)``: ``scores`` is ``[B, N]`` float32, or None when the stage has
    no scorer (only for ``needs_scores = False``); ``keep`` is ``[B]`` long with
    ``1 <= keep[b] <= n_visual[b]`` (0 for a sample without visual tokens).  Returns exactly
    ``keep[b]`` ascending candidate indices per sample.  A subclass must define ``select`` itself:
    the stub below counts as missing when the class is registered.
    """

    #: True: it ranks by scores, so a stage must name a scorer
    needs_scores: ClassVar[bool] = False

    def select(self, view: TokenView, scores: Tensor | None, keep: Tensor) -> Selection:
        raise NotImplementedError(f"{type(self).__name__} must implement select(view, scores, keep)")


Strategy.Settings = Strategy
Scorer.Settings = Scorer
Selector.Settings = Selector


def hook(component: Any, name: str) -> Any:
    """``component``'s hook ``name`` (one of :data:`HOOKS`); for a class without a base, the
    default declared above when it lacks the hook.  Works on a component or its class (for
    attributes such as ``needs``)."""
    if name not in HOOKS:
        raise ValueError(f"unknown hook {name!r}; the hooks are {', '.join(HOOKS)}")
    value = getattr(component, name, None)
    if value is not None:
        return value
    default = inspect.getattr_static(Selector, name)
    if inspect.isfunction(default):
        return default.__get__(component)  # the base's default, bound to this component
    return default
