"""Stage 0 of the scenes recipe (``tools/reference/symbolic.py``): the patch sample, the layout of a
symbolic prompt (the positions of the real prompt), and the stage in a tiny training run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tokenreduce.reference import scenes
from tools.reference.build import ArchSettings, build_model, make_processor, num_visual_tokens
from tools.reference.symbolic import LABEL_CLASSES, SceneSymbols, sample_patches, symbolic_batch, symbolic_logits
from tools.reference.train import (
    SCENES_TRAIN,
    TINY_SCENES_ARCH,
    TINY_TRAIN,
    TrainSettings,
    _Encoded,
    _token_tags,
    train,
)

SIDE = 24


@pytest.fixture(scope="module")
def split():
    return scenes.load_split("train")


def _labels(split, images=range(6), side=SIDE):
    class Encoded:  # the one attribute _token_tags reads
        by_image = {img: [img] for img in images}

    return _token_tags(split, Encoded, side)


def test_sample_keeps_one_to_three_patches_of_every_object_and_every_cells_background(split):
    for img, labels in _labels(split).items():
        kept = sample_patches(labels, torch.Generator().manual_seed(img))
        assert kept.tolist() == sorted(set(kept.tolist()))
        groups = {tuple(row) for row in labels.tolist()}  # (shape, colour, size, row, col)
        for group in groups:
            members = [i for i, row in enumerate(labels.tolist()) if tuple(row) == group]
            n = sum(i in set(kept.tolist()) for i in members)
            assert 1 <= n <= min(3, len(members)), (img, group, n, len(members))
        assert len(kept) <= 3 * len(groups)
        # every object of the scene that covers a patch is kept
        objects = {tuple(row[:3]) for row in labels.tolist() if row[0]}
        assert objects == {tuple(labels[i, :3].tolist()) for i in kept.tolist() if labels[i, 0]}


def test_per_cell_sample_keeps_each_object_in_its_own_cell_and_else_the_background(split):
    for img, labels in _labels(split, range(40)).items():
        kept = sample_patches(labels, torch.Generator().manual_seed(img), per_cell=True)
        rows = labels[kept].tolist()
        assert len(rows) == 9 and sorted((r[3], r[4]) for r in rows) == [(r, c) for r in range(3) for c in range(3)]
        objects = sorted((r[3], r[4], r[0], r[1], r[2]) for r in rows if r[0])
        assert objects == sorted(
            (
                o.row,
                o.col,
                1 + scenes.SCENE_SHAPES.index(o.shape),
                1 + list(scenes.SCENE_COLORS).index(o.color),
                1 + scenes.SIZES.index(o.size),
            )
            for o in split.scenes[img].objects
        )


def test_sample_is_a_function_of_the_generator(split):
    labels = _labels(split, [0])[0]
    a = sample_patches(labels, torch.Generator().manual_seed(5))
    assert torch.equal(a, sample_patches(labels, torch.Generator().manual_seed(5)))
    assert any(not torch.equal(a, sample_patches(labels, torch.Generator().manual_seed(s))) for s in range(6, 10))
    with pytest.raises(ValueError, match="low <= high"):
        sample_patches(labels, torch.Generator(), low=3, high=2)


def test_symbols_sum_one_embedding_per_label():
    symbols = SceneSymbols(8, seed=0)
    labels = torch.tensor([[1, 2, 1, 0, 2], [0, 0, 0, 1, 1]])
    expected = sum(t.weight[labels[:, k]] for k, t in enumerate(symbols.tables))
    torch.testing.assert_close(symbols(labels), expected)
    assert [t.num_embeddings for t in symbols.tables] == list(LABEL_CLASSES)
    with pytest.raises(ValueError, match="5 columns"):
        symbols(torch.zeros(2, 4, dtype=torch.long))


def test_symbol_tables_start_with_every_value_of_a_label_apart():
    """At the language model's std 0.02 the two size rows started 0.2 apart and never separated:
    every table now starts orthonormal, and row_distances reports the closest pair per table."""
    symbols = SceneSymbols(64, seed=3)
    for table, closest in zip(symbols.tables, symbols.row_distances()):
        w = table.weight.detach()
        torch.testing.assert_close(w @ w.T, torch.eye(len(w)), atol=1e-5, rtol=0)
        assert abs(closest - 2**0.5) < 1e-4
    with torch.no_grad():
        symbols.tables[2].weight[2] = symbols.tables[2].weight[1]  # a stuck label shows as 0
    assert symbols.row_distances()[2] == 0.0


def test_a_symbolic_prompt_with_every_patch_is_the_full_prompt_with_symbols_for_image_features(split):
    """Keeping all patches must reproduce the decoder's forward on the real prompt, with the
    projected visual tokens replaced by the symbols: same tokens, same position ids."""
    arch = ArchSettings(**{**TINY_SCENES_ARCH, "image_size": 48, "patch": 8})  # 6x6 = 36 visual tokens
    model = build_model(arch, seed=0).eval()
    processor = make_processor(arch, scenes.make_tokenizer())
    n_visual = num_visual_tokens(arch)
    rows = [0, 1, 7]  # questions of images 0 and 1
    encoded = _Encoded(split, rows, processor.tokenizer, "llava", n_visual)
    tags = _labels(split, {encoded.image_ids[r] for r in range(len(rows))}, side=6)
    symbols = SceneSymbols(arch.text_hidden, seed=1)
    embed = model.get_input_embeddings()
    image = encoded.prefix == int(encoded.prefix[-1])
    head = encoded.prefix[: int(image.nonzero()[0])]
    with torch.no_grad():
        scenes_in = [(tags[encoded.image_ids[r]], torch.arange(n_visual)) for r in range(len(rows))]
        suffixes = [encoded.suffix[r, : int(encoded.lengths[r])] for r in range(len(rows))]
        inputs, mask, positions = symbolic_batch(symbols, embed, head, n_visual, scenes_in, suffixes)
        got = symbolic_logits(model, inputs, mask, positions)
        for r in range(len(rows)):
            ids = encoded.full_ids(r)
            x = embed(ids)
            x[: len(encoded.prefix)][image] = symbols(tags[encoded.image_ids[r]])
            hidden = model.model.language_model(inputs_embeds=x[None]).last_hidden_state
            want = model.lm_head(hidden[0, -3:-1])
            torch.testing.assert_close(got[r], want, atol=1e-5, rtol=1e-4)
    # left padding: the shorter sequences start with masked zeros
    assert bool((mask.sum(1) == torch.tensor([len(head) + n_visual + len(s) for s in suffixes])).all())


def test_symbolic_prompt_positions_are_those_of_the_kept_patches():
    symbols = SceneSymbols(4, seed=0)
    embed = torch.nn.Embedding(10, 4)
    labels = torch.zeros(16, 5, dtype=torch.long)
    inputs, mask, positions = symbolic_batch(
        symbols,
        embed,
        torch.tensor([1, 2, 3]),
        16,
        [(labels, torch.tensor([2, 9])), (labels, torch.tensor([5]))],
        [torch.tensor([4, 5]), torch.tensor([4, 5])],
    )
    assert positions[0].tolist() == [0, 1, 2, 3 + 2, 3 + 9, 19, 20]
    assert positions[1].tolist() == [0, 0, 1, 2, 3 + 5, 19, 20] and mask[1].tolist() == [0, 1, 1, 1, 1, 1, 1]
    assert inputs.shape == (2, 7, 4)


def _tiny(**kw):
    return ArchSettings(**TINY_SCENES_ARCH), TrainSettings(
        **{**SCENES_TRAIN, **TINY_TRAIN, "name": "scenes-tiny", **kw}
    )


def test_stage_0_loss_goes_down_and_is_recorded(tmp_path):
    arch, settings = _tiny(
        steps=1,
        language_pretrain_steps=40,
        language_pretrain_lr=3e-3,
        language_pretrain_cells=0.5,
        vision_pretrain_steps=2,
        eval_every=20,
        ckpt_every=1,
        max_val_questions=24,
        test_questions=0,
    )
    metrics = train(arch, settings, tmp_path, show_progress=False)
    stage0 = metrics["language_pretrain"]
    assert stage0["steps"] == 40 and set(stage0["val_accuracy_by_step"]) == {20, 40}
    # per question type at the last evaluation (patch samples, as the overall number there)
    by_type = stage0["val_accuracy_by_type"]
    assert by_type and set(by_type) <= set(scenes.QUESTION_TYPES)
    assert min(by_type.values()) - 1e-4 <= stage0["val_accuracy"] <= max(by_type.values()) + 1e-4
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    losses = [r["loss"] for r in saved["language_log"]]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    assert "symbol_mse" in saved["vision_log"][0]
    assert json.loads((tmp_path / "model" / "metrics.json").read_text())["language_pretrain"]["steps"] == 40
    assert "stage 0, language pre-training on symbolic scenes" in (tmp_path / "model" / "README.md").read_text()


def test_stage_0_on_fresh_scenes_trains_on_them_and_not_on_the_training_split(tmp_path, monkeypatch):
    import tools.reference.train as train_module

    seen: list[str] = []
    real = train_module.pretrain_language

    def spy(model, symbols, encoded, token_tags, val, s, bar=None, **kw):
        seen.append(encoded.split.name)
        assert len(encoded.by_image) == 30 and len(token_tags) == 30
        assert next(iter(token_tags.values())).dtype == torch.uint8
        assert val[0].split.name == "train"  # held-out training images, as without fresh scenes
        return real(model, symbols, encoded, token_tags, val, s, bar, **kw)

    monkeypatch.setattr(train_module, "pretrain_language", spy)
    arch, settings = _tiny(
        steps=1,
        language_pretrain_steps=3,
        language_pretrain_scenes=30,
        vision_pretrain_steps=1,
        eval_every=3,
        max_val_questions=12,
        test_questions=0,
    )
    metrics = train(arch, settings, tmp_path, show_progress=False)
    assert seen == ["symbolic"] and metrics["language_pretrain"]["steps"] == 3


def test_a_run_stopped_in_stage_0_or_right_after_it_resumes_exactly(tmp_path, monkeypatch):
    import tools.reference.train as train_module

    arch, settings = _tiny(
        steps=2,
        language_pretrain_steps=6,
        language_pretrain_cells=0.5,
        vision_pretrain_steps=2,
        eval_every=3,
        max_val_questions=12,
        test_questions=0,
    )
    whole = train(arch, settings, tmp_path / "whole", show_progress=False)

    class Stop(Exception):
        pass

    real = train_module._save_checkpoint

    def stop_after_a_stage_0_checkpoint(path, state):
        real(path, state)
        if "stage0" in state:
            raise Stop

    monkeypatch.setattr(train_module, "_save_checkpoint", stop_after_a_stage_0_checkpoint)
    cut = tmp_path / "cut"
    with pytest.raises(Stop):
        train(arch, settings, cut, show_progress=False)
    assert torch.load(cut / "checkpoint.pt", weights_only=False)["stage0"]["step"] == 3  # mid stage 0
    with pytest.raises(Stop):
        train(arch, settings, cut, resume=True, show_progress=False)
    assert torch.load(cut / "checkpoint.pt", weights_only=False)["stage0"]["step"] == 6  # its end
    monkeypatch.setattr(train_module, "_save_checkpoint", real)
    resumed = train(arch, settings, cut, resume=True, show_progress=False)
    assert resumed["language_pretrain"] == whole["language_pretrain"]
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(cut / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stage_0_is_refused_where_it_cannot_work():
    with pytest.raises(ValueError, match="language_pretrain_scenes: set language_pretrain_steps too"):
        _tiny(language_pretrain_steps=0, language_pretrain_scenes=10)
    with pytest.raises(ValueError, match="language_pretrain_steps: symbolic scenes exist for --task scenes only"):
        TrainSettings(language_pretrain_steps=5, vision_pretrain_tokens=False)
    with pytest.raises(ValueError, match="stage 1 must align"):
        _tiny(language_pretrain_steps=5, vision_pretrain_steps=0)
    with pytest.raises(ValueError, match="stage 1 must align"):
        _tiny(language_pretrain_steps=5, vision_pretrain_steps=3, vision_pretrain_tokens=False)


def test_rope_theta_reaches_the_llava_decoder_and_is_refused_for_qwen():
    model = build_model(ArchSettings(**TINY_SCENES_ARCH, rope_theta=1e6), seed=0)
    assert model.config.text_config.rope_parameters["rope_theta"] == 1e6
    assert build_model(ArchSettings(**TINY_SCENES_ARCH), seed=0).config.text_config.rope_parameters["rope_theta"] == 1e4
    with pytest.raises(ValueError, match="rope_theta .* applies to the LLaVA decoder only"):
        ArchSettings(arch="qwen2_5_vl", rope_theta=1e6)
