"""``pio_ve`` selector: PIO-FVLM's official encoder-involved mode (local + global CLS scan, merge).

Paper: "PIO-FVLM: Rethinking Training-Free Visual Token Reduction for VLM Acceleration from an
Inference-Objective Perspective", arXiv 2602.04657 (v3: "TRIO").  Official code ``ocy1/PIO-FVLM``
/ ``ocy1/TRIO`` (``llava_arch.py::encode_images``, ``clip_encoder.py``); nothing copied.

Encoder side (a stage at layer 0): a windowed local scan of the CLS attention at an early vision
layer, a global scan at layer -2 for the rest of the budget, then every dropped token merged into
its most similar kept token.  Follow it by a ``pio`` stage (presets ``pio_ve_*``).  Details and
deviations: ``docs/strategies/pio_ve.md``.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from tokenreduce.core.strategy import Selector
from tokenreduce.core.types import Need, Selection, TokenView

from .visionzip import check_encoder_stage


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
