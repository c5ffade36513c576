"""``tokenreduce viz``: a figure of the kept visual tokens, one panel per plan (docs/cli.md).

PNG (``viz.file``) plus the same drawing as PDF and SVG (``viz.formats``) in the output folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenreduce.cli.config import resolve_plans, setup
from tokenreduce.cli.inputs import picture
from tokenreduce.cli.output import out_dir, progress_note, write_outputs
from tokenreduce.core.errors import TokenReduceError

__all__ = ["cmd_viz"]


def cmd_viz(overrides: Sequence[str]) -> int:
    from tokenreduce.measure.tasks import format_prompt
    from tokenreduce.measure.viz import task_inputs, visualize

    ctx = setup("viz", overrides)
    plans = resolve_plans(ctx)
    if not plans:
        raise TokenReduceError("viz needs at least one plan (plan=<preset> or plans=[a,b,...])")
    vcfg = ctx.cfg.viz
    loaded = ctx.load()
    if loaded.processor is None:
        raise TokenReduceError(
            f"viz needs a model with a processor to show its input (kind tiny or pretrained); "
            f"model {ctx.model_name!r} is kind {loaded.kind!r}"
        )
    golds: list[str] | None = None
    if vcfg.images:
        sources: list[str] = list(vcfg.images)
        pictures = [picture(p, vcfg.image_size, vcfg.seed + i) for i, p in enumerate(vcfg.images)]
        questions = [vcfg.question] * len(pictures)
    elif vcfg.source == "task":
        pictures, questions, golds = task_inputs(ctx.cfg.task, vcfg.n_images)
        sources = [f"{ctx.cfg.task.name}:{ctx.cfg.task.split}:{i}" for i in range(vcfg.n_images)]
    else:
        pictures = [picture(None, vcfg.image_size, vcfg.seed + i) for i in range(vcfg.n_images)]
        questions = [vcfg.question] * len(pictures)
        sources = ["synthetic"] * len(pictures)
    template = ctx.template(loaded)
    prompts = [format_prompt(template, q, ctx.cfg.task.question_format) for q in questions]
    figure, record = visualize(loaded, plans, pictures, prompts, vcfg, questions=questions, golds=golds)
    folder = out_dir(ctx)
    files = [vcfg.file]
    figure.save(folder / vcfg.file)
    for fmt in vcfg.formats:
        name = f"{Path(vcfg.file).stem}.{fmt}"
        if name not in files:
            figure.save(folder / name)
            files.append(name)
    print(
        f"viz: {len(plans)} plan(s) on {len(pictures)} image(s) of {ctx.model_name}; figure {figure.size[0]}x{figure.size[1]} px"
    )
    for name, entries in record["plans"].items():
        counts = " | ".join(
            " > ".join([str(e["visual_before"])] + [f"L{s['layer']}:{s['visual_after']}" for s in e["stages"]])
            for e in entries
        )
        print(f"  {name}: {counts}")
    write_outputs(
        ctx,
        folder,
        {"model": loaded.describe(), "images": sources, "files": files, "file": vcfg.file, **record},
        plans,
    )
    progress_note(folder, files)
    return 0
