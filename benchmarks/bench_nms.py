"""Benchmark of the ``nms`` selector (blockwise greedy) against a full-matrix implementation.

Usage::

    PYTHONPATH=. python benchmarks/bench_nms.py [--threads 2] [--repeats 7] [--device cpu]

For each case it prints the median and minimum wall time (after warm-up) of ``NMSSelector.select`` and of a
full-matrix greedy NMS (normalise all N rows, ``X Xᵀ >= τ`` as one N x N boolean matrix, greedy
loop plus fill-up on the host: what the official code does), the speed-up, and how many
candidates the greedy pass examined / accepted.  Both must select the same tokens; the script
exits with status 1 on a mismatch (there are no timing assertions).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from tokenreduce.core.types import Need, TokenView
from tokenreduce.strategies.nms import NMSSelector

TAU = 0.8


class _NoSignals:
    provides = Need.HIDDEN


def make_view(vis: torch.Tensor, ns: list[int], prefix: int = 35, suffix: int = 40) -> TokenView:
    """``vis``: ``[B, N, d]`` visual rows; sample ``b`` uses its first ``ns[b]`` rows."""
    B, N, d = vis.shape
    S = prefix + N + suffix
    hidden = torch.zeros(B, S, d, dtype=vis.dtype, device=vis.device)
    hidden[:, prefix : prefix + N] = vis
    valid = torch.zeros(B, S, dtype=torch.bool, device=vis.device)
    visual_index = torch.zeros(B, N, dtype=torch.long, device=vis.device)
    visual_valid = torch.zeros(B, N, dtype=torch.bool, device=vis.device)
    for b, n in enumerate(ns):
        valid[b, : prefix + n + suffix] = True
        visual_index[b, :n] = torch.arange(prefix, prefix + n)
        visual_valid[b, :n] = True
    return TokenView(
        layer=2,
        stage=0,
        hidden=hidden,
        valid=valid,
        visual_index=visual_index,
        visual_valid=visual_valid,
        original_index=torch.where(visual_valid, visual_index, -1),
        n_original_visual=torch.tensor(ns),
        signals=_NoSignals(),
    )


def full_matrix_nms(view: TokenView, scores: torch.Tensor, keep: torch.Tensor, tau: float = TAU):
    """Reference: full N x N similarity per sample, greedy + fill-up on the host (numpy)."""
    out, stats = [], []
    for b, (n, k) in enumerate(zip(view.n_visual.tolist(), keep.tolist())):
        x = F.normalize(view.hidden[b, view.visual_index[b, :n]].float(), dim=-1)
        hit = (x @ x.T >= torch.tensor(tau, dtype=torch.float32)).cpu().numpy()
        s = torch.nan_to_num(scores[b, :n].float(), nan=float("-inf"))
        order = torch.sort(s, descending=True, stable=True).indices.cpu().tolist()
        chosen, supp, examined = [], np.zeros(n, dtype=bool), 0
        for i in order:
            if len(chosen) == k:
                break
            examined += 1
            if supp[i]:
                continue
            chosen.append(i)
            supp |= hit[i]
        accepted = len(chosen)
        taken = set(chosen)
        for i in order:
            if len(chosen) == k:
                break
            if i not in taken:
                chosen.append(i)
        out.append(sorted(chosen))
        stats.append((examined, accepted))
    return out, stats


def ambiguous(view: TokenView, tau: float = TAU) -> bool:
    """True if some pair's cosine lies within float32 rounding of τ (block vs full products may
    then decide it differently)."""
    for b, n in enumerate(view.n_visual.tolist()):
        x = F.normalize(view.hidden[b, view.visual_index[b, :n]].float(), dim=-1)
        if bool(((x @ x.T - tau).abs() < 1e-5).any()):
            return True
    return False


def features(kind: str, B: int, N: int, d: int, g: torch.Generator) -> torch.Tensor:
    """``[B, N, d]`` synthetic hidden states.

    diverse: isotropic Gaussian (pairwise cosine ~ 0, NMS accepts the top k).
    clustered-<c>: c centres per sample, tokens = centre + 0.4 noise (cosine ~0.86 within a
        centre, so one token per centre is accepted; with c < k the pass walks all N and fills up).
    near-dup: all tokens = one direction + 1e-3 noise (one accepted, the rest by fill-up).
    """
    if kind == "diverse":
        return torch.randn(B, N, d, generator=g)
    if kind.startswith("clustered-"):
        c = int(kind.split("-")[1])
        centres = torch.randn(B, c, d, generator=g)
        assign = torch.randint(0, c, (B, N), generator=g)
        rows = centres.gather(1, assign.unsqueeze(-1).expand(-1, -1, d))
        return rows + 0.4 * torch.randn(B, N, d, generator=g)
    if kind == "near-dup":
        return torch.randn(B, 1, d, generator=g) + 1e-3 * torch.randn(B, N, d, generator=g)
    raise ValueError(kind)


def timings(fn, repeats: int, warmup: int = 2, sync=lambda: None) -> tuple[float, float]:
    """(median, min) wall time in seconds over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    d = 4096
    cases = [  # (name, B, N, k, kind)
        ("N=2880 k=320 diverse", 1, 2880, 320, "diverse"),
        ("N=2880 k=320 clustered-400", 1, 2880, 320, "clustered-400"),
        ("N=2880 k=320 clustered-100 (fill-up)", 1, 2880, 320, "clustered-100"),
        ("N=2880 k=320 clustered-300 (fill-up)", 1, 2880, 320, "clustered-300"),
        ("N=2880 k=320 near-dup (fill-up)", 1, 2880, 320, "near-dup"),
        ("N=576 k=64 diverse", 1, 576, 64, "diverse"),
        ("N=576 k=64 clustered-100", 1, 576, 64, "clustered-100"),
        ("N=576 k=192 diverse", 1, 576, 192, "diverse"),
        ("N=576 k=192 clustered-300", 1, 576, 192, "clustered-300"),
        ("N=576 k=192 near-dup (fill-up)", 1, 576, 192, "near-dup"),
        ("B=4 ragged N<=576 k=64..192 clustered-200", 4, 576, None, "clustered-200"),
    ]
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"hidden {args.dtype}, d={d}, tau={TAU}, {args.repeats} repeats after warm-up; "
        "ms; speed-up = ratio of medians"
    )
    head = (
        f"{'case':42s} {'nms med':>8s} {'nms min':>8s} {'full med':>8s} {'full min':>8s} {'speed-up':>8s}"
        "  examined/accepted"
    )
    print(head)
    print("-" * len(head))
    selector = NMSSelector(NMSSelector.Settings(threshold=TAU))
    failed = False
    g = torch.Generator().manual_seed(0)
    for name, B, N, k, kind in cases:
        vis = features(kind, B, N, d, g).to(dtype).to(device)
        if B == 1:
            ns, keep = [N], torch.tensor([k])
        else:
            ns, keep = [576, 400, 576, 150][:B], torch.tensor([192, 100, 64, 150][:B])
        view = make_view(vis, ns)
        scores = torch.rand(B, N, generator=g).to(device)
        keep = keep.to(device)

        got = selector.select(view, scores, keep).to_lists()
        ref, stats = full_matrix_nms(view, scores, keep)
        status = ""
        if got != ref:
            if ambiguous(view):
                status = "  (differs: a pair within float32 rounding of tau)"
            else:
                status = "  MISMATCH"
                failed = True

        def fresh_select(view=view, scores=scores, keep=keep):  # no cached visual_hidden: gathers its own rows
            view.cache.clear()
            return selector.select(view, scores, keep)

        t_nms, t_nms_min = timings(fresh_select, args.repeats, sync=sync)
        t_full, t_full_min = timings(
            lambda view=view, scores=scores, keep=keep: full_matrix_nms(view, scores, keep),
            max(3, args.repeats // 2),
            sync=sync,
        )
        ea = ", ".join(f"{e}/{a}" for e, a in stats)
        print(
            f"{name:42s} {t_nms * 1e3:8.2f} {t_nms_min * 1e3:8.2f}"
            f" {t_full * 1e3:8.1f} {t_full_min * 1e3:8.1f}"
            f" {t_full / t_nms:7.1f}x  {ea}{status}"
        )
    if failed:
        print("correctness mismatch against the full-matrix implementation", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
