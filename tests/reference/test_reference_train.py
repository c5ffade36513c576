"""The reference-model training script (``tools/reference/train.py``, outside the package) on a
tiny configuration: the loss goes down, runs are reproducible, resumption continues exactly,
settings are validated."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tools.reference.build import ArchSettings
from tools.reference.train import (
    TINY_ARCH,
    TINY_TRAIN,
    TrainSettings,
    _epoch_units,
    _step_units,
    learning_rate,
    main,
    train,
)


def _settings(**kw):
    return ArchSettings(**TINY_ARCH), TrainSettings(**{**TINY_TRAIN, **kw})


def test_tiny_training_loss_goes_down_and_exports_a_loadable_model(tmp_path):
    arch, settings = _settings(steps=30, eval_every=15, ckpt_every=15)
    metrics = train(arch, settings, tmp_path, show_progress=False)
    losses = [h["loss"] for h in metrics["history"]]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    model_dir = tmp_path / "model"
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "processor_config.json",
        "README.md",
        "metrics.json",
    ):
        assert (model_dir / name).is_file(), name
    saved = json.loads((model_dir / "metrics.json").read_text())
    assert saved["best_step"] in (15, 30) and "test_accuracy" not in saved  # test_questions=0 in TINY_TRAIN

    from tokenreduce.reference import load_folder

    model, processor = load_folder(model_dir)
    assert model.config.model_type == "llava" and not model.training
    assert processor.tokenizer.padding_side == "left"
    assert "Training" in (model_dir / "README.md").read_text()


def test_same_seed_gives_the_same_weights_and_resume_continues_exactly(tmp_path):
    arch, settings = _settings(steps=6, eval_every=3, ckpt_every=3)
    train(arch, settings, tmp_path / "straight", show_progress=False)

    stopped = train(arch, settings.model_copy(update={"stop_at_step": 3}), tmp_path / "resumed", show_progress=False)
    assert stopped["stopped_at_step"] == 3 and not (tmp_path / "resumed" / "model").exists()
    saved = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 3
    resumed = train(arch, settings, tmp_path / "resumed", resume=True, show_progress=False)
    assert [h["step"] for h in resumed["history"]] == list(range(1, 7))

    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    straight = json.loads((tmp_path / "straight" / "history.json").read_text())
    again = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert [round(h["loss"], 4) for h in straight] == [round(h["loss"], 4) for h in again]


def test_resume_refuses_changed_settings_and_missing_checkpoints(tmp_path):
    arch, settings = _settings(steps=2, eval_every=2, ckpt_every=2)
    train(arch, settings, tmp_path, show_progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(arch, settings, tmp_path, show_progress=False)
    with pytest.raises(ValueError, match=r"training settings \['lr'\] differ"):
        train(arch, settings.model_copy(update={"lr": 1e-4}), tmp_path, resume=True, show_progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(arch, settings, tmp_path / "empty", resume=True, show_progress=False)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="extra"):
        TrainSettings(step=3)
    with pytest.raises(ValueError, match="multiple of patch"):
        ArchSettings(image_size=100, patch=8)
    with pytest.raises(ValueError, match="head_dim"):
        ArchSettings(arch="qwen2_5_vl", image_size=64, patch=8, text_hidden=72, text_heads=6, text_kv_heads=2)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    s = TrainSettings(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    lrs = [learning_rate(i, s) for i in range(100)]
    assert lrs[9] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert learning_rate(100, s) == pytest.approx(1e-4)


def test_step_units_are_slices_of_their_epoch_in_any_call_order():
    class Encoded:  # the attributes _step_units reads
        by_image = {img: list(range(6 * img, 6 * img + 6)) for img in range(10)}  # 20 units of 4 questions
        epoch_memo: dict = {}

    items = tuple((img, tuple(rows)) for img, rows in Encoded.by_image.items())
    for seed in (0, 1):  # a second seed must not reuse the first one's epochs
        s = TrainSettings(images_per_batch=6, questions_per_image=4, seed=seed)  # 3 steps per epoch
        for step in (4, 0, 7, 2, 3, 4):
            epoch, b = divmod(step, 3)
            assert _step_units(step, Encoded, s) == _epoch_units(items, 4, seed, epoch)[6 * b : 6 * b + 6]


def test_command_line_runs_the_tiny_configuration(tmp_path, capsys):
    assert main(["--tiny", "--steps", "4", "--eval-every", "2", "--out", str(tmp_path), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["best_step"] in (2, 4)
    card = (tmp_path / "model" / "README.md").read_text()
    assert "python -m tools.reference.train --tiny --steps 4" in card


@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl"])
def test_shared_prefix_forward_equals_the_full_sequence_forward(arch):
    """Training runs the image prefix once per image and the questions on its KV cache; that must
    give the logits of the plain full-sequence forward (LLaVA 1-D positions, Qwen M-RoPE)."""
    from tokenreduce.reference import data
    from tools.reference.build import build_model, make_processor, num_visual_tokens
    from tools.reference.train import _Encoded, _ImageCache, _Unit, forward_units

    kw = dict(TINY_ARCH)
    if arch == "qwen2_5_vl":
        kw.update(patch=4, text_hidden=32, text_heads=2)  # 8x8 patches -> 16 merged tokens; head_dim 16
    settings = ArchSettings(arch=arch, **kw)
    model = build_model(settings, seed=1).eval()
    processor = make_processor(settings)
    split = data.load_split("train")
    enc = _Encoded(split, list(range(25)), processor.tokenizer, arch, num_visual_tokens(settings))
    images = _ImageCache(split, enc.image_ids, processor, arch, flips=False)
    units = [_Unit(img, tuple(rows), len(rows)) for img, rows in sorted(enc.by_image.items())]
    with torch.no_grad():
        logits, targets, weight = forward_units(model, arch, enc, images, units, None)
        assert logits.shape == (25, 2, settings.vocab_size) and bool((weight == 1).all())
        for q, row in enumerate(r for u in units for r in u.rows):
            ids = enc.full_ids(row)[None]
            pixels = images.batch([enc.image_ids[row]], None)
            if arch == "qwen2_5_vl":
                pixels["mm_token_type_ids"] = (ids == data.IMAGE_PAD_TOKEN_ID).long()
            full = model(input_ids=ids, **pixels).logits[0]  # [S, V]
            n = ids.shape[1]
            torch.testing.assert_close(logits[q], full[[n - 3, n - 2]], rtol=1e-4, atol=1e-5)
            assert targets[q].tolist() == ids[0, [n - 2, n - 1]].tolist()


def test_yes_no_weights_balance_answers_within_plain_and_negated_questions():
    from tools.reference.train import _yes_no_weights

    questions = ["is there a red shape?"] * 7 + [
        "is there a blue shape?",
        "is there not a circle?",
        "is there not a circle?",
        "what color is the shape?",
    ]
    answers = ["no"] * 7 + ["yes", "yes", "no", "red"]
    w = _yes_no_weights(questions, answers)
    assert w.mean().item() == pytest.approx(1.0)
    assert w[:7].sum().item() == pytest.approx(w[7].item())  # plain: 7 "no" weigh as much as 1 "yes"
    assert w[8].item() == pytest.approx(w[9].item())  # negated: already balanced
    assert w[10].item() == pytest.approx(w[8].item())  # other questions and balanced groups weigh 1 (before scaling)
    assert (w[7] / w[10]).item() == pytest.approx(4.0)  # 8 plain questions / (2 * 1 "yes")


def test_training_runs_from_the_checkout_and_the_old_module_forwards_with_a_warning(tmp_path):
    """``python tools/reference/train.py`` works from any folder; ``python -m tokenreduce.reference.train``
    (the command the shipped model cards record) forwards there with a deprecation warning."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    as_file = subprocess.run(
        [sys.executable, str(root / "tools" / "reference" / "train.py"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert as_file.returncode == 0, as_file.stderr
    assert "--vision-pretrain-steps" in as_file.stdout and "python -m tools.reference.train" in as_file.stdout
    old = subprocess.run(  # at the root of a checkout, as the model cards say (editable install or not)
        [sys.executable, "-m", "tokenreduce.reference.train", "--help"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert old.returncode == 0, old.stderr
    assert "--vision-pretrain-steps" in old.stdout and "DeprecationWarning" in old.stderr
    # outside a checkout, with the package installed elsewhere: a clear error, not a traceback
    from tokenreduce.reference import train as shim

    if not (Path(shim.__file__).resolve().parents[2] / "tools").is_dir():
        gone = subprocess.run(
            [sys.executable, "-m", "tokenreduce.reference.train", "--help"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert gone.returncode == 2 and "python -m tools.reference.train" in gone.stderr


def test_the_old_build_module_keeps_the_processor_and_points_to_tools():
    import importlib
    import sys

    from tokenreduce.adapters.qwen2_5_vl.processor import ImageOnlyQwen2_5_VLProcessor

    sys.modules.pop("tokenreduce.reference.build", None)
    with pytest.deprecated_call():
        old = importlib.import_module("tokenreduce.reference.build")
    assert old.ImageOnlyQwen2_5_VLProcessor is ImageOnlyQwen2_5_VLProcessor
    with pytest.raises(AttributeError, match="tools/reference/build.py"):
        old.ArchSettings  # noqa: B018
