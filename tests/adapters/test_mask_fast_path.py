"""The mask fast path after a cut: with no padding anywhere in the batch, sdpa layers after a cut
get no mask (prefill: ``is_causal``; decode: no mask at all), and the outputs equal those of the
explicit-mask path (``build_mask(..., fast_path=False)``), for LLaVA-1.5 and Qwen2.5-VL."""

from __future__ import annotations

import functools

import pytest
import torch

import tokenreduce
import tokenreduce.adapters.cut.layer_kwargs as lk
from tokenreduce.adapters.llama_signals import LlamaSignals
from tokenreduce.adapters.masks import build_mask
from tokenreduce.testing.tiny import build_tiny, make_inputs

PROMPT = "USER: <image> what color is the shape? ASSISTANT:"
SHORT = "USER: <image> shape? ASSISTANT:"
STEPS = 4
PLANS = {
    "keep": {"positions": "keep", "stages": [{"layer": 1, "keep": 5, "scorer": "fastv", "selector": "topk"}]},
    "renumber": {
        "positions": "renumber",
        "stages": [
            {"layer": 1, "keep": 8, "scorer": "norm", "selector": "topk"},
            {"layer": 3, "keep": 3, "scorer": "fastv", "selector": "topk"},
        ],
    },
}


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl"])
def model(request):
    m = build_tiny(request.param)
    m.kind = request.param
    return m


def run(model, inputs, plan, monkeypatch, fast_path: bool):
    """Generate under ``plan``; returns (sequences, step logits, forward logits, masks the layers got)."""
    masks: list = []

    def spy(*args, **kwargs):
        mask = functools.partial(build_mask, fast_path=fast_path)(*args, **kwargs)
        masks.append(mask)
        return mask

    with monkeypatch.context() as mp:
        mp.setattr(lk, "build_mask", spy)
        with tokenreduce.apply(model, plan):
            out = model.generate(
                **inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
            forward = model(**inputs).logits
    return out.sequences, torch.stack(out.logits, 1), forward, masks


@pytest.mark.parametrize("policy", list(PLANS))
def test_unpadded_batch_takes_the_fast_path_and_matches_the_masked_path(model, policy, monkeypatch):
    inputs = make_inputs(model.kind, [PROMPT, PROMPT], seed=3)  # two images, the same length: no padding
    assert bool(inputs["attention_mask"].bool().all())
    seq, logits, forward, masks = run(model, inputs, PLANS[policy], monkeypatch, fast_path=True)
    ref_seq, ref_logits, ref_forward, ref_masks = run(model, inputs, PLANS[policy], monkeypatch, fast_path=False)
    # fast path: no mask at all, for the prefill after each cut and every decode step
    assert masks and all(m is None for m in masks)
    assert ref_masks and all(m is not None and m.dtype == torch.bool for m in ref_masks)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(forward, ref_forward, atol=1e-5, rtol=1e-5)


def test_padded_batch_keeps_the_explicit_mask(model, monkeypatch):
    inputs = make_inputs(model.kind, [PROMPT, SHORT])
    assert not bool(inputs["attention_mask"].bool().all())
    seq, logits, _, masks = run(model, inputs, PLANS["keep"], monkeypatch, fast_path=True)
    ref_seq, ref_logits, _, _ = run(model, inputs, PLANS["keep"], monkeypatch, fast_path=False)
    assert masks and all(m is not None for m in masks)  # padding: never the fast path
    assert torch.equal(seq, ref_seq)
    assert torch.equal(logits, ref_logits)


def test_the_cut_changes_the_output(model, monkeypatch):
    """The comparisons above mean something only if the cut removes tokens that matter."""
    inputs = make_inputs(model.kind, [PROMPT, PROMPT], seed=3)
    _, logits, _, _ = run(model, inputs, PLANS["keep"], monkeypatch, fast_path=True)
    plain = model.generate(
        **inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    assert not torch.allclose(logits, torch.stack(plain.logits, 1))


# -- build_mask on its own ---------------------------------------------------------------------------
def _slots(valid):
    b, s = valid.shape
    return torch.arange(s).expand(b, -1), valid


@pytest.mark.parametrize("impl", ["sdpa", "eager", "flash_attention_2"])
def test_build_mask_fast_path_rules(impl):
    order, valid = _slots(torch.ones(2, 5, dtype=torch.bool))
    fast = build_mask(impl, order, valid, order, valid, torch.float32, self_slot=order)
    full = build_mask(impl, order, valid, order, valid, torch.float32, self_slot=order, fast_path=False)
    assert full is not None
    if impl == "eager":
        assert fast is not None and torch.equal(fast, full)
    else:
        assert fast is None
    if impl == "sdpa":  # the explicit mask is plain causality
        assert torch.equal(full[:, 0], torch.ones(5, 5, dtype=torch.bool).tril().expand(2, -1, -1))
    padded = valid.clone()
    padded[1, 0] = False
    masked = build_mask(impl, order, padded, order, padded, torch.float32, self_slot=order)
    assert masked is not None  # padding anywhere in the batch: an explicit mask
    # decode, one query over all keys: no mask on the fast path under sdpa
    q = torch.full((2, 1), 5)
    step = build_mask(impl, q, torch.ones(2, 1, dtype=torch.bool), order, valid, torch.float32)
    assert (step is None) == (impl != "eager")


# -- layer K-1's keys from the KV cache -------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llava", "llava_next", "qwen2_5_vl", "qwen3_vl"])
def test_cached_keys_are_the_recomputed_keys_bit_for_bit(kind, monkeypatch):
    """FastV/DART read layer K-1's keys; that layer stored them in the KV cache during the same
    prefill, and the cached copy equals the recomputation exactly (else it would not be reused)."""
    model = build_tiny(kind)
    inputs = make_inputs(kind, [PROMPT, SHORT])  # padded batch: the cut layer sees padding slots too
    pairs = []
    original = LlamaSignals._cached_keys

    def spy(self, layer_offset, hidden, kwargs):
        cached = original(self, layer_offset, hidden, kwargs)
        if cached is not None:
            layer = self._layers[self._layer + layer_offset]
            cos, sin = self._rotary(kwargs, hidden.shape[0])
            with torch.no_grad():
                k, _ = self._keys_values(layer, layer.input_layernorm(hidden), cos, sin, with_values=False)
            pairs.append((cached.clone(), k))
        return cached

    plan = {
        "stages": [
            {"layer": 1, "keep": 6, "scorer": "fastv", "selector": "topk"},
            {"layer": 3, "keep": 3, "selector": "dart"},
        ]
    }
    monkeypatch.setattr(LlamaSignals, "_cached_keys", spy)
    with tokenreduce.apply(model, plan) as att:
        att.record_scores = True
        seq = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
        kept = [st.kept for st in att.trace.stages]
        fastv_scores = att.trace.stages[0].scores
        logits = model(**inputs).logits
        forward_kept = [st.kept for st in att.trace.stages]
        assert len(pairs) == 4  # both stages of both prefills read the cache
        no_cache = model(**inputs, use_cache=False).logits  # no cache: recomputed, same result
        assert [st.kept for st in att.trace.stages] == forward_kept
        assert torch.equal(no_cache, logits)
    for cached, recomputed in pairs:
        assert cached.shape == recomputed.shape
        assert torch.equal(cached, recomputed)
    monkeypatch.setattr(LlamaSignals, "_cached_keys", lambda self, *a: None)  # recompute everywhere
    with tokenreduce.apply(model, plan) as att:
        att.record_scores = True
        assert torch.equal(model.generate(**inputs, max_new_tokens=STEPS, do_sample=False), seq)
        assert [st.kept for st in att.trace.stages] == kept
        # FastV's attention rows: cached keys and the query rows' own norm give the same bits
        for got, want in zip(att.trace.stages[0].scores, fastv_scores):
            assert torch.equal(got, want)


def test_cached_keys_not_used_for_the_cut_layer_or_without_cache(monkeypatch):
    """layer_offset 0 (the cut layer has not run yet) and a forward without cache recompute."""
    model = build_tiny("llava")
    inputs = make_inputs("llava", [PROMPT])
    used = []
    original = LlamaSignals._cached_keys

    def spy(self, layer_offset, hidden, kwargs):
        out = original(self, layer_offset, hidden, kwargs)
        used.append((layer_offset, out is not None))
        return out

    monkeypatch.setattr(LlamaSignals, "_cached_keys", spy)
    plan = {"stages": [{"layer": 2, "keep": 5, "scorer": {"name": "fastv", "layer_offset": 0}, "selector": "topk"}]}
    with tokenreduce.apply(model, plan):
        model(**inputs)
    plan = {"stages": [{"layer": 2, "keep": 5, "scorer": "fastv", "selector": "topk"}]}
    with tokenreduce.apply(model, plan):
        model(**inputs, use_cache=False)
    assert used == [(0, False), (-1, False)]
