"""Time training steps of candidate reference-model sizes before committing to a long run.

Usage, from the repository root::

    python -m tools.reference.timing --task scenes --threads 1 2 --steps 5 \\
        --candidate text_hidden=128,text_layers=8 --candidate text_hidden=96,text_layers=8,text_intermediate=192

Each candidate is a comma-separated list of ``ArchSettings`` overrides on top of the task's
preset (``SCENES_ARCH`` for ``--task scenes``). For each candidate and thread count the script
builds the model, prepares the questions of ``--images`` training images, runs one untimed step,
then times ``--steps`` optimizer steps of stage 2 (the shared-prefix forward, backward, AdamW) and
of stage 1 (vision pre-training), and prints one JSON line per measurement with the seconds per
step and the projected time of a run of ``--project-steps`` stage-2 and ``--project-vision-steps``
stage-1 steps. Numbers depend on the machine's load: report it with them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a file: the checkout on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.reference.build import ArchSettings, build_model, make_processor, num_visual_tokens  # noqa: E402
from tools.reference.train import (  # noqa: E402
    SCENES_ARCH,
    SCENES_TRAIN,
    TrainSettings,
    _cell_tags,
    _Encoded,
    _ImageCache,
    _optimizer,
    _step_units,
    forward_units,
    pretrain_vision,
    task_data,
)

__all__ = ["parse_candidate", "time_candidate", "main"]


def parse_candidate(text: str) -> dict[str, Any]:
    """``"text_hidden=128,text_layers=8"`` -> ``{"text_hidden": 128, "text_layers": 8}`` (integers,
    else floats, else strings).

    Raises:
        ValueError: an item is not ``name=value`` or names no ``ArchSettings`` field.
    """
    out: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in ArchSettings.model_fields:
            raise ValueError(
                f"candidate item {item!r}: expected name=value with name one of {sorted(ArchSettings.model_fields)}"
            )
        for kind in (int, float, str):
            try:
                out[name] = kind(value)
                break
            except ValueError:
                continue
    return out


def time_candidate(
    arch: ArchSettings, settings: TrainSettings, images: int, steps: int, threads: int
) -> dict[str, Any]:
    """Seconds per stage-2 and stage-1 step of ``arch`` under ``settings`` with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    task = task_data(settings.task)
    tokenizer = task.make_tokenizer()
    processor = make_processor(arch, tokenizer)
    model = build_model(arch, seed=settings.seed)
    split = task.load_split("train")
    index = [i for i, img in enumerate(split.image_ids) if img < images]
    enc = _Encoded(split, index, tokenizer, arch.arch, num_visual_tokens(arch))
    cache = _ImageCache(split, enc.image_ids, processor, arch.arch, flips=settings.hflip)
    optimizer = _optimizer(model, settings)
    model.train()

    def step(k: int) -> float:
        t0 = time.perf_counter()
        units = _step_units(k, enc, settings)
        sel, tgt, weight = forward_units(model, arch.arch, enc, cache, units, None)
        loss = (F.cross_entropy(sel.flatten(0, 1), tgt.flatten(), reduction="none").view(-1, 2).mean(1) * weight).sum()
        optimizer.zero_grad(set_to_none=True)
        (loss / weight.sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        return time.perf_counter() - t0

    step(0)  # untimed: allocations, first-call overheads
    stage2 = [step(k) for k in range(1, steps + 1)]
    tags = _cell_tags(split, enc) if settings.task == "scenes" else task.image_tags("train", index)
    t0 = time.perf_counter()
    pretrain_vision(model, cache, tags, settings.model_copy(update={"vision_pretrain_steps": steps}))
    stage1 = (time.perf_counter() - t0) / steps
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "visual_tokens": num_visual_tokens(arch),
        "threads": threads,
        "stage2_s_per_step": round(sorted(stage2)[len(stage2) // 2], 3),
        "stage1_s_per_step": round(stage1, 3),
        "questions_per_step": settings.images_per_batch * settings.questions_per_image,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.reference.timing", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("easy_vqa", "scenes"), default="scenes")
    p.add_argument("--candidate", action="append", default=[], help="ArchSettings overrides, name=value,...")
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--steps", type=int, default=5, help="timed steps per stage (median reported for stage 2)")
    p.add_argument("--images", type=int, default=200, help="training images whose questions are prepared")
    p.add_argument("--images-per-batch", type=int, default=None)
    p.add_argument("--project-steps", type=int, default=3000, help="stage-2 steps of the projected run")
    p.add_argument("--project-vision-steps", type=int, default=300, help="stage-1 steps of the projected run")
    args = p.parse_args(argv)
    base_arch = SCENES_ARCH if args.task == "scenes" else {}
    train_kw = dict(SCENES_TRAIN) if args.task == "scenes" else {}
    if args.images_per_batch:
        train_kw["images_per_batch"] = args.images_per_batch
    settings = TrainSettings(**train_kw)
    for text in args.candidate or [""]:
        arch = ArchSettings(**{**base_arch, **parse_candidate(text)})
        for threads in args.threads:
            row = {"candidate": text or "preset", **time_candidate(arch, settings, args.images, args.steps, threads)}
            row["projected_minutes"] = round(
                (args.project_steps * row["stage2_s_per_step"] + args.project_vision_steps * row["stage1_s_per_step"])
                / 60,
                1,
            )
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
