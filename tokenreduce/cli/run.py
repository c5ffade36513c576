"""``tokenreduce run``: answer one question about an image with ``plan`` and without it (docs/cli.md)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from tokenreduce.cli.config import resolve_plans, setup
from tokenreduce.cli.inputs import picture
from tokenreduce.cli.output import out_dir, progress_note, trace_dict, trace_rows, write_outputs
from tokenreduce.core.errors import TokenReduceError
from tokenreduce.measure.latency import format_si, format_table

__all__ = ["cmd_run"]

log = logging.getLogger("tokenreduce")


def cmd_run(overrides: Sequence[str]) -> int:
    import tokenreduce
    from tokenreduce.measure.tasks import format_prompt

    ctx = setup("run", overrides)
    if ctx.cfg.plans is not None:
        raise TokenReduceError("run uses one plan: use plan=<preset> (plans=[...] is for bench/eval/flops/viz)")
    plan = resolve_plans(ctx)[ctx.plan_name]
    rcfg = ctx.cfg.run
    loaded = ctx.load()
    adapter, compiled = tokenreduce.compile_for(loaded.model, plan)
    if loaded.processor is not None:
        prompt = rcfg.prompt or format_prompt(ctx.template(loaded), rcfg.question, ctx.cfg.task.question_format)
        inputs = loaded.processor_inputs([prompt], [picture(rcfg.image, rcfg.image_size, rcfg.seed)])
        decode = lambda ids: loaded.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    else:
        prompt = "(synthetic inputs: random pixels and token ids; kind config has no processor)"
        inputs = loaded.synthetic_inputs(1, seed=rcfg.seed)
        decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    kw = dict(max_new_tokens=rcfg.max_new_tokens, do_sample=False)
    n_prompt = inputs["input_ids"].shape[1]
    answers: dict[str, Any] = {}
    if rcfg.vanilla:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = loaded.model.generate(**inputs, **kw)
        answers["vanilla"] = {
            "answer": decode(out[0, n_prompt:].tolist()),
            "tokens": out[0, n_prompt:].tolist(),
            "seconds": time.perf_counter() - t0,
        }
    t0 = time.perf_counter()
    with adapter.attach(loaded.model, compiled) as att, torch.no_grad():
        out = loaded.model.generate(**inputs, **kw)
    answers[plan.name] = {
        "answer": decode(out[0, n_prompt:].tolist()),
        "tokens": out[0, n_prompt:].tolist(),
        "seconds": time.perf_counter() - t0,
    }
    trace = att.trace
    acc = _account(loaded, compiled.plan, trace)

    info = loaded.describe()
    print(
        f"model {info['name']} ({info['arch']}, {info['decoder_layers']} decoder layers, {info['dtype']}, "
        f"{info['attn_implementation']}, {info['weights']} weights) with plan {plan.name}: {plan.description}"
    )
    print(f"prompt: {prompt!r}  ({n_prompt} tokens, {trace.original_visual[0]} visual)")
    for name, a in answers.items():
        print(f"{name:>12}: {a['answer']!r}  ({a['seconds'] * 1e3:.0f} ms)")
    per_layer = trace.visual_per_layer(0)
    print(format_table([[str(i), str(n)] for i, n in enumerate(per_layer)], ["layer", "visual tokens"]))
    print(f"layer average: {trace.layer_average(0):.2f} of {trace.original_visual[0]} visual tokens")
    if trace.stages:
        print("trace (kept = original sequence positions of the kept visual tokens):")
        print(format_table(trace_rows(trace), ["stage", "layer", "tokens", "visual", "ms", "kept"]))
    for st in trace.stages:
        if st.clamped:
            print(
                f"note: stage {st.stage} asked for {st.requested[0]} visual tokens and kept {st.visual_after[0]} "
                "(clamped to 1..the visual tokens entering the stage; docs/concepts.md)"
            )
    if acc is not None:
        print(
            f"prefill FLOPs: {format_si(acc['flops_true'])} true, {format_si(acc['flops_paper'])} paper convention; "
            f"KV cache {acc['kv_mib']:.2f} MiB"
        )
    folder = out_dir(ctx)
    write_outputs(
        ctx,
        folder,
        {"model": info, "prompt": prompt, "answers": answers, "trace": trace_dict(trace), "accounting": acc},
        {plan.name: plan},
    )
    progress_note(folder)
    return 0


def _account(loaded, plan, trace) -> dict[str, Any] | None:
    try:
        from tokenreduce.measure.flops import account

        return account(loaded.model.config, plan=plan, trace=trace, kv_dtype_bytes=loaded.dtype.itemsize).to_dict()
    except Exception as exc:  # noqa: BLE001 - the answer stands without FLOPs
        log.warning("FLOP accounting failed: %s: %s", type(exc).__name__, exc)
        return None
