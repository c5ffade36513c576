"""Train a reference VLM from scratch on easy-VQA or the generated scenes (seeded, reproducible,
resumable).

Usage, from the repository root::

    python -m tools.reference.train --arch llava --out runs/easyvqa-llava
    python -m tools.reference.train --task scenes --out runs/scenes-llava   # 576 visual tokens, 8 layers
    python -m tools.reference.train --tiny --steps 20 --out /tmp/t        # smoke test

What a run does, the flags, and the recipe and measurements behind the shipped models:
``tools/reference/TRAINING.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

if __package__ in (None, ""):  # run as a file (python tools/reference/train.py): the checkout on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tokenreduce.reference import data, scenes  # noqa: E402
from tokenreduce.reference.evaluate import evaluate_generate  # noqa: E402
from tools.reference.build import ARCHS, ArchSettings, build_model, make_processor, num_visual_tokens  # noqa: E402
from tools.reference.card import model_card  # noqa: E402
from tools.reference.symbolic import LABEL_CLASSES, SceneSymbols, sample_patches, symbolic_batch, symbolic_logits  # noqa: E402

__all__ = [
    "TASKS",
    "TrainSettings",
    "TINY_ARCH",
    "TINY_TRAIN",
    "SCENES_ARCH",
    "SCENES_TRAIN",
    "task_data",
    "train",
    "main",
]

CHECKPOINT = "checkpoint.pt"
#: how the script is run (recorded on the model card)
PROG = "python -m tools.reference.train"


#: The data sets a reference model can be trained on (``--task``).
TASKS = ("easy_vqa", "scenes")
#: stage 0's extra scenes (``--language-pretrain-scenes``) are drawn from seeds from here on
SYMBOLIC_SEED_BASE = 3_000_000


def task_data(task: str) -> types.ModuleType:
    """The data module of ``task``: :mod:`tokenreduce.reference.data` (easy-VQA) or
    :mod:`tokenreduce.reference.scenes`; both provide ``load_split``, ``make_tokenizer``,
    ``train_val_split`` and ``fixed_test_subset``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return data if task == "easy_vqa" else scenes


class TrainSettings(BaseModel):
    """Optimisation and bookkeeping settings of a training run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: typing.Literal["easy_vqa", "scenes"] = Field(
        "easy_vqa",
        description="training data: easy-VQA (one shape per image) or the generated cluttered scenes "
        "(tokenreduce.reference.scenes); --task scenes also switches the defaults to SCENES_ARCH and SCENES_TRAIN",
    )
    steps: int = Field(1500, gt=0, description="stage-2 optimizer steps in total")
    images_per_batch: int = Field(32, gt=0, description="images per optimizer step")
    questions_per_image: int = Field(4, gt=0, description="at most this many questions of each image per step")
    lr: float = Field(5e-4, gt=0, description="stage-2 peak learning rate")
    min_lr_ratio: float = Field(0.05, ge=0, le=1, description="final learning rate / peak")
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (matrices only)")
    grad_clip: float = Field(1.0, gt=0, description="max global gradient norm")
    vision_pretrain_steps: int = Field(
        600, ge=0, description="stage 1: steps of shape/colour classification on the projected image features"
    )
    vision_pretrain_lr: float = Field(2e-3, gt=0, description="stage 1 peak learning rate")
    vision_pretrain_target: typing.Literal["heads", "embeddings"] = Field(
        "embeddings",
        description="stage 1 classifier: linear heads (thrown away), or the language model's input embeddings of "
        "the shape/colour words (CLIP-style cosine logits; aligns the visual tokens with those words)",
    )
    vision_pretrain_tokens: bool = Field(
        False,
        description="stage 1, --task scenes only: also classify every visual token by itself (shape, colour and size "
        "of the object covering its patch, or none; the row and column of its grid cell), so that each token "
        "describes its own patch to the language model",
    )
    language_pretrain_steps: int = Field(
        0,
        ge=0,
        description="stage 0, --task scenes only: steps of question answering on symbolic scenes (a few labelled "
        "patches per cell in place of the image, tools/reference/symbolic.py), teaching the decoder to reason "
        "before it sees pixels; stage 1 then also aligns every visual token with its patch's symbol",
    )
    language_pretrain_lr: float = Field(1e-3, gt=0, description="stage 0 peak learning rate")
    language_pretrain_cells: float = Field(
        0.5,
        ge=0,
        le=1,
        description="stage 0: fraction of its steps (the first ones) with one symbol per grid cell, before 1-3 "
        "symbols of every object and every cell's background (a curriculum: sparser scenes are learned faster)",
    )
    language_pretrain_scenes: int = Field(
        0,
        ge=0,
        description="stage 0: answer the questions of this many freshly generated scenes (seeds from "
        f"{SYMBOLIC_SEED_BASE:,}, never the test split's) instead of the training split's, so that the decoder cannot "
        "memorise a few thousand scenes over its many epochs (symbolic scenes are never drawn: they cost "
        "no pixels); 0 = the training split",
    )
    balance_yes_no: bool = Field(
        True,
        description="weight yes/no questions so that yes and no weigh the same within plain and within negated questions",
    )
    seed: int = 0
    hflip: bool = Field(True, description="flip each training image horizontally with p=0.5")
    val_images: int = Field(300, ge=1, description="training images held out for model selection")
    max_train_questions: int | None = Field(None, gt=0, description="use only the first N training questions")
    max_val_questions: int | None = Field(None, gt=0, description="use only the first N held-out questions")
    eval_every: int = Field(250, gt=0)
    ckpt_every: int = Field(100, gt=0)
    eval_batch_size: int = Field(128, gt=0, description="questions per batch in evaluations")
    threads: int = Field(1, gt=0, description="torch intra-op threads (1 is fastest on a shared 2-core VM)")
    test_questions: int | None = Field(
        None, ge=0, description="final test evaluation on the first N test questions (default all; 0 = skip)"
    )
    name: str = Field("easyvqa-llava", description="model name written on the card")
    init_from: str | None = Field(
        None,
        description="start from the weights of an exported model folder (OUT/model of an earlier run) instead of "
        "a fresh initialisation; its commands and times are carried onto the new card",
    )
    stop_at_step: int | None = Field(
        None, gt=0, description="stop this invocation at this step (checkpoint written, no export); resume later"
    )

    @model_validator(mode="after")
    def _check_task(self) -> TrainSettings:
        if self.task == "scenes" and self.hflip:
            raise ValueError(
                "hflip: flipping a scene changes its left/right answers; use --no-hflip with --task scenes"
            )
        if self.task == "scenes" and self.vision_pretrain_steps and self.vision_pretrain_target != "heads":
            raise ValueError(
                "vision_pretrain_target: --task scenes pre-trains per grid cell with linear heads; "
                "use --vision-pretrain-target heads (or --vision-pretrain-steps 0)"
            )
        if self.vision_pretrain_tokens and self.task != "scenes":
            raise ValueError("vision_pretrain_tokens: per-token labels exist for --task scenes only")
        if self.language_pretrain_steps and self.task != "scenes":
            raise ValueError("language_pretrain_steps: symbolic scenes exist for --task scenes only")
        if self.language_pretrain_scenes and not self.language_pretrain_steps:
            raise ValueError("language_pretrain_scenes: set language_pretrain_steps too (the scenes are stage 0's)")
        if self.language_pretrain_steps and not (self.vision_pretrain_steps and self.vision_pretrain_tokens):
            raise ValueError(
                "language_pretrain_steps: stage 1 must align the visual tokens with the symbols "
                "(--vision-pretrain-steps > 0 and --vision-pretrain-tokens)"
            )
        return self


#: Settings that may change between a run and its resumption.
_RESUMABLE_CHANGES = {
    "eval_every",
    "ckpt_every",
    "eval_batch_size",
    "threads",
    "test_questions",
    "name",
    "stop_at_step",
}
# (init_from is not among them: a resumed run must start from the same weights)

#: ``--tiny``: a model and data subset small enough for unit tests (a step takes milliseconds).
TINY_ARCH: dict[str, Any] = dict(
    image_size=32,
    patch=8,
    vision_hidden=32,
    vision_layers=2,
    vision_heads=2,
    text_hidden=32,
    text_layers=2,
    text_heads=2,
    text_kv_heads=2,
    text_intermediate=64,
)
TINY_TRAIN: dict[str, Any] = dict(
    steps=20,
    lr=2e-3,
    vision_pretrain_steps=0,
    images_per_batch=4,
    questions_per_image=4,
    warmup_steps=2,
    max_train_questions=256,
    max_val_questions=64,
    eval_every=10,
    ckpt_every=10,
    test_questions=0,
    name="easyvqa-tiny",
)


#: ``--task scenes``: the model sizes of the scenes reference model (LLaVA-1.5 architecture at 576
#: visual tokens: 96 px images, 4 px patches, 24x24 patches; 8 decoder layers of width 64, the
#: width that fits a 2-hour run on 2 CPU cores: TRAINING.md). Flags override them.
SCENES_ARCH: dict[str, Any] = dict(
    image_size=scenes.IMAGE_SIZE,
    patch=4,
    vision_hidden=64,
    vision_layers=3,
    vision_heads=4,
    text_hidden=64,
    text_layers=8,
    text_heads=2,
    text_kv_heads=2,
    text_intermediate=128,
)
#: ``--task scenes``: the training defaults (no flips: they would change left/right answers; all 6
#: questions of an image on one shared prefix; cell-wise stage 1 with linear heads).
SCENES_TRAIN: dict[str, Any] = dict(
    task="scenes",
    hflip=False,
    questions_per_image=scenes.QUESTIONS_PER_IMAGE,
    images_per_batch=16,
    steps=2500,
    lr=1e-3,
    vision_pretrain_target="heads",
    vision_pretrain_steps=900,  # shapes stay at chance for about 600 steps, then rise (TRAINING.md)
    vision_pretrain_tokens=True,
    balance_yes_no=False,
    val_images=300,
    eval_every=250,
    name="scenes-llava",
)
#: ``--task scenes --tiny``: the tiny model on 32 px renderings would lose the objects; 48 px, 8 px
#: patches (36 visual tokens).
TINY_SCENES_ARCH: dict[str, Any] = dict(TINY_ARCH, image_size=48, patch=8)


# ---------------------------------------------------------------------------------------------
# data


_Split = data.EasyVQASplit | scenes.ScenesSplit


class _ImageCache:
    """Processor outputs of a set of images, plain and flipped, kept in memory.

    ``pixel_values(image_ids, flip)`` returns the model inputs of a batch: LLaVA
    ``pixel_values [B, 3, H, W]``; Qwen2.5-VL ``pixel_values [B * patches, D]`` and
    ``image_grid_thw [B, 3]``.
    """

    def __init__(self, split: _Split, image_ids: Sequence[int], processor, arch: str, flips: bool):
        self.arch = arch
        self.row = {img: r for r, img in enumerate(sorted(set(image_ids)))}
        images = [split.image(img) for img in sorted(self.row)]
        variants = [images]
        if flips:
            from PIL import ImageOps

            variants.append([ImageOps.mirror(im) for im in images])
        self.values = []  # per variant: [N, 3, H, W] (LLaVA) or [N, patches, D] (Qwen)
        self.grid = None
        for ims in variants:
            if arch == "llava":
                self.values.append(data.stack_pixel_values(processor.image_processor, ims))
            else:
                out = processor.image_processor(images=ims, return_tensors="pt")
                grid = out["image_grid_thw"]  # [N, 3]
                if not bool((grid == grid[0]).all()):
                    raise ValueError("all easy-VQA images must give the same Qwen patch grid")
                self.grid = grid[0]
                self.values.append(out["pixel_values"].view(len(ims), -1, out["pixel_values"].shape[-1]))

    def batch(self, image_ids: Sequence[int], flip: torch.Tensor | None) -> dict[str, torch.Tensor]:
        rows = torch.tensor([self.row[i] for i in image_ids])
        pv = self.values[0][rows]
        if flip is not None and len(self.values) > 1:
            pv = torch.where(flip.view(-1, *([1] * (pv.dim() - 1))), self.values[1][rows], pv)
        if self.arch == "llava":
            return {"pixel_values": pv}
        return {"pixel_values": pv.reshape(-1, pv.shape[-1]), "image_grid_thw": self.grid.repeat(len(image_ids), 1)}


class _Encoded:
    """Token ids of ``prompt + " {answer}</s>"`` for a list of questions, split into a shared prefix
    and per-question suffixes.

    Every prompt starts with the same tokens up to and including the image (LLaVA:
    ``<s> user : <image>*N``; Qwen2.5-VL: ``<s> user : <|vision_start|> <|image_pad|>*N
    <|vision_end|>``), so the decoder states of that prefix depend on the image only. Training
    runs the prefix once per image and the questions of that image on top of its KV cache, which
    is exactly the full-sequence forward (causal attention), several times cheaper.

    Attributes:
        prefix: ``[P]`` int64, the shared prefix.
        suffix: ``[N, L]`` int64, question + ``assistant :`` + answer + ``</s>``, right-padded.
        lengths: ``[N]`` suffix lengths (answer at ``length - 2``, ``</s>`` at ``length - 1``).
        image_ids: ``N`` image ids.
        by_image: image id -> its rows, ascending.
    """

    def __init__(self, split: _Split, index: Sequence[int], tokenizer, arch: str, n_visual: int):
        image_token = data.IMAGE_TOKEN_ID if arch == "llava" else data.IMAGE_PAD_TOKEN_ID
        prompts = [data.prompt(split.questions[i], arch) for i in index]
        prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        answer_ids = [tokenizer.convert_tokens_to_ids(split.answers[i].lower()) for i in index]
        prefix: list[int] | None = None
        suffixes = []
        for ids, ans in zip(prompt_ids, answer_ids):
            if ids.count(image_token) != 1:
                raise ValueError(f"prompt must hold one image placeholder, got {ids.count(image_token)}")
            at = ids.index(image_token) + (1 if arch == "llava" else 2)  # Qwen: through <|vision_end|>
            head = ids[:at]
            if prefix is None:
                prefix = head
            elif head != prefix:
                raise ValueError(f"prompts do not share their prefix up to the image: {head} != {prefix}")
            suffixes.append(ids[at:] + [ans, data.EOS_TOKEN_ID])
        if prefix is None:
            raise ValueError("no questions to encode")
        i = prefix.index(image_token)
        self.prefix = torch.tensor(prefix[:i] + [image_token] * n_visual + prefix[i + 1 :])
        self.lengths = torch.tensor([len(r) for r in suffixes])
        self.suffix = torch.full((len(suffixes), int(self.lengths.max())), data.PAD_TOKEN_ID, dtype=torch.long)
        for k, r in enumerate(suffixes):
            self.suffix[k, : len(r)] = torch.tensor(r)
        self.answer_ids = torch.tensor(answer_ids)
        if bool((self.answer_ids == tokenizer.unk_token_id).any()):
            raise ValueError("an answer is not a single token of the tokenizer")
        self.image_ids = [split.image_ids[i] for i in index]
        self.split, self.index = split, list(index)  # row -> its question in ``split``
        self.weights = _yes_no_weights([split.questions[i] for i in index], [split.answers[i] for i in index])
        self.by_image: dict[int, list[int]] = {}
        for row, img in enumerate(self.image_ids):
            self.by_image.setdefault(img, []).append(row)
        self.epoch_memo: dict[str, Any] = {}  # _step_units' current epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def full_ids(self, row: int) -> torch.Tensor:
        """``[P + length]``: the whole training sequence of question ``row``."""
        return torch.cat([self.prefix, self.suffix[row, : int(self.lengths[row])]])

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(suffix_ids [B, S], suffix_mask [B, S], lengths [B])`` trimmed to the batch's longest."""
        lengths = self.lengths[rows]
        ids = self.suffix[rows, : int(lengths.max())]
        mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
        return ids, mask, lengths


def _yes_no_weights(questions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    """``[N]`` loss weights that balance yes/no answers.

    Most plain yes/no questions are answered "no" (a named colour is present 1 time in 8) and most
    negated ones ("is there not a ...", "is no ... present") "yes", so the answer can be guessed
    from the question alone (measured: 87% of yes/no questions, with the image ignored). Within
    the plain and within the negated yes/no questions, each answer gets half of the group's
    weight; other questions weigh 1; the weights are then scaled to mean 1.
    """
    groups: list[str | None] = []
    for q, a in zip(questions, answers):
        if a not in ("yes", "no"):
            groups.append(None)
            continue
        words = data.split_words([q])[0]
        negated = "not" in words or words[:2] == ["is", "no"]
        groups.append(f"{'negated' if negated else 'plain'}:{a}")
    counts: dict[str, int] = {}
    for g in groups:
        if g is not None:
            counts[g] = counts.get(g, 0) + 1
    totals = {pol: sum(n for g, n in counts.items() if g.startswith(pol)) for pol in ("plain", "negated")}
    w = torch.tensor([1.0 if g is None else totals[g.split(":")[0]] / (2 * counts[g]) for g in groups])
    return w / w.mean()


class _Unit(typing.NamedTuple):
    """Questions (rows of an :class:`_Encoded`) about one image, run on one shared prefix.

    The first ``real`` rows count; training pads a short unit with repeats of its own rows (weight
    0) so that every unit has the same size and the prefix cache expands with a cheap repeat.
    """

    image_id: int
    rows: tuple[int, ...]
    real: int


def _answer_logits(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Logits that predict the answer and ``</s>``: positions ``length - 3`` and ``length - 2``.

    Args:
        logits: ``[B, S, V]`` (suffix logits). lengths: ``[B]`` suffix lengths.

    Returns:
        ``[B, 2, V]``.
    """
    pos = torch.stack([lengths - 3, lengths - 2], dim=1)  # [B, 2]
    return logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))


def _targets(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``[B, 2]``: the answer id and ``</s>`` of each row."""
    pos = torch.stack([lengths - 2, lengths - 1], dim=1)
    return ids.gather(1, pos)


def forward_units(
    model, arch: str, encoded: _Encoded, images: _ImageCache, units: Sequence[_Unit], flip: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced forward of the questions of ``units``: the shared prefix once per image,
    then every question on top of its image's KV cache.

    Args:
        units: U units (one image each); Q questions in all.
        flip: ``[U]`` bool, use the mirrored image (training augmentation), or None.

    Returns:
        ``(logits [Q, 2, V], targets [Q, 2], weight [Q])`` at the answer and ``</s>`` positions;
        ``weight`` is 1 for the real questions of each unit, 0 for padding repeats.
    """
    n_img = len(units)
    pix = images.batch([u.image_id for u in units], flip)
    prefix = encoded.prefix.expand(n_img, -1)  # [U, P]
    if arch == "qwen2_5_vl":  # M-RoPE positions need to know which tokens are image tokens (1) or text (0)
        pix["mm_token_type_ids"] = (prefix == data.IMAGE_PAD_TOKEN_ID).long()
    out = model(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True, logits_to_keep=1, **pix)
    cache = out.past_key_values
    sizes = {len(u.rows) for u in units}
    if len(sizes) == 1:  # [U, ...] -> [U * k, ...]; backward is a cheap sum
        cache.batch_repeat_interleave(sizes.pop())
    else:  # [U, ...] -> [Q, ...]; index_select (slow backward, used without gradients)
        cache.reorder_cache(torch.tensor([k for k, u in enumerate(units) for _ in u.rows]))
    rows = torch.tensor([r for u in units for r in u.rows])
    weight = torch.tensor([float(j < u.real) for u in units for j in range(len(u.rows))])  # [Q]
    ids, mask, lengths = encoded.batch(rows)  # [Q, S]
    full_mask = torch.cat([torch.ones(len(rows), prefix.shape[1], dtype=mask.dtype), mask], dim=1)
    kwargs: dict[str, torch.Tensor] = {}
    if arch == "qwen2_5_vl":
        # text after the image continues from the largest M-RoPE position of the prefix
        start = int(model.model.rope_deltas[0]) + prefix.shape[1]
        pos = start + torch.arange(ids.shape[1])
        kwargs["position_ids"] = pos.view(1, 1, -1).expand(3, len(rows), -1)
    logits = model(input_ids=ids, attention_mask=full_mask, past_key_values=cache, use_cache=True, **kwargs).logits
    return _answer_logits(logits, lengths), _targets(ids, lengths), weight


# ---------------------------------------------------------------------------------------------
# schedule, optimizer


def learning_rate(step: int, s: TrainSettings) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up to ``lr`` over
    ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` at ``steps``."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return s.lr * (s.min_lr_ratio + (1.0 - s.min_lr_ratio) * cosine)


def _optimizer(model: torch.nn.Module, s: TrainSettings) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.98), eps=1e-8)


@functools.lru_cache(maxsize=2)
def _epoch_units(by_image_items: tuple[tuple[int, tuple[int, ...]], ...], k: int, seed: int, epoch: int) -> list[_Unit]:
    """The units of one epoch: each image's questions in a random order, cut into chunks of at
    most ``k``, all chunks shuffled; a pure function of ``(seed, epoch)``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    units = []
    for img, rows in by_image_items:
        order = torch.randperm(len(rows), generator=g).tolist()
        shuffled = [rows[i] for i in order]
        for j in range(0, len(shuffled), k):
            chunk = shuffled[j : j + k]
            padded = [chunk[i % len(chunk)] for i in range(k)]
            units.append(_Unit(img, tuple(padded), len(chunk)))
    perm = torch.randperm(len(units), generator=g).tolist()
    return [units[i] for i in perm]


def _step_units(step: int, encoded: _Encoded, s: TrainSettings) -> list[_Unit]:
    """Units of optimizer step ``step`` (0-based): slice ``step % steps_per_epoch`` of the epoch's
    units (the last partial slice of an epoch is skipped). The epoch's units are kept on
    ``encoded`` between calls: recomputing them costs time linear in the images, every step."""
    memo = encoded.epoch_memo
    key = (s.questions_per_image, s.images_per_batch, s.seed)
    if memo.get("key") != key:
        items = tuple((img, tuple(rows)) for img, rows in sorted(encoded.by_image.items()))
        n_units = sum(-(-len(rows) // s.questions_per_image) for _, rows in items)
        memo.clear()
        memo.update(key=key, items=items, per_epoch=max(1, n_units // s.images_per_batch))
    epoch, b = divmod(step, memo["per_epoch"])
    if memo.get("epoch") != epoch:
        memo.update(epoch=epoch, units=_epoch_units(memo["items"], s.questions_per_image, s.seed, epoch))
    return memo["units"][b * s.images_per_batch : (b + 1) * s.images_per_batch]


# ---------------------------------------------------------------------------------------------
# evaluation during training


@torch.no_grad()
def teacher_forced_accuracy(
    model, arch: str, encoded: _Encoded, images: _ImageCache, batch_size: int
) -> tuple[float, float]:
    """(accuracy, mean loss) of the answer + ``</s>`` under teacher forcing, over all questions of
    ``encoded``.

    A question counts as correct when the argmax at both target positions is right, which is
    what greedy ``generate()`` answers.
    """
    correct, loss_sum = teacher_forced_correct(model, arch, encoded, images, batch_size)
    return float(correct.float().mean()), loss_sum / len(encoded)


@torch.no_grad()
def teacher_forced_correct(
    model, arch: str, encoded: _Encoded, images: _ImageCache, batch_size: int
) -> tuple[torch.Tensor, float]:
    """``(correct [N] bool, summed loss)``: whether the argmax at the answer and at ``</s>`` are both
    right, for every row of ``encoded`` (in row order), and the summed mean-of-two-tokens loss."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(len(encoded), dtype=torch.bool)
    loss_sum, batch, size = 0.0, [], 0
    units = [_Unit(img, tuple(rows), len(rows)) for img, rows in sorted(encoded.by_image.items())]
    for i, unit in enumerate(units):
        batch.append(unit)
        size += len(unit.rows)
        if size >= batch_size or i == len(units) - 1:
            sel, tgt, _ = forward_units(model, arch, encoded, images, batch, None)
            correct[torch.tensor([r for u in batch for r in u.rows])] = (sel.argmax(-1) == tgt).all(-1)
            loss_sum += float(F.cross_entropy(sel.flatten(0, 1), tgt.flatten(), reduction="sum")) / 2
            batch, size = [], 0
    model.train(was_training)
    return correct, loss_sum


# ---------------------------------------------------------------------------------------------
# stage 1: vision pre-training


@functools.cache
def _word_ids() -> dict[str, int]:
    tok = data.make_tokenizer()
    return {w: tok.convert_tokens_to_ids(w) for w in data.SHAPES + data.COLORS}


def _word_id(word: str) -> int:
    return _word_ids()[word]


def image_features(model, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
    """The projected visual tokens the language model receives: ``[B, N_vis, D_text]``."""
    out = model.model.get_image_features(**pixels)
    return torch.stack(list(out.pooler_output))


_Tag = tuple[str | None, str | None]
_NONE = "none"  # the class of an empty grid cell (scenes)


def _cell_tags(split: scenes.ScenesSplit, encoded: _Encoded) -> dict[int, tuple[_Tag, ...]]:
    """Stage-1 labels of the scenes task: per training image, the (shape, colour) of each cell of its
    3x3 grid in row-major order, ``("none", "none")`` for an empty cell (read off the generated scene)."""
    tags = {}
    for img in sorted(encoded.by_image):
        scene = split.scenes[img]
        cells = []
        for row, col in sorted(scenes.CELL_NAMES):
            k = scene.at(row, col)
            cells.append((_NONE, _NONE) if k is None else (scene.objects[k].shape, scene.objects[k].color))
        tags[img] = tuple(cells)
    return tags


def _token_tags(
    split: scenes.ScenesSplit, encoded: _Encoded, side: int, dtype: torch.dtype = torch.long
) -> dict[int, torch.Tensor]:
    """Per-token stage-1 labels of the scenes task: per training image, ``[side * side, 5]`` ``dtype``
    (int64; uint8 holds them in an eighth of the memory) rows ``(shape, colour, size, cell row, cell column)`` of each patch in row-major order; shape,
    colour and size are those of the topmost object whose bounding box holds the patch centre, 0
    ("none") where no object does (1 + the index in ``SCENE_SHAPES`` / ``SCENE_COLORS`` / ``SIZES``
    otherwise)."""
    colors = tuple(scenes.SCENE_COLORS)
    patch = scenes.IMAGE_SIZE / side
    centre = (torch.arange(side, dtype=torch.float64) + 0.5) * patch  # [side] pixel centres
    cell = torch.div(torch.arange(side) * 3, side, rounding_mode="floor")  # [side] the grid cell of each row/column
    rows, cols = cell.repeat_interleave(side), cell.repeat(side)  # [N]
    tags = {}
    for img in sorted(encoded.by_image):
        what = torch.zeros(side, side, 3, dtype=torch.long)
        for o in split.scenes[img].objects:  # drawing order: later objects on top
            left, top, right, bottom = o.box()
            inside = ((centre >= top) & (centre < bottom))[:, None] & ((centre >= left) & (centre < right))[None, :]
            what[inside] = torch.tensor(
                [1 + scenes.SCENE_SHAPES.index(o.shape), 1 + colors.index(o.color), 1 + scenes.SIZES.index(o.size)]
            )
        tags[img] = torch.cat([what.view(-1, 3), rows[:, None], cols[:, None]], dim=1).to(dtype)
    return tags


def _pool_cells(features: torch.Tensor, n_cells: int) -> torch.Tensor:
    """``[B, N_vis, D]`` -> ``[B, n_cells, D]``: the mean visual token (1 cell), or the tokens
    average-pooled over each cell of a ``sqrt(n_cells)``-square grid laid over the square token
    grid, row-major."""
    if n_cells == 1:
        return features.mean(1, keepdim=True)
    b, n, d = features.shape
    side, cells_side = math.isqrt(n), math.isqrt(n_cells)
    if side * side != n or cells_side * cells_side != n_cells:
        raise ValueError(f"cell pooling needs square grids, got {n} visual tokens and {n_cells} cells")
    grid = features.transpose(1, 2).reshape(b, d, side, side)
    return F.adaptive_avg_pool2d(grid, cells_side).flatten(2).transpose(1, 2)


def pretrain_vision(
    model,
    images: _ImageCache,
    tags: dict[int, _Tag] | dict[int, tuple[_Tag, ...]],
    s: TrainSettings,
    bar=None,
    token_tags: dict[int, torch.Tensor] | None = None,
    symbols: SceneSymbols | None = None,
) -> list[dict[str, float]]:
    """Stage 1: train the vision tower and projector to tell each image's shape and colour.

    ``tags`` holds, per image, its ``(shape, colour)`` (easy-VQA, :func:`tokenreduce.reference.data.image_tags`;
    classified from the mean visual token) or, for the scenes task, one ``(shape, colour)`` per cell
    of its 3x3 grid (:func:`_cell_tags`, ``"none"`` for empty cells; classified from the visual
    tokens average-pooled over each cell, so the tokens learn what is where).

    LLaVA starts from a pre-trained CLIP; the reference models start from scratch, and a
    language-model loss alone is slow to teach a small ViT shapes (measured: the VQA loss learned
    colours within 800 steps while shape questions stayed at chance). So the visual tokens are
    first trained with two linear heads (3 shapes, 8 colours) on their mean, with labels read off
    the training questions (:func:`tokenreduce.reference.data.image_tags`); the heads are then
    thrown away. ``vision_pretrain_steps`` steps of ``images_per_batch * questions_per_image``
    images, AdamW, warm-up then cosine decay, horizontal flips; batches are a pure function of
    ``(seed, step)``.

    ``token_tags`` (scenes, ``vision_pretrain_tokens``: :func:`_token_tags`) adds a third linear
    head on every visual token by itself: the shape, colour and size of the object covering its
    patch (or none) and the row and column of its grid cell, so that each token describes its own
    patch and says where it is; the language model can then find "the red circle" or "the shape
    at the top left" by matching tokens, which it did not learn from cell-pooled features alone
    (TRAINING.md).

    ``symbols`` (with ``token_tags``; the symbols stage 0 trained the language model on) adds the
    mean squared distance of every visual token to its patch's symbol, divided by the symbols' mean
    square, so that the language model receives from the pixels what it learned to reason over.

    Returns:
        per-step ``{"step", "loss", "shape_accuracy", "color_accuracy"}`` (over the cells, empty
        ones included), plus ``"object_shape_accuracy"`` (occupied cells only) for the scenes task.
    """

    def cells(tag) -> list[_Tag]:
        return list(tag) if tag and isinstance(tag[0], tuple) else [tag]

    if symbols is not None and token_tags is None:
        raise ValueError("vision pre-training: aligning with symbols needs the per-token labels (token_tags)")
    if s.task == "scenes":
        shapes, colors = (_NONE, *scenes.SCENE_SHAPES), (_NONE, *scenes.SCENE_COLORS)
    else:
        shapes, colors = data.SHAPES, data.COLORS
    known = sorted(img for img, tag in tags.items() if img in images.row and any(sh or co for sh, co in cells(tag)))
    if not known:
        raise ValueError("vision pre-training: no training image has a shape or colour tag")
    shape_y = torch.tensor([[shapes.index(sh) if sh else -100 for sh, _ in cells(tags[i])] for i in known])  # [N, C]
    color_y = torch.tensor([[colors.index(co) if co else -100 for _, co in cells(tags[i])] for i in known])
    n_cells, n_shapes = shape_y.shape[1], len(shapes)
    width = model.config.text_config.hidden_size
    params = [p for n, p in model.named_parameters() if not n.startswith(("model.language_model", "lm_head"))]
    if s.vision_pretrain_target == "heads":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed + 1)
            head = torch.nn.Linear(width, n_shapes + len(colors))
        extra = list(head.parameters())
        classify = head
    else:  # cosine similarity with the input embeddings of the 11 words, learned temperature (CLIP)
        embeddings = model.get_input_embeddings().weight  # [V, D]
        word_ids = torch.tensor([_word_id(w) for w in data.SHAPES + data.COLORS])
        log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        extra = [embeddings, log_scale]

        def classify(features: torch.Tensor) -> torch.Tensor:
            words = F.normalize(embeddings[word_ids], dim=-1)  # [11, D]
            return log_scale.exp() * F.normalize(features, dim=-1) @ words.T

    token_head = None
    if token_tags is not None:
        token_y = torch.stack([token_tags[i] for i in known])  # [N, T, 5]
        token_classes = LABEL_CLASSES
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed + 2)
            token_head = torch.nn.Linear(width, sum(token_classes))
        extra = extra + list(token_head.parameters())
    stage = s.model_copy(
        update={
            "steps": s.vision_pretrain_steps,
            "lr": s.vision_pretrain_lr,
            "warmup_steps": min(s.warmup_steps, s.vision_pretrain_steps // 10),
        }
    )
    opt = torch.optim.AdamW(
        [{"params": params, "weight_decay": s.weight_decay}, {"params": extra, "weight_decay": 0.0}], lr=stage.lr
    )
    batch = s.images_per_batch * s.questions_per_image
    log: list[dict[str, float]] = []
    model.train()
    for step in range(stage.steps):
        g = torch.Generator().manual_seed(s.seed * 1_000_003 + 104_729 * (step + 1))
        pick = torch.randint(len(known), (batch,), generator=g)
        flip = (torch.rand(batch, generator=g) < 0.5) if s.hflip else None
        pixels = images.batch([known[i] for i in pick.tolist()], flip)
        features = image_features(model, pixels)  # [B, T, D]
        logits = classify(_pool_cells(features, n_cells)).flatten(0, 1)  # [B * C, S + K]
        ys, yc = shape_y[pick].flatten(), color_y[pick].flatten()
        loss = F.cross_entropy(logits[:, :n_shapes], ys, ignore_index=-100) + F.cross_entropy(
            logits[:, n_shapes:], yc, ignore_index=-100
        )
        if token_head is not None:  # every token by itself: 5 classifications, averaged
            parts = token_head(features).split(token_classes, dim=-1)  # 5 x [B, T, classes]
            y = token_y[pick]  # [B, T, 5]
            loss = (
                loss + sum(F.cross_entropy(part.flatten(0, 1), y[..., k].flatten()) for k, part in enumerate(parts)) / 5
            )
            if symbols is not None:
                with torch.no_grad():
                    target = symbols(y)  # [B, T, D]
                align = F.mse_loss(features, target) / target.pow(2).mean()
                loss = loss + align
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, stage)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params + extra, s.grad_clip)
        opt.step()
        with torch.no_grad():
            acc_s = float((logits[:, :n_shapes].argmax(-1) == ys)[ys >= 0].float().mean())
            acc_c = float((logits[:, n_shapes:].argmax(-1) == yc)[yc >= 0].float().mean())
        row = {"step": step + 1, "loss": loss.item(), "shape_accuracy": acc_s, "color_accuracy": acc_c}
        if symbols is not None:
            row["symbol_mse"] = float(align.detach())
        if s.task == "scenes":
            with torch.no_grad():
                occupied = ys > 0
                row["object_shape_accuracy"] = float((logits[:, :n_shapes].argmax(-1) == ys)[occupied].float().mean())
        log.append(row)
        if bar is not None:
            shown = {"object_shape": f"{row['object_shape_accuracy']:.2f}"} if "object_shape_accuracy" in row else {}
            bar.set_postfix(
                loss=f"{loss.item():.3f}", shape=f"{acc_s:.2f}", color=f"{acc_c:.2f}", **shown, refresh=False
            )
            bar.update(1)
    model.zero_grad(set_to_none=True)
    return log


# ---------------------------------------------------------------------------------------------
# stage 0: language pre-training on symbolic scenes (tools/reference/symbolic.py)


def _symbolic_forward(
    model,
    symbols: SceneSymbols,
    encoded: _Encoded,
    token_tags: dict[int, torch.Tensor],
    units: Sequence[_Unit],
    generator: torch.Generator,
    per_cell: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [Q, 2, V], targets [Q, 2])`` of the real questions of ``units`` on symbolic scenes
    (one patch sample per image, shared by its questions; ``per_cell``: :func:`sample_patches`)."""
    image_token = int(encoded.prefix[-1])
    head = encoded.prefix[: int((encoded.prefix == image_token).nonzero()[0])]
    n_visual = int((encoded.prefix == image_token).sum())
    scenes_in, suffixes, rows = [], [], []
    for u in units:
        labels = token_tags[u.image_id].long()
        kept = sample_patches(labels, generator, per_cell=per_cell)
        for r in u.rows[: u.real]:
            scenes_in.append((labels, kept))
            suffixes.append(encoded.suffix[r, : int(encoded.lengths[r])])
            rows.append(r)
    inputs, mask, positions = symbolic_batch(symbols, model.get_input_embeddings(), head, n_visual, scenes_in, suffixes)
    logits = symbolic_logits(model, inputs, mask, positions)
    index = torch.tensor(rows)
    ids, _, lengths = encoded.batch(index)
    return logits, _targets(ids, lengths)


@torch.no_grad()
def symbolic_accuracy(
    model,
    symbols: SceneSymbols,
    encoded: _Encoded,
    token_tags: dict[int, torch.Tensor],
    s: TrainSettings,
    per_cell: bool = False,
    by_type: dict[str, float] | None = None,
) -> float:
    """Exact-match accuracy (answer and ``</s>``) on symbolic scenes of ``encoded``'s questions, with
    a fixed patch sample (seeded by ``s.seed``; ``per_cell``: one symbol per grid cell). A dict
    given as ``by_type`` receives the accuracy per question type (scenes)."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(s.seed * 1_000_003 + 1)
    units = [_Unit(img, tuple(rows), len(rows)) for img, rows in sorted(encoded.by_image.items())]
    per_batch = max(1, s.eval_batch_size // s.questions_per_image)
    correct: list[bool] = []
    for i in range(0, len(units), per_batch):
        logits, targets = _symbolic_forward(model, symbols, encoded, token_tags, units[i : i + per_batch], g, per_cell)
        correct += (logits.argmax(-1) == targets).all(-1).tolist()
    model.train(was_training)
    if by_type is not None and isinstance(encoded.split, scenes.ScenesSplit):
        questions = [encoded.index[r] for u in units for r in u.rows[: u.real]]  # _symbolic_forward's order
        by_type.update(
            {typ: v["accuracy"] for typ, v in scenes.accuracy_by_type(encoded.split, questions, correct).items()}
        )
    return sum(correct) / len(correct)


def pretrain_language(
    model,
    symbols: SceneSymbols,
    encoded: _Encoded,
    token_tags: dict[int, torch.Tensor],
    val: tuple[_Encoded, dict[int, torch.Tensor]],
    s: TrainSettings,
    bar=None,
    resume_from: dict[str, Any] | None = None,
    save: typing.Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, float]]:
    """Stage 0 (scenes): train the language model and ``symbols`` to answer the training questions
    on symbolic scenes (tools/reference/symbolic.py); the vision tower and projector are untouched.

    ``language_pretrain_steps`` steps of ``images_per_batch`` images (the stage-2 batch order) with
    all their questions, AdamW (the stage-2 groups), warm-up then cosine decay from
    ``language_pretrain_lr``; the first ``language_pretrain_cells`` of the steps keep one symbol per
    grid cell, the others 1-3 per object and per cell background; the patch samples are a pure
    function of ``(seed, step)``. Every
    ``eval_every`` steps the accuracy on symbolic scenes of the held-out questions ``val`` is logged
    and ``save`` (if given) receives the stage's state ``{"step", "optimizer", "log"}``, from which
    ``resume_from`` continues exactly (the batches and patch samples are functions of the step).

    Returns:
        per-step ``{"step", "loss", "accuracy"}``, with ``"val_accuracy"`` on evaluated steps.
    """
    stage = s.model_copy(
        update={
            "steps": s.language_pretrain_steps,
            "lr": s.language_pretrain_lr,
            "warmup_steps": min(s.warmup_steps, s.language_pretrain_steps // 10),
        }
    )
    named = [(n, p) for n, p in model.named_parameters() if n.startswith(("model.language_model", "lm_head"))]
    language = [p for _, p in named]
    decay = [p for n, p in named if p.dim() >= 2 and "embed" not in n]
    keep = [p for n, p in named if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": s.weight_decay},
            {"params": keep + list(symbols.parameters()), "weight_decay": 0.0},
        ],
        lr=stage.lr,
        betas=(0.9, 0.98),
    )
    log: list[dict[str, float]] = []
    first = 0
    if resume_from is not None:
        opt.load_state_dict(resume_from["optimizer"])
        log, first = list(resume_from["log"]), int(resume_from["step"])
        if bar is not None:
            bar.update(first)
    model.train()
    for step in range(first, stage.steps):
        g = torch.Generator().manual_seed(s.seed * 1_000_003 + 15_485_863 * (step + 1))
        per_cell = step < round(s.language_pretrain_cells * stage.steps)
        logits, targets = _symbolic_forward(
            model, symbols, encoded, token_tags, _step_units(step, encoded, s), g, per_cell
        )
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, stage)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(language + list(symbols.parameters()), s.grad_clip)
        opt.step()
        row = {
            "step": step + 1,
            "loss": loss.item(),
            "accuracy": float((logits.argmax(-1) == targets).all(-1).float().mean()),
        }
        if (step + 1) % s.eval_every == 0 or step + 1 == stage.steps:
            by_type: dict[str, float] = {}  # of the scenes the stage is training on at this step
            row["val_accuracy"] = symbolic_accuracy(
                model, symbols, val[0], val[1], s, by_type=None if per_cell else by_type
            )
            if per_cell:  # the curriculum's own scenes too: how far the per-cell phase has got
                row["val_accuracy_per_cell"] = symbolic_accuracy(
                    model, symbols, val[0], val[1], s, per_cell=True, by_type=by_type
                )
            row.update({f"val_accuracy_{typ}": v for typ, v in by_type.items()})
            # the closest two values of each label: one near 0 is a label the symbols cannot tell apart
            row["symbol_row_distance"] = symbols.row_distances()
            if bar is not None:
                extra = f" (one symbol per cell: {row['val_accuracy_per_cell']:.4f})" if per_cell else ""
                types = ", ".join(f"{typ} {v:.2f}" for typ, v in by_type.items())
                apart = " ".join(f"{d:.2f}" for d in row["symbol_row_distance"])
                bar.write(
                    f"stage 0 step {step + 1}: symbolic val acc {row['val_accuracy']:.4f}{extra}; {types};"
                    f" closest symbol rows (shape colour size row col) {apart}"
                )
        log.append(row)
        if save is not None and "val_accuracy" in row:
            save({"step": step + 1, "optimizer": opt.state_dict(), "log": log})
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{row['accuracy']:.2f}", refresh=False)
            bar.update(1)
    model.zero_grad(set_to_none=True)
    return log


# ---------------------------------------------------------------------------------------------
# checkpoints


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _check_resume(saved: dict[str, Any], arch: ArchSettings, train_s: TrainSettings) -> None:
    if saved["arch"] != arch.model_dump():
        raise ValueError(
            f"--resume: model settings differ from the checkpoint's: {saved['arch']} != {arch.model_dump()}"
        )
    now = train_s.model_dump()
    diff = {k for k in now if now[k] != saved["train"].get(k) and k not in _RESUMABLE_CHANGES}
    if diff:
        was = ", ".join(f"{k}={saved['train'].get(k)!r}" for k in sorted(diff))
        raise ValueError(
            f"--resume: training settings {sorted(diff)} differ from the checkpoint's ({was}); "
            f"only {sorted(_RESUMABLE_CHANGES)} may change"
        )


# ---------------------------------------------------------------------------------------------
# the run


def train(
    arch: ArchSettings,
    settings: TrainSettings,
    out: str | os.PathLike,
    resume: bool = False,
    command: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train a reference model; what is written under ``out``: ``tools/reference/TRAINING.md``.

    Args:
        arch: model sizes.
        settings: optimisation settings.
        out: output folder (created).
        resume: continue from ``out/checkpoint.pt`` (settings must match, see ``_RESUMABLE_CHANGES``).
        command: the command line recorded on the model card.
        show_progress: draw a tqdm progress bar.

    Returns:
        the metrics written to ``out/model/metrics.json`` (``history`` holds the losses per step);
        when stopped early by ``stop_at_step``: ``stopped_at_step``, ``best_step``,
        ``best_val_accuracy``, ``train_seconds`` and ``history`` only.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(settings.threads)
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists() and not resume:
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out")
    if resume and not ckpt_path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")

    task = task_data(settings.task)
    tokenizer = task.make_tokenizer()
    if len(tokenizer) > arch.vocab_size:
        raise ValueError(f"vocab_size ({arch.vocab_size}) is smaller than the tokenizer ({len(tokenizer)} tokens)")
    processor = make_processor(arch, tokenizer)
    model = build_model(arch, seed=settings.seed)
    earlier: dict[str, Any] = {}
    if settings.init_from:
        model_dir_in = Path(settings.init_from)
        if not (model_dir_in / "model.safetensors").is_file():
            raise FileNotFoundError(f"--init-from: no model.safetensors in {model_dir_in}")
        source = type(model).from_pretrained(model_dir_in, dtype=torch.float32)  # maps saved key names
        model.load_state_dict(source.state_dict(), strict=True)
        del source
        if (model_dir_in / "metrics.json").is_file():
            earlier = json.loads((model_dir_in / "metrics.json").read_text())
    optimizer = _optimizer(model, settings)

    train_index, val_index = task.train_val_split(settings.val_images, seed=settings.seed)
    if settings.max_train_questions is not None:
        train_index = train_index[: settings.max_train_questions]
    if settings.max_val_questions is not None:
        val_index = val_index[: settings.max_val_questions]
    split = task.load_split("train")
    n_visual = num_visual_tokens(arch)
    t0 = time.perf_counter()
    train_enc = _Encoded(split, train_index, tokenizer, arch.arch, n_visual)
    val_enc = _Encoded(split, val_index, tokenizer, arch.arch, n_visual)
    train_images = _ImageCache(split, train_enc.image_ids, processor, arch.arch, flips=settings.hflip)
    val_images = _ImageCache(split, val_enc.image_ids, processor, arch.arch, flips=False)
    prep_seconds = time.perf_counter() - t0

    step, train_seconds, best_val, best_step = 0, 0.0, -1.0, -1
    wall_seconds = 0.0  # the whole run (steps, evaluation, checkpoints), over all resumptions
    commands = list(earlier.get("commands", [])) + ([command] if command else [])
    history: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    if resume:
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        _check_resume(saved, arch, settings)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        step, train_seconds = saved["step"], saved["train_seconds"]
        best_val, best_step = saved["best_val"], saved["best_step"]
        history, evals = saved["history"], saved["evals"]
        wall_seconds = saved["wall_seconds"]
        commands = saved["commands"] + ([command] if command else [])
        torch.set_rng_state(saved["torch_rng"])
    t_wall = time.perf_counter() - wall_seconds

    vision_log: list[dict[str, float]] = []
    language_log: list[dict[str, float]] = []
    stage0_saved: dict[str, Any] | None = None  # a checkpoint written in stage 0 or at its end
    if resume:
        vision_log = saved.get("vision_log", [])
        language_log = saved.get("language_log", [])
        stage0_saved = saved.get("stage0")

    def checkpoint(**override: Any) -> None:
        _save_checkpoint(
            ckpt_path,
            {
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "arch": arch.model_dump(),
                "train": settings.model_dump(),
                "train_seconds": train_seconds,
                "wall_seconds": time.perf_counter() - t_wall,
                "commands": commands,
                "best_val": best_val,
                "best_step": best_step,
                "history": history,
                "evals": evals,
                "torch_rng": torch.get_rng_state(),
                "vision_log": vision_log,
                "language_log": language_log,
                **override,
            },
        )

    symbols = None
    if settings.language_pretrain_steps and not language_log:
        if arch.arch != "llava":
            raise ValueError(
                "language_pretrain_steps: symbolic scenes are laid out for the LLaVA prompt (--arch llava)"
            )
        t_stage = time.perf_counter()
        side = math.isqrt(n_visual)
        symbols = SceneSymbols(arch.text_hidden, seed=settings.seed + 3)
        if stage0_saved is not None:
            symbols.load_state_dict(stage0_saved["symbols"])

        def save_stage0(state: dict[str, Any]) -> None:
            # stage 0 so far (its own optimizer, log and the symbols); a resumed run continues it, or
            # starts stage 1 from it once its last step is in
            assert symbols is not None
            seconds = train_seconds + time.perf_counter() - t_stage
            checkpoint(train_seconds=seconds, stage0={**state, "symbols": symbols.state_dict()})

        lbar = tqdm(
            total=settings.language_pretrain_steps,
            desc="stage 0: symbolic scenes",
            disable=not show_progress,
            mininterval=2.0,
            dynamic_ncols=True,
        )
        if stage0_saved is not None and stage0_saved["step"] >= settings.language_pretrain_steps:
            language_log = list(stage0_saved["log"])  # stage 0 was over: stage 1 next
        else:
            stage0_split, stage0_enc = split, train_enc
            if settings.language_pretrain_scenes:
                stage0_split = scenes.generate_split("symbolic", settings.language_pretrain_scenes, SYMBOLIC_SEED_BASE)
                stage0_enc = _Encoded(stage0_split, range(len(stage0_split)), tokenizer, arch.arch, n_visual)
            language_log = pretrain_language(
                model,
                symbols,
                stage0_enc,
                _token_tags(stage0_split, stage0_enc, side, dtype=torch.uint8),
                (val_enc, _token_tags(split, val_enc, side)),
                settings,
                lbar,
                resume_from=stage0_saved,
                save=save_stage0,
            )
        lbar.close()
        train_seconds += time.perf_counter() - t_stage
    if settings.vision_pretrain_steps and not vision_log:
        t_stage = time.perf_counter()
        tags = data.image_tags("train", train_index) if settings.task == "easy_vqa" else _cell_tags(split, train_enc)
        vbar = tqdm(
            total=settings.vision_pretrain_steps,
            desc="stage 1: vision",
            disable=not show_progress,
            mininterval=2.0,
            dynamic_ncols=True,
        )
        token_tags = None
        if settings.vision_pretrain_tokens:
            token_tags = _token_tags(split, train_enc, math.isqrt(n_visual))
        vision_log = pretrain_vision(model, train_images, tags, settings, vbar, token_tags, symbols)
        vbar.close()
        train_seconds += time.perf_counter() - t_stage
        last = vision_log[-50:]
        tqdm.write(
            f"stage 1 done: shape acc {sum(r['shape_accuracy'] for r in last) / len(last):.3f}, colour acc "
            f"{sum(r['color_accuracy'] for r in last) / len(last):.3f} (mean of the last {len(last)} steps)"
        )

    def evaluate_and_keep_best() -> None:
        nonlocal best_val, best_step
        acc, loss = teacher_forced_accuracy(model, arch.arch, val_enc, val_images, settings.eval_batch_size)
        evals.append({"step": step, "val_accuracy": acc, "val_loss": loss, "train_seconds": round(train_seconds, 1)})
        improved = acc > best_val
        if improved:
            best_val, best_step = acc, step
            model.save_pretrained(out / "best")
            processor.save_pretrained(out / "best")
        bar.write(
            f"step {step}: val acc {acc:.4f} loss {loss:.4f} (best {best_val:.4f} @ {best_step})"
            f"{' *' if improved else ''} [{train_seconds / 60:.1f} min]"
        )

    if (settings.vision_pretrain_steps or settings.language_pretrain_steps) and step == 0:
        checkpoint()
    model.train()
    bar = tqdm(
        total=settings.steps,
        initial=step,
        desc=f"train {settings.name}",
        disable=not show_progress,
        mininterval=2.0,
        dynamic_ncols=True,
    )
    ema_loss, ema_acc = None, None
    while step < settings.steps:
        t_step = time.perf_counter()
        units = _step_units(step, train_enc, settings)
        flip = None
        if settings.hflip:
            g = torch.Generator().manual_seed(settings.seed * 1_000_003 + 7_919 * (step + 1))
            flip = torch.rand(len(units), generator=g) < 0.5
        lr = learning_rate(step, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sel, tgt, weight = forward_units(
            model, arch.arch, train_enc, train_images, units, flip
        )  # [Q, 2, V], [Q, 2], [Q]
        token_loss = F.cross_entropy(sel.flatten(0, 1), tgt.flatten(), reduction="none").view(-1, 2)  # [Q, 2]
        loss_weight = weight
        if settings.balance_yes_no:
            loss_weight = weight * train_enc.weights[torch.tensor([r for u in units for r in u.rows])]
        loss = (token_loss.mean(1) * loss_weight).sum() / loss_weight.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        acc = float(((sel.detach().argmax(-1) == tgt).all(-1).float() * weight).sum() / weight.sum())
        step += 1
        train_seconds += time.perf_counter() - t_step
        loss_value = loss.item()
        history.append({"step": step, "loss": loss_value, "accuracy": acc, "lr": lr, "grad_norm": grad_norm.item()})
        ema_loss = loss_value if ema_loss is None else 0.98 * ema_loss + 0.02 * loss_value
        ema_acc = acc if ema_acc is None else 0.98 * ema_acc + 0.02 * acc
        bar.set_postfix(loss=f"{ema_loss:.4f}", acc=f"{ema_acc:.3f}", lr=f"{lr:.1e}", refresh=False)
        bar.update(1)
        if step % settings.eval_every == 0 or step == settings.steps:
            evaluate_and_keep_best()
        stopping = settings.stop_at_step is not None and step >= settings.stop_at_step
        if step % settings.ckpt_every == 0 or step == settings.steps or stopping:
            checkpoint()
        if stopping and step < settings.steps:
            bar.close()
            return {
                "stopped_at_step": step,
                "best_step": best_step,
                "best_val_accuracy": best_val,
                "train_seconds": round(train_seconds, 1),
                "history": history,
            }
    bar.close()

    if best_step < 0:  # resumed a finished run whose best folder is missing
        evaluate_and_keep_best()
    wall_seconds = time.perf_counter() - t_wall
    if earlier:  # the run it started from
        train_seconds += earlier.get("train_seconds", 0.0)
        wall_seconds += earlier.get("wall_seconds", 0.0)
    metrics = export(
        out,
        arch,
        settings,
        best_step,
        best_val,
        train_seconds,
        wall_seconds,
        prep_seconds,
        history,
        evals,
        commands,
        vision_log,
        earlier,
        language_log,
    )
    return metrics


def export(
    out: Path,
    arch: ArchSettings,
    settings: TrainSettings,
    best_step: int,
    best_val: float,
    train_seconds: float,
    wall_seconds: float,
    prep_seconds: float,
    history: list[dict[str, Any]],
    evals: list[dict[str, Any]],
    commands: list[str],
    vision_log: list[dict[str, float]] | None = None,
    earlier: dict[str, Any] | None = None,
    language_log: list[dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Copy the best model to ``out/model``, measure its test accuracy, and write ``metrics.json`` and
    the ``README.md`` model card there.

    easy-VQA is measured with greedy ``generate()``; the scenes task by teacher forcing (the argmax
    at the answer and at ``</s>`` both right: what greedy decoding of a one-word answer returns),
    with the accuracy per question type as well (CI checks greedy ``generate()`` on 200 of them,
    :func:`tokenreduce.reference.evaluate.evaluate_generate` with ``task="scenes"``)."""

    from tokenreduce.reference import load_folder

    model_dir = out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(out / "best", model_dir)
    model, processor = load_folder(model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    metrics: dict[str, Any] = {
        "name": settings.name,
        "arch": arch.model_dump(),
        "train": settings.model_dump(),
        "parameters": n_params,
        "visual_tokens": num_visual_tokens(arch),
        "best_step": best_step,
        "best_val_accuracy": best_val,
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(wall_seconds, 1),
        "prep_seconds": round(prep_seconds, 1),
        "commands": commands,
        "hardware": _hardware(settings.threads),
        "evals": evals,
    }
    if vision_log:
        metrics["vision_pretrain"] = vision_summary(vision_log)
    if language_log:
        metrics["language_pretrain"] = language_summary(language_log)
    if earlier:  # --init-from: the runs this one continues, oldest first
        keep = (
            "commands",
            "train",
            "best_step",
            "best_val_accuracy",
            "vision_pretrain",
            "language_pretrain",
            "train_seconds",
            "wall_seconds",
            "test_accuracy",
        )
        metrics["previous_runs"] = list(earlier.get("previous_runs", [])) + [
            {k: earlier[k] for k in keep if k in earlier}
        ]
    task = task_data(settings.task)
    test = task.load_split("test")
    n_test = len(test) if settings.test_questions is None else min(settings.test_questions, len(test))
    if n_test:
        t0 = time.perf_counter()
        if settings.task == "easy_vqa":
            bar = tqdm(total=n_test, desc="test generate()", mininterval=2.0, dynamic_ncols=True)
            full = evaluate_generate(
                model, processor, "test", range(n_test), batch_size=settings.eval_batch_size, progress=bar.update
            )
            bar.close()
            indices, correct = list(full.indices), list(full.correct)
        else:
            indices = list(range(n_test))
            encoded = _Encoded(test, indices, processor.tokenizer, arch.arch, num_visual_tokens(arch))
            images = _ImageCache(test, encoded.image_ids, processor, arch.arch, flips=False)
            hits, _ = teacher_forced_correct(model, arch.arch, encoded, images, settings.eval_batch_size)
            correct = hits.tolist()
            metrics["test_method"] = "teacher_forced"
            metrics["test_accuracy_per_type"] = scenes.accuracy_by_type(test, indices, correct)
        metrics["test_seconds"] = round(time.perf_counter() - t0, 1)
        metrics["test_questions"] = len(indices)
        metrics["test_accuracy"] = sum(correct) / len(indices)
        ci_index = task.fixed_test_subset()
        pred = dict(zip(indices, correct))
        if all(i in pred for i in ci_index):
            metrics["ci_subset_accuracy"] = sum(pred[i] for i in ci_index) / len(ci_index)
        per_answer: dict[str, list[int]] = {}
        for i, ok in zip(indices, correct):
            per_answer.setdefault(test.answers[i], [0, 0])
            per_answer[test.answers[i]][0] += int(ok)
            per_answer[test.answers[i]][1] += 1
        metrics["test_accuracy_per_answer"] = {a: round(c / n, 4) for a, (c, n) in sorted(per_answer.items())}
    metrics["weights_bytes"] = (model_dir / "model.safetensors").stat().st_size
    (model_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "history.json").write_text(json.dumps(history) + "\n")
    (model_dir / "README.md").write_text(model_card(metrics))
    return {**metrics, "history": history}


def vision_summary(vision_log: list[dict[str, float]], last: int = 50) -> dict[str, float]:
    """Stage-1 summary: steps and the mean training accuracies of the last ``last`` steps."""
    tail = vision_log[-last:]
    return {
        "steps": len(vision_log),
        "shape_accuracy": round(sum(r["shape_accuracy"] for r in tail) / len(tail), 4),
        "color_accuracy": round(sum(r["color_accuracy"] for r in tail) / len(tail), 4),
    }


def language_summary(language_log: list[dict[str, float]]) -> dict[str, Any]:
    """Stage-0 summary: steps, and the held-out accuracy on symbolic scenes at each evaluated step."""
    evaluated = [(int(r["step"]), round(r["val_accuracy"], 4)) for r in language_log if "val_accuracy" in r]
    last = next((r for r in reversed(language_log) if "val_accuracy" in r), {})
    return {
        "steps": len(language_log),
        "val_accuracy": evaluated[-1][1] if evaluated else None,
        "val_accuracy_by_step": dict(evaluated),
        # per question type at the last evaluated step (scenes)
        "val_accuracy_by_type": {
            k.removeprefix("val_accuracy_"): round(v, 4)
            for k, v in last.items()
            if k.startswith("val_accuracy_") and k.removeprefix("val_accuracy_") in scenes.QUESTION_TYPES
        },
    }


def _hardware(threads: int) -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, "
        f"{threads} torch thread(s), no GPU; torch {torch.__version__}, "
        f"transformers {__import__('transformers').__version__}, Python {platform.python_version()}"
    )


# ---------------------------------------------------------------------------------------------
# command line


def _add_fields(parser: argparse.ArgumentParser, model: type[BaseModel], skip: set[str]) -> None:
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        ann = field.annotation
        args = typing.get_args(ann)
        if ann is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=field.description)
            continue
        if typing.get_origin(ann) in (typing.Union, types.UnionType):
            ann = next(a for a in args if a is not type(None))
        kind = str if typing.get_origin(ann) is typing.Literal else ann
        parser.add_argument(flag, type=kind, default=None, help=f"{field.description or ''} (default {field.default})")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=ARCHS, default="llava")
    p.add_argument("--out", help="output folder (checkpoint, best/, model/)")
    p.add_argument(
        "--refresh-card",
        metavar="MODEL_DIR",
        help="only re-write MODEL_DIR/README.md from MODEL_DIR/metrics.json, then exit",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--tiny", action="store_true", help="tiny model and data subset (tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_fields(p, ArchSettings, skip={"arch"})
    _add_fields(p, TrainSettings, skip=set())
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bar at every evaluation
    if args.refresh_card:
        folder = Path(args.refresh_card)
        (folder / "README.md").write_text(model_card(json.loads((folder / "metrics.json").read_text())))
        return 0
    if not args.out:
        _parser().error("--out is required")
    given = {k: v for k, v in vars(args).items() if v is not None and k != "refresh_card"}
    arch_kw = dict(TINY_ARCH) if args.tiny else {}
    train_kw = dict(TINY_TRAIN) if args.tiny else {}
    if given.get("task") == "scenes":  # the scenes presets, under the flags given
        arch_kw = dict(TINY_SCENES_ARCH if args.tiny else SCENES_ARCH)
        train_kw = {**SCENES_TRAIN, **train_kw, "name": "scenes-tiny"} if args.tiny else dict(SCENES_TRAIN)
    elif args.arch == "qwen2_5_vl" and not args.tiny:
        train_kw.setdefault("name", "easyvqa-qwen2_5_vl")
    arch_kw.update({k: v for k, v in given.items() if k in ArchSettings.model_fields and k != "arch"})
    train_kw.update({k: v for k, v in given.items() if k in TrainSettings.model_fields})
    arch = ArchSettings(arch=args.arch, **arch_kw)
    settings = TrainSettings(**train_kw)
    command = f"{PROG} " + " ".join(shlex.quote(a) for a in argv)
    metrics = train(arch, settings, args.out, resume=args.resume, command=command, show_progress=not args.no_progress)
    summary = {
        k: metrics[k]
        for k in (
            "best_step",
            "best_val_accuracy",
            "test_accuracy",
            "ci_subset_accuracy",
            "train_seconds",
            "parameters",
        )
        if k in metrics
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
