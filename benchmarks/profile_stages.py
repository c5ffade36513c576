"""Per-op profile of one PIO stage and one FastV stage of the cut engine, in layer-equivalents.

Builds LLaVA-1.5-7B's language model with random weights at its real width (``conf/model/
llava_1_5_7b.yaml``, ``model.kind=config``: d = 4096, intermediate 11008, 32 heads, vocab 32064)
cut down to ``--layers`` decoder layers (default 3), fp32, sdpa, on the CPU.  The vision tower is
built with one layer and never runs: the prompt is ``[bos] + 5 text + N image tokens + the rest
of the text`` and a forward hook on the token embedding writes random features at the image
positions, so ``N`` can be any count (576, 92 or 54 for 636, 152 or 114 tokens with 60 text
tokens: the lengths ``pio_64`` cuts at, arXiv 2602.04657's LLaVA-1.5 schedule).

For each length, interleaved in one process:

* ``plain``: one decoder layer's own forward on a sequence of that length (no grad, no mask,
  sdpa's causal path), what the model pays per layer: the unit of "layer-equivalents";
* ``pio``: a prefill through ``tokenreduce.apply`` with one stage at layer 1 (``pio`` scorer with
  the ``pio_64`` preset's settings, ``nms`` selector, keep 92 / 54 / 22);
* ``fastv``: one stage at layer 2 (``fastv`` scorer, ``topk``, keep 30).

The prefill runs with a KV cache, as ``generate()``'s does.  The stage is timed around the engine's
own cut (score + select + gather + bookkeeping), and the forward stops right after it (the layers
after the cut are not part of the stage).  One more
prefill per configuration runs the stage under ``torch.profiler`` and prints the ops with the
most self CPU time and their share of the stage, then the matrix products by input shape.
Prints numbers only; no assertions.

Usage::

    PYTHONPATH=. python benchmarks/profile_stages.py [--threads 2] [--repeats 3] [--lengths 636,152,114]
    PYTHONPATH=. python benchmarks/profile_stages.py --quick   # tiny width, seconds (used by a test)
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

import tokenreduce
from tokenreduce.core.strategy import Scorer, Selector
from tokenreduce.models import load_model

ROOT = Path(__file__).resolve().parents[1]
N_TEXT = 60
#: keep counts of the pio_64 preset's three stages, by the visual count entering the stage
PIO_KEEP = {576: 92, 92: 54, 54: 22}


class _StageDone(Exception):
    """Raised after the timed cut: the layers after it are not part of the stage."""


def build_model(args):
    """The random-weight model: LLaVA-1.5 width from the project's model conf (or tiny with --quick)."""
    if args.quick:
        from tokenreduce.testing.tiny import build_tiny

        return build_tiny("llava", text_layers=args.layers)
    conf = yaml.safe_load((ROOT / "conf" / "model" / "llava_1_5_7b.yaml").read_text())
    conf.update(kind="config", text_layers=args.layers, dtype="float32", attn_implementation="sdpa", device="cpu")
    conf["hf_config"]["vision_config"]["num_hidden_layers"] = 1  # never runs here
    return load_model(conf).model


def make_inputs(model, n_visual: int, seed: int = 0):
    """``input_ids`` ``[1, S]`` (bos, 5 text, ``n_visual`` image tokens, the rest text) and the
    random features the embedding hook writes at the image positions."""
    g = torch.Generator().manual_seed(seed)
    text_cfg = model.config.text_config
    image = int(model.config.image_token_index)
    low, high = 3, min(image, text_cfg.vocab_size, 1000)
    text = torch.randint(low, high, (N_TEXT - 1,), generator=g)
    bos = torch.tensor([text_cfg.bos_token_id if text_cfg.bos_token_id is not None else 1])
    ids = torch.cat([bos, text[:5], torch.full((n_visual,), image), text[5:]]).unsqueeze(0)
    std = float(model.get_input_embeddings().weight.detach().std())
    feats = torch.randn(n_visual, text_cfg.hidden_size, generator=g) * std
    return ids, feats


@contextmanager
def visual_features(model, ids: torch.Tensor, feats: torch.Tensor):
    """Write ``feats`` at the image positions of the embedding output while in the block."""
    where = ids == model.config.image_token_index

    def hook(module, args, out):
        out = out.clone()
        out[where] = feats.to(out.dtype)
        return out

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def phase_timers(phases: dict[str, float]):
    """Add the time spent in every scorer's ``score`` and selector's ``select`` to ``phases``."""
    patched = []

    def wrap(cls, name, key):
        original = cls.__dict__[name]

        def timed(self, *a, **kw):
            t0 = time.perf_counter()
            try:
                return original(self, *a, **kw)
            finally:
                phases[key] = phases.get(key, 0.0) + time.perf_counter() - t0

        setattr(cls, name, timed)
        patched.append((cls, name, original))

    def subclasses(base):
        out, todo = [], [base]
        while todo:
            for sub in todo.pop().__subclasses__():
                out.append(sub)
                todo.append(sub)
        return out

    for cls in subclasses(Scorer):
        if "score" in cls.__dict__:
            wrap(cls, "score", "score")
    for cls in subclasses(Selector):
        if "select" in cls.__dict__:
            wrap(cls, "select", "select")
    try:
        yield
    finally:
        for cls, name, original in reversed(patched):
            setattr(cls, name, original)


def run_stage(model, plan: dict, ids: torch.Tensor, feats: torch.Tensor, profile: bool = False):
    """One prefill up to and including the stage's cut: (stage seconds, phases, profiler or None)."""
    result: dict = {}
    phases: dict[str, float] = {}
    with tokenreduce.apply(model, plan) as att:
        cut = att._cut

        def timed_cut(*a, **kw):
            prof = None
            with phase_timers(phases):
                if profile:
                    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
                    prof.__enter__()
                t0 = time.perf_counter()
                try:
                    cut(*a, **kw)
                finally:
                    result["seconds"] = time.perf_counter() - t0
                    if prof is not None:
                        prof.__exit__(None, None, None)
                        result["prof"] = prof
            raise _StageDone

        att._cut = timed_cut  # the instance attribute shadows the method for this attachment only
        with visual_features(model, ids, feats), torch.no_grad():
            try:
                # with a KV cache, as generate()'s prefill runs (stages may read what earlier layers cached)
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
            except _StageDone:
                pass
    return result["seconds"], phases, result.get("prof")


def plain_layer(model, s: int, seed: int = 1):
    """A callable running decoder layer 1's own forward on ``s`` random hidden states."""
    lm = model.model.language_model
    layer = lm.layers[1]
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, s, lm.config.hidden_size, generator=g)
    pos = torch.arange(s).unsqueeze(0)
    with torch.no_grad():
        cos_sin = lm.rotary_emb(hidden, pos)

    def call():
        with torch.no_grad():
            return layer.forward(hidden, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)

    return call


def op_table(prof, stage_s: float, top: int) -> list[str]:
    """Markdown rows: the ``top`` ops by self CPU time and their share of the profiled stage."""
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    lines = ["| op | self ms | share | calls |", "|---|---|---|---|"]
    for e in events[:top]:
        ms = e.self_cpu_time_total / 1e3
        lines.append(f"| {e.key} | {ms:.2f} | {100 * ms / 1e3 / total:.1f}% | {e.count} |")
    rest = sum(e.self_cpu_time_total for e in events[top:]) / 1e3
    lines.append(f"| (other {max(0, len(events) - top)} ops) | {rest:.1f} | {100 * rest / 1e3 / total:.1f}% | |")
    lines.append(f"| total self CPU (profiled stage: {stage_s * 1e3:.1f} ms wall) | {total * 1e3:.1f} | 100% | |")
    return lines


def gemm_table(prof, top: int) -> list[str]:
    """Markdown rows: the matrix products (``aten::mm``/``addmm``/``bmm``) by input shapes."""
    names = ("aten::mm", "aten::addmm", "aten::bmm")
    events = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in names]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in prof.key_averages() if e.self_cpu_time_total > 0)
    lines = ["| product | input shapes | self ms | share of stage | calls |", "|---|---|---|---|---|"]
    for e in events[:top]:
        shapes = " x ".join(str(list(x)) for x in e.input_shapes if x)
        share = 100 * e.self_cpu_time_total / total
        lines.append(f"| {e.key} | {shapes} | {e.self_cpu_time_total / 1e3:.2f} | {share:.1f}% | {e.count} |")
    return lines


def plans(n_visual: int) -> dict[str, dict]:
    keep_pio = PIO_KEEP.get(n_visual, max(1, n_visual // 6))
    return {
        "pio": {
            "positions": "renumber",
            "stages": [
                {
                    "layer": 1,
                    "keep": keep_pio,
                    "scorer": {"name": "pio", "loss_positions": 4, "layer_offset": 0},
                    "selector": "nms",
                }
            ],
        },
        "fastv": {
            "positions": "keep",
            "stages": [{"layer": 2, "keep": min(30, n_visual - 1), "scorer": "fastv", "selector": "topk"}],
        },
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (intra-op)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per configuration (median)")
    ap.add_argument("--lengths", default="636,152,114", help="total tokens (visual = length - 60 text)")
    ap.add_argument("--layers", type=int, default=3, help="decoder layers built (>= 3: FastV cuts at layer 2)")
    ap.add_argument("--top", type=int, default=12, help="ops per profile table")
    ap.add_argument("--methods", default="pio,fastv", help="stages to profile (pio, fastv)")
    ap.add_argument("--no-profile", action="store_true", help="timings only, no per-op tables")
    ap.add_argument("--quick", action="store_true", help="tiny width (d=64), one repeat: a smoke run")
    args = ap.parse_args(argv)
    if args.layers < 3:
        ap.error(f"--layers must be >= 3 (the FastV stage cuts at layer 2); got {args.layers}")
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    bad = [n for n in lengths if n <= N_TEXT + 1]
    if bad:
        ap.error(f"--lengths must each exceed {N_TEXT + 1} (60 text tokens plus at least 2 visual); got {bad}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - {"pio", "fastv"})
    if unknown:
        ap.error(f"--methods: unknown {unknown}; allowed: pio, fastv")
    if args.quick:
        args.repeats = 1
    torch.set_num_threads(args.threads)
    model = build_model(args)
    d = model.config.text_config.hidden_size
    print(
        f"d={d} layers={args.layers} fp32 sdpa cpu threads={args.threads} repeats={args.repeats} (median), "
        f"60 text tokens"
    )
    cases = []
    for s in lengths:
        ids, feats = make_inputs(model, s - N_TEXT)
        cases.append((s, ids, feats, plain_layer(model, s), plans(s - N_TEXT)))
    times: dict[tuple[int, str], list[float]] = {}
    phases: dict[tuple[int, str], list[dict]] = {}
    for rep in range(args.repeats + 1):  # round 0 warms up; configurations interleaved
        for s, ids, feats, plain, stage_plans in cases:
            t0 = time.perf_counter()
            plain()
            t_plain = time.perf_counter() - t0
            if rep:
                times.setdefault((s, "plain"), []).append(t_plain)
            for name in methods:
                sec, ph = run_stage(model, stage_plans[name], ids, feats)[:2]
                if rep:
                    times.setdefault((s, name), []).append(sec)
                    phases.setdefault((s, name), []).append(ph)
    print()
    print("| tokens | plain layer ms | stage | stage ms | layer-eq | score ms | select ms | engine ms |")
    print("|---|---|---|---|---|---|---|---|")
    for s, *_ in cases:
        t_plain = statistics.median(times[(s, "plain")])
        for name in methods:
            t = statistics.median(times[(s, name)])
            score = statistics.median(p.get("score", 0.0) for p in phases[(s, name)])
            select = statistics.median(p.get("select", 0.0) for p in phases[(s, name)])
            # the engine's own part (candidates, gather, bookkeeping), per repeat, then the median
            rest = [
                sec - p.get("score", 0.0) - p.get("select", 0.0) for sec, p in zip(times[(s, name)], phases[(s, name)])
            ]
            engine = statistics.median(rest)
            print(
                f"| {s} | {t_plain * 1e3:.1f} | {name} | {t * 1e3:.1f} | {t / t_plain:.2f} | "
                f"{score * 1e3:.1f} | {select * 1e3:.1f} | {engine * 1e3:.1f} |"
            )
    if args.no_profile:
        return
    for s, ids, feats, _, stage_plans in cases:
        for name in methods:
            sec, _, prof = run_stage(model, stage_plans[name], ids, feats, profile=True)
            print(f"\n{name} stage at {s} tokens: top {args.top} ops by self CPU time")
            print("\n".join(op_table(prof, sec, args.top)))
            print(f"\n{name} stage at {s} tokens: matrix products by shape")
            print("\n".join(gemm_table(prof, args.top)))


if __name__ == "__main__":
    main()
