"""``tokenreduce eval``: accuracy and fidelity of vanilla and each plan on a task (docs/cli.md)."""

from __future__ import annotations

import platform
from collections.abc import Sequence
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
    (folder / "results.md").write_text(result.markdown(about))
    write_outputs(ctx, folder, {"model": info, **result.to_dict()}, plans)
    progress_note(folder, ["results.md"])
    return 0


def _suite_plans(ctx: Context, model) -> tuple[dict[str, Any], list[str]]:
    """The suite's plans that ``model`` can run, and a note for each one skipped."""
    import tokenreduce

    suite = ctx.cfg.suite
    plans = resolve_plans(ctx, entries=suite.plans, field="suite.plans")
    if not suite.skip_inapplicable:
        return plans, []
    usable, notes = {}, []
    for name, plan in plans.items():
        try:
            tokenreduce.compile_for(model, plan)
        except TokenReduceError as exc:
            notes.append(f"skipped {name} (suite.skip_inapplicable): {str(exc).splitlines()[0]}")
        else:
            usable[name] = plan
    return usable, notes
