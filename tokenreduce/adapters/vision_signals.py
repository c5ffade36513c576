"""Vision-tower signals for encoder-side methods (CLS attention, patch keys, projector-input and
CLS features), recomputed from captured encoder-layer inputs: pre-hooks keep a reference to each
chosen CLIP layer's input, and one CLS query row per image and head is recomputed from the
layer's own ``layer_norm1`` / ``q_proj`` / ``k_proj``, so the tower keeps its own attention
implementation (no eager, no ``output_attentions``).  Timing, the candidate mapping, which
layers are captured and the layer convention: ``docs/cut.md`` (Signals without attention
matrices).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tokenreduce.core.errors import PlanError, UnsupportedModelError


def resolve_vision_layer(layer: int, n_layers: int) -> int:
    """Encoder-layer index in ``0..n_layers-1`` for ``layer`` (negative counts from the end)."""
    resolved = layer + n_layers if layer < 0 else layer
    if not 0 <= resolved < n_layers:
        raise PlanError(
            f"vision layer {layer} is out of range: the vision tower has {n_layers} encoder layers, "
            f"so a vision layer must be in {-n_layers}..{n_layers - 1}"
        )
    return resolved


@dataclass
class VisionTower:
    """What the vision signals need to know about one model's vision tower (filled by an adapter).

    Attributes:
        tower: the module called once per batch of images (its pre-hook marks a new capture).
        layers: the encoder layers, CLIP layout (``layer_norm1``, ``self_attn.{q,k}_proj``,
            ``self_attn.num_heads``/``head_dim``/``scale``).
        projector: ``[..., d_v] -> [..., d]``, the multimodal projector.
        feature_input_layer: the features the projector receives are the input of this encoder
            layer (``vision_feature_layer`` -2 of a 24-layer CLIP: layer 23).
        patches: patch tokens per image that reach the LLM (CLS excluded).
    """

    tower: torch.nn.Module
    layers: list
    projector: Callable[[Tensor], Tensor]
    feature_input_layer: int
    patches: int

    @property
    def n_layers(self) -> int:
        return len(self.layers)


class VisionCapture:
    """Forward pre-hooks that keep the inputs of chosen vision encoder layers (references only).

    A tower whose class sets ``capture_type`` (a subclass of this class) gets that capture instead
    (Qwen-family towers: :mod:`.qwen_vision_signals`)."""

    def __new__(cls, tower: VisionTower, *args: Any, **kwargs: Any) -> VisionCapture:
        impl = getattr(tower, "capture_type", None) if cls is VisionCapture else None
        return super().__new__(impl if impl is not None else cls)

    def __init__(self, tower: VisionTower, layers: Iterable[int] | None):
        self.tower = tower
        wanted = range(tower.n_layers) if layers is None else {resolve_vision_layer(i, tower.n_layers) for i in layers}
        self.layers = sorted(set(wanted) | {tower.feature_input_layer})
        self.inputs: dict[int, Tensor] = {}
        self._handles = [tower.tower.register_forward_pre_hook(self._new_run)]
        try:
            for i in self.layers:
                self._handles.append(tower.layers[i].register_forward_pre_hook(self._make_hook(i), with_kwargs=True))
        except BaseException:
            self.detach()
            raise

    def _new_run(self, module, args):
        self.inputs = {}

    def _make_hook(self, i: int):
        def hook(module, args, kwargs):
            self.inputs[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    def detach(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        self.inputs = {}

    def take(self) -> dict[int, Tensor]:
        """The captured inputs (layer -> ``[I, 1 + P, d_v]``); the capture is emptied."""
        inputs, self.inputs = self.inputs, {}
        return inputs


class VisionSignals:
    """Vision signals of one layer-0 stage, mapped onto its candidates (``[B, N]``).

    Args:
        tower: the adapter's :class:`VisionTower`.
        inputs: captured layer inputs, encoder layer -> ``[I, 1 + P, d_v]``.
        n_visual: ``[B]`` candidates per sample (all image tokens of the sample).
        valid: ``[B, N]`` bool candidate validity.

    A tower whose class sets ``signals_type`` (a subclass of this class) gets those signals
    instead (Qwen-family towers: :mod:`.qwen_vision_signals`).
    """

    def __new__(cls, tower: VisionTower, *args: Any, **kwargs: Any) -> VisionSignals:
        impl = getattr(tower, "signals_type", None) if cls is VisionSignals else None
        return super().__new__(impl if impl is not None else cls)

    def __init__(self, tower: VisionTower, inputs: dict[int, Tensor], n_visual: Tensor, valid: Tensor):
        self.tower = tower
        self.inputs = inputs
        self.valid = valid
        p = tower.patches
        total = int(n_visual.sum())
        images = next(iter(inputs.values())).shape[0] if inputs else 0
        if not inputs or images * p != total or bool((n_visual % p != 0).any()):
            raise RuntimeError(
                f"vision signals: the captured vision-tower run has {images} image(s) x {p} patches, but the "
                f"prefill has {n_visual.tolist()} visual tokens per sample; the vision tower must encode exactly "
                "the images of this prefill (no cached or precomputed image features)"
            )
        first = torch.cumsum(n_visual, 0) - n_visual  # [B] flat offset of each sample's first patch
        n = valid.shape[1]
        flat = first.unsqueeze(1) + torch.arange(n, device=valid.device).unsqueeze(0)  # [B, N]
        self.flat = torch.where(valid, flat, torch.zeros_like(flat))

    def _layer_input(self, layer: int) -> tuple[Any, Tensor]:
        i = resolve_vision_layer(layer, self.tower.n_layers)
        if i not in self.inputs:
            raise RuntimeError(
                f"vision layer {layer} (encoder layer {i}) was not captured; captured: {sorted(self.inputs)}"
            )
        return self.tower.layers[i], self.inputs[i]

    def _to_candidates(self, per_patch: Tensor) -> Tensor:
        """``[I, P, ...]`` per image patch -> ``[B, N, ...]`` per candidate (zeros where invalid)."""
        flat = per_patch.reshape(-1, *per_patch.shape[2:])
        out = flat[self.flat.flatten()].view(*self.flat.shape, *per_patch.shape[2:])
        mask = self.valid.view(*self.valid.shape, *([1] * (per_patch.dim() - 2)))
        return out.masked_fill(~mask, 0)

    @staticmethod
    def _heads(attn) -> tuple[int, int]:
        heads = int(getattr(attn, "num_heads", 0) or attn.config.num_attention_heads)
        return heads, attn.head_dim

    def cls_attention(self, layer: int, heads: str = "sum") -> Tensor:
        """``[B, N]`` float32: CLS -> patch attention at vision layer ``layer``, reduced over heads."""
        if heads not in ("sum", "mean"):
            raise ValueError(f"heads must be 'sum' or 'mean'; got {heads!r}")
        module, x = self._layer_input(layer)
        attn = module.self_attn
        with torch.no_grad():
            h = module.layer_norm1(x)  # [I, T, d_v]
            n_img, t, _ = h.shape
            n_heads, hd = self._heads(attn)
            q = attn.q_proj(h[:, :1]).view(n_img, 1, n_heads, hd).transpose(1, 2)  # [I, H, 1, hd]
            k = attn.k_proj(h).view(n_img, t, n_heads, hd).transpose(1, 2)  # [I, H, T, hd]
            scores = (q @ k.transpose(-1, -2)).float() * attn.scale  # [I, H, 1, T]
            probs = torch.softmax(scores, dim=-1)[:, :, 0, 1:]  # [I, H, P]
            reduced = probs.sum(1) if heads == "sum" else probs.mean(1)  # [I, P]
        return self._to_candidates(reduced).float()

    def keys(self, layer: int, heads: str = "mean") -> Tensor:
        """Patch keys at vision layer ``layer``: ``[B, N, head_dim]`` (mean over heads) or
        ``[B, N, d_v]`` (``"concat"``)."""
        if heads not in ("mean", "concat"):
            raise ValueError(f"heads must be 'mean' or 'concat'; got {heads!r}")
        module, x = self._layer_input(layer)
        attn = module.self_attn
        with torch.no_grad():
            k = attn.k_proj(module.layer_norm1(x))[:, 1:]  # [I, P, d_v]
            if heads == "mean":
                n_heads, hd = self._heads(attn)
                k = k.view(*k.shape[:2], n_heads, hd).mean(2)
        return self._to_candidates(k)

    def features(self) -> Tensor:
        """``[B, N, d_v]``: what the projector received for each candidate."""
        x = self.inputs[self.tower.feature_input_layer]
        return self._to_candidates(x[:, 1:])

    def cls_features(self) -> Tensor:
        """``[B, N, d_v]``: the CLS token's feature at the projector's input layer (the same layer as
        :meth:`features`, position 0 of the image's row), repeated on every candidate of its image.
        LLaVA's ``default`` feature selection drops it; VisionZip's official LLaVA path projects it
        and feeds it to the LLM."""
        x = self.inputs[self.tower.feature_input_layer]
        return self._to_candidates(x[:, :1].expand(-1, self.tower.patches, -1))

    def project(self, features: Tensor) -> Tensor:
        with torch.no_grad():
            return self.tower.projector(features)


def clip_tower(model, *, name: str) -> VisionTower:
    """The :class:`VisionTower` of a LLaVA-style model with a CLIP vision tower
    (``model.model.vision_tower[.vision_model].encoder.layers``, ``model.model.multi_modal_projector``).

    Raises :class:`UnsupportedModelError` for layouts whose visual tokens are not the CLS-free
    patches of one ``vision_feature_layer``.
    """
    cfg = model.config
    tower = model.model.vision_tower
    try:
        layers = list(getattr(tower, "vision_model", tower).encoder.layers)
    except AttributeError:
        raise UnsupportedModelError(f"{name}: vision signals need a CLIP-style vision tower (encoder.layers)") from None
    feature_layer = cfg.vision_feature_layer
    if not isinstance(feature_layer, int):
        raise UnsupportedModelError(
            f"{name}: vision signals need one vision_feature_layer; this model concatenates layers {feature_layer}"
        )
    if cfg.vision_feature_select_strategy != "default":
        raise UnsupportedModelError(
            f"{name}: vision signals need vision_feature_select_strategy='default' (CLS dropped); "
            f"got {cfg.vision_feature_select_strategy!r}"
        )
    n = len(layers)
    index = feature_layer + n + 1 if feature_layer < 0 else feature_layer  # into hidden_states (n + 1 entries)
    if not 0 <= index < n:
        raise UnsupportedModelError(
            f"{name}: vision signals read the projector's input as the input of an encoder layer; "
            f"vision_feature_layer={feature_layer} is the tower's last output"
        )
    vc = cfg.vision_config
    patches = (vc.image_size // vc.patch_size) ** 2
    return VisionTower(
        tower=tower,
        layers=layers,
        projector=model.model.multi_modal_projector,
        feature_input_layer=index,
        patches=patches,
    )
