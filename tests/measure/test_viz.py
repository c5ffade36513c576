"""viz: the PNG of kept tokens has one panel per plan (plus the input) per image, of the set size."""

import pytest
import torch
from PIL import Image

from tokenreduce.measure.viz import TokenLayout, VizSettings, render_panel, survival_levels, token_layout, visualize
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
    settings = VizSettings(panel_size=96, header=40)
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
        VizSettings(panel_size=64, header=0, show_input=False),
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
        VizSettings(panel_size=64, header=0),
    )
    assert figure.size == (2 * 64, 64)
    sample = record["samples"][0]
    assert sample["n_visual"] == 70 and len(sample["panels"]) == 2 and sample["panels"][0] == [4, 4]
    assert record["plans"]["uniform_25"][0]["stages"][0]["visual_after"] == 18  # round(70 / 4)
