"""Layouts the LLaVA-NeXT and Qwen2.5-VL adapters read off what the decoder sees (newline tokens,
grids), checked against transformers' own arithmetic; LLaVA-NeXT's keep_newlines option;
Qwen2.5-VL video tokens as visual candidates."""

from __future__ import annotations

import pytest
import torch
from oracle import oracle_generate
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

import tokenreduce
from tokenreduce.core.errors import PlanError
from tokenreduce.testing.tiny import (
    VIDEO_PAD_TOKEN_ID,
    VISION_END_TOKEN_ID,
    VISION_START_TOKEN_ID,
    build_tiny,
    make_inputs,
    make_tokenizer,
)

PROMPT = "USER: <image> what color is the shape? ASSISTANT:"
SIZES = [(100, 80), (60, 120), (56, 56), (112, 57)]


@pytest.fixture(scope="module")
def next_model():
    return build_tiny("llava_next")


@pytest.fixture(scope="module")
def qwen_model():
    return build_tiny("qwen2_5_vl")


def reference_anyres(image_size_hw, config):
    """(panel, row, col, newline) per token from the image size, the way the model packs them."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    rows = [(0, r, c, 0) for r in range(side) for c in range(side)]
    n_h, n_w = get_anyres_image_grid_shape(
        list(image_size_hw), config.image_grid_pinpoints, config.vision_config.image_size
    )
    _, h, w = unpad_image(torch.empty(1, n_h * side, n_w * side), torch.tensor(image_size_hw)).shape
    rows += [(1, r, c, int(c == w)) for r in range(h) for c in range(w + 1)]
    return rows


def test_next_grid_and_newlines_match_transformers_layout(next_model):
    prompts = [PROMPT, "USER: <image> and <image> ? ASSISTANT:", PROMPT]
    inputs = make_inputs("llava_next", prompts, image_sizes=SIZES)
    with tokenreduce.apply(next_model, {"stages": [{"layer": 1, "keep": 3, "selector": "random"}]}) as att:
        next_model.generate(**inputs, max_new_tokens=1, do_sample=False)
        grid = att.visual_grid()
    sizes = inputs["image_sizes"].tolist()  # (height, width) per image
    per_sample = [[0], [1, 2], [3]]
    for b, images in enumerate(per_sample):
        want = []
        for k, i in enumerate(images):
            want += [(p + 2 * k, r, c) for p, r, c, _ in reference_anyres(sizes[i], next_model.config)]
        got = grid[b][att.candidate_mask[b]].tolist()
        assert [tuple(x) for x in got] == want


def test_keep_newlines_keeps_every_newline_token(next_model):
    inputs = make_inputs("llava_next", [PROMPT, PROMPT], image_sizes=SIZES[:2])
    sizes = inputs["image_sizes"].tolist()
    plan = {
        "adapter": {"keep_newlines": True},
        "stages": [
            {"layer": 1, "keep": {"ratio": 0.3}, "selector": "uniform"},
            {"layer": 3, "keep": 2, "scorer": "norm", "selector": "topk"},
        ],
    }
    with tokenreduce.apply(next_model, plan) as att:
        next_model.generate(**inputs, max_new_tokens=2, do_sample=False)
    media = inputs["input_ids"] == next_model.config.image_token_id
    for b in range(2):
        ref = reference_anyres(sizes[b], next_model.config)
        positions = torch.nonzero(media[b]).flatten().tolist()
        newline_positions = {p for p, row in zip(positions, ref) if row[3]}
        assert att.trace.original_visual[b] == len(ref) - len(newline_positions)  # patches only
        assert not newline_positions & set(att.trace.stages[0].kept[b])
        assert newline_positions <= set(att.trace.final_index[b])  # every newline survives both cuts
        assert att.trace.stages[-1].visual_after[b] == 2


def test_without_keep_newlines_the_whole_span_is_the_candidate_set(next_model):
    """The official code caps NeXT's candidates at the first 576 (the base image); we do not."""
    inputs = make_inputs("llava_next", [PROMPT], image_sizes=SIZES[:1])
    with tokenreduce.apply(next_model, {"stages": [{"layer": 1, "keep": 5, "selector": "random"}]}) as att:
        next_model.generate(**inputs, max_new_tokens=1, do_sample=False)
    n_media = int((inputs["input_ids"] == next_model.config.image_token_id).sum())
    assert att.trace.original_visual == [n_media] and n_media > 16
    assert att.trace.stages[0].visual_after == [5]


def test_adapter_options_are_validated(next_model, qwen_model):
    with pytest.raises(
        PlanError, match=r"adapter\.keep_newline: unknown key 'keep_newline'; allowed keys: keep_newlines"
    ):
        tokenreduce.apply(
            next_model, {"adapter": {"keep_newline": True}, "stages": [{"layer": 1, "keep": 2, "selector": "random"}]}
        )
    with pytest.raises(PlanError, match="the Qwen2_5_VLAdapter adapter takes no options"):
        tokenreduce.apply(
            qwen_model, {"adapter": {"keep_newlines": True}, "stages": [{"layer": 1, "keep": 2, "selector": "random"}]}
        )


def test_qwen_grid_matches_image_grid_thw(qwen_model):
    inputs = make_inputs("qwen2_5_vl", [PROMPT, "USER: <image> and <image> ? ASSISTANT:"], image_sizes=SIZES[:3])
    with tokenreduce.apply(qwen_model, {"stages": [{"layer": 1, "keep": 3, "selector": "random"}]}) as att:
        qwen_model.generate(**inputs, max_new_tokens=1, do_sample=False)
        grid = att.visual_grid()
    merge = qwen_model.config.vision_config.spatial_merge_size
    thw = inputs["image_grid_thw"].tolist()
    for b, images in enumerate([[0], [1, 2]]):
        want = [
            (k, r, c)
            for k, i in enumerate(images)
            for r in range(thw[i][1] // merge)
            for c in range(thw[i][2] // merge)
        ]
        assert [tuple(x) for x in grid[b][att.candidate_mask[b]].tolist()] == want


@pytest.mark.parametrize("policy", ["keep", "renumber"])
def test_qwen_video_tokens_are_visual_candidates(qwen_model, policy):
    """A video (built by hand: the video processor needs torchvision) is reduced like images;
    pruned generate() equals the oracle, and each temporal slice is its own grid panel."""
    tok = make_tokenizer()
    t, h, w = 2, 4, 6  # 2 temporal patches of a 4x6 patch grid -> 2 * 2 * 3 = 12 tokens
    n = t * h * w // 4
    pre = tok("USER:", add_special_tokens=False)["input_ids"]
    post = tok("what shape? ASSISTANT:", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([pre + [VISION_START_TOKEN_ID] + [VIDEO_PAD_TOKEN_ID] * n + [VISION_END_TOKEN_ID] + post])
    types = torch.zeros_like(ids)
    types[ids == VIDEO_PAD_TOKEN_ID] = 2
    pixels = torch.randn(t * h * w, 1176, generator=torch.Generator().manual_seed(0))
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": types,
        "pixel_values_videos": pixels,
        "video_grid_thw": torch.tensor([[t, h, w]]),
    }
    plan = {"positions": policy, "stages": [{"layer": 1, "keep": 5, "selector": "uniform"}]}
    with tokenreduce.apply(qwen_model, plan) as att:
        out = qwen_model.generate(
            **inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        grid = att.visual_grid()
    assert att.trace.original_visual == [n] and att.trace.stages[0].visual_after == [5]
    assert grid[0][att.candidate_mask[0]][:, 0].tolist() == [0] * 6 + [1] * 6
    text = torch.nonzero(~att.candidate_mask[0]).flatten().tolist()
    stages = [(1, sorted(set(text) | set(att.trace.stages[0].kept[0])), policy)]
    extra = {k: inputs[k] for k in ("mm_token_type_ids", "pixel_values_videos", "video_grid_thw")}
    tokens, ref_logits = oracle_generate(qwen_model, ids, None, stages, 4, extra=extra)
    assert out.sequences[0, -4:].tolist() == tokens
    torch.testing.assert_close(torch.stack(out.logits, 1)[0], ref_logits, atol=1e-5, rtol=0)


def test_missing_signal_fails_at_build_time_with_the_reason(qwen_model):
    from pydantic import BaseModel
    from registry_helpers import registry_with

    from tokenreduce.core.types import Need

    class ClsScorer:
        class Settings(BaseModel):
            pass

        needs = Need.VISION_CLS_ATTENTION

        def __init__(self, settings):
            pass

        def score(self, view):  # pragma: no cover - never reached
            raise AssertionError

    registry = registry_with("cls", scorers={"cls_attention": ClsScorer})
    plan = {"stages": [{"layer": 0, "keep": 4, "scorer": "cls_attention", "selector": "topk"}]}
    with pytest.raises(PlanError, match=r"stages\.0: needs signals \[vision_cls_attention\].*no CLS token"):
        tokenreduce.apply(qwen_model, plan, registry=registry)
    assert len(qwen_model._forward_pre_hooks) == 0


def test_image_only_qwen_processor_round_trips(tmp_path):
    from tokenreduce.adapters.qwen2_5_vl.processor import ImageOnlyQwen2_5_VLProcessor
    from tokenreduce.testing.tiny import make_processor

    processor = make_processor("qwen2_5_vl")
    processor.save_pretrained(tmp_path)
    loaded = ImageOnlyQwen2_5_VLProcessor.from_pretrained(tmp_path)
    loaded.tokenizer.padding_side = "left"
    prompts = [PROMPT, "USER: <image> shape? ASSISTANT:"]
    a = make_inputs("qwen2_5_vl", prompts, processor=processor)
    b = make_inputs("qwen2_5_vl", prompts, processor=loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["llava", "llava_next", "qwen2_5_vl"])
def test_visual_layout_is_available_after_decode_steps(kind, next_model, qwen_model):
    model = {"llava_next": next_model, "qwen2_5_vl": qwen_model}.get(kind) or build_tiny("llava")
    inputs = make_inputs(kind, [PROMPT])
    with tokenreduce.apply(model, {"stages": [{"layer": 1, "keep": 3, "selector": "random"}]}) as att:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)  # decode steps after the prefill
        mask, layout = att.visual_layout()
    assert torch.equal(mask, att.candidate_mask) and layout.shape == (*mask.shape, 4)
    n_newline = int(layout[0][mask[0]][:, 3].sum())
    assert (n_newline > 0) == (kind == "llava_next")
