"""The ``tokenreduce`` command.

    tokenreduce demo [key=value ...]      apply a plan to a tiny built-in LLaVA and show what it kept
    tokenreduce list                      every registered component with its origin
    tokenreduce plans [--depth 32] [--visual 576] [name ...]
                                          each plan preset's keep counts and layer average

Overrides are Hydra overrides of ``conf/config.yaml``: ``plan=random_50``,
``plan.stages.0.keep.ratio=0.25``, ``model.text_layers=4``, ``demo.max_new_tokens=4``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Sequence

import torch

from tokenreduce.core.errors import TokenReduceError

COMMANDS = ("demo", "list", "plans")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def cmd_list(_: Sequence[str]) -> int:
    from tokenreduce.core.registry import list_components

    rows = [[c["kind"], c["name"], c["origin"], c["summary"]] for c in list_components()]
    print(_table(rows, ["kind", "name", "origin", "summary"]))
    return 0


def cmd_plans(argv: Sequence[str]) -> int:
    from tokenreduce.core.presets import load_preset, preset_names

    parser = argparse.ArgumentParser(prog="tokenreduce plans", description="keep counts and layer averages of presets")
    parser.add_argument("names", nargs="*", help="presets (default: all)")
    parser.add_argument("--depth", type=int, default=32, help="decoder layers (LLaVA-1.5-7B: 32)")
    parser.add_argument("--visual", type=int, default=576, help="visual tokens entering the LLM (LLaVA-1.5: 576)")
    args = parser.parse_args(argv)
    rows = []
    for name in args.names or preset_names("plan"):
        plan = load_preset(name)
        layers = [s.layer for s in plan.stages]
        try:
            counts = plan.keep_counts(args.visual, args.depth)
            avg = f"{plan.layer_average_for(args.visual, args.depth):.3f}"
        except TokenReduceError as exc:
            counts, avg = "-", f"error: {exc}"
        rows.append([name, str(layers), str(counts), avg, f"{float(avg) / args.visual:.1%}" if avg[0].isdigit() else ""])
    print(f"depth {args.depth}, {args.visual} visual tokens (layer average = mean visual tokens per decoder layer)")
    print(_table(rows, ["preset", "layers", "keep", "layer avg", "of visual"]))
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


def cmd_demo(overrides: Sequence[str]) -> int:
    import tokenreduce
    from tokenreduce.core.plan import parse_plan
    from tokenreduce.core.presets import compose
    from tokenreduce.testing.tiny import build_tiny, make_inputs, make_processor

    cfg = compose(overrides)
    preset = next((o.split("=", 1)[1] for o in overrides if o.startswith("plan=")), "demo")
    plan = parse_plan({"name": preset, **cfg["plan"]})
    mcfg, dcfg = cfg["model"], cfg["demo"]
    if mcfg.get("kind") != "tiny":
        raise TokenReduceError(f"model.kind={mcfg.get('kind')!r}: the demo runs on the tiny built-in model only (model=tiny_llava)")
    model = build_tiny(
        mcfg["arch"],
        attn_implementation=mcfg["attn_implementation"],
        text_layers=mcfg["text_layers"],
        image_size=mcfg["image_size"],
        patch=mcfg["patch"],
        seed=dcfg["seed"],
    )
    processor = make_processor(mcfg["arch"], image_size=mcfg["image_size"], patch=mcfg["patch"])
    inputs = make_inputs(mcfg["arch"], [dcfg["prompt"]], image_sizes=[(mcfg["image_size"], mcfg["image_size"])],
                         seed=dcfg["seed"], processor=processor)
    steps, repeats = int(dcfg["max_new_tokens"]), int(dcfg["repeats"])
    torch.manual_seed(dcfg["seed"])

    with torch.inference_mode():
        vanilla = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    with tokenreduce.apply(model, plan) as att:
        reduced = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    trace = att.trace
    t_vanilla, t_reduced = _time_pair(model, inputs, plan, steps, repeats)

    n_layers = trace.n_layers
    print(f"tiny LLaVA ({n_layers} decoder layers, {mcfg['attn_implementation']}, fp32, random weights) "
          f"with plan {plan.name}: {plan.description}")
    print(f"prompt: {dcfg['prompt']!r}  ({inputs['input_ids'].shape[1]} tokens, {trace.original_visual[0]} visual)")
    per_layer = trace.visual_per_layer(0)
    stage_at = {st.layer: st for st in trace.stages}
    rows = []
    for layer, n in enumerate(per_layer):
        st = stage_at.get(layer)
        note = f"stage {st.stage}: {st.visual_before[0]} -> {st.visual_after[0]} ({st.seconds * 1e3:.1f} ms)" if st else ""
        rows.append([str(layer), str(n), f"{n / max(1, trace.original_visual[0]):.0%}", note])
    print(_table(rows, ["layer", "visual tokens", "kept", "cut"]))
    print(f"layer average: {trace.layer_average(0):.2f} of {trace.original_visual[0]} visual tokens "
          f"(plan arithmetic: {plan.layer_average_for(trace.original_visual[0], n_layers):.2f})")
    same = torch.equal(vanilla, reduced)
    print(f"generated tokens identical to vanilla: {same}")
    print(f"generate({steps} tokens), median of {repeats} interleaved runs: vanilla {t_vanilla * 1e3:.1f} ms, "
          f"reduced {t_reduced * 1e3:.1f} ms ({t_vanilla / t_reduced:.2f}x)")
    print("(a tiny random-weight model: the timing shows the overhead of the hooks, not real speed-ups)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"tokenreduce: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return {"demo": cmd_demo, "list": cmd_list, "plans": cmd_plans}[command](rest)
    except TokenReduceError as exc:
        print(f"tokenreduce {command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
