"""The training script on the scenes task (``--task scenes``), tiny configuration: the loss goes
down, stage 1 learns per grid cell, settings that would break the task are refused."""

import json

import pytest
import torch

from tokenreduce.reference import scenes
from tools.reference.build import ArchSettings
from tools.reference.train import (
    SCENES_ARCH,
    SCENES_TRAIN,
    TINY_SCENES_ARCH,
    TINY_TRAIN,
    TrainSettings,
    _pool_cells,
    _token_tags,
    main,
    train,
)


def _tiny(**kw):
    return ArchSettings(**TINY_SCENES_ARCH), TrainSettings(
        **{**SCENES_TRAIN, **TINY_TRAIN, "name": "scenes-tiny", **kw}
    )


def test_tiny_scenes_training_loss_goes_down_and_reports_accuracy_by_type(tmp_path):
    arch, settings = _tiny(steps=30, lr=3e-3, eval_every=15, ckpt_every=30, test_questions=60, max_val_questions=60)
    metrics = train(arch, settings, tmp_path, show_progress=False)
    losses = [h["loss"] for h in metrics["history"]]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    saved = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert saved["test_method"] == "teacher_forced" and saved["test_questions"] == 60
    assert set(saved["test_accuracy_per_type"]) <= set(scenes.QUESTION_TYPES)
    assert sum(v["n"] for v in saved["test_accuracy_per_type"].values()) == 60
    card = (tmp_path / "model" / "README.md").read_text()
    assert "Per question type" in card and "scenes train split (8,000 images" in card


def test_cell_pretraining_runs_and_is_recorded(tmp_path):
    arch, settings = _tiny(steps=1, vision_pretrain_steps=3, eval_every=1, ckpt_every=1, max_val_questions=12)
    metrics = train(arch, settings, tmp_path, show_progress=False)
    stage1 = metrics["vision_pretrain"]
    assert stage1["steps"] == 3 and 0 <= stage1["shape_accuracy"] <= 1
    assert "each cell of every training scene" in (tmp_path / "model" / "README.md").read_text()


def test_pool_cells_averages_each_grid_cell():
    features = torch.arange(36.0).view(1, 36, 1).expand(2, 36, 3)  # token k has value k, 6x6 grid
    pooled = _pool_cells(features, 9)
    assert pooled.shape == (2, 9, 3)
    assert pooled[0, 0, 0] == torch.tensor([0.0, 1, 6, 7]).mean()  # top-left 2x2 block
    assert pooled[0, 8, 0] == torch.tensor([28.0, 29, 34, 35]).mean()
    torch.testing.assert_close(_pool_cells(features, 1)[:, 0], features.mean(1))
    with pytest.raises(ValueError, match="square grids"):
        _pool_cells(torch.zeros(1, 10, 3), 9)


def test_scenes_settings_refuse_flips_and_word_targets():
    with pytest.raises(ValueError, match="flipping a scene changes its left/right answers"):
        TrainSettings(task="scenes", hflip=True)
    with pytest.raises(ValueError, match="--vision-pretrain-target heads"):
        TrainSettings(task="scenes", hflip=False, vision_pretrain_target="embeddings")
    with pytest.raises(ValueError, match="task"):
        TrainSettings(task="coco")


def test_scenes_preset_is_the_576_token_8_layer_llava():
    from tools.reference.build import num_visual_tokens

    arch = ArchSettings(**SCENES_ARCH)
    assert num_visual_tokens(arch) == 576 and arch.text_layers >= 8 and arch.arch == "llava"
    assert len(scenes.make_tokenizer()) <= arch.vocab_size


def test_command_line_task_scenes_uses_the_presets(tmp_path, capsys):
    assert (
        main(
            ["--task", "scenes", "--tiny", "--steps", "2", "--eval-every", "2", "--out", str(tmp_path), "--no-progress"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["best_step"] == 2
    saved = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert saved["train"]["task"] == "scenes" and saved["train"]["hflip"] is False
    assert saved["arch"]["image_size"] == TINY_SCENES_ARCH["image_size"] and saved["name"] == "scenes-tiny"


def test_token_tags_label_each_patch_with_the_object_covering_it_and_its_grid_cell():
    split = scenes.load_split("train")

    class Encoded:  # the one attribute _token_tags reads
        by_image = {img: [img] for img in range(20)}

    side = 24
    tags = _token_tags(split, Encoded, side)
    patch = scenes.IMAGE_SIZE / side
    for img, t in tags.items():
        assert t.shape == (side * side, 5)
        grid = t.view(side, side, 5)
        for o in split.scenes[img].objects:
            left, top, right, bottom = o.box()
            # the patch under the object's centre carries its shape, colour and size unless a later
            # object covers that patch too
            r, c = int(o.y * scenes.IMAGE_SIZE // patch), int(o.x * scenes.IMAGE_SIZE // patch)
            covered_later = any(
                later.box()[0] <= (c + 0.5) * patch < later.box()[2]
                and later.box()[1] <= (r + 0.5) * patch < later.box()[3]
                for later in split.scenes[img].objects[split.scenes[img].objects.index(o) + 1 :]
            )
            if not covered_later:
                assert grid[r, c, :3].tolist() == [
                    1 + scenes.SCENE_SHAPES.index(o.shape),
                    1 + list(scenes.SCENE_COLORS).index(o.color),
                    1 + scenes.SIZES.index(o.size),
                ]
        assert int((grid[..., 0] == 0).sum()) > 0  # background patches: "none"
        assert (
            grid[0, 0, 3:].tolist() == [0, 0]
            and grid[-1, -1, 3:].tolist() == [2, 2]
            and grid[8, 16, 3:].tolist() == [1, 2]
        )


def test_per_token_stage_1_is_refused_outside_the_scenes_task():
    with pytest.raises(ValueError, match="vision_pretrain_tokens"):
        TrainSettings(vision_pretrain_tokens=True)
