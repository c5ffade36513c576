"""Signals for Llama-family decoder layers, recomputed without attention matrices of the model.

Everything here reads a layer's own modules (``input_layernorm``, ``q_proj``/``k_proj``/
``v_proj``/``o_proj``, ``post_attention_layernorm``, ``mlp``) and the rotary tables the model
computed, so it works whatever attention implementation the model runs (sdpa, eager,
flash-attention) and never asks the model for ``output_attentions``.  Only the requested query
rows are computed: ``Q x S`` scores, never ``S x S``.

Grouped-query attention is handled by folding the query heads of a key/value group into the
row dimension (``[B, H_kv, G*Q, hd]``), so keys and values are never repeated per head.

Layer conventions (see :class:`~tokenreduce.core.types.SignalSource`): offset 0 is the cut
layer K (the first consumer of the reduced sequence), offset -1 the layer K-1 that produced the
hidden states at the cut.

Gradients: :meth:`LlamaSignals.layer_forward` and :meth:`LlamaSignals.layer_module_forward`
are differentiable with respect to ``hidden``; call them under ``torch.enable_grad()`` (and
outside inference mode) and differentiate with ``torch.autograd.grad(loss, hidden)`` so that no
``.grad`` lands on model parameters.  Tensors the model created under ``torch.inference_mode()``
(rotary tables, masks) are cloned out of it here when grad mode is on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tokenreduce.core.types import Need

from .masks import build_mask
from .vision_signals import VisionSignals

#: layer kwargs that must never reach a probe forward (the probe has no KV cache)
_CACHE_KWARGS = (
    "hidden_states",
    "past_key_values",
    "past_key_value",
    "use_cache",
    "cache_position",
    "output_attentions",
)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x``: ``[B, H, n, hd]``; ``cos``/``sin``: ``[B, n, hd]``."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def _gather_rows(x: Tensor, rows: Tensor) -> Tensor:
    """``x``: ``[B, S, ...]``, ``rows``: ``[B, R]`` -> ``[B, R, ...]``."""
    idx = rows.view(*rows.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, idx)


def _usable(t):
    """``t`` itself, or a normal clone of it when it is an inference tensor and autograd is on
    (inference tensors cannot be saved for backward).  Recurses into tuples."""
    if isinstance(t, tuple):
        return tuple(_usable(x) for x in t)
    if isinstance(t, Tensor) and torch.is_grad_enabled() and t.is_inference():
        return t.clone()
    return t


def _head_norm(attn, name: str, x: Tensor) -> Tensor:
    """``x`` ``[B, S, H, hd]`` through the attention's per-head norm ``name`` (``q_norm`` /
    ``k_norm``: Qwen3 and other decoders normalise queries and keys per head before RoPE), or
    unchanged when the layer has none (Llama, Qwen2)."""
    norm = getattr(attn, name, None)
    return x if norm is None else norm(x)


class LlamaSignals:
    """:class:`~tokenreduce.core.types.SignalSource` for one stage of a Llama-family decoder."""

    provides = Need.HIDDEN | Need.ATTENTION_ROWS | Need.KEY_STATES | Need.LAYER_PROBE | Need.VISUAL_GRID

    def __init__(
        self,
        layers,
        norm: torch.nn.Module,
        lm_head: torch.nn.Module,
        layer: int,
        current: tuple[Tensor, dict],
        previous: tuple[Tensor, dict] | None,
        valid: Tensor,
        grid: Callable[[], Tensor],
        vision: VisionSignals | None = None,
    ):
        self._layers = layers
        self._norm = norm
        self._lm_head = lm_head
        self._layer = layer
        self._inputs = {0: current, -1: previous}
        self._valid = valid  # [B, S]
        self._grid = grid
        self._vision_signals = vision

    # -- helpers ---------------------------------------------------------------------------------
    def _resolve(self, layer_offset: int):
        if layer_offset not in (0, -1):
            raise ValueError(f"layer_offset must be 0 (cut layer) or -1 (the layer before it); got {layer_offset}")
        inputs = self._inputs[layer_offset]
        if inputs is None:
            raise ValueError(f"no layer before the cut at layer {self._layer} (layer_offset=-1 needs K >= 1)")
        hidden, kwargs = inputs
        return self._layers[self._layer + layer_offset], hidden, kwargs

    @staticmethod
    def _rotary(kwargs: dict, b: int) -> tuple[Tensor, Tensor]:
        cos, sin = _usable(kwargs["position_embeddings"])
        return cos.expand(b, -1, -1), sin.expand(b, -1, -1)  # [B, S, hd] each

    def _cached_keys(self, layer_offset: int, hidden: Tensor, kwargs: dict) -> Tensor | None:
        """Layer K-1's keys after RoPE ``[B, H_kv, S, hd]`` as that layer stored them in the KV cache
        of this prefill, or None (no cache, another layout, or ``layer_offset`` 0: the cut layer
        has not run yet).

        Layer K-1 ran on exactly the hidden states and rotary tables captured for it, through the
        same projection, head norm and RoPE formula as :meth:`_keys_values`, so its cached keys
        are what the recomputation would give, bit for bit (``tests/adapters/test_mask_fast_path.py``
        checks it per architecture) and the ``S x d x d_kv`` key projection is not paid twice.
        """
        if layer_offset != -1:
            return None
        cache = kwargs.get("past_key_values")
        entries = getattr(cache, "layers", None)
        index = self._layer + layer_offset
        if entries is None or not 0 <= index < len(entries):
            return None
        keys = getattr(entries[index], "keys", None)
        b, s, _ = hidden.shape
        if not isinstance(keys, Tensor) or keys.dim() != 4 or keys.shape[0] != b or keys.shape[2] != s:
            return None  # not (only) this prefill's sequence: recompute
        if keys.dtype != hidden.dtype or keys.device != hidden.device:
            return None
        # a copy laid out as _keys_values lays its keys out (heads inside positions: the projection's
        # view, transposed): products that read them see the same strides, hence the same bits, and
        # the cache itself is never handed out
        return keys.transpose(1, 2).contiguous().transpose(1, 2)

    @staticmethod
    def _keys_values(layer, x: Tensor, cos: Tensor, sin: Tensor, with_values: bool = True):
        """Keys after RoPE (and values) at every position: ``[B, H_kv, S, hd]``."""
        attn = layer.self_attn
        b, s, _ = x.shape
        hd = attn.head_dim
        k = _head_norm(attn, "k_norm", attn.k_proj(x).view(b, s, -1, hd)).transpose(1, 2)
        k = apply_rope(k, cos, sin)
        v = attn.v_proj(x).view(b, s, -1, hd).transpose(1, 2) if with_values else None
        return k, v

    def _row_attention(
        self, layer, x_rows: Tensor, cos: Tensor, sin: Tensor, rows: Tensor, k: Tensor, v: Tensor | None
    ) -> Tensor:
        """Attention of query ``rows`` (``[B, R]`` slots; ``x_rows`` ``[B, R, d]`` their normed
        hidden states) over all ``S`` keys ``k`` ``[B, H_kv, S, hd]``, causal by slot and
        padding-masked.

        Returns the probabilities ``[B, H, R, S]`` (computation dtype, softmax taken in float32
        like the eager implementation) when ``v`` is None, else the attention output
        ``[B, R, H*hd]`` (before ``o_proj``).  Query heads of one key/value group are folded into
        the row dimension, so grouped-query keys and values are never repeated.
        """
        attn = layer.self_attn
        b, r, _ = x_rows.shape
        s = k.shape[2]
        hd = attn.head_dim
        h_kv = k.shape[1]
        q = _head_norm(attn, "q_norm", attn.q_proj(x_rows).view(b, r, -1, hd)).transpose(1, 2)
        q = apply_rope(q, _gather_rows(cos, rows), _gather_rows(sin, rows))
        h = q.shape[1]
        groups = h // h_kv
        q = q.reshape(b, h_kv, groups * r, hd)  # head j*G+g of kv group j -> rows g*R..g*R+R-1
        scores = (q @ k.transpose(-1, -2)) * attn.scaling  # [B, H_kv, G*R, S]
        slots = torch.arange(s, device=k.device)
        allowed = (slots.view(1, 1, s) <= rows.unsqueeze(-1)) & _usable(self._valid).unsqueeze(1)  # [B, R, S]
        allowed = allowed | (slots.view(1, 1, s) == rows.unsqueeze(-1))  # a padding row attends to itself: no NaN
        scores = scores.view(b, h_kv, groups, r, s).masked_fill(~allowed[:, None, None], float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # [B, H_kv, G, R, S]
        if v is None:
            return probs.reshape(b, h, r, s)
        out = probs.view(b, h_kv, groups * r, s) @ v  # [B, H_kv, G*R, hd]
        return out.view(b, h, r, hd).transpose(1, 2).reshape(b, r, h * hd)

    # -- SignalSource ------------------------------------------------------------------------------
    def attention_rows(self, query_index: Tensor, layer_offset: int = -1) -> Tensor:
        layer, hidden, kwargs = self._resolve(layer_offset)
        with torch.no_grad():
            cos, sin = self._rotary(kwargs, hidden.shape[0])
            # the norm over every row, then the query rows: norming only the gathered rows is not
            # bit-identical (the reduction's vectorisation depends on the tensor's shape)
            x = layer.input_layernorm(hidden)
            k = self._cached_keys(layer_offset, hidden, kwargs)
            if k is None:
                k, _ = self._keys_values(layer, x, cos, sin, with_values=False)
            return self._row_attention(layer, _gather_rows(x, query_index), cos, sin, query_index, k, None).float()

    def key_states(self, layer_offset: int = -1) -> Tensor:
        layer, hidden, kwargs = self._resolve(layer_offset)
        cached = self._cached_keys(layer_offset, hidden, kwargs)
        if cached is not None:
            return cached  # a copy: the caller may change it, the cache stays as the layer wrote it
        with torch.no_grad():
            cos, sin = self._rotary(kwargs, hidden.shape[0])
            x = layer.input_layernorm(hidden)
            k, _ = self._keys_values(layer, x, cos, sin, with_values=False)
        return k

    def layer_forward(self, hidden: Tensor, rows: Tensor | None, layer_offset: int = 0) -> Tensor:
        """Row-restricted forward of one decoder layer (see the protocol).  Keys and values are
        computed at every position, queries, ``o_proj``, the residual and the MLP only at
        ``rows``; the output at those rows equals the full layer's (same causal+padding mask)."""
        layer, _, kwargs = self._resolve(layer_offset)
        b, s, _ = hidden.shape
        cos, sin = self._rotary(kwargs, b)
        rows = torch.arange(s, device=hidden.device).expand(b, -1) if rows is None else _usable(rows)
        x = layer.input_layernorm(hidden)
        k, v = self._keys_values(layer, x, cos, sin)
        out = self._row_attention(layer, _gather_rows(x, rows), cos, sin, rows, k, v)  # [B, R, H*hd]
        h = _gather_rows(hidden, rows) + layer.self_attn.o_proj(out)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def layer_module_forward(self, hidden: Tensor, layer_offset: int = 0) -> Tensor:
        """The model's own decoder-layer module (its attention implementation) on ``hidden``
        (``[B, S, d]``) with the stage's positions and a causal+padding mask, no KV cache:
        ``[B, S, d]``.  The reference path of gradient probes (``probe: exact``).

        The module is called through ``forward`` so that no forward hook (tokenreduce's own cut
        hooks included) runs again.  The mask is rebuilt from the slot validity in the layer's
        attention format (padding query rows attend to themselves, so no row is fully masked and
        a backward pass never meets a NaN).
        """
        layer, _, kwargs = self._resolve(layer_offset)
        b, s, _ = hidden.shape
        impl = getattr(layer.self_attn.config, "_attn_implementation", None) or "sdpa"
        slots = torch.arange(s, device=hidden.device).expand(b, -1)
        valid = _usable(self._valid)
        mask = build_mask(impl, slots, valid, slots, valid, hidden.dtype, self_slot=slots)
        call = {k: _usable(v) for k, v in kwargs.items() if k not in _CACHE_KWARGS}
        call["attention_mask"] = mask
        out = layer.forward(hidden, past_key_values=None, use_cache=False, **call)
        return out[0] if isinstance(out, tuple) else out

    def final_norm(self, hidden: Tensor) -> Tensor:
        return self._norm(hidden)

    def lm_logits(self, hidden: Tensor) -> Tensor:
        return self._lm_head(self._norm(hidden))

    def visual_grid(self) -> Tensor:
        return self._grid()

    # -- vision-tower signals (see tokenreduce.adapters.vision_signals) ----------------------------
    def _vision(self) -> VisionSignals:
        if self._vision_signals is None:
            raise RuntimeError(
                f"vision-tower signals are only available at a stage cutting at layer 0 of a plan whose "
                f"components declare a Need.VISION_* flag (this stage cuts at layer {self._layer})"
            )
        return self._vision_signals

    def vision_cls_attention(self, layer: int, heads: str = "sum") -> Tensor:
        return self._vision().cls_attention(layer, heads)

    def vision_keys(self, layer: int, heads: str = "mean") -> Tensor:
        return self._vision().keys(layer, heads)

    def vision_features(self) -> Tensor:
        return self._vision().features()

    def vision_cls_features(self) -> Tensor:
        return self._vision().cls_features()

    def project_vision(self, features: Tensor) -> Tensor:
        return self._vision().project(features)
