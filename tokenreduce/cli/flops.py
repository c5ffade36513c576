"""``tokenreduce flops``: FLOPs (true and paper conventions) and KV cache of each plan (docs/cli.md)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from tokenreduce.cli.config import resolve_plans, setup
from tokenreduce.cli.output import out_dir, progress_note, write_outputs
from tokenreduce.core.errors import TokenReduceError
from tokenreduce.measure.latency import format_si, format_table

__all__ = ["cmd_flops"]


def cmd_flops(overrides: Sequence[str]) -> int:
    from tokenreduce.measure.configs import hf_config
    from tokenreduce.measure.flops import account, probe_rule

    ctx = setup("flops", overrides)
    plans = resolve_plans(ctx)
    fcfg, mcfg = ctx.cfg.flops, ctx.cfg.model
    try:
        config = hf_config(mcfg.model_dump())
    except ValueError as exc:
        raise TokenReduceError(str(exc)) from None
    n_visual = fcfg.n_visual or mcfg.n_visual or getattr(config, "image_seq_length", None) or 576
    n_text = fcfg.n_text or mcfg.n_text or 60
    kw = dict(
        n_visual=n_visual,
        n_text=n_text,
        kv_dtype_bytes=fcfg.kv_dtype_bytes,
        include_vision=fcfg.include_vision,
        probe_backward_factor=fcfg.probe_backward_factor,
    )
    base = account(config, None, **kw)
    results = {"vanilla": base}
    for name, plan in plans.items():
        results[name] = account(config, plan, **kw)
    rows = []
    for name, acc in results.items():
        r = acc.ratios(base)
        rows.append(
            [
                name,
                f"{acc.layer_average:.1f}",
                format_si(acc.flops_true),
                format_si(acc.flops_paper),
                format_si(acc.scorer_flops_true),
                f"{acc.kv_mib:.2f}",
                f"{r['flops_true']:.2f}",
                f"{r['flops_paper']:.2f}",
                f"{r['kv_bytes']:.2f}",
            ]
        )
    depth = base.n_layers
    print(
        f"flops: {ctx.model_name} ({depth} decoder layers), {n_visual} visual + {n_text} text tokens, prefill of one sample, "
        f"KV at {fcfg.kv_dtype_bytes} bytes/element"
    )
    print(
        format_table(
            rows,
            ["config", "layer avg", "FLOPs true", "FLOPs paper", "scorer FLOPs", "KV MiB", "x true", "x paper", "x KV"],
        )
    )
    print(
        "true: 2 per multiply-add of every matmul (decoder on text + visual, LM head at 1 position"
        + (", vision tower + projector" if fcfg.include_vision else "")
        + ", scorer work);"
    )
    print(
        "paper: sum over layers of 4nd^2 + 2n^2d + 2ndm with n = visual tokens (PIO-FVLM/FastV convention), "
        f"{probe_rule(fcfg.probe_backward_factor)}; x = vanilla / plan"
    )
    notes: dict[str, list[str]] = {}
    for name, acc in results.items():
        for item in acc.uncounted:
            key = re.sub(r"stages\.\d+\.", "stages.*.", item)
            if name not in notes.setdefault(key, []):
                notes[key].append(name)
    for item, names in notes.items():
        print(f"note ({', '.join(names)}): {item}")
    folder = out_dir(ctx)
    write_outputs(
        ctx,
        folder,
        {
            "n_visual": n_visual,
            "n_text": n_text,
            "accounting": {name: acc.to_dict() for name, acc in results.items()},
            "ratios": {name: acc.ratios(base) for name, acc in results.items()},
        },
        plans,
    )
    progress_note(folder)
    return 0
