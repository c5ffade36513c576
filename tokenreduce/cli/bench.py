"""``tokenreduce bench``: latency of vanilla and each plan (docs/cli.md)."""

from __future__ import annotations

from collections.abc import Sequence

from tokenreduce.cli.config import resolve_plans, setup
from tokenreduce.cli.inputs import picture
from tokenreduce.cli.output import out_dir, progress_note, write_outputs
from tokenreduce.core.errors import TokenReduceError

__all__ = ["cmd_bench"]


def cmd_bench(overrides: Sequence[str]) -> int:
    from tokenreduce.measure.latency import TABLE_LEGEND, benchmark
    from tokenreduce.measure.tasks import format_prompt

    ctx = setup("bench", overrides)
    plans = resolve_plans(ctx)
    bcfg = ctx.cfg.bench
    loaded = ctx.load()
    synthetic = bcfg.synthetic if bcfg.synthetic is not None else loaded.processor is None
    if synthetic:
        inputs = loaded.synthetic_inputs(bcfg.batch_size, n_visual=bcfg.n_visual, n_text=bcfg.n_text, seed=bcfg.seed)
    else:
        if loaded.processor is None:
            raise TokenReduceError("bench.synthetic=false needs a model with a processor (kind tiny or pretrained)")
        prompt = format_prompt(ctx.template(loaded), bcfg.question, ctx.cfg.task.question_format)
        pictures = [picture(bcfg.image, None, bcfg.seed + i) for i in range(bcfg.batch_size)]
        inputs = loaded.processor_inputs([prompt] * bcfg.batch_size, pictures)
    result = benchmark(loaded.model, inputs, plans, bcfg)
    info = loaded.describe()
    print(
        f"bench: {info['name']} ({info['arch']}, {info['decoder_layers']} decoder layers, hidden {info['hidden_size']}, "
        f"{info['dtype']}, {info['attn_implementation']}, {info['weights']} weights) on {info['device']}"
    )
    print(
        f"inputs: batch {result.inputs['batch_size']}, {result.inputs['sequence_length']} tokens "
        f"({result.inputs['n_visual'][0]} visual, {result.inputs['n_text'][0]} text), {'synthetic' if synthetic else 'processor'}; "
        f"{bcfg.max_new_tokens} new tokens; median [min-max] of {bcfg.repeats} after {bcfg.warmup} warm-up"
    )
    print(result.table())
    print(f"peak memory: {result.memory_method}")
    print(TABLE_LEGEND)
    for note in result.notes:
        print(f"note: {note}")
    if result.compose is not None:
        print()
        print(f"composed estimate at {result.compose.n_layers} decoder layers (an estimate, not a measurement):")
        print(result.compose.table())
        for line in result.compose.describe():
            print(line)
    folder = out_dir(ctx)
    write_outputs(ctx, folder, {"model": info, **result.to_dict()}, plans)
    progress_note(folder)
    return 0
