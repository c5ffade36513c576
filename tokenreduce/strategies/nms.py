"""``nms`` selector: greedy feature-space non-maximum suppression in saliency order.

Paper: "PIO-FVLM: Rethinking Training-Free Visual Token Reduction for VLM Acceleration from an
Inference-Objective Perspective", arXiv 2602.04657 (v3 renamed "TRIO").

Candidates are visited by descending score (ties: lower index); each one not yet suppressed is
accepted and suppresses every candidate whose cosine similarity with it is ``>= threshold``; a
fill-up in the same order completes ``keep``.  The greedy pass is evaluated blockwise, with the
same accepted set as the plain pass and only the similarities it examines.  The algorithm, why
the blockwise pass is exact, its cost and the deviations: ``docs/strategies/nms.md``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import field_validator
from torch import Tensor

from tokenreduce.core.cost import Cost, StageCostInput
from tokenreduce.core.strategy import Selector
from tokenreduce.core.types import Need, Selection, TokenView

#: rows x hidden size (float32 elements, summed over the active batch) normalised at a time
_CHUNK_ELEMS = 1 << 21  # 8 MiB: small temporaries, reused by the allocator
_MIN_WINDOW = 16


def saliency_order(scores: Tensor, valid: Tensor) -> Tensor:
    """``[B, N]`` long: valid candidates first, by descending score, ties to the lower index.

    Args:
        scores: ``[B, N]`` float (any float dtype; NaN counts as ``-inf``).
        valid: ``[B, N]`` bool.
    Returns:
        A permutation of ``0..N-1`` per row whose first ``valid[b].sum()`` entries are the valid
        candidates in greedy order.
    """
    key = torch.nan_to_num(scores.float(), nan=float("-inf"))
    first = torch.sort(key, dim=-1, descending=True, stable=True).indices
    # second stable pass: valid candidates before invalid ones, score order kept within each group
    second = torch.sort((~valid).gather(1, first).to(torch.int8), dim=-1, stable=True).indices
    return first.gather(1, second)


def _greedy_accept(
    feats: Tensor,
    row_index: Tensor,
    order: Tensor,
    n_l: list[int],
    k_l: list[int],
    group: list[int],
    tau: Tensor,
) -> dict[int, list[int]]:
    """The greedy pass (without fill-up) for the samples in ``group``, batched over them.

    Needs ``0 < k_l[b] < n_l[b]`` for every ``b`` in ``group``.  Returns, per sample, the accepted
    candidate ids in acceptance order (``k_l[b]`` of them unless the order ran out first).
    """
    N = order.shape[1]
    d = feats.shape[-1]
    device = feats.device
    G = len(group)
    accepted: dict[int, list[int]] = {b: [] for b in group}
    # accepted rows per group member; slots not yet filled stay zero (similarity 0 < τ)
    acc_feats = torch.zeros(G, max(k_l[b] for b in group), d, dtype=torch.float32, device=device)
    cursor = {b: 0 for b in group}  # ranks examined so far
    seen_surv = {b: 0 for b in group}  # survivors handed to the in-block pass so far
    last_m = {b: 0 for b in group}  # the sample's previous window (windows grow at least 2x)
    done = {b: False for b in group}
    while True:
        act = [gi for gi, b in enumerate(group) if not done[b]]  # local indices
        if not act:
            break
        samples = [group[gi] for gi in act]
        want, caps = [], []
        for b in samples:
            a = len(accepted[b])
            need = k_l[b] - a
            rate_e = cursor[b] / a if a else 1.0  # ranks examined per accepted token
            rate_s = seen_surv[b] / a if a else 1.0  # survivors per accepted token
            guess = max(math.ceil(need * rate_e * 1.1) + 8, 2 * last_m[b])
            want.append(min(n_l[b] - cursor[b], guess))
            caps.append(math.ceil(need * rate_s * 1.1) + 8)
        ba = len(act)
        m = min(max(max(want), _MIN_WINDOW), N)
        a_max = max(len(accepted[b]) for b in samples)
        b_t = torch.tensor(samples, device=device)
        cur_t = torch.tensor([cursor[b] for b in samples], device=device)
        n_t = torch.tensor([n_l[b] for b in samples], device=device)
        cap_t = torch.tensor(caps, device=device)
        left_h = [n_l[b] - cursor[b] for b in samples]  # ranks not yet examined

        # (a) the window's ranks, and suppression by the tokens accepted in earlier rounds
        rank = cur_t.unsqueeze(1) + torch.arange(m, device=device)  # [Ba, m]
        surv = rank < n_t.unsqueeze(1)  # in the window and still a candidate
        cand = order[b_t].gather(1, rank.clamp(max=N - 1))  # [Ba, m] candidate ids
        rows = row_index[b_t].gather(1, cand)  # [Ba, m] rows of feats
        if a_max:
            if ba == G:
                prev = acc_feats[:, :a_max]
            else:
                prev = acc_feats[torch.tensor(act, device=device), :a_max]
            prev_t = prev.transpose(1, 2)  # [Ba, d, a_max]
            chunk = max(_MIN_WINDOW, _CHUNK_ELEMS // (ba * d))
            for c0 in range(0, m, chunk):  # chunks bound the temporaries' size
                c1 = min(m, c0 + chunk)
                x = F.normalize(feats[b_t.unsqueeze(1), rows[:, c0:c1]].float(), dim=-1)
                surv[:, c0:c1] &= ~(torch.bmm(x, prev_t) >= tau).any(-1)
                if c1 < m:  # stop early once every sample has its cap of survivors
                    n_s = surv[:, :c1].sum(-1).tolist()
                    if all(ns >= cp or lf <= c1 for ns, cp, lf in zip(n_s, caps, left_h)):
                        m = c1
                        surv, cand, rows = surv[:, :m], cand[:, :m], rows[:, :m]
                        break
        n_surv = surv.sum(-1)
        take = surv & (surv.cumsum(-1) <= cap_t.unsqueeze(1))
        n_take = take.sum(-1)
        s_max = int(n_take.max())
        pos = torch.sort((~take).to(torch.int8), dim=-1, stable=True).indices[:, :s_max]
        # (b) the survivors (rank order, at most cap per sample) against each other
        sfeat = F.normalize(feats[b_t.unsqueeze(1), rows.gather(1, pos)].float(), dim=-1)
        block = (torch.bmm(sfeat, sfeat.transpose(1, 2)) >= tau).cpu().numpy()  # [Ba, s, s]
        pos_h = pos.cpu()
        cand_h = cand.gather(1, pos).cpu().tolist()
        n_surv_h = n_surv.tolist()
        n_take_h = n_take.tolist()

        put_g, put_slot, put_li, put_i = [], [], [], []
        for li, (gi, b) in enumerate(zip(act, samples)):
            s_b = n_take_h[li]
            need = k_l[b] - len(accepted[b])
            blk = block[li]
            suppressed = np.zeros(s_b, dtype=bool)
            chosen: list[int] = []
            stop = -1
            for i in range(s_b):  # the greedy pass over this round's survivors
                if suppressed[i]:
                    continue
                chosen.append(i)
                if len(chosen) == need:
                    stop = i
                    break
                suppressed |= blk[i, :s_b]
            base = len(accepted[b])
            put_g += [gi] * len(chosen)
            put_slot += range(base, base + len(chosen))
            put_li += [li] * len(chosen)
            put_i += chosen
            accepted[b].extend(cand_h[li][i] for i in chosen)
            if stop >= 0:  # k accepted
                seen_surv[b] += stop + 1
                done[b] = True
                continue
            seen_surv[b] += s_b
            if n_surv_h[li] > s_b:  # survivors beyond the cap: resume after the last one taken
                step = int(pos_h[li, s_b - 1]) + 1
            else:
                step = min(m, n_l[b] - cursor[b])
            cursor[b] += step
            last_m[b] = step
            if cursor[b] >= n_l[b]:  # order exhausted: the fill-up completes this sample
                done[b] = True
        if put_g and not all(done.values()):
            dst = (torch.tensor(put_g, device=device), torch.tensor(put_slot, device=device))
            src = (torch.tensor(put_li, device=device), torch.tensor(put_i, device=device))
            acc_feats[dst] = sfeat[src]
    return accepted


def greedy_nms_mask(
    feats: Tensor,
    row_index: Tensor,
    order: Tensor,
    n: Tensor,
    keep: Tensor,
    threshold: float,
    batched: bool | None = None,
) -> Tensor:
    """Greedy NMS with fill-up, evaluated blockwise; returns the kept candidates as a mask.

    Args:
        feats: ``[B, M, d]`` feature rows (any float dtype; cast to float32 and L2-normalised
            here, only for the rows examined).
        row_index: ``[B, N]`` long, row of ``feats`` holding candidate ``j`` of sample ``b``.
        order: ``[B, N]`` long, candidates in greedy order (see :func:`saliency_order`); the first
            ``n[b]`` entries are the valid ones.
        n: ``[B]`` long, valid candidates per sample.
        keep: ``[B]`` long, tokens to keep per sample (clamped to ``[0, n[b]]``).
        threshold: cosine similarity at or above which an accepted token suppresses another,
            ``0 < threshold <= 1``.
        batched: run the rounds of all samples together (padded batched products: fewer kernel
            launches and host syncs) or one sample after the other (no padding work).  Default:
            batched except on CPU, where padding only costs compute.  Same result either way.
    Returns:
        ``[B, N]`` bool, exactly ``min(max(keep[b], 0), n[b])`` True entries per row, only at
        valid candidates.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must satisfy 0 < threshold <= 1, got {threshold!r}")
    B, N = order.shape
    device = feats.device
    n_l = [int(v) for v in n.tolist()]
    k_l = [min(max(int(v), 0), nb) for v, nb in zip(keep.tolist(), n_l)]
    tau = torch.tensor(threshold, dtype=torch.float32, device=device)
    if batched is None:
        batched = device.type != "cpu"

    accepted: dict[int, list[int]] = {}  # candidate ids, in acceptance order
    nms_samples = [b for b in range(B) if 0 < k_l[b] < n_l[b]]
    for group in ([nms_samples] if batched else [[b] for b in nms_samples]) if nms_samples else []:
        accepted.update(_greedy_accept(feats, row_index, order, n_l, k_l, group, tau))

    # accepted tokens, then the fill-up in the same order (also covers keep-all samples)
    mask = torch.zeros(B, N, dtype=torch.bool, device=device)
    ids = [(b, c) for b, acc in accepted.items() for c in acc]
    if ids:
        idx = torch.tensor(ids, device=device)
        mask[idx[:, 0], idx[:, 1]] = True
    deficit = [k_l[b] - len(accepted.get(b, ())) for b in range(B)]
    if any(deficit):
        in_order = mask.gather(1, order)
        n_dev = torch.tensor(n_l, device=device)
        free = (torch.arange(N, device=device) < n_dev.unsqueeze(1)) & ~in_order
        add = free & (free.cumsum(-1) <= torch.tensor(deficit, device=device).unsqueeze(1))
        mask = mask | torch.zeros_like(mask).scatter(1, order, add)
    return mask


class NMSSelector(Selector):
    """Greedy cosine-similarity NMS in descending-score order, with fill-up (PIO-FVLM).

    ``select(view, scores, keep)``: ``scores`` ``[B, N]`` float (higher = keep; required),
    ``keep`` ``[B]`` long.  Returns exactly ``keep[b]`` (clamped to ``[0, n_visual[b]]``) ascending
    candidate indices per sample.
    """

    #: cosine similarity at or above which an accepted token suppresses a candidate
    threshold: float = 0.8

    needs = Need.HIDDEN
    needs_scores = True

    @field_validator("threshold")
    @classmethod
    def _check_threshold(cls, v: float) -> float:
        if not (0.0 < v <= 1.0):  # also rejects NaN
            raise ValueError(
                f"nms threshold must satisfy 0 < threshold <= 1 (a cosine similarity; "
                f"candidates with similarity >= threshold to an accepted token are suppressed), "
                f"got {v!r}"
            )
        return v

    def cost(self, c: StageCostInput) -> Cost:
        return Cost.not_counted(
            "the similarities of the candidates it examines depend on the data: about E*(k+s)*d multiply-adds"
        )

    @torch.no_grad()
    def select(self, view: TokenView, scores: Tensor | None, keep: Tensor) -> Selection:
        if scores is None:
            raise ValueError("the nms selector needs scores (configure a scorer for this stage)")
        valid = view.visual_valid
        if scores.shape != valid.shape:
            raise ValueError(f"scores must be [B, N] = {tuple(valid.shape)}, got {tuple(scores.shape)}")
        if "visual_hidden" in view.cache:  # already materialised (e.g. by a scorer): reuse it
            feats = view.cache["visual_hidden"]
            row_index = torch.arange(valid.shape[1], device=valid.device).expand_as(view.visual_index)
        else:  # gather only the rows examined, straight from the hidden states
            feats, row_index = view.hidden, view.visual_index
        order = saliency_order(scores.to(valid.device), valid)
        mask = greedy_nms_mask(feats, row_index, order, valid.sum(-1), keep.to(valid.device), self.threshold)
        return Selection.from_mask(mask)
