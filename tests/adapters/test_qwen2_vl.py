"""Qwen2-VL (``qwen2_vl``): the adapter against the hand-written decoder loop (tests/oracle.py)
under both position policies and both attention implementations, keep-all identity, detach,
ragged batches of images of different sizes, several images and a video in one prompt, the
strategies inside generate(), the refused CLS attention (the encoder-side signals themselves:
test_qwen_family_encoder_side.py), the Qwen PIO presets at the real
depth, the vision FLOPs of the real config, and the real-checkpoint config offline.  Tiny
random-weight models, CPU."""

from __future__ import annotations

import oracle
import pytest
import torch
from oracle import oracle_generate, oracle_inputs_embeds
from pydantic import BaseModel
from registry_helpers import registry_with

import tokenreduce
from tokenreduce.adapters.qwen2_vl import ImageOnlyQwen2VLProcessor, Qwen2VLAdapter, Qwen2VLSpec
from tokenreduce.core.errors import PlanError, UnsupportedModelError
from tokenreduce.core.presets import load_preset
from tokenreduce.core.registry import get_registry
from tokenreduce.core.types import VISION_NEEDS, Need
from tokenreduce.testing.tiny import (
    TINY,
    VIDEO_PAD_TOKEN_ID,
    VISION_END_TOKEN_ID,
    VISION_START_TOKEN_ID,
    build_tiny,
    make_image,
    make_inputs,
    make_processor,
    make_tokenizer,
    save_tiny_checkpoint,
)

KIND = "qwen2_vl"
PROMPT = "USER: <image> what color is the shape? ASSISTANT:"
SHORT = "USER: <image> shape? ASSISTANT:"
TWO = "USER: <image> and <image> same shape? ASSISTANT:"
STEPS = 4
SIZES = [(100, 80), (60, 120), (56, 56)]  # (width, height): 12, 8 and 4 visual tokens
BATCH_ATOL = 3e-5  # batch vs single runs: float accumulation order differs with padding


@pytest.fixture(scope="module", autouse=True)
def oracle_reads_qwen2_vl():
    """tests/oracle.py builds Qwen inputs from the model's own ``get_image_features`` /
    ``get_video_features`` and ``get_rope_index``, which Qwen2-VL has with the same meaning, but
    recognises Qwen by ``model_type == "qwen2_5_vl"``; let it recognise Qwen2-VL too."""
    if oracle._is_qwen(build_tiny(KIND, text_layers=1)):
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(oracle, "_is_qwen", lambda model: model.config.model_type in ("qwen2_5_vl", KIND))
        yield


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return build_tiny(KIND, attn_implementation=request.param)


@pytest.fixture(scope="module")
def sdpa_model():
    return build_tiny(KIND)


def media_mask(model, ids):
    return (ids == model.config.image_token_id) | (ids == model.config.video_token_id)


def generate(model, inputs, steps=STEPS):
    out = model.generate(
        **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    return out.sequences, torch.stack(out.logits, 1)  # [B, S+T], [B, T, V]


def inputs_for(prompts=(PROMPT,), sizes=None, seed=0):
    sizes = sizes or SIZES[: sum(max(1, p.count("<image>")) for p in prompts)]
    return make_inputs(KIND, list(prompts), image_sizes=sizes, seed=seed)


def oracle_for(model, inputs, att, policies, steps=STEPS):
    """The oracle with the stages the attachment recorded: every non-candidate position plus the
    kept candidates."""
    text = torch.nonzero(~att.candidate_mask[0]).flatten().tolist()
    stages = [(st.layer, sorted(set(text) | set(st.kept[0])), pol) for st, pol in zip(att.trace.stages, policies)]
    keys = ("mm_token_type_ids", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    extra = {k: inputs[k] for k in keys if k in inputs}
    return oracle_generate(model, inputs["input_ids"], inputs.get("pixel_values"), stages, steps, extra=extra)


def assert_equals_oracle(model, inputs, att, seq, logits, policies):
    tokens, ref_logits = oracle_for(model, inputs, att, policies)
    assert seq[0, inputs["input_ids"].shape[1] :].tolist() == tokens
    torch.testing.assert_close(logits[0], ref_logits, atol=1e-5, rtol=0)


# -- the architecture ------------------------------------------------------------------------------
def test_registered_with_its_tiny_model_and_a_full_attention_vit(sdpa_model):
    spec = get_registry().spec_for(KIND)
    assert isinstance(spec, Qwen2VLSpec) and spec.adapter is Qwen2VLAdapter
    assert get_registry().adapter_for(KIND).cls is Qwen2VLAdapter
    assert type(sdpa_model).__name__ == "Qwen2VLForConditionalGeneration"
    block = sdpa_model.model.visual.blocks[0]
    assert type(block.norm1).__name__ == "LayerNorm" and hasattr(block.mlp, "fc1")  # not Qwen2.5-VL's tower
    assert spec.prompt_images(2) == "<|vision_start|><|image_pad|><|vision_end|>" * 2


def test_oracle_embeddings_and_keep_all_match_the_model(sdpa_model):
    """The oracle's Qwen branch, applied to Qwen2-VL: its embeddings are what the decoder gets and
    without stages it decodes what generate() decodes."""
    inputs = inputs_for()
    with torch.no_grad():
        first = sdpa_model.model(**inputs, output_hidden_states=True).hidden_states[0]
        extra = {k: inputs[k] for k in ("mm_token_type_ids", "image_grid_thw")}
        embeds = oracle_inputs_embeds(sdpa_model, inputs["input_ids"], inputs["pixel_values"], extra=extra)
    torch.testing.assert_close(embeds, first, rtol=0, atol=0)
    seq, logits = generate(sdpa_model, inputs)
    everything = list(range(inputs["input_ids"].shape[1]))
    for stages in ([], [(2, everything, "keep")]):
        tokens, ref_logits = oracle_generate(
            sdpa_model, inputs["input_ids"], inputs["pixel_values"], stages, STEPS, extra=extra
        )
        n = logits.shape[1]
        assert seq[0, -n:].tolist() == tokens[:n]
        torch.testing.assert_close(logits[0], ref_logits[:n], atol=1e-5, rtol=0)


# -- keep-all identity, the oracle -----------------------------------------------------------------
@pytest.mark.parametrize(
    "plan",
    [
        "keep_all",
        {"stages": [{"layer": 0, "keep": 10_000, "selector": "random"}]},
        {"positions": "renumber", "stages": [{"layer": 2, "keep": {"ratio": 1.0}, "selector": "uniform"}]},
    ],
    ids=["preset", "K0-random", "K2-renumber"],
)
def test_keep_all_is_identity(model, plan):
    inputs = inputs_for([PROMPT, SHORT])  # two image sizes: a ragged batch
    ref_seq, ref_logits = generate(model, inputs)
    with tokenreduce.apply(model, plan) as att:
        seq, logits = generate(model, inputs)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    assert all(st.visual_after == st.visual_before for st in att.trace.stages)


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
    inputs = inputs_for()
    plan = {"positions": policy, "stages": ORACLE_CASES[case]}
    with tokenreduce.apply(model, plan) as att:
        seq, logits = generate(model, inputs)
    n_vis = att.trace.original_visual[0]
    assert n_vis == int(media_mask(model, inputs["input_ids"]).sum()) == 12
    assert [st.visual_after[0] for st in att.trace.stages] == tokenreduce.build_plan(plan).plan.keep_counts(n_vis, 4)
    assert_equals_oracle(model, inputs, att, seq, logits, [policy] * len(att.trace.stages))


def test_mixed_policies_equal_oracle(model):
    inputs = inputs_for()
    plan = {
        "stages": [
            {"layer": 1, "keep": {"ratio": 0.5}, "selector": {"name": "random", "seed": 5}, "positions": "renumber"},
            {"layer": 3, "keep": {"ratio": 0.5}, "selector": {"name": "random", "seed": 6}, "positions": "keep"},
        ]
    }
    with tokenreduce.apply(model, plan) as att:
        seq, logits = generate(model, inputs)
    assert_equals_oracle(model, inputs, att, seq, logits, ["renumber", "keep"])


def test_pruning_changes_the_output(sdpa_model):
    inputs = inputs_for()
    _, ref_logits = generate(sdpa_model, inputs)
    with tokenreduce.apply(sdpa_model, {"stages": [{"layer": 0, "keep": 2, "selector": "random"}]}):
        _, logits = generate(sdpa_model, inputs)
    assert not torch.allclose(logits, ref_logits)


def test_detach_restores_bit_identical_outputs(model):
    inputs = inputs_for([PROMPT, SHORT])
    ref_seq, ref_logits = generate(model, inputs)
    ref_forward = model(**inputs).logits
    att = tokenreduce.apply(model, {"stages": [{"layer": 1, "keep": 3, "selector": "random"}]})
    with att:
        generate(model, inputs)
    assert not att.attached
    seq, logits = generate(model, inputs)
    assert torch.equal(seq, ref_seq) and torch.equal(logits, ref_logits)
    assert torch.equal(model(**inputs).logits, ref_forward)
    assert len(model._forward_pre_hooks) == 0 and len(model.model.language_model._forward_pre_hooks) == 0
    assert all(len(layer._forward_pre_hooks) == 0 for layer in model.model.language_model.layers)


# -- ragged batches, several images, video -----------------------------------------------------------
@pytest.mark.parametrize("policy", ["keep", "renumber"])
@pytest.mark.parametrize("first_layer", [0, 2])
def test_ragged_batch_of_three_image_sizes_equals_single_runs(model, policy, first_layer):
    plan = {
        "positions": policy,
        "stages": [
            {"layer": first_layer, "keep": {"ratio": 0.5}, "selector": "uniform"},
            {"layer": 3, "keep": {"ratio": 0.25, "of": "original"}, "scorer": "norm", "selector": "topk"},
        ],
    }
    prompts = [PROMPT, SHORT, "USER: <image> is there a circle in the image? ASSISTANT:"]
    batch = inputs_for(prompts, SIZES)
    assert bool((batch["attention_mask"] == 0).any())  # left padding present
    with tokenreduce.apply(model, plan) as att:
        seq, logits = generate(model, batch)
    assert att.trace.stages[0].visual_before == [12, 8, 4]  # three image sizes
    for i, prompt in enumerate(prompts):
        single = make_inputs(KIND, [prompt], image_sizes=[SIZES[i]], seed=i)
        with tokenreduce.apply(model, plan) as att1:
            seq1, logits1 = generate(model, single)
        assert att1.trace.stages[-1].visual_after[0] == att.trace.stages[-1].visual_after[i]
        n = single["input_ids"].shape[1]
        assert seq[i, -STEPS:].tolist() == seq1[0, n:].tolist()
        torch.testing.assert_close(logits[i], logits1[0], atol=BATCH_ATOL, rtol=0)


@pytest.mark.parametrize("policy", ["keep", "renumber"])
def test_two_images_of_different_sizes_in_one_prompt(model, policy):
    inputs = inputs_for([TWO], SIZES[:2])
    plan = {"positions": policy, "stages": [{"layer": 1, "keep": {"ratio": 0.5}, "selector": "uniform"}]}
    with tokenreduce.apply(model, plan) as att:
        seq, logits = generate(model, inputs)
        grid = att.visual_grid()
    assert att.trace.original_visual == [12 + 8]
    panels = grid[0][att.candidate_mask[0]][:, 0]
    assert panels.tolist() == [0] * 12 + [1] * 8
    assert set(grid[0][att.trace.stages[0].kept[0]][:, 0].tolist()) == {0, 1}  # uniform keeps both images
    assert_equals_oracle(model, inputs, att, seq, logits, [policy])


def test_grid_matches_image_grid_thw(sdpa_model):
    sizes = [(100, 80), (60, 120), (56, 56), (112, 57)]
    inputs = make_inputs(KIND, [PROMPT, "USER: <image> and <image> ? ASSISTANT:", PROMPT], image_sizes=sizes)
    with tokenreduce.apply(sdpa_model, {"stages": [{"layer": 1, "keep": 3, "selector": "random"}]}) as att:
        sdpa_model.generate(**inputs, max_new_tokens=1, do_sample=False)
        grid = att.visual_grid()
    thw = inputs["image_grid_thw"].tolist()
    for b, images in enumerate([[0], [1, 2], [3]]):
        want = [(k, r, c) for k, i in enumerate(images) for r in range(thw[i][1] // 2) for c in range(thw[i][2] // 2)]
        assert [tuple(x) for x in grid[b][att.candidate_mask[b]].tolist()] == want


@pytest.mark.parametrize("policy", ["keep", "renumber"])
def test_video_tokens_are_visual_candidates(sdpa_model, policy):
    """A video built by hand (the video processor needs torchvision): its tokens are candidates
    like image tokens, one grid panel per temporal slice, and the pruned run equals the oracle."""
    tok = make_tokenizer()
    t, h, w = 2, 4, 6  # 2 temporal patches of a 4x6 patch grid -> 2 * 2 * 3 = 12 tokens
    n = t * h * w // 4
    pre = tok("USER:", add_special_tokens=False)["input_ids"]
    post = tok("what shape? ASSISTANT:", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([pre + [VISION_START_TOKEN_ID] + [VIDEO_PAD_TOKEN_ID] * n + [VISION_END_TOKEN_ID] + post])
    types = torch.zeros_like(ids)
    types[ids == VIDEO_PAD_TOKEN_ID] = 2
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": types,
        "pixel_values_videos": torch.randn(t * h * w, 1176, generator=torch.Generator().manual_seed(0)),
        "video_grid_thw": torch.tensor([[t, h, w]]),
    }
    plan = {"positions": policy, "stages": [{"layer": 1, "keep": 5, "selector": "uniform"}]}
    with tokenreduce.apply(sdpa_model, plan) as att:
        seq, logits = generate(sdpa_model, inputs)
        grid = att.visual_grid()
    assert att.trace.original_visual == [n] and att.trace.stages[0].visual_after == [5]
    assert grid[0][att.candidate_mask[0]].tolist() == [[f, r, c] for f in range(2) for r in range(2) for c in range(3)]
    assert_equals_oracle(sdpa_model, inputs, att, seq, logits, [policy])


# -- strategies ------------------------------------------------------------------------------------
STRATEGY_STAGES = {
    "pio+nms": {"scorer": {"name": "pio", "loss_positions": 4}, "selector": "nms"},
    "pio-exact": {"scorer": {"name": "pio", "probe": "exact", "layer_offset": -1}, "selector": "topk"},
    "fastv": {"scorer": "fastv", "selector": "topk"},
    "random": {"selector": "random"},
    "uniform": {"selector": "uniform"},
}


@pytest.mark.parametrize("name", list(STRATEGY_STAGES))
def test_every_strategy_runs_in_generate(model, name):
    inputs = inputs_for([PROMPT, SHORT])
    plan = {"stages": [{"layer": 2, "keep": {"ratio": 0.5}, **STRATEGY_STAGES[name]}]}
    with tokenreduce.apply(model, plan) as att:
        seq, _ = generate(model, inputs)
    st = att.trace.stages[0]
    assert st.visual_before == [12, 8]
    assert st.visual_after == [tokenreduce.build_plan(plan).plan.keep_counts(n, 4)[0] for n in st.visual_before]
    assert seq.shape[1] == inputs["input_ids"].shape[1] + STEPS


def test_pio_three_stages_in_generate_equals_oracle(model):
    inputs = inputs_for()
    pio = {"scorer": {"name": "pio", "loss_positions": 4, "layer_offset": -1}, "selector": "nms"}
    plan = {
        "positions": "keep",
        "stages": [{"layer": k, "keep": {"ratio": r}, **pio} for k, r in ((1, 0.6), (2, 0.5), (3, 0.5))],
    }
    with tokenreduce.apply(model, plan) as att:
        seq, logits = generate(model, inputs)
    counts = [st.visual_after[0] for st in att.trace.stages]
    assert counts == tokenreduce.build_plan(plan).plan.keep_counts(12, 4) and counts[0] > counts[1] > counts[2]
    assert_equals_oracle(model, inputs, att, seq, logits, ["keep"] * 3)


# -- refusals ----------------------------------------------------------------------------------------
def test_cls_attention_is_refused_at_build_time_and_the_other_vision_signals_are_provided(sdpa_model):
    flag = Need.VISION_CLS_ATTENTION

    class Needy:
        class Settings(BaseModel):
            pass

        needs = flag

        def __init__(self, settings):
            pass

        def score(self, view):  # pragma: no cover - never reached
            raise AssertionError

    assert not Qwen2VLAdapter.provides & flag
    assert Qwen2VLAdapter.provides & VISION_NEEDS == VISION_NEEDS & ~flag
    assert Qwen2VLAdapter(sdpa_model).vision_tower().window_index is None  # full attention: raster order
    registry = registry_with("needy", scorers={"needy": Needy})
    plan = {"stages": [{"layer": 0, "keep": 4, "scorer": "needy", "selector": "topk"}]}
    with pytest.raises(PlanError, match=r"stages\.0: needs signals \[vision_cls_attention\].*has no CLS token"):
        tokenreduce.apply(sdpa_model, plan, registry=registry)
    assert len(sdpa_model._forward_pre_hooks) == 0


def test_sliding_window_decoder_and_adapter_options_are_refused(sdpa_model):
    spec = get_registry().spec_for(KIND)
    config = spec.tiny_config(TINY, text_layers=2)
    config.text_config.use_sliding_window = True
    windowed = spec.model_class()._from_config(config).eval()
    with pytest.raises(UnsupportedModelError, match="qwen2_vl: models with sliding-window attention layers"):
        tokenreduce.apply(windowed, {"stages": [{"layer": 1, "keep": 2, "selector": "random"}]})
    with pytest.raises(PlanError, match="the Qwen2VLAdapter adapter takes no options"):
        tokenreduce.apply(
            sdpa_model, {"adapter": {"keep_newlines": True}, "stages": [{"layer": 1, "keep": 2, "selector": "random"}]}
        )


# -- presets at the real depth -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def deep_model():
    return build_tiny(KIND, text_layers=28)  # Qwen2-VL-7B's decoder depth


@pytest.mark.parametrize("pct, target", [(33, 1 / 3), (22, 2 / 9), (11, 1 / 9)])
def test_qwen_pio_presets_apply_unchanged_at_28_layers(deep_model, pct, target):
    plan = load_preset(f"qwen_pio_{pct}")
    assert [st.layer for st in plan.stages] == [1, 8, 14]
    inputs = make_inputs(KIND, [PROMPT, PROMPT], image_sizes=[(112, 112), (100, 80)])
    with tokenreduce.apply(deep_model, plan) as att:
        out = deep_model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    assert att.trace.original_visual == [16, 12]
    for b, n in enumerate(att.trace.original_visual):
        assert [st.visual_after[b] for st in att.trace.stages] == plan.keep_counts(n, 28)
        assert att.trace.layer_average(b) == pytest.approx(plan.layer_average_for(n, 28))
        assert att.trace.layer_average(b) / n == pytest.approx(target, abs=0.03)
    # at the real config's nominal 1296 tokens: the keep counts of docs/adapters.md
    assert (
        tokenreduce.build_plan(plan, n_layers=28).keep_counts(1296)
        == {
            33: [779, 457, 186],
            22: [488, 286, 117],
            11: [197, 116, 47],
        }[pct]
    )


# -- FLOPs -------------------------------------------------------------------------------------------
def test_vision_flops_closed_form_by_hand():
    spec = get_registry().spec_for(KIND)
    config = spec.tiny_config(TINY)  # D = 32, M = 64, d = 64, 14 px patches, temporal 2
    cost = spec.vision_flops(config, 6, vision_grid=(4, 6))  # 24 patches, 6 merged tokens
    embed = 2 * 24 * (3 * 2 * 14 * 14) * 32
    block = 2 * (3 * 24 * 32 * 32 + 24 * 32 * 32 + 2 * 24 * 32 * 64) + 4 * 32 * 24 * 24
    assert cost.tower == embed + 2 * block
    assert cost.projector == 2 * 6 * (128 * 128 + 128 * 64)
    assert spec.vision_flops(config, 6).detail["grid_patches"] == [4, 6]  # most square: 2 x 3 merged
    with pytest.raises(ValueError, match=r"vision_grid=\(4, 4\) .* rows\*cols = 4 \* n_visual = 24"):
        spec.vision_flops(config, 6, vision_grid=(4, 4))


def test_real_config_flops_match_the_meta_device_count():
    from tokenreduce.measure.configs import model_config, real_config
    from tokenreduce.measure.flops import account, count_with_flop_counter

    config = real_config("qwen2_vl_7b")
    vc, text = config.vision_config, config.text_config
    assert (vc.depth, vc.embed_dim, vc.mlp_ratio, vc.hidden_size, vc.hidden_act) == (32, 1280, 4, 3584, "quick_gelu")
    assert (text.num_hidden_layers, text.hidden_size, text.num_key_value_heads) == (28, 3584, 4)
    assert model_config("qwen2_vl_7b")["n_visual"] == 1296
    acc = account(config, "qwen_pio_33", n_visual=1296, n_text=60)
    assert [acc.per_layer_visual[k] for k in (0, 1, 8, 14)] == [1296, 779, 457, 186]
    counted = count_with_flop_counter(config, acc.per_layer_tokens, n_visual=1296)
    for ours, theirs in (
        (acc.vision_flops_true, counted["vision_tower"]),
        (acc.projector_flops_true, counted["projector"]),
        (acc.llm_flops_true, counted["decoder_layers"]),
    ):
        assert abs(ours - theirs) / theirs < 1e-3
    # full attention over 72x72 = 5184 patches in all 32 blocks: 10.94 TFLOPs of vision tower
    assert round(acc.vision_flops_true / 1e12, 2) == 10.94


# -- real checkpoints, offline -------------------------------------------------------------------------
def test_local_checkpoint_loads_with_its_chat_template_and_runs_a_preset(tmp_path):
    from tokenreduce.measure.tasks import format_prompt
    from tokenreduce.models import load_model, load_pretrained

    folder = save_tiny_checkpoint(tmp_path / "ckpt", KIND)
    loaded = load_pretrained(folder)
    assert loaded.arch == KIND and loaded.kind == "pretrained" and isinstance(loaded.model, Qwen2VLSpec().model_class())
    assert isinstance(loaded.processor, ImageOnlyQwen2VLProcessor)  # no torchvision for the video processor
    template = loaded.prompt_template()
    assert "<|vision_start|><|image_pad|><|vision_end|>" in template
    assert template.endswith("<|im_start|>assistant\n")
    prompt = format_prompt(template, "what color is the shape?")
    inputs = loaded.processor_inputs([prompt, prompt], [make_image(0), make_image(1, (112, 56))])
    with torch.no_grad(), tokenreduce.apply(loaded.model, "random_50") as att:
        out = loaded.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[0] == 2 and att.trace.original_visual == [4, 8]  # 56x56 and 112x56 pixels
    # the real model conf, pointed at the local copy (model.path wins over the repo)
    from tokenreduce.measure.configs import model_config

    conf = dict(model_config("qwen2_vl_7b"), path=str(folder))
    assert load_model(conf).n_layers == 3


def test_image_only_processor_round_trips(tmp_path):
    processor = make_processor(KIND)
    processor.save_pretrained(tmp_path)
    loaded = ImageOnlyQwen2VLProcessor.from_pretrained(tmp_path)
    loaded.tokenizer.padding_side = "left"
    a = make_inputs(KIND, [PROMPT, SHORT], processor=processor)
    b = make_inputs(KIND, [PROMPT, SHORT], processor=loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_offline_without_the_checkpoint_says_the_hub_is_unreachable(tmp_path, monkeypatch, capsys):
    """``model=qwen2_vl_7b`` with the hub offline and an empty cache: a clear message naming the
    repository and ``model.path=DIR``, no traceback.  (In-process: huggingface_hub reads its
    offline switch and cache folder from ``huggingface_hub.constants`` at call time.)"""
    from huggingface_hub import constants

    from tokenreduce.cli import main

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    assert main(["run", "model=qwen2_vl_7b", "plan=random_50", f"out_dir={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err
    assert "'Qwen/Qwen2-VL-7B-Instruct'" in err and "Hugging Face Hub is unreachable" in err
    assert "model.path=DIR" in err and "Traceback" not in err
