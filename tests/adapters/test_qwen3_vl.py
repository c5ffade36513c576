"""The Qwen3-VL adapter (``tokenreduce/adapters/qwen3_vl``) against an independent decode loop
with DeepStack, on tiny random-weight models (CPU): identity, the oracle under both attention
implementations and both position policies (cuts before, at and after the DeepStack layers),
ragged batches equal single runs, detach, the signals with q/k norms, encoder-side plans (DeepStack
rows after a layer-0 cut, merged tokens included), the presets at the real depth, FLOPs of the real
config, offline loading and the refusals."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from registry_helpers import registry_with
from transformers import DynamicCache

import tokenreduce
from tokenreduce.adapters import llama_signals
from tokenreduce.adapters.qwen3_vl.adapter import deepstack_rows
from tokenreduce.core.errors import PlanError, UnsupportedCallError
from tokenreduce.core.presets import load_preset
from tokenreduce.core.types import TokenView
from tokenreduce.strategies.norm import NormScorer
from tokenreduce.testing.tiny import build_tiny, make_inputs, save_tiny_checkpoint

KIND = "qwen3_vl"
PROMPT = "USER: <image> what color is the shape? ASSISTANT:"
SHORT = "USER: <image> shape? ASSISTANT:"
TWO = "USER: <image> and <image> same shape? ASSISTANT:"
SIZES = [(128, 96), (60, 120)]  # (width, height): 12 and 8 visual tokens
STEPS = 4
BATCH_ATOL = 3e-5  # batch vs single runs: float accumulation order differs with padding


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return build_tiny(KIND, attn_implementation=request.param)


@pytest.fixture(scope="module")
def sdpa_model():
    return build_tiny(KIND)


def generate(model, inputs, steps=STEPS):
    out = model.generate(
        **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    return out.sequences, torch.stack(out.logits, 1)  # [B, S+T], [B, T, V]


# -- the oracle: an independent decode loop with DeepStack ------------------------------------------
@torch.no_grad()
def deepstack_oracle(model, inputs, stages, steps=STEPS, deepstack="kept", merge=False):
    """Greedy decode of one prompt (no padding) with tokens dropped before given layers.

    ``stages``: ``(K, kept original positions, policy)``.  After decoder layer ``i`` (``i`` below
    the number of DeepStack taps) the tap ``i`` rows are added to the visual tokens present:
    ``deepstack="kept"`` adds to each surviving visual token the row of its own original visual
    position (what Qwen3-VL computes on a shorter sequence); ``"dropped"`` skips the injections
    once a token was removed; ``"misaligned"`` adds rows 0..n-1 in order (the rows of the first
    visual tokens).  ``merge``: at a layer-0 stage, each dropped visual token is averaged into its
    most cosine-similar kept one (on the merger outputs; PIO w/ VE's merge), and the merged token
    keeps the DeepStack rows of its own position.  Returns ``(tokens, logits [steps, V])``.
    """
    cfg = model.config
    ids = inputs["input_ids"]
    assert ids.shape[0] == 1 and bool(inputs["attention_mask"].bool().all())
    decoder = model.model.language_model
    feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    h = model.get_input_embeddings()(ids).clone()
    image = ids[0] == cfg.image_token_id
    h[0, image] = torch.cat(list(feats.pooler_output)).to(h.dtype)
    taps = [torch.cat(list(f)).to(h.dtype) for f in feats.deepstack_features]  # each [N_vis, d]
    visual_row = {p: j for j, p in enumerate(torch.nonzero(image).flatten().tolist())}
    rope, _ = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"])
    rope = rope[:, 0]  # [3, S]
    seq = ids.shape[1]
    kept = list(range(seq))
    decode_base = int(rope.max()) + 1
    bases, removed = [], False
    stage_at = {k: (list(pos), policy) for k, pos, policy in stages}
    cache = DynamicCache()
    for i, layer in enumerate(decoder.layers):
        if i in stage_at:
            new, policy = stage_at[i]
            if merge and i == 0:
                anchors = [p for p in new if p in visual_row]
                gone = [p for p in visual_row if p not in set(new)]
                normed = torch.nn.functional.normalize(h[0], dim=-1)
                assign = (normed[gone] @ normed[anchors].T).argmax(-1)
                h = h.clone()
                for j, p in enumerate(anchors):
                    mine = [g for g, a in zip(gone, assign.tolist()) if a == j]
                    h[0, p] = (h[0, p] + h[0, mine].sum(0)) / (1 + len(mine))
            rows = [kept.index(p) for p in new]
            removed = removed or len(new) < len(kept)
            h, kept = h[:, rows], new
            if policy == "keep":
                rope = rope[:, rows]
            else:
                rope = torch.arange(len(kept)).expand(3, -1)
                decode_base = len(kept)
        bases.append(decode_base)
        n = h.shape[1]
        mask = torch.triu(torch.full((1, 1, n, n), torch.finfo(h.dtype).min), diagonal=1)
        h = layer(
            h,
            attention_mask=mask,
            position_embeddings=decoder.rotary_emb(h, rope[:, None]),
            past_key_values=cache,
            use_cache=True,
        )
        if i < len(taps) and not (removed and deepstack == "dropped"):
            slots = [s for s, p in enumerate(kept) if p in visual_row]
            rows = (
                list(range(len(slots)))
                if removed and deepstack == "misaligned"
                else [visual_row[kept[s]] for s in slots]
            )
            h = h.clone()
            h[0, slots] = h[0, slots] + taps[i][rows]
    logits = model.lm_head(decoder.norm(h[:, -1]))
    tokens, out = [], []
    for t in range(steps):
        out.append(logits[0])
        tokens.append(int(logits.argmax(-1)))
        if t == steps - 1:
            break
        h = decoder.embed_tokens(torch.tensor([[tokens[-1]]]))
        for i, layer in enumerate(decoder.layers):
            pos = torch.full((3, 1, 1), bases[i] + t)
            h = layer(h, attention_mask=None, position_embeddings=decoder.rotary_emb(h, pos), past_key_values=cache)
        logits = model.lm_head(decoder.norm(h[:, -1]))
    return tokens, torch.stack(out)


def oracle_stages(att, policies):
    """The attachment's stages for the oracle: every non-candidate position plus the kept ones."""
    text = torch.nonzero(~att.candidate_mask[0]).flatten().tolist()
    return [(st.layer, sorted(set(text) | set(st.kept[0])), pol) for st, pol in zip(att.trace.stages, policies)]


def test_oracle_without_stages_equals_generate(sdpa_model):
    inputs = make_inputs(KIND, [PROMPT], image_sizes=SIZES[:1])
    seq, logits = generate(sdpa_model, inputs)
    tokens, ref = deepstack_oracle(sdpa_model, inputs, [])
    assert seq[0, inputs["input_ids"].shape[1] :].tolist() == tokens
    torch.testing.assert_close(logits[0], ref, atol=1e-5, rtol=0)


ORACLE_CASES = {
    "K0": [{"layer": 0, "keep": {"ratio": 0.4}, "selector": {"name": "random", "seed": 1}}],
    "K1": [{"layer": 1, "keep": {"ratio": 0.5}, "selector": {"name": "random", "seed": 2}}],
    "K2": [{"layer": 2, "keep": {"ratio": 0.3}, "scorer": "norm", "selector": "topk"}],
    "K3": [{"layer": 3, "keep": {"ratio": 0.3}, "selector": "uniform"}],
    "K0+K1": [
        {"layer": 0, "keep": {"ratio": 0.7}, "selector": "uniform"},
        {"layer": 1, "keep": {"ratio": 0.4}, "scorer": "norm", "selector": "topk"},
    ],
}


@pytest.mark.parametrize("policy", ["keep", "renumber"])
@pytest.mark.parametrize("case", list(ORACLE_CASES))
def test_pruned_generate_equals_deepstack_oracle(model, case, policy):
    inputs = make_inputs(KIND, [PROMPT], image_sizes=SIZES[:1])
    plan = {"positions": policy, "stages": ORACLE_CASES[case]}
    with tokenreduce.apply(model, plan) as att:
        seq, logits = generate(model, inputs)
    n_vis = att.trace.original_visual[0]
    assert n_vis == 12
    assert [st.visual_after[0] for st in att.trace.stages] == tokenreduce.build_plan(plan).plan.keep_counts(n_vis, 4)
    stages = oracle_stages(att, [policy] * len(att.trace.stages))
    tokens, ref = deepstack_oracle(model, inputs, stages)
    assert seq[0, inputs["input_ids"].shape[1] :].tolist() == tokens
    torch.testing.assert_close(logits[0], ref, atol=1e-5, rtol=0)
    if att.trace.stages[0].layer < 3:  # a cut before the last injection (after layer 2)
        for wrong in ("dropped", "misaligned"):  # the injected rows matter, and they must be the kept ones
            _, other = deepstack_oracle(model, inputs, stages, deepstack=wrong)
            assert (other - ref).abs().max() > 1e-3, wrong


#: encoder-side plans (a layer-0 stage that reads vision-tower signals), alone or followed by a
#: decoder stage between two DeepStack injections: (stages, merged tokens at layer 0)
ENCODER_CASES = {
    "divprune": ([{"layer": 0, "keep": 5, "selector": "divprune"}], False),
    "scope+K2": (
        [
            {"layer": 0, "keep": 7, "scorer": {"name": "vision_attn", "layer": -1}, "selector": "scope"},
            {"layer": 2, "keep": 4, "scorer": "norm", "selector": "topk"},
        ],
        False,
    ),
    "pio_ve_qwen-merge": (
        [
            {
                "layer": 0,
                "keep": 5,
                "selector": {"name": "pio_ve_qwen", "local_layer": 0, "global_layer": -1, "window": 2, "merge": True},
            }
        ],
        True,
    ),
}


@pytest.mark.parametrize("case", list(ENCODER_CASES))
def test_encoder_side_plans_equal_the_deepstack_oracle(model, case):
    """An encoder-side stage removes visual tokens before decoder layer 0, so every DeepStack
    injection (after layers 0/1/2) follows the cut: each kept token gets the rows of its own
    original position, a merged token those of the kept token it replaces."""
    stages, merge = ENCODER_CASES[case]
    inputs = make_inputs(KIND, [PROMPT], image_sizes=SIZES[:1])
    with tokenreduce.apply(model, {"positions": "keep", "stages": stages}) as att:
        seq, logits = generate(model, inputs)
    assert [st.visual_after[0] for st in att.trace.stages] == [st["keep"] for st in stages]
    ostages = oracle_stages(att, ["keep"] * len(stages))
    tokens, ref = deepstack_oracle(model, inputs, ostages, merge=merge)
    assert seq[0, inputs["input_ids"].shape[1] :].tolist() == tokens
    torch.testing.assert_close(logits[0], ref, atol=1e-5, rtol=0)
    for wrong in ("dropped", "misaligned"):  # the injected rows matter, and they must be the kept ones
        _, other = deepstack_oracle(model, inputs, ostages, deepstack=wrong, merge=merge)
        assert (other - ref).abs().max() > 1e-3, wrong
    if merge:  # the merge is real: the oracle without it is far off
        _, unmerged = deepstack_oracle(model, inputs, ostages)
        assert (unmerged - ref).abs().max() > 1e-3


def test_two_images_in_one_prompt_equal_the_oracle(sdpa_model):
    inputs = make_inputs(KIND, [TWO], image_sizes=SIZES)
    plan = {"stages": [{"layer": 1, "keep": {"ratio": 0.5}, "selector": {"name": "random", "seed": 3}}]}
    with tokenreduce.apply(sdpa_model, plan) as att:
        seq, logits = generate(sdpa_model, inputs)
    assert att.trace.original_visual == [20]
    grid = att.visual_grid()[0][att.candidate_mask[0]]  # (image, row, col) of each candidate
    assert grid[:, 0].tolist() == [0] * 12 + [1] * 8
    assert grid[:12, 1:].max(0).values.tolist() == [2, 3] and grid[12:, 1:].max(0).values.tolist() == [3, 1]
    tokens, ref = deepstack_oracle(sdpa_model, inputs, oracle_stages(att, ["keep"]))
    assert seq[0, inputs["input_ids"].shape[1] :].tolist() == tokens
    torch.testing.assert_close(logits[0], ref, atol=1e-5, rtol=0)


def test_deepstack_rows_follow_the_kept_positions():
    visual = torch.tensor([[False, True, True, True, False], [False, False, True, True, False]])
    orig = torch.tensor([[0, 1, 3, 4], [0, 0, 3, 4]])  # sample 0 dropped position 2; sample 1 is padded
    valid = torch.tensor([[True, True, True, True], [False, True, True, True]])
    mask, rows = deepstack_rows(visual, orig, valid)
    assert mask.tolist() == [[False, True, True, False], [False, False, True, False]]
    assert rows.tolist() == [0, 2, 4]  # sample 0: visual rows 0 and 2; sample 1: its second row (4 overall)


# -- identity, detach, ragged batches --------------------------------------------------------------
@pytest.mark.parametrize(
    "plan",
    [
        "keep_all",
        {"stages": [{"layer": 0, "keep": 10_000, "selector": "random"}]},
        {"positions": "renumber", "stages": [{"layer": 1, "keep": {"ratio": 1.0}, "selector": "uniform"}]},
    ],
    ids=["preset", "K0-random", "K1-renumber"],
)
def test_keep_all_is_identity(sdpa_model, plan):
    inputs = make_inputs(KIND, [PROMPT, SHORT], image_sizes=SIZES)
    ref_seq, ref_logits = generate(sdpa_model, inputs)
    with warnings.catch_warnings(), tokenreduce.apply(sdpa_model, plan):
        warnings.simplefilter("ignore")  # the clamp warning of keep: 10000
        seq, logits = generate(sdpa_model, inputs)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)


def test_detach_restores_bit_identical_outputs(sdpa_model):
    inputs = make_inputs(KIND, [PROMPT, SHORT], image_sizes=SIZES)
    ref_seq, ref_logits = generate(sdpa_model, inputs)
    with tokenreduce.apply(sdpa_model, {"stages": [{"layer": 1, "keep": 3, "selector": "random"}]}):
        _, pruned = generate(sdpa_model, inputs)
    assert not torch.allclose(pruned, ref_logits)
    seq, logits = generate(sdpa_model, inputs)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in sdpa_model.modules())


PLANS = {
    "pio": {
        "stages": [
            {"layer": 1, "keep": {"ratio": 0.5}, "scorer": {"name": "pio", "layer_offset": -1}, "selector": "nms"}
        ]
    },
    "fastv": {"stages": [{"layer": 2, "keep": {"ratio": 0.5}, "scorer": "fastv", "selector": "topk"}]},
    "random": {"stages": [{"layer": 0, "keep": {"ratio": 0.5}, "selector": {"name": "random", "seed": 4}}]},
    "uniform": {
        "positions": "renumber",
        "stages": [
            {"layer": 0, "keep": {"ratio": 0.75}, "selector": "uniform"},
            {"layer": 2, "keep": {"ratio": 0.5}, "selector": "uniform"},
        ],
    },
}


@pytest.mark.parametrize("name", list(PLANS))
def test_ragged_batch_equals_single_runs(sdpa_model, name):
    """A left-padded batch of two image sizes (12 and 8 visual tokens) computes what each sample
    computes alone, DeepStack rows included, for each method inside generate()."""
    plan = PLANS[name]
    inputs = make_inputs(KIND, [PROMPT, SHORT], image_sizes=SIZES)
    with tokenreduce.apply(sdpa_model, plan) as att:
        seq, logits = generate(sdpa_model, inputs)
    batch_trace = att.trace
    assert batch_trace.original_visual == [12, 8]
    _, ref_logits = generate(sdpa_model, inputs)
    assert not torch.allclose(logits, ref_logits)  # the plan did cut
    width = inputs["input_ids"].shape[1]
    for b, (prompt, size) in enumerate(zip([PROMPT, SHORT], SIZES)):
        single = make_inputs(KIND, [prompt], image_sizes=[size], seed=b)
        with tokenreduce.apply(sdpa_model, plan) as att:
            s_seq, s_logits = generate(sdpa_model, single)
        pad = width - single["input_ids"].shape[1]
        for st_b, st_s in zip(batch_trace.stages, att.trace.stages):
            assert st_b.visual_after[b] == st_s.visual_after[0]
            assert [p - pad for p in st_b.kept[b]] == st_s.kept[0]
        assert seq[b, width:].tolist() == s_seq[0, single["input_ids"].shape[1] :].tolist()
        torch.testing.assert_close(logits[b], s_logits[0], atol=BATCH_ATOL, rtol=0)


# -- signals: q/k norms ------------------------------------------------------------------------------
RECORDS: list[TokenView] = []


class RecordingNorm(NormScorer):
    def score(self, view: TokenView) -> torch.Tensor:
        RECORDS.append(view)
        return super().score(view)


REGISTRY = registry_with("qwen3_vl", scorers={"rec_norm": RecordingNorm})


def test_signals_apply_the_q_and_k_norms(monkeypatch):
    """Attention rows equal the eager attention weights of the layer before the cut, and the
    row-restricted probe equals the model's own layer; both differ without the q/k norms."""
    eager = build_tiny(KIND, attn_implementation="eager")
    inputs = make_inputs(KIND, [PROMPT, SHORT], image_sizes=SIZES)
    RECORDS.clear()
    plan = {"stages": [{"layer": 2, "keep": {"ratio": 0.5}, "scorer": "rec_norm", "selector": "topk"}]}
    with tokenreduce.apply(eager, plan, registry=REGISTRY):
        eager(**inputs)
    with torch.no_grad():
        weights = eager(**inputs, output_attentions=True).attentions[1][:, :, -1, :]  # [B, H, S], layer K-1
    view = RECORDS[0]
    last = torch.full((2, 1), view.hidden.shape[1] - 1)
    rows = view.signals.attention_rows(last, layer_offset=-1)[:, :, 0]  # [B, H, S]
    torch.testing.assert_close(rows, weights.float(), atol=1e-5, rtol=0)
    hidden, valid = view.hidden, view.valid
    with torch.no_grad():
        exact = view.signals.layer_module_forward(hidden, 0)  # the model's own module
        fast = view.signals.layer_forward(hidden, None, 0)
    torch.testing.assert_close(fast[valid], exact[valid], atol=1e-4, rtol=0)

    # the same signals with the q/k norms left out are far off: the norms are what makes them right
    monkeypatch.setattr(llama_signals, "_head_norm", lambda attn, name, x: x)
    assert (view.signals.attention_rows(last, layer_offset=-1)[:, :, 0] - weights).abs().max() > 1e-2
    with torch.no_grad():
        wrong = view.signals.layer_forward(hidden, None, 0)
    assert (wrong[valid] - exact[valid]).abs().max() > 1e-2


# -- presets at the real depth ---------------------------------------------------------------------
@pytest.mark.parametrize("pct,target", [(33, 1 / 3), (22, 2 / 9), (11, 1 / 9)])
def test_presets_reach_their_layer_average_at_36_layers(pct, target):
    plan = load_preset(f"qwen3_pio_{pct}")
    adapter = tokenreduce.core.registry.get_registry().adapter_for(KIND).cls
    compiled = tokenreduce.build_plan(plan, n_layers=36, adapter=adapter)
    assert [cs.layer for cs in compiled.stages] == [1, 10, 18]
    assert plan.layer_average_for(1296, 36) / 1296 == pytest.approx(target, abs=5e-4)


@pytest.fixture(scope="module")
def deep_model():
    return build_tiny(KIND, text_layers=36)


@pytest.mark.parametrize("pct", [33, 11])
def test_presets_run_inside_generate_at_the_real_depth(deep_model, pct):
    plan = load_preset(f"qwen3_pio_{pct}")
    inputs = make_inputs(KIND, [PROMPT, SHORT], image_sizes=[(160, 160), SIZES[0]])
    with tokenreduce.apply(deep_model, plan) as att:
        out = deep_model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    for b, n in enumerate(att.trace.original_visual):
        assert [st.visual_after[b] for st in att.trace.stages] == plan.keep_counts(n, 36)
        assert att.trace.layer_average(b) == pytest.approx(plan.layer_average_for(n, 36))


# -- FLOPs of the real config ----------------------------------------------------------------------
def test_vision_flops_closed_form_equals_the_flop_counter():
    from tokenreduce.measure.configs import real_config
    from tokenreduce.measure.flops import account, count_with_flop_counter

    config = real_config("qwen3_vl_8b")
    assert config.model_type == KIND and config.get_text_config().num_hidden_layers == 36
    assert list(config.vision_config.deepstack_visual_indexes) == [8, 16, 24]
    acc = account(config, "qwen3_pio_11", n_visual=1296, n_text=60)
    counted = count_with_flop_counter(config, acc.per_layer_tokens, n_visual=acc.n_visual)
    for ours, key in (
        (acc.llm_flops_true, "decoder_layers"),
        (acc.vision_flops_true, "vision_tower"),
        (acc.projector_flops_true, "projector"),
    ):
        assert abs(ours - counted[key]) / counted[key] < 1e-3, key
    spec = tokenreduce.core.registry.get_registry().spec_for(KIND)
    with pytest.raises(ValueError, match="vision_grid"):
        spec.vision_flops(config, 1296, vision_grid=(70, 74))


# -- real-checkpoint conf, offline -----------------------------------------------------------------
def run_cli(args, tmp_path, **env):
    """The ``tokenreduce`` command in a subprocess (``huggingface_hub`` reads its environment at
    import), offline, importing the same ``tokenreduce`` as this test process."""
    root = os.path.dirname(os.path.dirname(tokenreduce.__file__))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": path, **env}
    code = "import sys; from tokenreduce.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path, env=full_env, timeout=300
    )


def test_real_conf_offline_without_the_checkpoint_is_a_clear_error(tmp_path):
    proc = run_cli(["run", "model=qwen3_vl_8b", "plan=random_50"], tmp_path, HF_HUB_CACHE=str(tmp_path / "empty"))
    assert proc.returncode == 1
    assert "'Qwen/Qwen3-VL-8B-Instruct'" in proc.stderr and "Hugging Face Hub is unreachable" in proc.stderr
    assert "model.path=DIR" in proc.stderr and "Traceback" not in proc.stderr


def test_real_conf_with_a_local_copy_loads_and_runs_a_plan(tmp_path):
    """``model=qwen3_vl_8b model.path=DIR``: the checkpoint in DIR (a tiny one), its processor and
    its chat template, driving a plan inside generate()."""
    from tokenreduce.measure.configs import model_config
    from tokenreduce.measure.tasks import format_prompt
    from tokenreduce.models import load_model
    from tokenreduce.testing.tiny import make_image

    folder = save_tiny_checkpoint(tmp_path / "ckpt", KIND)
    loaded = load_model({**model_config("qwen3_vl_8b"), "path": str(folder)})
    assert loaded.arch == KIND and loaded.kind == "pretrained"
    assert loaded.model.config.get_text_config().num_hidden_layers == 3  # the folder's, not the 36-layer config
    template = loaded.prompt_template()
    assert "<|vision_start|><|image_pad|><|vision_end|>" in template and template.endswith("<|im_start|>assistant\n")
    prompt = format_prompt(template, "what color is the shape?")
    inputs = loaded.processor_inputs([prompt, prompt], [make_image(0, (128, 96)), make_image(1, (64, 128))])
    with torch.no_grad(), tokenreduce.apply(loaded.model, "random_50") as att:
        out = loaded.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[0] == 2 and att.trace.original_visual == [12, 8]
    assert att.trace.stages[0].visual_after == [6, 4]


# -- refusals --------------------------------------------------------------------------------------
def test_video_is_refused_with_the_reason(sdpa_model):
    inputs = make_inputs(KIND, [PROMPT], image_sizes=SIZES[:1])
    with tokenreduce.apply(sdpa_model, "random_50"):
        with pytest.raises(UnsupportedCallError, match="video inputs .* not supported yet"):
            sdpa_model(**inputs, video_grid_thw=torch.tensor([[2, 4, 4]]))


@pytest.mark.parametrize("preset", ["visionzip_64", "scope_64"])
def test_cls_attention_plans_are_refused_with_the_reason(sdpa_model, preset):
    with pytest.raises(PlanError, match="Qwen3-VL's vision tower has no CLS token"):
        tokenreduce.apply(sdpa_model, preset)


def test_synthetic_inputs_carry_the_token_types_the_model_needs(sdpa_model):
    """bench/flops's random inputs: ``mm_token_type_ids`` marks the image tokens (the processor's
    convention), so the model computes its M-RoPE ids and a plan runs on them."""
    from tokenreduce.models import synthetic_inputs

    inputs = synthetic_inputs(sdpa_model.config, KIND, batch_size=2, n_visual=16, n_text=20)
    types = inputs["mm_token_type_ids"]
    assert types.shape == inputs["input_ids"].shape
    assert torch.equal(types.bool(), inputs["input_ids"] == sdpa_model.config.image_token_id)
    assert types.sum(-1).tolist() == [16, 16]
    with tokenreduce.apply(sdpa_model, "random_50") as att, torch.no_grad():
        sdpa_model(**inputs)
    assert [len(k) for k in att.trace.stages[0].kept] == [8, 8]
