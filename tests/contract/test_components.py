"""The strategy contract, checked on every registered scorer and selector (plugins included) on
every tiny architecture.

Each case runs one stage with the component (default settings) inside a real prefill of a tiny
model, on a ragged, left-padded batch (two images in the first prompt, one in the second), and
records what the component returned.  Checked:

* shapes and dtypes: scores ``[B, N]`` float32; a selection's index ``[B, k]`` long, validity
  ``[B, k]`` bool and merged hidden states ``[B, k, d]`` in the model's dtype;
* finiteness: scores at valid candidates, merged hidden states;
* the selection is valid: exactly ``keep[b]`` candidates per sample, ascending, unique, in range;
* determinism: the same batch twice gives identical outputs;
* batch = singles: each sample alone gives the same scores (to float tolerance) and the same
  selection as in the batch;
* no grad leak: no parameter gets a ``.grad``, ``requires_grad`` and the grad mode are unchanged,
  and nothing returned requires grad.

A component that needs a signal the architecture's adapter cannot provide is skipped with the
reason the plan build gives.  The contract: ``docs/writing-a-strategy.md``.
"""

from __future__ import annotations

import types

import pytest
import torch

import tokenreduce
from tokenreduce.core.errors import PlanError
from tokenreduce.core.registry import Registry, get_registry, hookimpl, make_plugin_manager
from tokenreduce.core.strategy import hook
from tokenreduce.core.types import VISION_NEEDS, Need, Selection
from tokenreduce.testing.tiny import KINDS, build_tiny, make_inputs

PROMPTS = ["USER: <image> <image> what color is the shape? ASSISTANT:", "<image> what shape is it?"]
IMAGES_BEFORE = [0, 2]  # image seed of each prompt's first image (make_inputs: image i has seed i)
RECORDS: list[dict] = []
#: settings a tiny model needs instead of a default (its vision towers have 2 layers)
TINY_SETTINGS = {("selector", "pio_ve"): {"local_layer": 0}, ("selector", "pio_ve_qwen"): {"local_layer": 0}}


def _components() -> list:
    return [
        pytest.param(c, id=f"{c.kind}:{c.name}")
        for c in get_registry().components()
        if c.kind in ("scorer", "selector")
    ]


def _recording(cls: type, kind: str) -> type:
    """A subclass of ``cls`` that records what its ``score`` / ``select`` returns."""
    if kind == "scorer":

        def score(self, view):
            out = cls.score(self, view)
            RECORDS.append({"kind": kind, "view": view, "out": out})
            return out

        body = {"score": score}
    else:

        def select(self, view, scores, keep):
            out = cls.select(self, view, scores, keep)
            RECORDS.append({"kind": kind, "view": view, "out": out, "keep": keep.clone()})
            return out

        body = {"select": select}
    return type(f"Recording{cls.__name__}", (cls,), {**body, "__module__": __name__})


def _registry(comp) -> Registry:
    """The process's components plus the recording copy of ``comp``, named ``contract_probe``."""
    plugin = types.ModuleType("contract_plugin")

    @hookimpl
    def tokenreduce_register(registry):
        getattr(registry, comp.kind)("contract_probe", _recording(comp.cls, comp.kind), comp.settings)

    plugin.tokenreduce_register = tokenreduce_register
    pm = make_plugin_manager()
    pm.register(plugin, name="test:contract")
    return Registry.from_plugin_manager(pm)


def _plan(comp, n_layers: int) -> dict:
    """One stage around ``comp`` (default settings but :data:`TINY_SETTINGS`): at layer 0 for vision-tower signals, else the deepest of 2, 1, 0
    that the component accepts; a helper scorer for a selector that ranks by scores."""
    settings = TINY_SETTINGS.get((comp.kind, comp.name), {})
    instance = comp.settings.model_validate(settings)
    instance = instance if isinstance(instance, comp.cls) else comp.cls(instance)
    needs = hook(instance, "needs")
    layers = [0] if needs & VISION_NEEDS else [2, 1, 0]
    layer = next((k for k in layers if not hook(instance, "check_stage")(k, n_layers)), layers[-1])
    stage: dict = {"layer": layer, "keep": {"ratio": 0.5}}
    probe = {"name": "contract_probe", **settings}
    if comp.kind == "scorer":
        stage.update(scorer=probe, selector="topk")
    else:
        stage["selector"] = probe
        if hook(instance, "needs_scores"):
            stage["scorer"] = "vision_cls" if needs & VISION_NEEDS else "norm"
    return {"stages": [stage]}


_MODELS: dict = {}


def _tiny(kind: str):
    if kind not in _MODELS:
        _MODELS[kind] = build_tiny(kind)
    return _MODELS[kind]


def _run(model, plan: dict, registry: Registry, prompts: list[str], seed: int) -> dict:
    RECORDS.clear()
    inputs = make_inputs(model.config.model_type, prompts, seed=seed)
    with tokenreduce.apply(model, plan, registry=registry):  # generate: positions from the attention mask
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    (record,) = RECORDS
    return record


def _selection_rows(sel: Selection, keep: torch.Tensor, n_visual: torch.Tensor) -> list[list[int]]:
    """Check a selection's form; return its rows as candidate-index lists."""
    assert sel.index.dtype == torch.long and sel.valid.dtype == torch.bool
    assert sel.index.shape == sel.valid.shape and sel.index.shape[0] == keep.shape[0]
    assert sel.valid.sum(-1).tolist() == keep.tolist(), "exactly keep[b] candidates per sample"
    rows = sel.to_lists()
    for row, n, valid in zip(rows, n_visual.tolist(), sel.valid):
        assert row == sorted(set(row)), f"indices must be ascending and unique: {row}"
        assert all(0 <= j < n for j in row), f"indices must be candidates 0..{n - 1}: {row}"
        assert bool(valid[: len(row)].all()), "valid entries first"
    return rows


def _check_output(record: dict, model) -> None:
    view, out = record["view"], record["out"]
    if record["kind"] == "scorer":
        assert isinstance(out, torch.Tensor) and out.shape == view.visual_valid.shape
        assert out.dtype == torch.float32
        assert bool(torch.isfinite(out[view.visual_valid]).all()), "scores must be finite at valid candidates"
        assert not out.requires_grad
        return
    assert isinstance(out, Selection)
    _selection_rows(out, record["keep"], view.n_visual)
    if out.hidden is not None:
        assert out.hidden.shape == (*out.index.shape, view.hidden.shape[-1])
        assert out.hidden.dtype == view.hidden.dtype == model.dtype
        assert bool(torch.isfinite(out.hidden[out.valid]).all())
        assert not out.hidden.requires_grad


def _per_sample(record: dict) -> list:
    """Per sample, what the component decided: (valid scores) or (rows, merged hidden rows)."""
    view, out = record["view"], record["out"]
    if record["kind"] == "scorer":
        return [out[b][view.visual_valid[b]] for b in range(view.batch_size)]
    rows = out.to_lists()
    hidden = [out.hidden[b][out.valid[b]] if out.hidden is not None else None for b in range(view.batch_size)]
    return list(zip(rows, hidden))


def _assert_same(a, b, exact: bool) -> None:
    if isinstance(a, torch.Tensor):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        return
    (rows_a, hidden_a), (rows_b, hidden_b) = a, b
    assert rows_a == rows_b
    assert (hidden_a is None) == (hidden_b is None)
    if hidden_a is not None:
        _assert_same(hidden_a, hidden_b, exact)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("comp", _components())
def test_component_contract(comp, kind):
    model = _tiny(kind)
    n_layers = model.config.get_text_config().num_hidden_layers
    registry = _registry(comp)
    plan = _plan(comp, n_layers)
    try:
        tokenreduce.compile_for(model, plan, registry=registry)
    except PlanError as exc:
        if "cannot provide" in str(exc):
            pytest.skip(f"{comp.kind} {comp.name!r} on {kind}: {exc}")
        raise
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    grad_mode = torch.is_grad_enabled()

    batch = _run(model, plan, registry, PROMPTS, seed=0)
    _check_output(batch, model)
    assert batch["view"].n_visual[0] != batch["view"].n_visual[1], "the batch is ragged"
    again = _run(model, plan, registry, PROMPTS, seed=0)
    for x, y in zip(_per_sample(batch), _per_sample(again)):
        _assert_same(x, y, exact=True)
    for b, (prompt, seed) in enumerate(zip(PROMPTS, IMAGES_BEFORE)):
        single = _run(model, plan, registry, [prompt], seed=seed)
        _check_output(single, model)
        _assert_same(_per_sample(single)[0], _per_sample(batch)[b], exact=False)

    assert all(p.grad is None for p in model.parameters())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == requires_grad
    assert torch.is_grad_enabled() == grad_mode


def test_every_builtin_is_based_on_the_contract():
    from tokenreduce.core.strategy import Scorer, Selector

    base = {"scorer": Scorer, "selector": Selector}
    for c in get_registry().components():
        if c.kind in base and c.origin.startswith("builtin:"):
            assert issubclass(c.cls, base[c.kind]) and c.settings is c.cls, c.name
            assert isinstance(hook(c.cls, "needs"), Need)
