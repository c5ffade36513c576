"""tokenreduce: training-free visual-token reduction for vision-language models.

Public API::

    import tokenreduce
    with tokenreduce.apply(model, "pio_64") as att:   # a preset name, a dict, or a Plan
        out = model.generate(**inputs)
    att.trace                                         # what each stage kept

See ``docs/concepts.md`` for plans, stages, budgets, cuts and traces.
"""

from tokenreduce.api import apply, compile_for
from tokenreduce.core.errors import (
    DuplicateComponentError,
    PlanError,
    PluginLoadError,
    TokenReduceError,
    UnknownComponentError,
    UnsupportedCallError,
    UnsupportedModelError,
)
from tokenreduce.core.plan import LayerAverage, Plan, Ratio, Stage, Tokens, Weight, build_plan
from tokenreduce.core.registry import hookimpl, list_components
from tokenreduce.core.types import Need, Selection, TokenView, Trace

__version__ = "0.1.0"

__all__ = [
    "apply",
    "build_plan",
    "compile_for",
    "list_components",
    "hookimpl",
    "Plan",
    "Stage",
    "Tokens",
    "Ratio",
    "Weight",
    "LayerAverage",
    "Need",
    "TokenView",
    "Selection",
    "Trace",
    "TokenReduceError",
    "PlanError",
    "UnknownComponentError",
    "DuplicateComponentError",
    "PluginLoadError",
    "UnsupportedModelError",
    "UnsupportedCallError",
]
