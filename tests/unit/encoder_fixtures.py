"""Synthetic views for the encoder-side strategies (visionzip, scope, holov, pio_ve): random
vision signals behind a fake :class:`~tokenreduce.core.types.SignalSource`, ragged batches."""

from __future__ import annotations

import torch
from torch import Tensor

from tokenreduce.core.types import Need, TokenView

D, D_V, HEAD = 8, 6, 3


class FakeVision:
    """Vision signals as fixed tensors (``[B, N, ...]``), a real projector (Linear+GELU+Linear)."""

    provides = Need.HIDDEN | Need.VISUAL_GRID | Need.VISION_CLS_ATTENTION | Need.VISION_KEYS | Need.VISION_FEATURES

    def __init__(self, cls: dict, keys: Tensor, features: Tensor, grid: Tensor, projector):
        self.cls, self.keys, self.features, self.grid, self.projector = cls, keys, features, grid, projector
        self.calls: list = []

    def vision_cls_attention(self, layer: int, heads: str = "sum") -> Tensor:
        self.calls.append(("cls", layer, heads))
        return self.cls[(layer, heads)]

    def vision_keys(self, layer: int, heads: str = "mean") -> Tensor:
        self.calls.append(("keys", layer, heads))
        return self.keys

    def vision_features(self) -> Tensor:
        return self.features

    def project_vision(self, features: Tensor) -> Tensor:
        with torch.no_grad():
            return self.projector(features)

    def visual_grid(self) -> Tensor:
        return self.grid


def make_projector(seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    proj = torch.nn.Sequential(torch.nn.Linear(D_V, D), torch.nn.GELU(), torch.nn.Linear(D, D))
    with torch.no_grad():
        for p in proj.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return proj


def make_encoder_view(sides: list[int], seed: int = 0, layers=(-2, 5), ties: bool = False):
    """A layer-0 view: sample ``b`` has one image of ``sides[b]**2`` patches (raster order) after
    one text token, then one text token; hidden states are the projected features (as at K=0)."""
    g = torch.Generator().manual_seed(seed)
    ns = [s * s for s in sides]
    b, n = len(sides), max(ns)
    s_len = n + 2
    valid_vis = torch.arange(n).unsqueeze(0) < torch.tensor(ns).unsqueeze(1)
    features = torch.randn(b, n, D_V, generator=g).masked_fill(~valid_vis.unsqueeze(-1), 0)
    keys = torch.randn(b, n, HEAD, generator=g).masked_fill(~valid_vis.unsqueeze(-1), 0)
    cls = {}
    for layer in layers:
        for heads in ("sum", "mean"):
            raw = torch.rand(b, n, generator=g)
            if ties:
                raw = (raw * 4).floor() / 4
            cls[(layer, heads)] = raw.masked_fill(~valid_vis, 0)
    grid = torch.zeros(b, n, 3, dtype=torch.long)
    for i, side in enumerate(sides):
        k = torch.arange(side * side)
        grid[i, : side * side, 1] = k // side
        grid[i, : side * side, 2] = k % side
    projector = make_projector(seed)
    hidden = torch.zeros(b, s_len, D)
    valid = torch.zeros(b, s_len, dtype=torch.bool)
    visual_index = torch.zeros(b, n, dtype=torch.long)
    original_index = torch.full((b, n), -1, dtype=torch.long)
    for i, m in enumerate(ns):
        pad = n - m  # left padding
        valid[i, pad:] = True
        hidden[i, pad] = torch.randn(D, generator=g)
        hidden[i, pad + 1 : pad + 1 + m] = projector(features[i, :m]).detach()
        hidden[i, pad + 1 + m] = torch.randn(D, generator=g)
        visual_index[i, :m] = torch.arange(pad + 1, pad + 1 + m)
        original_index[i, :m] = visual_index[i, :m]
    signals = FakeVision(cls, keys, features, grid, projector)
    view = TokenView(
        layer=0,
        stage=0,
        hidden=hidden,
        valid=valid,
        visual_index=visual_index,
        visual_valid=valid_vis,
        original_index=original_index,
        n_original_visual=torch.tensor(ns),
        signals=signals,
    )
    return view, signals
