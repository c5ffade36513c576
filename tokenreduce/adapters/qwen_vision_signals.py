"""Vision-tower signals of Qwen-family ViTs (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): no CLS token.

The towers encode every image (video frame) as a flat run of patches whose 2x2 *merge units*
become one visual token each after the patch merger.  The signals here are per merge unit, in
the raster order of the LLM's visual tokens:

* **attention received** (``Need.VISION_ATTENTION``): at one block, the attention each patch
  receives, summed over heads (or averaged), then averaged over the query rows of its image (the
  mean of the column of the ``P x P`` attention matrix), then averaged over the 4 patches of its
  merge unit: PIO-FVLM's Qwen recipe (arXiv 2602.04657), which scores patches this way because
  there is no CLS row to read.  Windowed blocks attend within their windows, so their columns
  hold only the rows of the patch's window (the rest are zeros), as an eager matrix of the block
  has them;
* **keys** (``Need.VISION_KEYS``): the block's key projection of the normed input, before the
  vision RoPE, averaged over heads (or concatenated) and over the merge unit;
* **features** (``Need.VISION_FEATURES``): what the patch merger receives for each token, its 4
  patches' last-block outputs concatenated (``[4 * d_v]``), and the merger itself as projector.

Everything is recomputed from captured block inputs with the blocks' own modules, row chunk by
row chunk (no eager attention, no ``output_attentions``), as :mod:`.vision_signals` does for
CLIP.  Qwen2.5-VL runs its blocks in *window order* (merge units grouped by attention window,
``transformers.vision_utils.get_vision_window_index``); the signals are mapped back to raster
order with the inverse of that index.  Towers without windows (Qwen2-VL, Qwen3-VL: every block
full attention) are already in raster order.  Qwen3-VL's learned position embedding is added
before the first block, so the captured block inputs already hold it; its DeepStack mergers are
not read (the signals describe the main merger's tokens, which are the decoder's candidates).
Details: ``docs/cut.md`` (Signals without attention matrices) and ``docs/adapters.md``.

Wiring an adapter (one method): ``def vision_tower(self): return qwen_vision_tower(self.model,
name=self.name)`` plus ``Need.VISION_ATTENTION | Need.VISION_KEYS | Need.VISION_FEATURES`` in its
``provides``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tokenreduce.core.errors import UnsupportedModelError

from .vision_signals import VisionCapture, VisionSignals, VisionTower, resolve_vision_layer

#: query rows per chunk when the attention received is recomputed (bounds the ``rows x P``
#: probabilities held at once per head)
ROW_CHUNK = 1024


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_vision_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``[P, H, hd]`` rotated by the tower's 2-D RoPE (``cos``/``sin`` ``[P, hd]``), in float32."""
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    x = x.float()
    return x * cos + rotate_half(x) * sin


@dataclass
class QwenVisionTower(VisionTower):
    """A Qwen-family vision tower (see the module docstring).

    Attributes (beside :class:`VisionTower`'s; ``patches`` and ``feature_input_layer`` are unused,
    the grid is read from each call's ``grid_thw``):
        merge: the merge size (2: 2x2 patches per visual token).
        window_index: ``grid_thw -> [U]`` the tower's window order of the merge units (unit ``i``
            of the block sequence is raster unit ``window_index[i]``), None when the blocks run in
            raster order.
        qkv: ``(block, normed input [P, d_v]) -> (q, k)`` each ``[P, H, hd]`` before RoPE.
        norm: ``block -> its pre-attention norm``.
    """

    merge: int = 2
    window_index: Callable[[Tensor], Tensor] | None = None
    qkv: Callable[[Any, Tensor], tuple[Tensor, Tensor]] | None = None
    norm: Callable[[Any], Callable[[Tensor], Tensor]] | None = None
    unit: int = field(init=False, default=4)

    def __post_init__(self) -> None:
        self.unit = self.merge * self.merge


class QwenVisionCapture(VisionCapture):
    """Pre-hooks keeping each chosen block's input, ``cu_seqlens`` and RoPE tables, the tower's
    ``grid_thw`` and the merger's input (references only)."""

    def __init__(self, tower: QwenVisionTower, layers: Iterable[int] | None):
        self.tower = tower
        wanted = range(tower.n_layers) if layers is None else {resolve_vision_layer(i, tower.n_layers) for i in layers}
        self.layers = sorted(set(wanted))
        self.inputs: dict = {}
        self._handles = [tower.tower.register_forward_pre_hook(self._new_tower_run, with_kwargs=True)]
        try:
            merger: Any = getattr(tower.tower, "merger")  # noqa: B009
            self._handles.append(merger.register_forward_pre_hook(self._merger_hook, with_kwargs=True))
            for i in self.layers:
                self._handles.append(tower.layers[i].register_forward_pre_hook(self._make_hook(i), with_kwargs=True))
        except BaseException:
            self.detach()
            raise

    def _new_tower_run(self, module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self.inputs = {"grid_thw": grid}

    def _merger_hook(self, module, args, kwargs):
        self.inputs["merger"] = args[0] if args else kwargs["x"]

    def _make_hook(self, i: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
            pe = kwargs.get("position_embeddings")
            self.inputs[i] = (hidden, cu, pe)

        return hook


class QwenVisionSignals(VisionSignals):
    """The vision signals of one layer-0 stage on a Qwen-family tower, mapped onto its candidates."""

    def __init__(self, tower: QwenVisionTower, inputs: dict, n_visual: Tensor, valid: Tensor):  # noqa: D107
        self.tower = tower
        self.qt = tower
        self.inputs = inputs
        self.captured: dict[Any, Any] = inputs
        self.valid = valid
        grid = inputs.get("grid_thw")
        if grid is None:
            raise RuntimeError(
                "vision signals: no vision-tower run was captured for this prefill; the vision tower must "
                "encode exactly the images of this prefill (no cached or precomputed image features)"
            )
        self.grid = grid.to(torch.long)
        m = tower.merge
        units = self.grid[:, 0] * (self.grid[:, 1] // m) * (self.grid[:, 2] // m)  # [I] merge units per image
        self.units_per_image = units
        total = int(n_visual.sum())
        if int(units.sum()) != total:
            raise RuntimeError(
                f"vision signals: the captured vision-tower run has {units.tolist()} visual tokens per image, but "
                f"the prefill has {n_visual.tolist()} visual tokens per sample; the vision tower must encode exactly "
                "the images of this prefill (no cached or precomputed image features)"
            )
        first = torch.cumsum(n_visual, 0) - n_visual
        n = valid.shape[1]
        flat = first.unsqueeze(1) + torch.arange(n, device=valid.device).unsqueeze(0)
        self.flat = torch.where(valid, flat, torch.zeros_like(flat))
        order = tower.window_index(self.grid) if tower.window_index is not None else None
        #: raster unit -> its row in the block sequence (None: raster order)
        self.to_block = None if order is None else torch.argsort(order.to(valid.device))

    # -- helpers ------------------------------------------------------------------------------------
    def _block(self, layer: int) -> tuple[Any, tuple]:
        i = resolve_vision_layer(layer, self.qt.n_layers)
        if i not in self.captured:
            captured = sorted(k for k in self.captured if isinstance(k, int))
            raise RuntimeError(f"vision layer {layer} (block {i}) was not captured; captured: {captured}")
        return self.qt.layers[i], self.captured[i]

    def _units(self, per_patch: Tensor) -> Tensor:
        """``[P, ...]`` per patch in block order -> ``[U, 4, ...]`` per merge unit in raster order."""
        per_unit = per_patch.reshape(-1, self.qt.unit, *per_patch.shape[1:])
        return per_unit if self.to_block is None else per_unit[self.to_block.to(per_unit.device)]

    def _to_candidates_flat(self, per_unit: Tensor) -> Tensor:
        """``[U, ...]`` per raster unit -> ``[B, N, ...]`` per candidate (zeros where invalid)."""
        out = per_unit[self.flat.flatten()].view(*self.flat.shape, *per_unit.shape[1:])
        mask = self.valid.view(*self.valid.shape, *([1] * (per_unit.dim() - 1)))
        return out.masked_fill(~mask, 0)

    def _frames(self, device) -> Tensor:
        """``[F]`` patches per frame (an image is one frame; a video has ``t``)."""
        t, h, w = self.grid.unbind(-1)
        return torch.repeat_interleave(h * w, t).to(device)

    # -- signals ----------------------------------------------------------------------------------
    def attention_received(self, layer: int, heads: str = "sum") -> Tensor:
        """``[B, N]`` float32: the attention each candidate's merge unit receives at block
        ``layer`` (sum or mean over heads, mean over its image's query rows, mean over the unit)."""
        if heads not in ("sum", "mean"):
            raise ValueError(f"heads must be 'sum' or 'mean'; got {heads!r}")
        block, (x, cu, pe) = self._block(layer)
        assert self.qt.qkv is not None and self.qt.norm is not None
        with torch.no_grad():
            q, k = self.qt.qkv(block, self.qt.norm(block)(x))  # [P, H, hd] each
            if pe is not None:
                cos, sin = pe
                q, k = apply_vision_rope(q, cos, sin), apply_vision_rope(k, cos, sin)
            q, k = q.float().transpose(0, 1), k.float().transpose(0, 1)  # [H, P, hd]
            scale = q.shape[-1] ** -0.5
            p = x.shape[0]
            received = torch.zeros(p, dtype=torch.float32, device=x.device)
            bounds = cu.tolist() if cu is not None else [0, p]
            for start, end in zip(bounds[:-1], bounds[1:]):
                keys = k[:, start:end]  # [H, L, hd]
                for r0 in range(start, end, ROW_CHUNK):
                    r1 = min(end, r0 + ROW_CHUNK)
                    probs = torch.softmax((q[:, r0:r1] @ keys.transpose(-1, -2)) * scale, dim=-1)  # [H, R, L]
                    received[start:end] += probs.sum(dim=(0, 1))
            if heads == "mean":
                received = received / q.shape[0]
            frames = self._frames(x.device)  # [F] patches (= query rows) per frame
            per_unit = self._units(received).mean(1)  # [U] raster order
            frame_rows = torch.repeat_interleave(frames, frames // self.qt.unit).to(per_unit.dtype)  # [U]
        return self._to_candidates_flat(per_unit / frame_rows).float()

    def keys(self, layer: int, heads: str = "mean") -> Tensor:
        """``[B, N, head_dim]`` (mean over heads) or ``[B, N, d_v]`` (``"concat"``): the block's keys
        before RoPE, averaged over each merge unit; vision dtype."""
        if heads not in ("mean", "concat"):
            raise ValueError(f"heads must be 'mean' or 'concat'; got {heads!r}")
        block, (x, _, _) = self._block(layer)
        assert self.qt.qkv is not None and self.qt.norm is not None
        with torch.no_grad():
            _, k = self.qt.qkv(block, self.qt.norm(block)(x))  # [P, H, hd]
            k = k.mean(1) if heads == "mean" else k.reshape(k.shape[0], -1)
            per_unit = self._units(k).mean(1)  # [U, h]
        return self._to_candidates_flat(per_unit)

    def features(self) -> Tensor:
        """``[B, N, 4 * d_v]``: the patch merger's input for each candidate (its merge unit's
        last-block outputs, concatenated in the tower's patch order)."""
        x = self.captured.get("merger")
        if x is None:
            raise RuntimeError("vision signals: the patch merger's input was not captured")
        per_unit = self._units(x).flatten(1)  # [U, 4 * d_v]
        return self._to_candidates_flat(per_unit)

    def cls_attention(self, layer: int, heads: str = "sum") -> Tensor:
        raise UnsupportedModelError(
            "this vision tower has no CLS token: score patches by the attention they receive "
            "(scorer vision_attn, Need.VISION_ATTENTION)"
        )

    def cls_features(self) -> Tensor:
        raise UnsupportedModelError(
            "this vision tower has no CLS token to keep: set the visionzip selector's keep_cls to false"
        )


def _qwen_qkv(block, h: Tensor) -> tuple[Tensor, Tensor]:
    attn = block.attn
    heads = int(attn.num_heads)
    qkv = attn.qkv(h).reshape(h.shape[0], 3, heads, -1)
    return qkv[:, 0], qkv[:, 1]


def _check_block(block: Any, name: str) -> None:
    """Refuse a block whose layout :func:`_qwen_qkv` cannot read: a pre-attention ``norm1`` and an
    ``attn`` with ``num_heads`` and one fused ``qkv`` linear of ``3 x`` its input width (the
    layout of Qwen2-VL's, Qwen2.5-VL's and Qwen3-VL's ViT blocks)."""
    attn = getattr(block, "attn", None)
    qkv = getattr(attn, "qkv", None)
    heads = getattr(attn, "num_heads", None)
    d_in, d_out = getattr(qkv, "in_features", None), getattr(qkv, "out_features", None)
    if not hasattr(block, "norm1") or not isinstance(heads, int) or d_in is None or d_out != 3 * d_in:
        raise UnsupportedModelError(
            f"{name}: vision signals need Qwen-style ViT blocks (norm1, then attn.qkv: one fused q/k/v linear "
            f"of 3 x the width, and attn.num_heads); block type {type(block).__name__} has another layout"
        )
    if d_in % heads:
        raise UnsupportedModelError(f"{name}: the ViT width {d_in} is not divisible by attn.num_heads={heads}")


def qwen_vision_tower(model, *, name: str) -> QwenVisionTower:
    """The :class:`QwenVisionTower` of a Qwen-family VLM (``model.model.visual``: ``blocks`` with
    ``norm1`` and a fused ``attn.qkv``, a ``merger``; Qwen2-VL, Qwen2.5-VL, Qwen3-VL).  Windowed towers (``fullatt_block_indexes`` and
    ``window_size`` in the vision config, Qwen2.5-VL) get the window order; the others run in
    raster order."""
    visual = getattr(model.model, "visual", None)
    blocks = getattr(visual, "blocks", None)
    merger = getattr(visual, "merger", None)
    if visual is None or blocks is None or merger is None or len(blocks) == 0:
        raise UnsupportedModelError(f"{name}: vision signals need a Qwen-style vision tower (visual.blocks, merger)")
    _check_block(blocks[0], name)
    vc = model.config.vision_config
    merge = int(vc.spatial_merge_size)
    window_index = None
    if getattr(vc, "fullatt_block_indexes", None) is not None and getattr(vc, "window_size", None):
        from transformers.vision_utils import get_vision_window_index

        def window_index(grid: Tensor) -> Tensor:
            index, _ = get_vision_window_index(
                grid, spatial_merge_size=merge, window_size=int(vc.window_size), patch_size=int(vc.patch_size)
            )
            return index

    def project(features: Tensor) -> Tensor:
        return merger(features.reshape(-1, features.shape[-1] // (merge * merge))).view(*features.shape[:-1], -1)

    return QwenVisionTower(
        tower=visual,
        layers=list(blocks),
        projector=project,
        feature_input_layer=len(blocks) - 1,
        patches=0,
        merge=merge,
        window_index=window_index,
        qkv=_qwen_qkv,
        norm=lambda block: block.norm1,
    )


QwenVisionTower.capture_type = QwenVisionCapture  # type: ignore[attr-defined]
QwenVisionTower.signals_type = QwenVisionSignals  # type: ignore[attr-defined]
