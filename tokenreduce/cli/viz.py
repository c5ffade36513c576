"""``tokenreduce viz``: a PNG of the kept visual tokens, one panel per plan (docs/cli.md)."""

from __future__ import annotations

from collections.abc import Sequence

from tokenreduce.cli.config import resolve_plans, setup
from tokenreduce.cli.inputs import picture
from tokenreduce.cli.output import out_dir, progress_note, write_outputs
from tokenreduce.core.errors import TokenReduceError

__all__ = ["cmd_viz"]


def cmd_viz(overrides: Sequence[str]) -> int:
    from tokenreduce.measure.tasks import format_prompt
    from tokenreduce.measure.viz import visualize

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
    paths = vcfg.images or [None]
    pictures = [picture(p, vcfg.image_size, vcfg.seed + i) for i, p in enumerate(paths)]
    prompt = format_prompt(ctx.template(loaded), vcfg.question, ctx.cfg.task.question_format)
    figure, record = visualize(loaded, plans, pictures, [prompt] * len(pictures), vcfg)
    folder = out_dir(ctx)
    figure.save(folder / vcfg.file)
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
        {"model": loaded.describe(), "images": [p or "synthetic" for p in paths], "file": vcfg.file, **record},
        plans,
    )
    progress_note(folder, [vcfg.file])
    return 0
