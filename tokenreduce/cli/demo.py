"""``tokenreduce demo``: one plan on a model (by default a tiny built-in LLaVA), its per-layer visual
tokens and ``generate()`` times (docs/cli.md)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from tokenreduce.cli.config import resolve_plans, setup
from tokenreduce.cli.inputs import DEFAULT_PICTURE
from tokenreduce.core.errors import TokenReduceError
from tokenreduce.measure.latency import format_table

__all__ = ["DEMO_MODEL", "cmd_demo"]

#: the demo's own default model conf (``conf/model/<name>.yaml``), unless ``model=`` is given
DEMO_MODEL = "tiny_llava"

_DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def cmd_demo(overrides: Sequence[str]) -> int:
    import tokenreduce
    from tokenreduce.core.registry import get_registry
    from tokenreduce.models import load_model
    from tokenreduce.testing.tiny import make_image

    if not any(o.lstrip("+~").startswith("model=") for o in overrides):
        overrides = [f"model={DEMO_MODEL}", *overrides]
    ctx = setup("demo", overrides)
    if ctx.cfg.plans is not None:
        raise TokenReduceError("demo runs one plan: use plan=<preset> (plans=[...] is for bench/eval/flops/viz)")
    plan = resolve_plans(ctx)[ctx.plan_name]
    mcfg, dcfg = ctx.cfg.model, ctx.cfg.demo
    # demo.seed seeds the tiny model's weights as well as the picture
    settings = mcfg.model_copy(update={"seed": dcfg.seed}) if mcfg.kind == "tiny" else mcfg
    loaded = load_model(settings, name=ctx.model_name)
    if loaded.processor is None:
        raise TokenReduceError(
            f"demo needs a model with a processor (kind tiny or pretrained); "
            f"model {ctx.model_name!r} is kind {loaded.kind!r}"
        )
    spec = get_registry().spec_for(loaded.model.config.model_type, what="demo")
    if mcfg.image_size:
        size = (mcfg.image_size, mcfg.image_size)
    else:
        size = spec.tiny_image_size if loaded.kind == "tiny" else DEFAULT_PICTURE
    prompt = spec.tiny_prompt(dcfg.prompt)
    inputs = loaded.processor_inputs([prompt], [make_image(dcfg.seed, tuple(size))])
    model = loaded.model
    steps, repeats = dcfg.max_new_tokens, dcfg.repeats
    torch.manual_seed(dcfg.seed)

    with torch.no_grad():
        vanilla = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    with tokenreduce.apply(model, plan) as att:
        reduced = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    trace = att.trace
    t_vanilla, t_reduced = _time_pair(model, inputs, plan, steps, repeats)

    info = loaded.describe()
    n_layers = trace.n_layers
    title = f"tiny {spec.display_name or spec.name}" if loaded.kind == "tiny" else loaded.name
    print(
        f"{title} ({n_layers} decoder layers, {loaded.attn_implementation}, "
        f"{_DTYPE_SHORT.get(info['dtype'], info['dtype'])}, {info['weights']} weights) "
        f"with plan {plan.name}: {plan.description}"
    )
    print(f"prompt: {prompt!r}  ({inputs['input_ids'].shape[1]} tokens, {trace.original_visual[0]} visual)")
    per_layer = trace.visual_per_layer(0)
    stage_at = {st.layer: st for st in trace.stages}
    rows = []
    for layer, n in enumerate(per_layer):
        st = stage_at.get(layer)
        note = (
            f"stage {st.stage}: {st.visual_before[0]} -> {st.visual_after[0]} ({st.seconds * 1e3:.1f} ms)" if st else ""
        )
        rows.append([str(layer), str(n), f"{n / max(1, trace.original_visual[0]):.0%}", note])
    print(format_table(rows, ["layer", "visual tokens", "kept", "cut"]))
    print(
        f"layer average: {trace.layer_average(0):.2f} of {trace.original_visual[0]} visual tokens "
        f"(plan arithmetic: {plan.layer_average_for(trace.original_visual[0], n_layers):.2f})"
    )
    same = torch.equal(vanilla, reduced)
    print(f"generated tokens identical to vanilla: {same}")
    print(
        f"generate({steps} tokens), median of {repeats} interleaved runs: vanilla {t_vanilla * 1e3:.1f} ms, "
        f"reduced {t_reduced * 1e3:.1f} ms ({t_vanilla / t_reduced:.2f}x)"
    )
    if info["weights"] == "random":
        print("(a tiny random-weight model: the timing shows the overhead of the hooks, not real speed-ups)")
    return 0


def _time_pair(model, inputs, plan, steps: int, repeats: int) -> tuple[float, float]:
    """Median ``generate()`` time without and with the plan, runs interleaved (after one warm-up
    of each) so that machine noise hits both alike."""
    import tokenreduce

    def once() -> float:
        t0 = time.perf_counter()
        model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        return time.perf_counter() - t0

    vanilla, reduced = [], []
    for i in range(repeats + 1):
        v = once()
        with tokenreduce.apply(model, plan):
            r = once()
        if i:  # the first pair is the warm-up
            vanilla.append(v)
            reduced.append(r)
    return statistics.median(vanilla), statistics.median(reduced)
