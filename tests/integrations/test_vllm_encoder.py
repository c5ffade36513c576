"""The engine-independent half of the vLLM plugin (``tokenreduce.integrations.vllm.encoder``), in
the default suite (no vLLM needed): the encoder-side stage run on a batch of images keeps the same
patches as the transformers path on the shipped easyvqa-llava and easyvqa-qwen2_5_vl; the
provisional and recomputed positions equal the core layout (1-D, and Qwen2.5-VL's M-RoPE); the
index channels survive low-precision dtypes; plans are validated and LLM-side ones refused."""

from __future__ import annotations

import pytest
import torch

import tokenreduce
from tokenreduce.adapters.vision_signals import VisionCapture, clip_tower
from tokenreduce.core.errors import PlanError
from tokenreduce.core.static_budget import reduced_positions
from tokenreduce.integrations.vllm import engine_overrides
from tokenreduce.integrations.vllm.encoder import (
    compile_encoder_plan,
    decode_grid_index,
    decode_index,
    encode_grid_index,
    encode_index,
    grid_offsets,
    layout_positions,
    place_kept,
    plan_field,
    plan_json,
    plan_text,
    prompt_positions,
    reduce_images,
)
from tokenreduce.reference import data, load_reference, reference_dir

PLANS = {
    "uniform": {"stages": [{"layer": 0, "keep": {"ratio": 0.25}, "selector": "uniform"}]},
    "norm": {"stages": [{"layer": 0, "keep": 36, "scorer": "norm"}]},
    "random": "ref_random_22",
    "divprune": "ref_divprune_22",
    "visionzip": "ref_visionzip_22",
    "holov": "ref_holov_22",
    "scope": "ref_scope_22",
    "pio_ve": {
        "stages": [
            {"layer": 0, "keep": 24, "selector": {"name": "pio_ve", "local_layer": 1, "global_layer": -2, "windows": 4}}
        ]
    },
}
IMAGES = 3


@pytest.fixture(scope="module")
def llava():
    return load_reference("easyvqa-llava")


@pytest.fixture(scope="module")
def inputs(llava):
    _, processor = llava
    split = data.load_split("test")
    images = [split.image(split.image_ids[i]) for i in range(IMAGES)]
    return [processor(images=[im], text=[data.prompt("what shape is it?")], return_tensors="pt") for im in images]


@pytest.mark.parametrize("name", sorted(PLANS))
def test_reduce_images_keeps_what_the_transformers_path_keeps(llava, inputs, name):
    model, _ = llava
    n_layers = model.config.text_config.num_hidden_layers
    stage = compile_encoder_plan(plan_json(PLANS[name]), n_layers)
    expected = []
    for x in inputs:
        with torch.no_grad(), tokenreduce.apply(model, PLANS[name]) as att:
            model(**x)
        start = int(torch.nonzero(x["input_ids"][0] == model.config.image_token_id)[0])
        expected.append([p - start for p in att.trace.stages[0].kept[0]])

    tower = clip_tower(model, name="llava")
    capture = VisionCapture(tower, None)
    try:
        pixels = torch.cat([x["pixel_values"] for x in inputs])
        with torch.no_grad():
            out = model.model.get_image_features(
                pixel_values=pixels, vision_feature_layer=-2, vision_feature_select_strategy="default"
            )
            features = out.pooler_output if hasattr(out, "pooler_output") else out
            features = torch.stack(list(features)) if not isinstance(features, torch.Tensor) else features
            reduced = reduce_images(stage, features, tower, capture.take)
    finally:
        capture.detach()
    assert [r.index.tolist() for r in reduced] == expected
    for i, r in enumerate(reduced):
        assert r.embeddings.shape == (len(expected[i]), features.shape[-1])
        if name != "visionzip" and name != "pio_ve":  # these merge dropped tokens into kept anchors
            assert torch.equal(r.embeddings, features[i, r.index])


def test_no_plan_keeps_every_patch():
    stage = compile_encoder_plan("", 4)
    features = torch.randn(2, 9, 5)
    reduced = reduce_images(stage, features, None, None)
    assert [r.index.tolist() for r in reduced] == [list(range(9))] * 2
    assert torch.equal(reduced[1].embeddings, features[1])


@pytest.mark.parametrize("policy", ["keep", "renumber"])
def test_positions_equal_the_core_layout(policy):
    """Text, an image of 20 tokens keeping 6, text, an image keeping 4 of 20, text."""
    gen = torch.Generator().manual_seed(1)
    pieces, kept_masks, runs, kept_idx = [], [], [], []
    offset = 0
    for text, n, k in ((3, 20, 6), (2, 20, 4), (5, 0, 0)):
        pieces += [False] * text
        kept_masks += [True] * text
        offset += text
        if n:
            idx = torch.randperm(n, generator=gen)[:k].sort().values
            mask = torch.zeros(n, dtype=torch.bool)
            mask[idx] = True
            pieces += [True] * n
            kept_masks += mask.tolist()
            runs.append((offset, k, n))
            kept_idx.append(idx)
            offset += k
    visual_full = torch.tensor(pieces)
    kept = torch.tensor(kept_masks)
    want = reduced_positions(torch.arange(visual_full.numel()), kept, policy)
    ids, delta = prompt_positions(runs, int(kept.sum()), policy)
    visual = visual_full[kept]
    got = place_kept(ids.unsqueeze(0).expand(3, -1), visual, kept_idx, 0, policy)
    assert torch.equal(got[0], want) and torch.equal(got[2], want)
    assert delta == int(got.max()) + 1 - got.shape[-1]
    # a later chunk (prefix already computed) moves only the images it holds
    later = place_kept(ids.unsqueeze(0), visual, kept_idx[1:], runs[1][0], policy)
    assert torch.equal(later[0, runs[1][0] :], want[runs[1][0] :])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_index_channels_are_exact_in_low_precision(dtype):
    index = torch.tensor([0, 1, 255, 256, 575, 2303, 65535])
    for policy in ("keep", "renumber"):
        back, got_policy = decode_index(encode_index(index, policy, dtype))
        assert torch.equal(back, index) and got_policy == policy
    with pytest.raises(ValueError, match="patch indices"):
        encode_index(torch.tensor([65536]), "keep", dtype)


def test_engine_overrides_validate_and_refuse():
    path = reference_dir("easyvqa-llava")
    over = engine_overrides(path, "ref_visionzip_22")
    assert over["architectures"] == ["TokenReduceLlavaForConditionalGeneration"]
    assert over["tokenreduce_plan"]["stages"][0]["selector"]["name"] == "visionzip"
    assert over["text_config"]["rope_parameters"]["mrope_section"] == [16, 0, 0]  # head_dim 32
    assert engine_overrides(path)["tokenreduce_plan"] is None
    with pytest.raises(PlanError, match=r"stages.1 \(pio before layer 2\) cuts inside the decoder.*transformers"):
        engine_overrides(path, "ref_pio_ve_11")
    with pytest.raises(PlanError, match="keep"):
        engine_overrides(path, {"stages": [{"layer": 0, "keep": 0.5, "selector": "uniform"}]})
    with pytest.raises(ValueError, match="model_type 'gemma3' has no reduced vLLM class; supported: llava, qwen2_5_vl"):
        engine_overrides({"model_type": "gemma3"}, None)


def test_engine_overrides_for_qwen_validate_against_its_adapter():
    path = reference_dir("easyvqa-qwen2_5_vl")
    over = engine_overrides(path, "qwen_ref_visionzip_22")
    assert over["architectures"] == ["TokenReduceQwen2_5_VLForConditionalGeneration"]
    assert over["tokenreduce_plan"]["stages"][0]["scorer"]["name"] == "vision_attn"
    assert "text_config" not in over  # Qwen2.5-VL keeps its own M-RoPE
    with pytest.raises(PlanError, match="vision_cls_attention.*no CLS token"):
        engine_overrides(path, "ref_visionzip_22")
    with pytest.raises(PlanError, match=r"stages.1 \(pio before layer 2\) cuts inside the decoder"):
        engine_overrides(path, "qwen_ref_pio_ve_22")


def test_plan_field_round_trip():
    text = plan_json("ref_divprune_22")
    assert plan_text(plan_field(text)) == text
    assert plan_text(plan_field("")) == ""


def test_module_cli_prints_the_overrides_or_the_refusal(capsys):
    import json

    from tokenreduce.integrations.vllm.__main__ import main

    path = str(reference_dir("easyvqa-llava"))
    assert main([path, "ref_uniform_22"]) == 0
    assert json.loads(capsys.readouterr().out)["tokenreduce_plan"]["stages"][0]["keep"] == {"tokens": 32}
    assert main([path, "ref_fastv_22"]) == 1
    assert "reads decoder signals [attention_rows] (fastv, topk)" in capsys.readouterr().err
    assert main([]) == 2


# -- Qwen2.5-VL ---------------------------------------------------------------------------------------
QWEN_PLANS = {
    "uniform": {"stages": [{"layer": 0, "keep": {"ratio": 0.25}, "selector": "uniform"}]},
    "norm": {"stages": [{"layer": 0, "keep": 36, "scorer": "norm"}]},
    "random": "ref_random_22",
    "divprune": "ref_divprune_22",
    "visionzip": "qwen_ref_visionzip_22",
    "holov": "qwen_ref_holov_22",
    "scope": "qwen_ref_scope_22",
    "pio_ve": {
        "stages": [
            {
                "layer": 0,
                "keep": 32,
                "selector": {"name": "pio_ve_qwen", "local_layer": 2, "global_layer": -1, "window": 4, "merge": True},
            }
        ]
    },
}


@pytest.fixture(scope="module")
def qwen():
    return load_reference("easyvqa-qwen2_5_vl")


@pytest.fixture(scope="module")
def qwen_inputs(qwen):
    _, processor = qwen
    split = data.load_split("test")
    images = [split.image(split.image_ids[i]) for i in range(IMAGES)]
    text = [data.prompt("what shape is it?", "qwen2_5_vl")]
    return [processor(images=[im], text=text, return_tensors="pt") for im in images]


@pytest.mark.parametrize("name", sorted(QWEN_PLANS))
def test_reduce_images_on_qwen_keeps_what_the_transformers_path_keeps(qwen, qwen_inputs, name):
    from tokenreduce.adapters.qwen2_5_vl.adapter import Qwen2_5_VLAdapter
    from tokenreduce.adapters.qwen_vision_signals import qwen_vision_tower

    model, _ = qwen
    n_layers = model.config.text_config.num_hidden_layers
    stage = compile_encoder_plan(plan_json(QWEN_PLANS[name]), n_layers, Qwen2_5_VLAdapter)
    expected = []
    for x in qwen_inputs:
        with torch.no_grad(), tokenreduce.apply(model, QWEN_PLANS[name]) as att:
            model(**x)
        start = int(torch.nonzero(x["input_ids"][0] == model.config.image_token_id)[0])
        expected.append([p - start for p in att.trace.stages[0].kept[0]])

    tower = qwen_vision_tower(model, name="qwen")
    capture = VisionCapture(tower, None)
    merge = model.config.vision_config.spatial_merge_size
    try:
        pixels = torch.cat([x["pixel_values"] for x in qwen_inputs])
        grid = torch.cat([x["image_grid_thw"] for x in qwen_inputs])
        with torch.no_grad():
            out = model.model.get_image_features(pixel_values=pixels, image_grid_thw=grid)
            features = torch.stack(list(out.pooler_output))
            reduced = reduce_images(
                stage,
                features,
                tower,
                capture.take,
                grid_width=int(grid[0, 2]) // merge,
                provides=Qwen2_5_VLAdapter.provides,
            )
    finally:
        capture.detach()
    assert [r.index.tolist() for r in reduced] == expected
    for i, r in enumerate(reduced):
        assert r.embeddings.shape == (len(expected[i]), features.shape[-1])
        if name not in ("visionzip", "pio_ve"):  # these merge dropped tokens into kept anchors
            assert torch.equal(r.embeddings, features[i, r.index])


def test_qwen_layout_equals_the_models_rope_index(qwen, qwen_inputs):
    """Unreduced, :func:`layout_positions` over :func:`grid_offsets` gives Qwen2.5-VL's own M-RoPE ids."""
    model, _ = qwen
    x = qwen_inputs[0]
    ids = x["input_ids"][0]
    visual = ids == model.config.image_token_id
    n = int(visual.sum())
    _, h, w = (int(v) // m for v, m in zip(x["image_grid_thw"][0], (1, 2, 2)))
    offset = int(torch.nonzero(visual)[0])
    got, delta = layout_positions([(offset, n, grid_offsets(torch.arange(n), w))], ids.numel(), "keep")
    want, want_delta = model.model.get_rope_index(
        x["input_ids"], x["mm_token_type_ids"], image_grid_thw=x["image_grid_thw"], attention_mask=x["attention_mask"]
    )
    assert torch.equal(got, want[:, 0]) and delta == int(want_delta)


@pytest.mark.parametrize("policy", ["keep", "renumber"])
def test_mrope_positions_equal_the_core_layout(policy):
    """Text, a 4x6 image keeping 7, text, a 3x5 image keeping 4, text: the provisional layout plus the
    recomputation equal :func:`reduced_positions` of the unreduced M-RoPE ids."""
    gen = torch.Generator().manual_seed(2)
    full_runs, runs, kept_masks, chunks = [], [], [], []
    offset_full, offset = 0, 0
    for text, (h, w), k in ((3, (4, 6), 7), (2, (3, 5), 4), (5, (0, 0), 0)):
        kept_masks += [True] * text
        offset_full += text
        offset += text
        if h * w:
            idx = torch.randperm(h * w, generator=gen)[:k].sort().values
            mask = torch.zeros(h * w, dtype=torch.bool)
            mask[idx] = True
            kept_masks += mask.tolist()
            layout = grid_offsets(torch.arange(h * w), w)
            full_runs.append((offset_full, h * w, layout))
            runs.append((offset, k, layout))
            chunks.append(grid_offsets(idx, w))
            offset_full += h * w
            offset += k
    kept = torch.tensor(kept_masks)
    full, _ = layout_positions(full_runs, kept.numel(), "keep")
    want = reduced_positions(full, kept, policy)
    ids, delta = layout_positions(runs, int(kept.sum()), policy)
    visual = torch.zeros(kept.numel(), dtype=torch.bool)
    for start, n, _ in full_runs:
        visual[start : start + n] = True
    got = place_kept(ids, visual[kept], chunks, 0, policy)
    assert torch.equal(got, want)
    assert delta == int(got.max()) + 1 - got.shape[-1]
    later = place_kept(ids, visual[kept], chunks[1:], runs[1][0], policy)
    assert torch.equal(later[:, runs[1][0] :], want[:, runs[1][0] :])


def test_prompt_positions_is_the_one_axis_layout():
    runs = [(2, 3, 10), (8, 1, 4)]
    ids, delta = prompt_positions(runs, 12, "keep")
    assert ids.tolist() == [0, 1, 2, 3, 4, 12, 13, 14, 15, 19, 20, 21] and delta == 10
    assert prompt_positions(runs, 12, "renumber")[0].tolist() == list(range(12))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grid_index_channels_round_trip(dtype):
    index = torch.tensor([0, 5, 143, 300])
    back, width, policy = decode_grid_index(encode_grid_index(index, 300, "renumber", dtype))
    assert torch.equal(back, index) and width == 300 and policy == "renumber"
    assert grid_offsets(torch.tensor([0, 13, 25]), 12).tolist() == [[0, 0, 0], [0, 1, 2], [0, 1, 1]]
    with pytest.raises(ValueError, match="grid width"):
        encode_grid_index(index, 0, "keep", dtype)
