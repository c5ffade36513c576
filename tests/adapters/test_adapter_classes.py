"""Adapters as instances of DecoderAdapter: the class-level surface the registry uses, the
attachment protocol, a failed attach leaving no hook behind, and the deprecated ArchHandles path."""

from __future__ import annotations

import pytest
import torch

import tokenreduce
from tokenreduce.adapters import architecture_folders
from tokenreduce.adapters.cut import CutAttachment, DecoderAdapter
from tokenreduce.core.interfaces import Attachment, ModelAdapter
from tokenreduce.core.registry import get_registry
from tokenreduce.testing.tiny import build_tiny, make_inputs

PROMPT = "USER: <image> what color is the shape? ASSISTANT:"
PLAN = {"stages": [{"layer": 1, "keep": 5, "scorer": "norm", "selector": "topk"}]}


@pytest.fixture(scope="module")
def model():
    return build_tiny("llava")


def all_hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


def test_registered_adapters_follow_the_protocol():
    builtins = [c for c in get_registry().components("adapter") if c.origin == "builtin:tokenreduce.adapters"]
    assert {c.name for c in builtins} == set(architecture_folders()) - {"cut"}
    for comp in builtins:
        assert isinstance(comp.cls, ModelAdapter), comp.name
        assert issubclass(comp.cls, DecoderAdapter), comp.name


def test_adapter_is_an_instance_per_model(model):
    adapter_cls = tokenreduce.api.adapter_for(model)
    adapter = adapter_cls(model)
    assert adapter.language_model is model.model.language_model and adapter.head is model.lm_head
    assert adapter.name == "llava" and adapter.attn_implementation in ("sdpa", "eager")
    ids = torch.tensor([[1, adapter.image_token, 5]])
    assert adapter.is_media_token(ids).tolist() == [[False, True, False]]
    assert adapter_cls.num_layers(model) == len(model.model.language_model.layers)


def test_attachment_follows_the_protocol(model):
    with tokenreduce.apply(model, PLAN) as att:
        assert isinstance(att, Attachment) and isinstance(att, CutAttachment)
        assert att.attached
        model(**make_inputs("llava", [PROMPT]))
        assert att.candidate_mask is not None and att.visual_grid().shape[-1] == 3
    assert not att.attached
    att.detach()  # idempotent


def test_failed_attach_leaves_no_hook(model, monkeypatch):
    before = all_hooks(model)
    last = model.model.language_model.layers[-1]

    def refuse(*args, **kwargs):
        raise RuntimeError("no hooks here")

    monkeypatch.setattr(last, "register_forward_pre_hook", refuse)
    with pytest.raises(RuntimeError, match="no hooks here"):
        tokenreduce.apply(model, PLAN)
    assert all_hooks(model) == before


def test_deprecated_arch_handles_still_attach(model):
    from tokenreduce.adapters.decoder_cut import ArchHandles
    from tokenreduce.adapters.decoder_cut import CutAttachment as OldCutAttachment
    from tokenreduce.adapters.llama_family import generate_position_ids
    from tokenreduce.adapters.llava.adapter import square_grid

    inputs = make_inputs("llava", [PROMPT])
    adapter, compiled = tokenreduce.compile_for(model, PLAN)
    with adapter.attach(model, compiled) as att:
        want = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    token = model.config.image_token_id
    with pytest.warns(DeprecationWarning):
        handles = ArchHandles(
            top=model,
            decoder=model.model.language_model,
            lm_head=model.lm_head,
            visual_mask=lambda ids, ctx: ids == token,
            visual_grid=lambda ids, vis, ctx: square_grid(ids, vis, model.config.image_seq_length),
            attn_implementation=model.model.language_model.config._attn_implementation,
            name="llava",
            decode_position_ids=generate_position_ids,
        )
    with OldCutAttachment(handles, compiled) as old:
        got = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, want)
    assert old.trace.stages[0].kept == att.trace.stages[0].kept


def test_layer_output_hooks_only_for_adapters_that_use_them():
    """The optional prefill hooks: an adapter that does not override ``layer_output`` gets no
    output hook on its layers (nothing changes for it); Qwen3-VL (DeepStack) does."""
    registry = get_registry()
    users = {name for name in registry.model_types() if registry.adapter_for(name).cls.uses_layer_output()}
    assert users == {"qwen3_vl"}
    model = build_tiny("llava")
    with tokenreduce.apply(model, "random_50"):
        assert sum(len(layer._forward_hooks) for layer in model.model.language_model.layers) == 0
