"""``tokenreduce plans``: each plan preset's keep counts and layer average (docs/cli.md)."""

from __future__ import annotations

from collections.abc import Sequence

from tokenreduce.core.errors import TokenReduceError
from tokenreduce.measure.latency import format_table

__all__ = ["cmd_plans"]


def cmd_plans(argv: Sequence[str]) -> int:
    import argparse

    from tokenreduce.cli.config import load_plan_file
    from tokenreduce.core.conf import did_you_mean, file_option
    from tokenreduce.core.presets import load_preset, preset_names

    parser = argparse.ArgumentParser(prog="tokenreduce plans", description="keep counts and layer averages of presets")
    parser.add_argument(
        "names", nargs="*", help="plan presets or plan files (path/to/my_plan.yaml); default: all presets"
    )
    parser.add_argument(
        "--depth", type=_positive("decoder layers"), default=32, help="decoder layers, >= 1 (LLaVA-1.5-7B: 32)"
    )
    parser.add_argument(
        "--visual",
        type=_positive("visual tokens"),
        default=576,
        help="visual tokens entering the LLM, >= 1 (LLaVA-1.5: 576)",
    )
    args = parser.parse_args(argv)
    known = preset_names("plan")
    rows = []
    for i, name in enumerate(args.names or known):
        if file_option(name) is not None:
            plan = load_plan_file(name, f"names.{i}={name!r}")
        elif name in known:
            plan = load_preset(name)
        else:
            suggestion = did_you_mean(name, known)
            raise TokenReduceError(
                f"unknown plan preset {name!r}{f' ({suggestion})' if suggestion else ''}; known presets: "
                f"{', '.join(known)} (or a plan file path ending in .yaml)"
            )
        layers = [s.layer for s in plan.stages]
        try:
            counts = plan.keep_counts(args.visual, args.depth)
            avg = f"{plan.layer_average_for(args.visual, args.depth):.3f}"
        except TokenReduceError as exc:
            counts, avg = "-", f"error: {exc}"
        rows.append(
            [name, str(layers), str(counts), avg, f"{float(avg) / args.visual:.1%}" if avg[0].isdigit() else ""]
        )
    print(f"depth {args.depth}, {args.visual} visual tokens (layer average = mean visual tokens per decoder layer)")
    print(format_table(rows, ["preset", "layers", "keep", "layer avg", "of visual"]))
    return 0


def _positive(what: str):
    """An argparse ``type``: an integer >= 1 (argparse names the option in its usage error)."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= 1 ({what}); got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be an integer >= 1 ({what}); got {value}")
        return value

    return parse
