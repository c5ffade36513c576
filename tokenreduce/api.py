"""The front door: ``with tokenreduce.apply(model, plan) as att: model.generate(...)``."""

from __future__ import annotations

from typing import Any

from tokenreduce.core.errors import UnsupportedModelError
from tokenreduce.core.plan import CompiledPlan, Plan, build_plan
from tokenreduce.core.registry import Registry, get_registry


def adapter_for(model: Any, registry: Registry | None = None) -> type:
    """The registered adapter class for ``model.config.model_type``."""
    registry = registry or get_registry()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    comp = registry.adapter_for(model_type) if model_type else None
    if comp is None:
        supported = registry.model_types()
        raise UnsupportedModelError(
            f"no tokenreduce adapter for model_type {model_type!r} ({type(model).__name__}); "
            f"supported model types: {', '.join(supported)}"
        )
    return comp.cls


def compile_for(model: Any, plan: Plan | dict | str, registry: Registry | None = None) -> tuple[type, CompiledPlan]:
    """Validate ``plan`` against the registry and the model (depth, signals) without attaching."""
    adapter = adapter_for(model, registry)
    return adapter, build_plan(plan, n_layers=adapter.num_layers(model), adapter=adapter, registry=registry)


def apply(model: Any, plan: Plan | dict | str, *, registry: Registry | None = None):
    """Attach ``plan`` to ``model`` and return the attachment (a context manager).

    ``plan`` is a :class:`~tokenreduce.core.plan.Plan`, a plain mapping, or the name of a preset
    in ``conf/plan``.  Everything is validated before any hook is registered; on exit (also on an
    exception) every hook is removed and the model computes exactly what it computed before.
    ``model`` is the whole model with its LM head (``*ForConditionalGeneration``).  One attachment
    per model at a time: a model that already has one is refused
    (:class:`~tokenreduce.core.errors.AlreadyAttachedError`); ``docs/concepts.md``, Attachments.
    """
    from tokenreduce.adapters.cut.attachment import check_unattached

    check_unattached(model)  # before compiling: the error names the attachment present
    adapter, compiled = compile_for(model, plan, registry)
    return adapter.attach(model, compiled)
