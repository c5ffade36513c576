"""The ``pio`` scorer against a straightforward reference, inside ``generate()`` on tiny LLaVA models.

The reference probe calls the real decoder-layer module per sample on the unpadded hidden states
with an explicit causal mask and rotary embeddings, then the final norm and the LM head, and
differentiates with plain autograd (the algorithm: ``docs/strategies/pio.md``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import oracle_generate
from registry_helpers import registry_with

import tokenreduce
from tokenreduce.core.errors import PlanError, UnsupportedCallError
from tokenreduce.core.plan import build_plan
from tokenreduce.core.presets import load_preset
from tokenreduce.core.types import TokenView
from tokenreduce.strategies.pio import PIOScorer, loss_rows, proxy_gradient
from tokenreduce.strategies.topk import topk_mask
from tokenreduce.testing.tiny import IMAGE_TOKEN_ID, build_tiny, make_inputs

PROMPTS = ["USER: <image> what color is the shape? ASSISTANT:", "<image> what shape is it?"]

# ----------------------------------------------------------------------------- registry helpers

RECORDS: list[dict] = []


class RecordingPIO(PIOScorer):
    """PIOScorer that keeps every view it scored and the scores it returned."""

    def score(self, view: TokenView) -> torch.Tensor:
        scores = super().score(view)
        RECORDS.append({"view": view, "scores": scores.clone(), "settings": self.settings})
        return scores


REGISTRY = registry_with("pio", scorers={"rec_pio": RecordingPIO})
_MODELS: dict = {}


def tiny(attn="sdpa", layers=4, dtype=torch.float32, kv_heads=4):
    """Tiny LLaVA (4 query heads); ``kv_heads=2`` gives grouped-query attention."""
    key = (attn, layers, dtype, kv_heads)
    if key not in _MODELS:
        _MODELS[key] = build_tiny(
            "llava", attn_implementation=attn, text_layers=layers, dtype=dtype, num_key_value_heads=kv_heads
        )
    return _MODELS[key]


def run(model, plan, prompts=PROMPTS, steps=2, **gen):
    """Generate under ``plan``; returns (attachment, the recorded scorer calls, sequences)."""
    RECORDS.clear()
    inputs = make_inputs("llava", prompts)
    with tokenreduce.apply(model, plan, registry=REGISTRY) as att:
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, **gen)
    return att, list(RECORDS), out


def pio_stage(layer, keep=8, **settings):
    return {"layer": layer, "keep": keep, "scorer": {"name": "rec_pio", **settings}, "selector": "topk"}


# ----------------------------------------------------------------------------- the reference


def reference_saliency(model, view: TokenView, layer_offset=0, loss_positions=4) -> torch.Tensor:
    """Per-sample full-layer probe on the unpadded sequence (first stage: positions 0..n-1)."""
    decoder = model.model.language_model
    layer = decoder.layers[view.layer + layer_offset]
    out = torch.zeros(view.visual_index.shape)
    for b in range(view.batch_size):
        slots = torch.nonzero(view.valid[b]).flatten()  # [n]
        n = slots.numel()
        vis = view.visual_index[b][view.visual_valid[b]]
        local = torch.searchsorted(slots, vis)  # visual candidates in unpadded coordinates
        h = view.hidden[b, slots].unsqueeze(0).detach().clone().requires_grad_(True)  # [1, n, d]
        pos = torch.arange(n).unsqueeze(0)
        mask = torch.triu(torch.full((1, 1, n, n), torch.finfo(h.dtype).min, dtype=h.dtype), diagonal=1)
        with torch.enable_grad():
            z = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=decoder.rotary_emb(h, pos))
            logits = model.lm_head(decoder.norm(z))[0].float()  # [n, V]
            available = n - 1 - int(local.max()) - 1
            m = min(loss_positions, available)
            tail = logits[n - 1 - m : n - 1]  # shifted sequence: the last m positions before S-1
            loss = F.cross_entropy(tail, tail.detach().argmax(-1))
            (grad,) = torch.autograd.grad(loss, h)
        out[b, : vis.numel()] = grad[0, local].float().norm(dim=-1)
    return out


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("layer,offset", [(1, 0), (2, 0), (2, -1)])
def test_matches_reference_batch_left_padding(layer, offset, kv_heads):
    model = tiny(kv_heads=kv_heads)
    att, rec, _ = run(model, {"stages": [pio_stage(layer, layer_offset=offset)]})
    (call,) = rec
    view, scores = call["view"], call["scores"]
    assert bool((~view.valid[1]).any()), "the second prompt should be left-padded"
    assert scores.dtype == torch.float32 and scores.shape == view.visual_index.shape
    ref = reference_saliency(model, view, layer_offset=offset)
    torch.testing.assert_close(scores, ref, rtol=1e-4, atol=1e-7)
    # the selection is the top 8 of the reference saliency (candidates = original positions here)
    keep = torch.full((view.batch_size,), 8)
    ref_kept = [view.visual_index[b][m].tolist() for b, m in enumerate(topk_mask(ref, view.visual_valid, keep))]
    assert att.trace.stages[0].kept == ref_kept
    assert att.trace.stages[0].visual_after == [8, 8]


@pytest.mark.parametrize("attn,kv_heads", [("sdpa", 4), ("eager", 4), ("sdpa", 2), ("eager", 2)])
def test_fast_equals_exact(attn, kv_heads):
    model = tiny(attn, kv_heads=kv_heads)
    plans = {p: {"stages": [pio_stage(2, probe=p)]} for p in ("fast", "exact")}
    (att_f, rec_f, out_f), (att_e, rec_e, out_e) = (run(model, plans[p]) for p in ("fast", "exact"))
    torch.testing.assert_close(rec_f[0]["scores"], rec_e[0]["scores"], rtol=1e-4, atol=1e-7)
    assert att_f.trace.stages[0].kept == att_e.trace.stages[0].kept
    assert torch.equal(out_f, out_e)
    # both gradients agree everywhere, not only at the visual tokens
    view = rec_f[0]["view"]
    g_fast, _ = proxy_gradient(view, probe="fast")
    g_exact, _ = proxy_gradient(view, probe="exact")
    torch.testing.assert_close(g_fast, g_exact, rtol=1e-4, atol=1e-7)


def test_sdpa_and_eager_agree():
    rec = [run(tiny(attn), {"stages": [pio_stage(1)]})[1][0]["scores"] for attn in ("sdpa", "eager")]
    torch.testing.assert_close(rec[0], rec[1], rtol=1e-4, atol=1e-7)


def test_grad_x_input_reduction():
    model = tiny()
    _, rec, _ = run(model, {"stages": [pio_stage(1, reduction="grad_x_input")]})
    view, scores = rec[0]["view"], rec[0]["scores"]
    grad, probe_input = proxy_gradient(view)
    idx = view.visual_index.unsqueeze(-1).expand(-1, -1, grad.shape[-1])
    expected = (grad.gather(1, idx) * probe_input.gather(1, idx)).sum(-1).abs().masked_fill(~view.visual_valid, 0)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-8)


def test_parameters_untouched_and_grad_mode_restored():
    model = tiny()
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    assert all(before.values())  # HF parameters require grad by default: the probe must not touch them
    for probe in ("fast", "exact"):
        run(model, {"stages": [pio_stage(1, probe=probe), pio_stage(3, keep=4, probe=probe)]})
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    assert not any(hook for layer in model.model.language_model.layers for hook in layer._forward_pre_hooks.values())


@pytest.mark.parametrize("probe", ["fast", "exact"])
def test_under_inference_mode_equals_no_grad(probe):
    model = tiny()
    plan = {"stages": [pio_stage(1, probe=probe), pio_stage(3, keep=4, probe=probe, layer_offset=-1)]}
    _, rec_ng, out_ng = run(model, plan)
    with torch.inference_mode():
        _, rec_im, out_im = run(model, plan)
    for a, b in zip(rec_im, rec_ng, strict=True):
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=0)
    assert torch.equal(out_im, out_ng)


def test_few_text_tokens_after_the_image():
    model = tiny()
    # two text tokens after the image: one loss position (the last token is excluded by the shift)
    att, rec, _ = run(model, {"stages": [pio_stage(1)]}, prompts=["USER: <image> yes no"])
    view = rec[0]["view"]
    rows, weight = loss_rows(view, 4)
    s = view.hidden.shape[1]
    assert rows.tolist() == [[s - 2]] and weight.tolist() == [[1.0]]
    torch.testing.assert_close(rec[0]["scores"], reference_saliency(model, view), rtol=1e-4, atol=1e-7)
    assert att.trace.stages[0].visual_after == [8]


@pytest.mark.parametrize("prompt", ["USER: <image>", "USER: <image> yes"])
def test_no_loss_position_after_the_image_is_a_clear_error(prompt):
    with pytest.raises(UnsupportedCallError, match="after its last visual token"):
        run(tiny(), {"stages": [pio_stage(1)]}, prompts=[prompt])


def test_loss_rows_ragged_batch():
    """Synthetic view: per-sample positions S-5..S-2 of the valid tokens, clipped to after the image."""
    valid = torch.tensor([[1] * 12, [0, 0, 0] + [1] * 9]).bool()
    visual_index = torch.tensor([[2, 3, 4], [4, 5, 0]])
    visual_valid = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    view = TokenView(
        0, 0, torch.zeros(2, 12, 4), valid, visual_index, visual_valid, visual_index, torch.tensor([3, 2]), None
    )
    rows, weight = loss_rows(view, 4)
    assert rows.tolist() == [[7, 8, 9, 10], [7, 8, 9, 10]]
    rows, weight = loss_rows(view, 20)  # clipped: sample 0 has 6 usable slots (5..10), sample 1 five (6..10)
    assert rows[0].tolist() == [5, 6, 7, 8, 9, 10] and rows[1, :5].tolist() == [6, 7, 8, 9, 10]
    torch.testing.assert_close(weight.sum(-1), torch.ones(2))
    assert weight[1, 5] == 0


def test_fp16_saliency_in_fp32():
    model = tiny(dtype=torch.float16, layers=2)
    _, rec, _ = run(model, {"stages": [pio_stage(1)]}, prompts=PROMPTS[:1], steps=1)
    view, scores = rec[0]["view"], rec[0]["scores"]
    assert view.hidden.dtype == torch.float16 and scores.dtype == torch.float32
    grad, _ = proxy_gradient(view)
    assert grad.dtype == torch.float16  # the probe runs in the model dtype
    g = grad.gather(1, view.visual_index.unsqueeze(-1).expand(-1, -1, grad.shape[-1]))
    assert torch.isfinite(scores).all() and bool((scores > 0).all())
    torch.testing.assert_close(scores, g.float().norm(dim=-1), rtol=1e-6, atol=0)


def test_three_stages_in_generate_match_the_oracle():
    model = tiny(layers=8)
    plan = {"positions": "renumber", "stages": [pio_stage(1, 10), pio_stage(3, 6), pio_stage(5, 3)]}
    inputs = make_inputs("llava", PROMPTS[:1])
    RECORDS.clear()
    with tokenreduce.apply(model, plan, registry=REGISTRY) as att:
        out = model.generate(
            **inputs, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    assert [s.visual_after for s in att.trace.stages] == [[10], [6], [3]]
    assert [s.layer for s in att.trace.stages] == [1, 3, 5]
    assert len(RECORDS) == 3 and [r["view"].n_visual.tolist() for r in RECORDS] == [[16], [10], [6]]
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(tokens) == 6  # generation ran to the end
    ids = inputs["input_ids"][0]
    text = torch.nonzero(ids != IMAGE_TOKEN_ID).flatten().tolist()
    stages = [(s.layer, sorted(text + s.kept[0]), "renumber") for s in att.trace.stages]
    o_tokens, o_logits = oracle_generate(model, inputs["input_ids"], inputs["pixel_values"], stages, 6)
    assert o_tokens == tokens
    torch.testing.assert_close(o_logits, torch.cat(out.logits), rtol=0, atol=1e-4)


def test_layer_offset_minus_one_refuses_layer_zero():
    with pytest.raises(PlanError, match="layer_offset=-1"):
        build_plan({"stages": [pio_stage(0, layer_offset=-1)]}, n_layers=4, registry=REGISTRY)
    build_plan({"stages": [pio_stage(0)]}, n_layers=4, registry=REGISTRY)  # offset 0 at layer 0 is fine


def test_settings_are_strict():
    with pytest.raises(PlanError, match="loss_position"):
        build_plan({"stages": [pio_stage(1, loss_position=4)]}, n_layers=4, registry=REGISTRY)
    with pytest.raises(PlanError, match="probe"):
        build_plan({"stages": [pio_stage(1, probe="full")]}, n_layers=4, registry=REGISTRY)


@pytest.mark.parametrize(
    "name,average,counts",
    [
        ("pio_64", 64.0, [92, 54, 22]),
        ("pio_128", 128.0, [218, 128, 54]),
        ("pio_192", 192.0, [342, 192, 90]),
    ],
)
def test_presets(name, average, counts):
    plan = load_preset(name)
    assert plan.description and plan.positions == "renumber"
    assert [s.layer for s in plan.stages] == [1, 10, 15]
    assert plan.keep_counts(576, 32) == counts
    assert plan.layer_average_for(576, 32) == average
    assert all(s.scorer.name == "pio" and s.selector.name == "nms" for s in plan.stages)
    if "nms" in REGISTRY.names("selector"):
        build_plan(plan, n_layers=32, registry=REGISTRY)


def test_layer_offset_minus_one_right_after_another_stage():
    run(tiny(), {"stages": [pio_stage(1, keep=10), pio_stage(2, keep=5, layer_offset=-1)]})


def test_full_row_layer_forward_equals_the_layer_module():
    """``layer_forward(rows=None)`` (every row) equals the model's own layer at valid slots and is
    finite at padding slots, for a left-padded batch."""
    _, rec, _ = run(tiny(kv_heads=2), {"stages": [pio_stage(2)]})
    view = rec[0]["view"]
    for offset in (0, -1):
        rows_out = view.signals.layer_forward(view.hidden, None, layer_offset=offset)
        module_out = view.signals.layer_module_forward(view.hidden, layer_offset=offset)
        assert torch.isfinite(rows_out).all() and torch.isfinite(module_out).all()
        torch.testing.assert_close(rows_out[view.valid], module_out[view.valid], rtol=1e-5, atol=1e-5)
