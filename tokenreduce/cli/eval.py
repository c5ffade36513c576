"""``tokenreduce eval``: accuracy and fidelity of vanilla and each plan on a task (docs/cli.md)."""

from __future__ import annotations

import contextlib
import platform
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from tokenreduce.cli.config import Context, check_out_dir, resolve_plans, setup
from tokenreduce.cli.output import (
    jsonable,
    out_dir,
    progress_note,
    resolved_config,
    results_meta,
    write_config,
    write_results,
)
from tokenreduce.core.errors import TokenReduceError

__all__ = ["cmd_eval"]


def cmd_eval(overrides: Sequence[str]) -> int:
    """``eval``: vanilla, then ``plans`` (or ``[plan]`` when a plan is chosen, else the suite);
    one shard of them with ``eval.shard`` or under torchrun, or the merge of a sharded run's files
    with ``eval.merge`` (docs/scaling.md)."""
    from tokenreduce.measure.shard import resolve_shard, write_shard_file
    from tokenreduce.measure.tasks import batch_count, evaluate, load_task, measure

    ctx = setup("eval", overrides)
    if ctx.cfg.eval.merge is not None:
        return _merge_command(ctx)
    shard = resolve_shard(ctx.cfg.eval.shard)
    use_suite = ctx.cfg.plans is None and not ctx.overridden("plan")
    plans = {} if use_suite else resolve_plans(ctx)
    run_hash = _check_shard_setup(ctx, shard, None if use_suite else plans) if shard is not None else None
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
    settings = ctx.cfg.eval
    template = ctx.template(loaded)
    if shard is None:
        result = evaluate(
            loaded,
            examples,
            plans,
            settings,
            template=template,
            question_format=ctx.cfg.task.question_format,
            task_info=task_info,
        )
        result.notes[:0] = skipped
        about = (
            f"torch {torch.__version__}, {settings.threads or torch.get_num_threads()} thread(s), {platform.machine()}"
        )
        _write_run(out_dir(ctx), result, info, settings, resolved_config(ctx, plans), results_meta(ctx), about)
        return 0

    assert run_hash is not None
    n_batches = batch_count(len(examples), settings)
    batches = shard.batches(n_batches)
    n_questions = sum(min(settings.batch_size, len(examples) - b * settings.batch_size) for b in batches)
    print(
        f"shard {shard.label} ({shard.source}) on {info['device']}: {len(batches)} of {n_batches} batches, "
        f"{n_questions} questions, every configuration",
        flush=True,
    )
    records = measure(  # no batches (more shards than batches): empty records, nothing generated
        loaded,
        examples,
        plans,
        settings,
        template=template,
        question_format=ctx.cfg.task.question_format,
        batches=batches,
    )
    folder = out_dir(ctx)
    payload = {
        "config_hash": run_hash,
        "source": shard.source,
        "batches": batches,
        "n_batches": n_batches,
        "questions": n_questions,
        "config": resolved_config(ctx, plans),
        "meta": results_meta(ctx),
        "task": task_info,
        "model": info,
        "skipped": skipped,
        "machine": {
            "host": platform.node(),
            "machine": platform.machine(),
            "device": info["device"],
            "threads": settings.threads or torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "records": records.to_dict(),
    }
    path = write_shard_file(folder, shard, jsonable(payload))
    print(f"shard {shard.label}: wrote {path}", flush=True)
    _merge_when_complete(folder, run_hash, shard.count)
    return 0


def _check_shard_setup(ctx: Context, shard, plans: dict[str, Any] | None) -> str:
    """Before any work: a sharded run needs an explicit ``out_dir`` (the folder every shard writes
    into), one whose ``shards/`` holds no files of another run; the device of this process
    (``cuda:LOCAL_RANK`` when CUDA is there and ``model.device`` is auto).  Returns the run's hash."""
    from tokenreduce import __version__
    from tokenreduce.measure.shard import config_hash, local_device, other_runs

    if ctx.cfg.out_dir is None:
        raise TokenReduceError(
            f"a sharded eval (shard {shard.label}, from {shard.source}) needs out_dir=DIR: the folder every shard "
            "writes its file into and where the shards are merged (the same DIR for every shard: a shared file "
            "system across nodes, or copy the shards/ files into one folder and run tokenreduce eval eval.merge=DIR)"
        )
    run_hash = config_hash(resolved_config(ctx, plans), tokenreduce=__version__)
    folder = check_out_dir(ctx.cfg.out_dir, "eval")
    others = other_runs(folder, run_hash, shard.count)
    if others:
        raise TokenReduceError(
            f"out_dir={ctx.cfg.out_dir!r} already holds shard files of another run (another config or number of "
            f"shards): {', '.join(others)} in {folder / 'shards'}; give a fresh out_dir, or remove them"
        )
    ctx.cfg.model.device = local_device(ctx.cfg.model.device, shard.local_rank)  # one GPU per process
    return run_hash


def _merge_when_complete(folder: Path, run_hash: str, count: int) -> None:
    """Merge the run's shard files into ``folder`` when they are all there (the shard that
    finishes last does it; a lock file keeps two shards finishing at once from both writing)."""
    import os

    from tokenreduce.measure.shard import SHARD_DIR, complete

    if not complete(folder, run_hash, count):
        print(
            f"waiting for the other shards: the last one to finish merges them into {folder} (or, once their files "
            f"are in {folder / SHARD_DIR}: tokenreduce eval eval.merge={folder})",
            flush=True,
        )
        return
    lock = folder / SHARD_DIR / f".merge-{run_hash}.lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        print(f"another shard is merging the shards into {folder}", flush=True)
        return
    os.close(fd)
    try:
        _merge(folder, folder, run_hash)
    finally:
        lock.unlink(missing_ok=True)


def _merge_command(ctx: Context) -> int:
    """``eval.merge=DIR``: the shard files in DIR (or DIR/shards) merged into ``out_dir`` (default DIR)."""
    allowed = ("eval.merge", "out_dir")
    extra = [o for o in ctx.overrides if o.lstrip("+~").split("=", 1)[0] not in allowed]
    if extra:
        raise TokenReduceError(
            f"eval.merge takes the whole config from the shard files; only out_dir=... may be given with it "
            f"(got {' '.join(extra)})"
        )
    given = str(ctx.cfg.eval.merge)
    source = Path(given).expanduser()
    if not source.is_dir():
        raise TokenReduceError(
            f"eval.merge={given!r}: {'not a folder' if source.exists() else 'no such folder'}; give the out_dir of "
            "a sharded eval (it holds shards/shard-<i>-of-<n>.json)"
        )
    _merge(source, out_dir(ctx) if ctx.cfg.out_dir else source, None)
    return 0


def _merge(source: Path, folder: Path, run_hash: str | None) -> None:
    """Read every shard file of one run in ``source``, and write what a single process writes into
    ``folder``: the table computed from the joined records (equal to a single-process run's, but
    for the summed time columns), ``results.json`` with a ``sharding`` section, ``results.md``,
    ``config.yaml``, the plot and the per-sample logs when the run asked for them."""
    from tokenreduce.measure.shard import TIMING_FIELDS, load_shards
    from tokenreduce.measure.tasks import EvalRecords, EvalSettings, summarize

    shards = load_shards(source, run_hash)
    first = shards[0]
    records = EvalRecords.merge([EvalRecords.from_dict(s["records"]) for s in shards])
    settings = EvalSettings.model_validate(first["config"]["eval"])
    result = summarize(records, settings, first["task"])
    result.notes[:0] = first["skipped"]
    n = len(shards)
    config = {**first["config"], "sharded": {"shards": n, "config_hash": first["config_hash"]}}
    meta = {**first["meta"], "merged": {"shards": n, "config_hash": first["config_hash"]}}
    hosts = {s["machine"]["host"] for s in shards}
    about = f"torch {first['machine']['torch']}, merged from {n} shards on {len(hosts)} host(s), times (s) summed over the shards"
    sharding = {
        "shards": n,
        "config_hash": first["config_hash"],
        "timing_fields": list(TIMING_FIELDS),
        "timing": "summed over the shards: each configuration's generate() time (compute time, not wall time); "
        "every other number equals a single-process run",
        "per_shard": [
            {
                "shard": s["shard"],
                "source": s["source"],
                "batches": s["batches"],
                "questions": s["questions"],
                **s["machine"],
                "seconds": s["records"]["seconds"],
            }
            for s in shards
        ],
    }
    print(f"merged {n} shard files of {source}")
    _write_run(folder, result, first["model"], settings, config, meta, about, {"sharding": sharding})


def _write_run(
    folder: Path,
    result,
    info: dict[str, Any],
    settings,
    config: dict[str, Any],
    meta: dict[str, Any],
    machine: str,
    extra: dict[str, Any] | None = None,
) -> None:
    """Print the table and notes; write ``results.md``, the plot, the per-sample logs,
    ``config.yaml`` and ``results.json`` into ``folder`` (a single run, or a merged one)."""
    print(result.table())
    for note in result.notes:
        print(f"note: {note}")
    about = (
        f"Model: {info['name']} ({info['decoder_layers']} decoder layers, {info['dtype']}, {info['weights']} weights); "
        f"{machine}; FLOPs: mean prefill FLOPs per question (docs/measurement.md); s: wall time of each "
        "configuration's generate() calls."
    )
    written = ["results.md"]
    if settings.plot:
        written += _plot(result, folder, settings.plot_metric, info)
    if settings.log_samples:
        paths = result.write_samples(folder / "samples")
        written.append(f"samples/ ({len(paths)} JSONL files, {len(result.examples)} lines each)")
    (folder / "results.md").write_text(result.markdown(about))
    write_config(folder, config)
    write_results(folder, meta, {"model": info, **result.to_dict(), **(extra or {})})
    progress_note(folder, written)


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
