"""tokenreduce: training-free visual-token reduction for vision-language models.

Public API::

    import tokenreduce
    with tokenreduce.apply(model, "pio_64") as att:   # a preset name, a dict, or a Plan
        out = model.generate(**inputs)
    att.trace                                         # what each stage kept
    tokenreduce.pipeline("easyvqa_llava", "ref_pio_11")(image, "what shape is it?").answer  # one call

See ``docs/concepts.md`` for plans, stages, budgets, cuts and traces.
"""

from importlib import metadata as _metadata

from tokenreduce.api import apply, compile_for
from tokenreduce.core.arch import ArchSpec
from tokenreduce.core.errors import (
    AlreadyAttachedError,
    ComponentOutputError,
    DuplicateComponentError,
    PlanError,
    PluginLoadError,
    RegistrationError,
    TokenReduceError,
    UnknownComponentError,
    UnsupportedCallError,
    UnsupportedModelError,
)
from tokenreduce.core.plan import ClampWarning, LayerAverage, Plan, Ratio, Stage, Tokens, Weight, build_plan
from tokenreduce.core.registry import hookimpl, list_components
from tokenreduce.core.strategy import Scorer, Selector
from tokenreduce.core.types import Need, Selection, TokenView, Trace
from tokenreduce.pipeline import Pipeline, PipelineResult, pipeline  # the function shadows its module

try:  # the version is written once, in pyproject.toml; the installed metadata carries it
    __version__ = _metadata.version("tokenreduce")
except _metadata.PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "apply",
    "pipeline",
    "Pipeline",
    "PipelineResult",
    "build_plan",
    "compile_for",
    "list_components",
    "hookimpl",
    "Scorer",
    "Selector",
    "ArchSpec",
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
    "AlreadyAttachedError",
    "ComponentOutputError",
    "RegistrationError",
    "ClampWarning",
]
