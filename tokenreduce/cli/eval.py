"""``tokenreduce eval``: accuracy and fidelity of vanilla and each plan on a task (docs/cli.md)."""

from __future__ import annotations

import contextlib
import platform
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from tokenreduce.cli.config import Context, resolve_plans, setup
from tokenreduce.cli.output import out_dir, progress_note, write_outputs
from tokenreduce.core.errors import TokenReduceError

__all__ = ["cmd_eval"]


def cmd_eval(overrides: Sequence[str]) -> int:
    """``eval``: vanilla, then ``plans`` (or ``[plan]`` when a plan is chosen, else the suite)."""
    from tokenreduce.measure.tasks import evaluate, load_task

    ctx = setup("eval", overrides)
    use_suite = ctx.cfg.plans is None and not ctx.overridden("plan")
    plans = {} if use_suite else resolve_plans(ctx)
    with _quiet_loading_bars(ctx.cfg.eval.progress):
        loaded = ctx.load()
    if loaded.processor is None:
        raise TokenReduceError(
            f"eval needs a model with a processor (kind tiny or pretrained); model {ctx.model_name!r} is kind {loaded.kind!r}"
        )
    skipped: list[str] = []
    if use_suite:
        plans, skipped = _suite_plans(ctx, loaded.model)
    examples = load_task(ctx.cfg.task)
    task_info = ctx.cfg.task.model_dump(mode="json")
    if use_suite:
        task_info["suite"] = ctx.choices.get("suite")
    info = loaded.describe()
    print(
        f"{ctx.cfg.task.name} ({ctx.cfg.task.split}, {len(examples)} questions, seed {ctx.cfg.task.seed}) on "
        f"{info['name']} ({info['decoder_layers']} layers, {info['dtype']}, {info['weights']} weights): vanilla + "
        f"{len(plans)} plan(s)" + (f" of suite {ctx.choices.get('suite')!r}" if use_suite else ""),
        flush=True,
    )
    result = evaluate(
        loaded,
        examples,
        plans,
        ctx.cfg.eval,
        template=ctx.template(loaded),
        question_format=ctx.cfg.task.question_format,
        task_info=task_info,
    )
    result.notes[:0] = skipped
    print(result.table())
    for note in result.notes:
        print(f"note: {note}")
    folder = out_dir(ctx)

    about = (
        f"Model: {info['name']} ({info['decoder_layers']} decoder layers, {info['dtype']}, {info['weights']} weights); "
        f"torch {torch.__version__}, {ctx.cfg.eval.threads or torch.get_num_threads()} thread(s), {platform.machine()}; "
        f"FLOPs: mean prefill FLOPs per question (docs/measurement.md); s: wall time of each configuration's generate() calls."
    )
    written = ["results.md"]
    if ctx.cfg.eval.plot:
        written += _plot(result, folder, ctx.cfg.eval.plot_metric, info)
    if ctx.cfg.eval.log_samples:
        paths = result.write_samples(folder / "samples")
        written.append(f"samples/ ({len(paths)} JSONL files, {len(examples)} lines each)")
    (folder / "results.md").write_text(result.markdown(about))
    write_outputs(ctx, folder, {"model": info, **result.to_dict()}, plans)
    progress_note(folder, written)
    return 0


@contextlib.contextmanager
def _quiet_loading_bars(progress: bool) -> Iterator[None]:
    """Hide transformers' weight-loading bar when stderr is not a terminal (a log file would get its
    carriage-return redraws) or when progress is off; restore the previous setting afterwards."""
    from transformers.utils import logging as hf_logging

    isatty = getattr(sys.stderr, "isatty", None)
    quiet = not progress or not (isatty and isatty())
    enabled = hf_logging.is_progress_bar_enabled()
    if quiet and enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and enabled:
            hf_logging.enable_progress_bar()


def _plot(result, folder: Path, metric: str, info: dict[str, Any]) -> list[str]:
    """``accuracy_cost.png`` and ``.svg`` (tokenreduce.measure.plots); a note instead when there
    is nothing to draw (retention with a vanilla accuracy of 0)."""
    from tokenreduce.measure.plots import plot_accuracy_cost

    task = result.task
    title = f"{info['name']} on {task.get('name')} ({task.get('split')}, {task.get('n')} questions)"
    try:
        plot = plot_accuracy_cost([("", result.metrics)], folder / "accuracy_cost", metric=metric, title=title)
    except TokenReduceError as exc:
        note = f"no plot: {exc}"
        result.notes.append(note)
        print(f"note: {note}")
        return []
    return [p.name for p in plot.files]


def _suite_plans(ctx: Context, model) -> tuple[dict[str, Any], list[str]]:
    """The suite's plans that ``model`` can run, and a note for each one skipped."""
    import tokenreduce

    suite = ctx.cfg.suite
    plans = resolve_plans(ctx, entries=suite.plans, field="suite.plans")
    if not suite.skip_inapplicable:
        return plans, []
    from tokenreduce.core.support import refusal_reason

    usable, skipped = {}, {}  # reason -> the plans refused for it
    for name, plan in plans.items():
        try:
            tokenreduce.compile_for(model, plan)
        except TokenReduceError as exc:
            skipped.setdefault(refusal_reason(str(exc)), []).append(name)
        else:
            usable[name] = plan
    notes = [f"skipped {', '.join(names)} (suite.skip_inapplicable): {reason}" for reason, names in skipped.items()]
    return usable, notes
