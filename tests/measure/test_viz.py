"""viz: the figure of kept tokens has one panel per plan (plus the input, plus score heat-maps) per image, of the
set size, as PNG, PDF and SVG."""

import pytest
import torch
from PIL import Image

import tokenreduce
from tokenreduce.measure.viz import (
    TokenLayout,
    VizSettings,
    render_panel,
    score_values,
    survival_levels,
    task_inputs,
    token_layout,
    visualize,
)
from tokenreduce.models import load_model
from tokenreduce.testing.tiny import QWEN_IMAGE_PLACEHOLDER, make_image


@pytest.fixture(scope="module")
def tiny_llava():
    return load_model({"kind": "tiny", "arch": "llava", "text_layers": 4})


def test_survival_levels_count_the_stages_that_kept_a_token():
    layout = TokenLayout(
        torch.tensor([5, 6, 7, 8]),
        torch.zeros(4, dtype=torch.long),
        torch.tensor([0, 0, 1, 1]),
        torch.tensor([0, 1, 0, 1]),
        torch.zeros(4, dtype=torch.bool),
    )
    levels = survival_levels(layout, [[5, 6, 8], [6]])
    assert levels.tolist() == [1, 2, 0, 1]  # 7 removed by stage 0; 6 kept to the end
    assert layout.extent(0) == (2, 2)


def test_render_panel_dims_removed_cells():
    layout = TokenLayout(
        torch.arange(4),
        torch.zeros(4, dtype=torch.long),
        torch.tensor([0, 0, 1, 1]),
        torch.tensor([0, 1, 0, 1]),
        torch.zeros(4, dtype=torch.bool),
    )
    white = Image.new("RGB", (20, 20), (255, 255, 255))
    panel = render_panel(layout, {0: white}, torch.tensor([0, 1, 1, 1]), 1, size=100, header=0, title="t", dim=0.0)
    assert panel.size == (100, 100)
    assert panel.getpixel((25, 25)) == (0, 0, 0)  # cell (0, 0) removed: fully dimmed
    assert panel.getpixel((75, 75)) == (255, 255, 255)  # kept cell untouched


def test_token_layout_of_tiny_llava_is_its_square_grid(tiny_llava):
    inputs = tiny_llava.processor_inputs(["USER: <image> what? ASSISTANT:"] * 2, [make_image(0), make_image(1)])
    layouts = token_layout(tiny_llava.model, inputs)
    assert len(layouts) == 2
    assert layouts[0].extent(0) == (4, 4) and len(layouts[0].positions) == 16
    assert sorted(zip(layouts[1].row.tolist(), layouts[1].col.tolist())) == [(r, c) for r in range(4) for c in range(4)]


def test_visualize_png_size_is_panels_times_panel_size(tiny_llava, tmp_path):
    settings = VizSettings(panel_size=96, header=40, answers=False)
    images = [make_image(3, (80, 60)), make_image(4, (60, 60))]
    figure, record = visualize(
        tiny_llava,
        {"demo": "demo", "uniform_25": "uniform_25"},
        images,
        ["USER: <image> what? ASSISTANT:"] * 2,
        settings,
    )
    assert figure.size == (3 * 96, 2 * (40 + 96))  # (input + 2 plans) panels per row, one row per image
    path = tmp_path / "kept.png"
    figure.save(path)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == figure.size
    demo = record["plans"]["demo"][0]
    assert [s["visual_after"] for s in demo["stages"]] == [8, 4] and len(demo["kept_cells"]) == 4
    assert record["plans"]["uniform_25"][1]["stages"][0]["visual_after"] == 4


def test_visualize_qwen_grid_from_the_adapter():
    loaded = load_model({"kind": "tiny", "arch": "qwen2_5_vl", "text_layers": 4})
    prompt = f"USER: {QWEN_IMAGE_PLACEHOLDER} what? ASSISTANT:"
    figure, record = visualize(
        loaded,
        {"uniform_25": "uniform_25"},
        [make_image(0, (100, 80))],
        [prompt],
        VizSettings(panel_size=64, header=0, show_input=False, answers=False),
    )
    assert figure.size == (64, 64)
    assert record["samples"][0]["n_visual"] == 12 and record["samples"][0]["panels"] == {0: [3, 4]}


def test_visualize_llava_next_has_base_and_high_resolution_panels():
    loaded = load_model({"kind": "tiny", "arch": "llava_next", "text_layers": 4})
    figure, record = visualize(
        loaded,
        {"uniform_25": "uniform_25"},
        [make_image(0, (100, 80))],
        ["USER: <image> what? ASSISTANT:"],
        VizSettings(panel_size=64, header=0, answers=False),
    )
    assert figure.size == (2 * 64, 64)
    sample = record["samples"][0]
    assert sample["n_visual"] == 70 and len(sample["panels"]) == 2 and sample["panels"][0] == [4, 4]
    assert record["plans"]["uniform_25"][0]["stages"][0]["visual_after"] == 18  # round(70 / 4)


def _square(n: int) -> TokenLayout:
    k = torch.arange(n * n)
    return TokenLayout(
        k + 10, torch.zeros(n * n, dtype=torch.long), k // n, k % n, torch.zeros(n * n, dtype=torch.bool)
    )


def test_score_values_map_scores_onto_the_grid_and_nan_elsewhere():
    layout = _square(2)  # positions 10..13
    values = score_values(layout, [10, 12, 13], torch.tensor([0.5, -1.0, 2.0]))
    assert values[[0, 2, 3]].tolist() == [0.5, -1.0, 2.0] and bool(values[1].isnan())
    with pytest.raises(ValueError, match="not visual tokens"):
        score_values(layout, [10, 99], torch.tensor([0.0, 1.0]))


def test_heat_map_panel_shades_cells_by_score():
    layout = _square(2)
    scores = torch.tensor([0.0, float("nan"), 1.0, 3.0])  # cell (0, 1) was removed before this stage
    white = Image.new("RGB", (20, 20), (255, 255, 255))
    panel = render_panel(layout, {0: white}, None, 0, size=100, header=0, title="", scores=scores, cmap="gray", dim=0.0)
    brightness = [sum(panel.getpixel(xy)) for xy in [(26, 26), (74, 26), (26, 74), (74, 74)]]
    assert brightness[1] == 0  # not scored: fully dimmed
    assert brightness[0] < brightness[2] < brightness[3]  # gray map: brighter = higher score


def test_recorded_scores_rank_the_kept_tokens(tiny_llava):
    """record_scores: the trace holds the scorer's scores of every candidate; a top-k stage kept the k best."""
    inputs = tiny_llava.processor_inputs(["USER: <image> what? ASSISTANT:"] * 2, [make_image(0), make_image(5)])
    plan = {"stages": [{"layer": 1, "keep": 6, "scorer": "norm", "selector": "topk"}]}
    with torch.no_grad(), tokenreduce.apply(tiny_llava.model, plan) as att:
        tiny_llava.model(**inputs, use_cache=False)
    assert att.trace.stages[0].scores is None  # off by default
    att.record_scores = True
    with torch.no_grad(), att:
        tiny_llava.model(**inputs, use_cache=False)
    st = att.trace.stages[0]
    for b in range(2):
        assert len(st.scored[b]) == 16 and len(st.scores[b]) == 16
        best = torch.topk(st.scores[b], 6).indices
        assert sorted(st.scored[b][i] for i in best.tolist()) == st.kept[b]


def test_visualize_heat_map_panel_per_scoring_stage_and_vector_files(tiny_llava, tmp_path):
    images, questions, golds = task_inputs({"name": "easy_vqa"}, 2)
    assert len(images) == 2 and questions[0].endswith("?") and golds[0]
    prompts = [f"USER: <image> {q} ASSISTANT:" for q in questions]
    settings = VizSettings(panel_size=96, header=84, heatmap=True, max_new_tokens=2)
    figure, record = visualize(
        tiny_llava,
        {"demo": "demo", "uniform_25": "uniform_25"},
        images,
        prompts,
        settings,
        questions=questions,
        golds=golds,
    )
    # input, demo, demo's scoring stage (norm at L3; its uniform first stage has no scorer), uniform_25
    assert len(figure.rows[0]) == 4 and figure.size == (4 * 96, 2 * (84 + 96))
    heat = figure.rows[1][2]
    assert heat.scores is not None and int(torch.isfinite(heat.scores).sum()) == 8  # 16 > L1:8 > L3:4
    assert int(heat.removed.sum()) == 4 and heat.lines[0] == f"Q: {questions[1]}"
    demo = record["plans"]["demo"][1]
    assert [s["layer"] for s in demo["scores"]] == [3] and demo["scores"][0]["min"] <= demo["scores"][0]["max"]
    assert len(demo["kept_cells_per_stage"]) == 2 and demo["kept_cells"] == demo["kept_cells_per_stage"][-1]
    assert "answer" in demo and record["samples"][1]["gold"] == golds[1]
    for suffix, magic in ((".png", b"\x89PNG"), (".pdf", b"%PDF"), (".svg", b"<?xml")):
        path = figure.save(tmp_path / f"kept{suffix}")
        assert path.read_bytes().startswith(magic)
    assert "uniform_25" in (tmp_path / "kept.svg").read_text()  # text stays text in the vector files
    with Image.open(tmp_path / "kept.png") as im:
        assert im.size == figure.size


def test_viz_settings_name_the_bad_field():
    with pytest.raises(ValueError, match="cmap"):
        VizSettings(cmap="no_such_map")
    with pytest.raises(ValueError, match="formats"):
        VizSettings(formats=["gif"])
