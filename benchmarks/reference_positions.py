"""Ablation for docs/results.md: the reference suite with original position ids kept (what the
``ref_*`` presets use) against renumbered positions (what most methods' official code does).

    python benchmarks/reference_positions.py [--n 1000] [--threads 1]

Prints one row per suite plan: accuracy with ``positions: keep`` and with ``positions: renumber``
on the same fixed easy-VQA questions as ``tokenreduce eval``, and the difference in points.
Plans whose positions do not matter (a layer-0 cut with ``renumber`` still changes the ids, so all
plans are listed) are evaluated twice; vanilla once.
"""

from __future__ import annotations

import argparse

import torch

from tokenreduce.core.presets import compose, load_preset
from tokenreduce.measure.latency import format_table
from tokenreduce.measure.tasks import EvalSettings, TaskSettings, evaluate, load_task
from tokenreduce.models import ModelSettings, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="questions (the main job's default subset)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model", default="easyvqa_llava", help="model conf")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose([f"model={args.model}"])
    loaded = load_model(ModelSettings.model_validate(cfg["model"]), name=cfg["model"]["name"])
    examples = load_task(TaskSettings.model_validate({**cfg["task"], "n": args.n}))
    plans = {}
    for name in cfg["suite"]["plans"]:
        plan = load_preset(name)
        plans[f"{name}"] = plan.model_copy(update={"positions": "keep"})
        plans[f"{name}@renumber"] = plan.model_copy(update={"positions": "renumber"})
    result = evaluate(
        loaded,
        examples,
        plans,
        EvalSettings(batch_size=32, progress=True),
        template=cfg["model"]["prompt"],
        task_info={"n": args.n},
    )
    acc = {m["name"]: m["accuracy"] for m in result.metrics}
    rows = [["vanilla", f"{acc['vanilla']:.3f}", "", ""]]
    for name in cfg["suite"]["plans"]:
        keep, renumber = acc[name], acc[f"{name}@renumber"]
        rows.append([name, f"{keep:.3f}", f"{renumber:.3f}", f"{100 * (renumber - keep):+.1f}"])
    print(f"{cfg['model']['name']}, {args.n} easy-VQA test questions (seed {cfg['task']['seed']})")
    print(format_table(rows, ["plan", "keep", "renumber", "points"]))


if __name__ == "__main__":
    main()
