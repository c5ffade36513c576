"""``pio_ve`` selector: PIO-FVLM's official encoder-involved mode (local + global CLS scan, merge).

Paper: "PIO-FVLM: Rethinking Training-Free Visual Token Reduction for VLM Acceleration from an
Inference-Objective Perspective", arXiv 2602.04657 (v3: "TRIO").  Official code ``ocy1/PIO-FVLM``
/ ``ocy1/TRIO`` (``llava_arch.py::encode_images``, ``clip_encoder.py``); nothing copied.

Encoder side (a stage at layer 0): a windowed local scan of the CLS attention at an early vision
layer, a global scan at layer -2 for the rest of the budget, then every dropped token merged into
its most similar kept token.  Follow it by a ``pio`` stage (presets ``pio_ve_*``).  Details and
deviations: ``docs/strategies/pio_ve.md``.

``pio_ve_qwen`` (:class:`PIOVEQwenSelector`): the official Qwen2.5-VL recipe, on the attention
each visual token receives (the tower has no CLS): local scores at the first full-attention
block with a window selection capped per 4x4 window of the merged grid, global scores at the
last block, then the same merge (presets ``qwen_pio_ve_*``).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from tokenreduce.core.strategy import Selector
from tokenreduce.core.types import Need, Selection, TokenView

from .visionzip import check_encoder_stage, vision_attention


def window_ids(grid: Tensor, windows: int) -> Tensor:
    """``[N]`` window id of each candidate from its ``[N, 3]`` (image, row, col) grid entry:
    ``image * w^2 + (row * w // side) * w + col * w // side``, ``side`` = the image's grid side."""
    image, row, col = grid.unbind(-1)
    side = torch.maximum(row, col).max().clamp(min=0) + 1 if grid.numel() else torch.tensor(1)
    wr = row * windows // side
    wc = col * windows // side
    return image * windows * windows + wr * windows + wc


def local_global_pick(local: Tensor, glob: Tensor, windows: Tensor, keep: int, n_windows: int) -> Tensor:
    """One sample's pio_ve pick: ``[N]`` bool, exactly ``keep`` True.

    Args:
        local, glob: ``[N]`` float scores of the local and global scans.
        windows: ``[N]`` long window id of each candidate.
        keep: tokens to keep (``T``).
        n_windows: windows of the sample (for ``m = floor(T/2) // n_windows``).
    """
    n = local.shape[0]
    chosen = torch.zeros(n, dtype=torch.bool, device=local.device)
    m = (keep // 2) // max(1, n_windows)
    if m > 0:
        for w in torch.unique(windows).tolist():
            members = torch.nonzero(windows == w).flatten()
            order = torch.sort(local[members], descending=True, stable=True).indices[:m]
            chosen[members[order]] = True
    rest = keep - int(chosen.sum())
    if rest > 0:
        masked = glob.float().masked_fill(chosen, float("-inf"))
        order = torch.sort(masked, descending=True, stable=True).indices[:rest]
        chosen[order] = True
    return chosen


def merge_into_kept(features: Tensor, kept: Tensor) -> Tensor:
    """``[k, d]`` float32: each kept token averaged with the dropped tokens most similar to it.

    Args:
        features: ``[N, d]`` one sample's projected features.
        kept: ``[N]`` bool.
    """
    x = features.float()
    normed = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    sim = normed[~kept] @ normed[kept].T  # [N - k, k]
    k = int(kept.sum())
    if sim.shape[0] == 0:
        return x[kept]
    assign = sim.argmax(dim=-1)
    sums = x[kept].clone().index_add_(0, assign, x[~kept])
    counts = 1 + torch.bincount(assign, minlength=k).unsqueeze(-1).to(x.dtype)
    return sums / counts


class PIOVESelector(Selector):
    """PIO-FVLM's encoder-involved reduction: windowed local + global CLS scan, then merge."""

    local_layer: int = Field(default=5, description="vision layer of the local (windowed) scan")
    global_layer: int = Field(default=-2, description="vision layer of the global scan")
    windows: int = Field(default=4, ge=1, description="windows per grid side (4: 16 windows of 6x6 on 24x24)")
    merge: bool = Field(default=True, description="merge dropped tokens into their most similar kept token")

    needs = Need.VISION_CLS_ATTENTION | Need.VISUAL_GRID
    needs_scores = False

    def check_stage(self, layer: int, n_layers: int) -> str | None:
        return check_encoder_stage("pio_ve", layer)

    def vision_layers(self) -> tuple[int, ...]:
        return (self.local_layer, self.global_layer)

    def select(self, view: TokenView, scores: Tensor | None, keep: Tensor) -> Selection:
        local = view.signals.vision_cls_attention(self.local_layer, "mean")  # [B, N]
        glob = view.signals.vision_cls_attention(self.global_layer, "mean")  # [B, N]
        grid = view.signals.visual_grid()  # [B, N, 3]
        mask = torch.zeros_like(view.visual_valid)
        for b in range(view.batch_size):
            valid = view.visual_valid[b]
            n = int(valid.sum())
            if n == 0:
                continue
            win = window_ids(grid[b, :n], self.windows)
            n_windows = int(grid[b, :n, 0].max() + 1) * self.windows * self.windows
            mask[b, :n] = local_global_pick(local[b, :n], glob[b, :n], win, int(keep[b]), n_windows)
        sel = Selection.from_mask(mask)
        if not self.merge:
            return sel
        feats = view.visual_hidden()  # [B, N, d] projected features (layer-0 hidden states)
        hidden = feats.gather(1, sel.index.unsqueeze(-1).expand(-1, -1, feats.shape[-1])).clone()
        for b in range(view.batch_size):
            n = int(view.visual_valid[b].sum())
            k = int(keep[b])
            if n == 0 or k == 0:
                continue
            hidden[b, :k] = merge_into_kept(feats[b, :n], mask[b, :n]).to(hidden.dtype)
        sel.hidden = hidden
        return sel


def qwen_window_ids(grid: Tensor, window: int) -> tuple[Tensor, int]:
    """Window of each candidate in PIO-FVLM's Qwen window selection, and the number of windows.

    Args:
        grid: ``[N, 3]`` (image, row, col) on the merged grid of each image.
        window: window side in merged tokens (4).

    Each image's ``H x W`` grid is cut into ``max(1, H // window) x max(1, W // window)`` windows
    of ``window x window`` tokens; the rows (columns) beyond the last whole window fold into the
    last window row (column).  Returns ``([N] long window id, total windows)``.
    """
    image, row, col = grid.unbind(-1)
    ids = torch.zeros_like(row)
    total = 0
    for i in torch.unique(image).tolist():
        at = image == i
        h = int(row[at].max()) + 1
        w = int(col[at].max()) + 1
        nh, nw = max(1, h // window), max(1, w // window)
        wr = torch.clamp(row[at] // window, max=nh - 1)
        wc = torch.clamp(col[at] // window, max=nw - 1)
        ids[at] = total + wr * nw + wc
        total += nh * nw
    return ids, total


def capped_window_pick(scores: Tensor, windows: Tensor, n_windows: int, k: int) -> Tensor:
    """``[N]`` bool: ``k`` tokens taken in descending score order (ties: lower index), each window
    holding at most ``ceil(k / n_windows)`` of them (PIO-FVLM's Qwen ``window_selection``)."""
    n = scores.shape[0]
    chosen = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return chosen
    cap = -(-k // max(1, n_windows))
    used = torch.zeros(max(1, n_windows), dtype=torch.long)
    taken = 0
    for i in torch.sort(scores.float(), descending=True, stable=True).indices.tolist():
        w = int(windows[i])
        if used[w] < cap:
            used[w] += 1
            chosen[i] = True
            taken += 1
            if taken == k:
                break
    return chosen


class PIOVEQwenSelector(Selector):
    """PIO-FVLM's encoder-involved reduction on Qwen-family towers (no CLS): local scores from a
    full-attention block with a capped window selection for half the budget, global scores from
    the last block for the rest, dropped tokens merged into their most similar kept token
    (``docs/pio-fvlm.md#encoder-involved-mode``)."""

    local_layer: int = Field(
        default=7, description="vision block of the local scores (7: Qwen2.5-VL-7B's first full-attention block)"
    )
    global_layer: int = Field(default=-1, description="vision block of the global scores (-1: the last)")
    window: int = Field(default=4, ge=1, description="window side in visual (merged) tokens")
    merge: bool = Field(default=True, description="merge dropped tokens into their most similar kept token")

    needs = Need.VISION_ATTENTION | Need.VISUAL_GRID
    needs_scores = False

    def check_stage(self, layer: int, n_layers: int) -> str | None:
        return check_encoder_stage("pio_ve_qwen", layer)

    def vision_layers(self) -> tuple[int, ...]:
        return (self.local_layer, self.global_layer)

    def select(self, view: TokenView, scores: Tensor | None, keep: Tensor) -> Selection:
        """Exactly ``keep[b]`` tokens: ``keep // 2`` by the capped window selection on the local
        scores, the rest by the global scores; ``hidden`` holds the merged features."""
        local = vision_attention(view, self.local_layer, "sum")  # [B, N]
        glob = vision_attention(view, self.global_layer, "sum")  # [B, N]
        grid = view.signals.visual_grid()  # [B, N, 3]
        mask = torch.zeros_like(view.visual_valid)
        for b in range(view.batch_size):
            n = int(view.visual_valid[b].sum())
            k = int(keep[b])
            if n == 0 or k == 0:
                continue
            win, n_windows = qwen_window_ids(grid[b, :n], self.window)
            picked = capped_window_pick(local[b, :n], win, n_windows, k // 2)
            rest = k - int(picked.sum())
            if rest > 0:
                masked = glob[b, :n].float().masked_fill(picked, float("-inf"))
                picked[torch.sort(masked, descending=True, stable=True).indices[:rest]] = True
            mask[b, :n] = picked
        sel = Selection.from_mask(mask)
        if not self.merge:
            return sel
        feats = view.visual_hidden()  # [B, N, d]: the merger's outputs (layer-0 hidden states)
        hidden = feats.gather(1, sel.index.unsqueeze(-1).expand(-1, -1, feats.shape[-1])).clone()
        for b in range(view.batch_size):
            n = int(view.visual_valid[b].sum())
            k = int(keep[b])
            if n == 0 or k == 0:
                continue
            hidden[b, :k] = merge_into_kept(feats[b, :n], mask[b, :n]).to(hidden.dtype)
        sel.hidden = hidden
        return sel
