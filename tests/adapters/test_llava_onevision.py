"""The LLaVA-OneVision adapter (tokenreduce/adapters/llava_onevision/) on a tiny random-weight model:
the token layout against transformers' own arithmetic, the hand-written decoder loop
(tests/oracle.py) under both attention implementations and position policies, keep-all identity,
detach, ragged batches of different image sizes, several images in one prompt, the strategies
inside generate(), the refusals (video, vision-tower signals), the spec (synthetic inputs, vision
FLOPs), the presets at the real depth and the real-checkpoint conf offline."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from oracle import oracle_generate
from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape, unpad_image

import tokenreduce
from tokenreduce.adapters.llava_onevision.spec import LlavaOnevisionSpec, image_tokens
from tokenreduce.core.errors import PlanError, UnsupportedCallError
from tokenreduce.core.presets import load_preset
from tokenreduce.testing.tiny import VIDEO_PAD_TOKEN_ID, build_tiny, make_inputs, make_tokenizer

KIND = "llava_onevision"
PROMPT = "USER: <image> what color is the shape? ASSISTANT:"
SHORT = "USER: <image> shape? ASSISTANT:"
TWO = "USER: <image> and <image> same shape? ASSISTANT:"
STEPS = 4
# (width, height): a downscaled 2x2 crop grid, a 2x1 grid kept as it is, one crop, 2x2 unpadded
SIZES = [(100, 80), (60, 120), (56, 56), (112, 57)]
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


def oracle_for(model, inputs, att, policies, steps=STEPS):
    text = torch.nonzero(~att.candidate_mask[0]).flatten().tolist()
    stages = [(st.layer, sorted(set(text) | set(st.kept[0])), pol) for st, pol in zip(att.trace.stages, policies)]
    return oracle_generate(
        model, inputs["input_ids"], inputs["pixel_values"], stages, steps, image_sizes=inputs["image_sizes"]
    )


def check_oracle(model, inputs, plan, policies):
    with tokenreduce.apply(model, plan) as att:
        seq, logits = generate(model, inputs)
    tokens, ref_logits = oracle_for(model, inputs, att, policies)
    assert seq[0, inputs["input_ids"].shape[1] :].tolist() == tokens
    torch.testing.assert_close(logits[0], ref_logits, atol=1e-5, rtol=0)
    return att


def reference_layout(image_size_hw, config, single=True):
    """(panel, row, col, newline) per token of one image, from transformers' anyres functions and
    the anyres-max downscale rule (arXiv 2408.03326), the way the model packs them."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    rows = [(0, r, c, 0) for r in range(side) for c in range(side)]
    if not single:
        return rows + [(0, side - 1, side, 1)]
    n_h, n_w = get_anyres_image_grid_shape(
        list(image_size_hw), config.image_grid_pinpoints, config.vision_config.image_size
    )
    _, h, w = unpad_image(torch.empty(1, n_h * side, n_w * side), torch.tensor(image_size_hw)).shape
    limit = int(config.vision_aspect_ratio.rsplit("_", 1)[1])
    ratio = math.sqrt(h * w / (limit * side * side))
    if ratio > 1.1:
        h, w = int(h // ratio), int(w // ratio)
    return rows + [(1, r, c, int(c == w)) for r in range(h) for c in range(w + 1)]


# -- the layout ---------------------------------------------------------------------------------
def test_token_counts_match_the_processor_and_cover_the_downscale(sdpa_model):
    config = sdpa_model.config
    downscaled = 0
    for width, height in [*SIZES, (200, 200), (160, 60), (30, 170)]:
        ids = make_inputs(KIND, [PROMPT], image_sizes=[(width, height)])["input_ids"]
        n = int((ids == config.image_token_id).sum())
        assert image_tokens(config, height, width) == n == len(reference_layout((height, width), config))
        n_h, n_w = get_anyres_image_grid_shape([height, width], config.image_grid_pinpoints, 56)
        downscaled += n < 16 + 4 * n_h * 4 * n_w  # fewer than the unpadded grid could hold
    assert downscaled >= 2


def test_grid_and_newlines_match_transformers_layout(sdpa_model):
    prompts = [PROMPT, TWO, PROMPT]
    inputs = make_inputs(KIND, prompts, image_sizes=SIZES)
    with tokenreduce.apply(sdpa_model, {"stages": [{"layer": 1, "keep": 3, "selector": "random"}]}) as att:
        sdpa_model.generate(**inputs, max_new_tokens=1, do_sample=False)
        mask, layout = att.visual_layout()
    sizes = inputs["image_sizes"].tolist()  # (height, width) per image
    for b, images in enumerate([[0], [1, 2], [3]]):
        want = []
        for k, i in enumerate(images):
            rows = reference_layout(sizes[i], sdpa_model.config, single=len(images) == 1)
            want += [(p + 2 * k, r, c, nl) for p, r, c, nl in rows]
        assert [tuple(x) for x in layout[b][mask[b]].tolist()] == want


def test_keep_newlines_keeps_every_newline_token_and_equals_the_oracle(sdpa_model):
    inputs = make_inputs(KIND, [PROMPT], image_sizes=SIZES[:1])
    plan = {
        "adapter": {"keep_newlines": True},
        "stages": [
            {"layer": 1, "keep": {"ratio": 0.3}, "selector": "uniform"},
            {"layer": 3, "keep": 2, "scorer": "norm", "selector": "topk"},
        ],
    }
    att = check_oracle(sdpa_model, inputs, plan, ["keep", "keep"])
    ref = reference_layout(inputs["image_sizes"][0].tolist(), sdpa_model.config)
    positions = torch.nonzero(inputs["input_ids"][0] == sdpa_model.config.image_token_id).flatten().tolist()
    newline_positions = {p for p, row in zip(positions, ref) if row[3]}
    assert att.trace.original_visual == [len(ref) - len(newline_positions)]
    assert newline_positions <= set(att.trace.final_index[0])
    assert att.trace.stages[-1].visual_after == [2]


# -- the oracle, identity, detach ------------------------------------------------------------------
ORACLE_CASES = {
    "K0": [{"layer": 0, "keep": {"ratio": 0.4}, "selector": {"name": "random", "seed": 1}}],
    "K2": [{"layer": 2, "keep": {"ratio": 0.3}, "selector": {"name": "random", "seed": 2}}],
    "K1+K3": [
        {"layer": 1, "keep": {"ratio": 0.6}, "selector": "uniform"},
        {"layer": 3, "keep": {"ratio": 0.5}, "scorer": "norm", "selector": "topk"},
    ],
}


@pytest.mark.parametrize("policy", ["keep", "renumber"])
@pytest.mark.parametrize("case", list(ORACLE_CASES))
def test_pruned_generate_equals_oracle(model, case, policy):
    inputs = make_inputs(KIND, [PROMPT])
    plan = {"positions": policy, "stages": ORACLE_CASES[case]}
    att = check_oracle(model, inputs, plan, [policy] * len(ORACLE_CASES[case]))
    n_vis = att.trace.original_visual[0]
    assert n_vis == int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert [st.visual_after[0] for st in att.trace.stages] == tokenreduce.build_plan(plan).plan.keep_counts(n_vis, 4)


def test_keep_all_is_identity_and_detach_is_bit_identical(model):
    inputs = make_inputs(KIND, [PROMPT, SHORT], image_sizes=SIZES[:2])  # ragged
    ref_seq, ref_logits = generate(model, inputs)
    with tokenreduce.apply(model, {"stages": [{"layer": 0, "keep": 10_000, "selector": "random"}]}) as att:
        seq, logits = generate(model, inputs)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    assert all(st.visual_after == st.visual_before for st in att.trace.stages)
    with tokenreduce.apply(model, {"stages": [{"layer": 1, "keep": 3, "selector": "random"}]}):
        _, pruned = generate(model, inputs)
    assert not torch.allclose(pruned, ref_logits)  # the cut does something
    seq, logits = generate(model, inputs)  # detached
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    assert len(model._forward_pre_hooks) == 0
    assert all(len(layer._forward_pre_hooks) == 0 for layer in model.model.language_model.layers)


# -- ragged batches, several images ----------------------------------------------------------------
@pytest.mark.parametrize("policy,first_layer", [("keep", 0), ("renumber", 2)])
def test_ragged_batch_of_three_sizes_equals_single_runs(sdpa_model, policy, first_layer):
    plan = {
        "positions": policy,
        "stages": [
            {"layer": first_layer, "keep": {"ratio": 0.5}, "selector": "uniform"},
            {"layer": 3, "keep": {"ratio": 0.25, "of": "original"}, "scorer": "norm", "selector": "topk"},
        ],
    }
    prompts = [PROMPT, SHORT, "USER: <image> is there a circle in the image? ASSISTANT:"]
    batch = make_inputs(KIND, prompts, image_sizes=SIZES[:3])
    assert bool((batch["attention_mask"] == 0).any())
    with tokenreduce.apply(sdpa_model, plan) as att:
        seq, logits = generate(sdpa_model, batch)
    assert len(set(att.trace.stages[0].visual_before)) == 3
    for i, prompt in enumerate(prompts):
        single = make_inputs(KIND, [prompt], image_sizes=[SIZES[i]], seed=i)
        with tokenreduce.apply(sdpa_model, plan) as att1:
            seq1, logits1 = generate(sdpa_model, single)
        assert att1.trace.stages[-1].visual_after[0] == att.trace.stages[-1].visual_after[i]
        assert seq[i, -STEPS:].tolist() == seq1[0, single["input_ids"].shape[1] :].tolist()
        torch.testing.assert_close(logits[i], logits1[0], atol=BATCH_ATOL, rtol=0)


def test_two_images_in_one_prompt(sdpa_model):
    """A multi-image prompt: each image is its base grid and one newline token (no crops)."""
    inputs = make_inputs(KIND, [TWO], image_sizes=SIZES[:2])
    ref_seq, ref_logits = generate(sdpa_model, inputs)
    with tokenreduce.apply(sdpa_model, {"stages": [{"layer": 0, "keep": 10_000, "selector": "random"}]}):
        seq, logits = generate(sdpa_model, inputs)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    plan = {"positions": "renumber", "stages": [{"layer": 1, "keep": {"ratio": 0.5}, "selector": "uniform"}]}
    with tokenreduce.apply(sdpa_model, plan) as att:
        generate(sdpa_model, inputs)
        grid = att.visual_grid()
    assert att.trace.original_visual == [2 * (16 + 1)]
    assert set(grid[0][att.trace.stages[0].kept[0]][:, 0].tolist()) == {0, 2}  # both images keep tokens


# -- strategies ------------------------------------------------------------------------------------
STRATEGY_STAGES = {
    "pio+nms": {"scorer": {"name": "pio", "loss_positions": 4}, "selector": "nms"},
    "pio-exact": {"scorer": {"name": "pio", "probe": "exact", "layer_offset": -1}, "selector": "topk"},
    "fastv": {"scorer": "fastv", "selector": "topk"},
    "random": {"selector": "random"},
    "uniform": {"selector": "uniform"},
}


@pytest.mark.parametrize("name", list(STRATEGY_STAGES))
def test_every_strategy_runs_in_generate(sdpa_model, name):
    inputs = make_inputs(KIND, [PROMPT, SHORT], image_sizes=SIZES[:2])
    plan = {"stages": [{"layer": 2, "keep": {"ratio": 0.5}, **STRATEGY_STAGES[name]}]}
    with tokenreduce.apply(sdpa_model, plan) as att:
        seq, _ = generate(sdpa_model, inputs)
    st = att.trace.stages[0]
    assert st.visual_after == [tokenreduce.build_plan(plan).plan.keep_counts(n, 4)[0] for n in st.visual_before]
    assert st.visual_after != st.visual_before and seq.shape[1] == inputs["input_ids"].shape[1] + STEPS


def test_pio_three_stages_equals_oracle(model):
    pio = {"scorer": {"name": "pio", "loss_positions": 4}, "selector": "nms"}
    plan = {
        "positions": "renumber",
        "stages": [{"layer": k, "keep": {"ratio": r}, **pio} for k, r in ((1, 0.6), (2, 0.5), (3, 0.5))],
    }
    att = check_oracle(model, make_inputs(KIND, [PROMPT]), plan, ["renumber"] * 3)
    counts = [st.visual_after[0] for st in att.trace.stages]
    assert counts[0] > counts[1] > counts[2] >= 1


# -- refusals --------------------------------------------------------------------------------------
def test_video_inputs_are_refused_with_the_reason(sdpa_model):
    tok = make_tokenizer()
    pre = tok("USER:", add_special_tokens=False)["input_ids"]
    post = tok("what shape? ASSISTANT:", add_special_tokens=False)["input_ids"]
    frames, pooled = 2, 2 * 2  # a 4x4 patch grid pooled 2x2 per frame, one newline after the video
    ids = torch.tensor([pre + [VIDEO_PAD_TOKEN_ID] * (frames * pooled + 1) + post])
    video = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values_videos": torch.randn(1, frames, 3, 56, 56, generator=torch.Generator().manual_seed(0)),
    }
    sdpa_model.generate(**video, max_new_tokens=1, do_sample=False)  # the model itself runs it
    plan = {"stages": [{"layer": 1, "keep": 3, "selector": "uniform"}]}
    with tokenreduce.apply(sdpa_model, plan):
        with pytest.raises(UnsupportedCallError, match=r"llava_onevision: video inputs .* not supported"):
            sdpa_model.generate(**video, max_new_tokens=1, do_sample=False)
        with pytest.raises(UnsupportedCallError, match="video tokens"):
            sdpa_model(input_ids=ids, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize(
    "preset,reason",
    [("visionzip_64", "SigLIP vision tower has no CLS token"), ("scope_64", "not the tower's patches one to one")],
)
def test_vision_tower_signals_are_refused_at_build_time(sdpa_model, preset, reason):
    with pytest.raises(PlanError, match=reason):
        tokenreduce.apply(sdpa_model, preset)
    assert len(sdpa_model._forward_pre_hooks) == 0


def test_unknown_adapter_option_is_refused(sdpa_model):
    with pytest.raises(
        PlanError, match=r"adapter\.keep_newline: unknown key 'keep_newline'; allowed keys: keep_newlines"
    ):
        tokenreduce.apply(
            sdpa_model, {"adapter": {"keep_newline": True}, "stages": [{"layer": 1, "keep": 2, "selector": "random"}]}
        )


# -- the spec: synthetic inputs, vision FLOPs ----------------------------------------------------------
def test_synthetic_inputs_run_with_the_promised_count(sdpa_model):
    from tokenreduce.models import synthetic_inputs

    spec = LlavaOnevisionSpec()
    for wish in (None, 36, 50):
        inputs = synthetic_inputs(sdpa_model.config, KIND, 2, wish, 10)
        n = int((inputs["input_ids"][0] == sdpa_model.config.image_token_id).sum())
        h, w = inputs["image_sizes"][0].tolist()
        assert n == image_tokens(sdpa_model.config, h, w)
        with tokenreduce.apply(sdpa_model, {"stages": [{"layer": 1, "keep": 3, "selector": "uniform"}]}) as att:
            sdpa_model(**inputs)
        assert att.trace.original_visual == [n, n]
    assert spec.synthetic_image(sdpa_model.config, 1, None, torch.Generator()).n_visual == 56  # the largest


def test_vision_flops_match_the_flop_counter_and_bad_input_is_refused(sdpa_model):
    from tokenreduce.measure.configs import real_config
    from tokenreduce.measure.flops import account, count_with_flop_counter

    config = real_config("llava_onevision_7b")
    acc = account(config, "ov_pio_11", n_visual=7371, n_text=60)
    counted = count_with_flop_counter(config, acc.per_layer_tokens, n_visual=acc.n_visual)
    for ours, theirs in [
        (acc.vision_flops_true, counted["vision_tower"]),
        (acc.projector_flops_true, counted["projector"]),
        (acc.llm_flops_true, counted["decoder_layers"]),
    ]:
        assert abs(ours - theirs) / theirs < 1e-3
    cost = LlavaOnevisionSpec().vision_flops(config, 7371)
    assert cost.detail["crops"] == 10 and cost.detail["tokens_per_crop"] == 729  # base + 3x3, no CLS
    assert LlavaOnevisionSpec().vision_flops(config, 7371, vision_crops=2).tower * 5 == cost.tower
    with pytest.raises(ValueError, match="vision_crops must be >= 1"):
        LlavaOnevisionSpec().vision_flops(config, 7371, vision_crops=0)
    with pytest.raises(ValueError, match="vision_grid does not apply to llava_onevision"):
        LlavaOnevisionSpec().vision_flops(config, 7371, vision_grid=(27, 27))


# -- presets at the real depth, the real conf offline -----------------------------------------------------
def test_presets_run_at_the_real_depth_with_their_budget():
    model = build_tiny(KIND, text_layers=28)
    inputs = make_inputs(KIND, [PROMPT, PROMPT], image_sizes=[(60, 120), (100, 80)])
    target = {33: 1 / 3, 22: 2 / 9, 11: 1 / 9}
    for pct in (33, 22, 11):
        plan = load_preset(f"ov_pio_{pct}")
        with tokenreduce.apply(model, plan) as att:
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 2
        for b, n in enumerate(att.trace.original_visual):
            assert [st.visual_after[b] for st in att.trace.stages] == plan.keep_counts(n, 28)
            assert att.trace.layer_average(b) / n == pytest.approx(target[pct], abs=0.03)


def test_real_checkpoint_conf_loads_a_local_copy_and_refuses_offline_without_one(tmp_path):
    import os
    import subprocess
    import sys

    from tokenreduce.models import load_model
    from tokenreduce.testing.tiny import make_image, save_tiny_checkpoint

    folder = save_tiny_checkpoint(tmp_path / "ckpt", KIND)
    loaded = load_model(
        {
            "kind": "pretrained",
            "arch": KIND,
            "repo": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
            "path": str(folder),
            "prompt": "chat_template",
        }
    )
    template = loaded.prompt_template()
    assert "<image>" in template and template.endswith("<|im_start|>assistant\n")
    inputs = loaded.processor_inputs([template.format(question="what?")] * 2, [make_image(0), make_image(1, (112, 56))])
    with torch.no_grad(), tokenreduce.apply(loaded.model, "random_50") as att:
        loaded.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert all(v in (n // 2, (n + 1) // 2) for v, n in zip(att.trace.stages[0].visual_after, att.trace.original_visual))
    # this checkout's package and conf/ (not another installed copy): the subprocess runs in tmp_path
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty"), "PYTHONPATH": repo}
    code = "import sys; from tokenreduce.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, "run", "model=llava_onevision_7b", "plan=random_50"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1
    assert (
        "'llava-hf/llava-onevision-qwen2-7b-ov-hf'" in proc.stderr and "Hugging Face Hub is unreachable" in proc.stderr
    )
    assert "model.path=DIR" in proc.stderr and "Traceback" not in proc.stderr
