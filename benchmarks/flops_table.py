"""FLOPs and KV cache of the paper's vanilla settings and of the plan presets, in both conventions.

Prints (markdown):

1. the vanilla anchors of PIO-FVLM's efficiency table (arXiv 2602.04657; docs/pio-fvlm.md,
   "Efficiency accounting" and "Reported results"): LLaVA-1.5-7B in the paper's convention for 576 visual tokens, true FLOPs of the
   636-token LLM prefill, LLaVA-NeXT-7B in the paper's convention for 2880 visual tokens, the
   fp16 KV cache of 636 tokens;
2. a cross-check of the true FLOPs against ``torch.utils.flop_counter.FlopCounterMode`` on the
   ``meta`` device (vanilla prefill of each real config);
3. for each model and each preset (``pio_64/128/192``, ``fastv_64/128/192``): layer average,
   FLOPs in both conventions, KV cache, and vanilla / preset ratios.  The paper column follows the
   paper's rule (a PIO probe's forward only); a second paper column charges the probe backward as
   ``PROFILER_GAMMA`` forwards, as the official profiler's ``backward_gamma`` does.

Everything comes from :func:`tokenreduce.measure.flops.account` on the configs in
``conf/model`` (no weights).  No assertions.

Usage::

    PYTHONPATH=. python benchmarks/flops_table.py [--models llava_1_5_7b llava_next_7b qwen2_5_vl_7b]
                                                  [--presets pio_64 ...] [--no-check]
"""

from __future__ import annotations

import argparse

from tokenreduce.measure.configs import model_config, real_config
from tokenreduce.measure.flops import account, count_with_flop_counter

PRESETS = ["pio_64", "pio_128", "pio_192", "fastv_64", "fastv_128", "fastv_192"]
MODELS = ["llava_1_5_7b", "llava_next_7b", "qwen2_5_vl_7b"]
T = 1e12
PROFILER_GAMMA = 2.0  # the official profiler's backward_gamma (docs/measurement.md)


def vanilla_anchors() -> list[str]:
    llava = account("llava_1_5_7b")
    nxt = account("llava_next_7b")
    return [
        "| figure | ours | paper |",
        "|---|---|---|",
        f"| LLaVA-1.5-7B, paper convention, 576 visual tokens (TFLOPs) | {llava.flops_paper / T:.3f} | 2.98 |",
        f"| LLaVA-1.5-7B, true FLOPs, 636-token LLM prefill, 32 layers (TFLOPs) | {llava.llm_flops_true / T:.3f} | - (8.45 with `FlopCounterMode`, below) |",
        f"| LLaVA-1.5-7B, true FLOPs, whole prefill: + LM head (1 position) + CLIP + projector (TFLOPs) | {llava.flops_true / T:.3f} | - |",
        f"| LLaVA-NeXT-7B, paper convention, 2880 visual tokens (TFLOPs) | {nxt.flops_paper / T:.3f} | 16.67 |",
        f"| LLaVA-1.5-7B KV cache, 636 tokens, fp16, 32 layers (MiB) | {llava.kv_mib:.1f} | 318 |",
    ]


def cross_check(models: list[str]) -> list[str]:
    lines = [
        "| model | part | account() | FlopCounterMode (meta) | rel. diff |",
        "|---|---|---|---|---|",
    ]
    for name in models:
        acc = account(name)
        counted = count_with_flop_counter(real_config(name), acc.per_layer_tokens, n_visual=acc.n_visual)
        ours = {
            "decoder_layers": acc.llm_flops_true,
            "lm_head": acc.lm_head_flops_true,
            "vision_tower": acc.vision_flops_true,
            "projector": acc.projector_flops_true,
        }
        for part, value in ours.items():
            diff = abs(value - counted[part]) / max(counted[part], 1)
            lines.append(f"| {name} | {part} | {value:.6g} | {counted[part]:.6g} | {diff:.1e} |")
    return lines


def preset_table(name: str, presets: list[str]) -> list[str]:
    spec = model_config(name)
    vanilla = account(name)
    lines = [
        f"**{spec.get('name', name)}**: {vanilla.n_visual} visual + {vanilla.n_text} text tokens, "
        f"{vanilla.n_layers} layers; KV fp16"
        + (
            ""
            if vanilla.n_visual == 576
            else " (the presets are LLaVA-1.5 schedules with absolute keep counts, so their layer averages differ here)"
        ),
        "",
        f"| plan | layer avg | paper TFLOPs (ratio) | paper, probe bwd {PROFILER_GAMMA:g}x fwd | true TFLOPs (ratio) | "
        "true, scorer+selector part | KV MiB (ratio) |",
        "|---|---|---|---|---|---|---|",
        f"| vanilla | {vanilla.layer_average:.1f} | {vanilla.flops_paper / T:.3f} | {vanilla.flops_paper / T:.3f} | "
        f"{vanilla.flops_true / T:.3f} | 0 | {vanilla.kv_mib:.1f} |",
    ]
    for preset in presets:
        acc = account(name, preset)
        gamma = account(name, preset, probe_backward_factor=PROFILER_GAMMA)
        r = acc.ratios(vanilla)
        own = (acc.scorer_flops_true + acc.selector_flops_true) / T
        lines.append(
            f"| {preset} | {acc.layer_average:.1f} | {acc.flops_paper / T:.3f} ({r['flops_paper']:.2f}x) | "
            f"{gamma.flops_paper / T:.3f} ({vanilla.flops_paper / gamma.flops_paper:.2f}x) | "
            f"{acc.flops_true / T:.3f} ({r['flops_true']:.2f}x) | {own:.3f} | {acc.kv_mib:.1f} ({r['kv_bytes']:.2f}x) |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("--no-check", action="store_true", help="skip the FlopCounterMode cross-check")
    args = parser.parse_args()
    out = ["## Vanilla anchors (PIO-FVLM README, POPE)", "", *vanilla_anchors(), ""]
    if not args.no_check:
        out += [
            "## Cross-check: FlopCounterMode on the meta device (vanilla prefill)",
            "",
            *cross_check(args.models),
            "",
        ]
    out += ["## Presets", ""]
    for name in args.models:
        out += [*preset_table(name, args.presets), ""]
    print("\n".join(out))


if __name__ == "__main__":
    main()
