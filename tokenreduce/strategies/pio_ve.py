"""``pio_ve`` selector: PIO-FVLM's official encoder-involved mode (local + global CLS scan, merge).

Paper: "PIO-FVLM: Rethinking Training-Free Visual Token Reduction for VLM Acceleration from an
Inference-Objective Perspective", arXiv 2602.04657 (v3: "TRIO").  Official code ``ocy1/PIO-FVLM``
/ ``ocy1/TRIO`` (``llava_arch.py::encode_images``, ``clip_encoder.py``), as summarised in
pio-spec §8.1; nothing copied.  Docs page: ``docs/strategies/pio_ve.md``.

At a stage at layer 0 keeping ``T`` tokens of a sample (pio-spec §8.1, VScan-style):

1. **local scan**: CLS -> patch attention at vision layer ``local_layer`` (default 5, the 6th
   CLIP layer), **averaged** over heads; the image grid is split into ``windows x windows``
   (default 4 x 4 = 16) non-overlapping windows and the ``m`` highest tokens of each window are
   taken, ``m = floor(floor(T/2) / #windows)`` (T = 96: 3 per window);
2. **global scan**: CLS attention at vision layer ``global_layer`` (default -2), head-averaged;
   the locally picked tokens are excluded and the ``T - (locally picked)`` highest are taken;
3. **merge** (``merge: true``): every dropped token is assigned to its most cosine-similar kept
   token on the **projected** features (the hidden states at layer 0, d = 4096 for 7B), and
   each kept token becomes ``(kept + sum(assigned)) / (1 + count)``.  The merged token replaces
   the kept one in its slot (the core rule, :class:`~tokenreduce.core.types.Selection`).

Follow it in the same plan by a ``pio`` stage at the middle LLM layer (preset ``pio_ve_*``:
the encoder keeps 1.5x the layer-average target, layer 16 keeps a third of that, pio-spec §3.2).

Deviations from the official code:

* the global scan takes ``T - (locally picked)`` tokens, so a stage always keeps exactly ``T``
  (official: ``T - floor(T/2)``, which keeps fewer than ``T`` when ``floor(T/2)`` is not a
  multiple of 16);
* windows follow the candidates' grid coordinates (``Need.VISUAL_GRID``): window of (row, col)
  is ``(row * w // side, col * w // side)``, so any grid side works (official: asserts 24 x 24);
  a sample with several images has ``w x w`` windows per image, sharing one ``m``;
* a window with fewer than ``m`` tokens gives what it has; ties go to the lower index;
* signals are recomputed from captured CLIP layer inputs (official: eager attention maps of
  every layer).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

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


class PIOVESelector:
    """PIO-FVLM's encoder-involved reduction: windowed local + global CLS scan, then merge."""

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")
        local_layer: int = Field(default=5, description="vision layer of the local (windowed) scan")
        global_layer: int = Field(default=-2, description="vision layer of the global scan")
        windows: int = Field(default=4, ge=1, description="windows per grid side (4: 16 windows of 6x6 on 24x24)")
        merge: bool = Field(default=True, description="merge dropped tokens into their most similar kept token")

    needs: ClassVar[Need] = Need.VISION_CLS_ATTENTION | Need.VISUAL_GRID
    needs_scores: ClassVar[bool] = False

    def __init__(self, settings: Settings):
        self.settings = settings

    def check_stage(self, layer: int, n_layers: int) -> str | None:
        return check_encoder_stage("pio_ve", layer)

    def vision_layers(self) -> tuple[int, ...]:
        return (self.settings.local_layer, self.settings.global_layer)

    def select(self, view: TokenView, scores: Tensor | None, keep: Tensor) -> Selection:
        s = self.settings
        local = view.signals.vision_cls_attention(s.local_layer, "mean")  # [B, N]
        glob = view.signals.vision_cls_attention(s.global_layer, "mean")  # [B, N]
        grid = view.signals.visual_grid()  # [B, N, 3]
        mask = torch.zeros_like(view.visual_valid)
        for b in range(view.batch_size):
            valid = view.visual_valid[b]
            n = int(valid.sum())
            if n == 0:
                continue
            win = window_ids(grid[b, :n], s.windows)
            n_windows = int(grid[b, :n, 0].max() + 1) * s.windows * s.windows
            mask[b, :n] = local_global_pick(local[b, :n], glob[b, :n], win, int(keep[b]), n_windows)
        sel = Selection.from_mask(mask)
        if not s.merge:
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
