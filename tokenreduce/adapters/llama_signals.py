"""Signals for Llama-family decoder layers, recomputed without attention matrices of the model.

Everything here reads a layer's own modules (``input_layernorm``, ``q_proj``/``k_proj``/
``v_proj``/``o_proj``, ``post_attention_layernorm``, ``mlp``) and the rotary tables the model
computed, so it works whatever attention implementation the model runs (sdpa, eager,
flash-attention) and never asks the model for ``output_attentions``.  Only the requested query
rows are computed: ``Q x S`` scores, never ``S x S`` (design.md §5).

Layer conventions (see :class:`~tokenreduce.core.types.SignalSource`): offset 0 is the cut
layer K (the first consumer of the reduced sequence), offset -1 the layer K-1 that produced the
hidden states at the cut.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from tokenreduce.core.types import Need


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
    ):
        self._layers = layers
        self._norm = norm
        self._lm_head = lm_head
        self._layer = layer
        self._inputs = {0: current, -1: previous}
        self._valid = valid  # [B, S]
        self._grid = grid

    # -- helpers ---------------------------------------------------------------------------------
    def _resolve(self, layer_offset: int):
        if layer_offset not in (0, -1):
            raise ValueError(f"layer_offset must be 0 (cut layer) or -1 (the layer before it); got {layer_offset}")
        if self._inputs[layer_offset] is None:
            raise ValueError(f"no layer before the cut at layer {self._layer} (layer_offset=-1 needs K >= 1)")
        hidden, kwargs = self._inputs[layer_offset]
        return self._layers[self._layer + layer_offset], hidden, kwargs

    def _keys_values(self, layer, x: Tensor, cos: Tensor, sin: Tensor, with_values: bool = True):
        attn = layer.self_attn
        b, s, _ = x.shape
        hd = attn.head_dim
        k = attn.k_proj(x).view(b, s, -1, hd).transpose(1, 2)
        k = apply_rope(k, cos, sin)
        v = attn.v_proj(x).view(b, s, -1, hd).transpose(1, 2) if with_values else None
        return k, v

    def _attention_probs(self, layer, x: Tensor, cos: Tensor, sin: Tensor, rows: Tensor, k: Tensor) -> Tensor:
        """Softmax attention of query ``rows`` over all keys, causal by slot and padding-masked:
        ``[B, H, R, S]`` in the computation dtype."""
        attn = layer.self_attn
        b, s, _ = x.shape
        hd = attn.head_dim
        q = attn.q_proj(_gather_rows(x, rows)).view(b, rows.shape[1], -1, hd).transpose(1, 2)
        q = apply_rope(q, _gather_rows(cos, rows), _gather_rows(sin, rows))
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1) if groups > 1 else k
        scores = (q @ k.transpose(-1, -2)) * attn.scaling  # [B, H, R, S]
        slots = torch.arange(s, device=x.device)
        allowed = (slots.view(1, 1, s) <= rows.unsqueeze(-1)) & self._valid.unsqueeze(1)  # [B, R, S]
        scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
        return torch.softmax(scores.float(), dim=-1).to(scores.dtype)

    # -- SignalSource ------------------------------------------------------------------------------
    def attention_rows(self, query_index: Tensor, layer_offset: int = -1) -> Tensor:
        layer, hidden, kwargs = self._resolve(layer_offset)
        cos, sin = kwargs["position_embeddings"]
        with torch.no_grad():
            x = layer.input_layernorm(hidden)
            cos, sin = cos.expand(x.shape[0], -1, -1), sin.expand(x.shape[0], -1, -1)
            k, _ = self._keys_values(layer, x, cos, sin, with_values=False)
            return self._attention_probs(layer, x, cos, sin, query_index, k).float()

    def key_states(self, layer_offset: int = -1) -> Tensor:
        layer, hidden, kwargs = self._resolve(layer_offset)
        cos, sin = kwargs["position_embeddings"]
        with torch.no_grad():
            x = layer.input_layernorm(hidden)
            k, _ = self._keys_values(layer, x, cos.expand(x.shape[0], -1, -1), sin.expand(x.shape[0], -1, -1), False)
        return k

    def layer_forward(self, hidden: Tensor, rows: Tensor | None, layer_offset: int = 0) -> Tensor:
        layer, _, kwargs = self._resolve(layer_offset)
        cos, sin = kwargs["position_embeddings"]
        b, s, _ = hidden.shape
        cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
        if rows is None:
            rows = torch.arange(s, device=hidden.device).expand(b, -1)
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        k, v = self._keys_values(layer, x, cos, sin)
        probs = self._attention_probs(layer, x, cos, sin, rows, k)  # [B, H, R, S]
        groups = probs.shape[1] // v.shape[1]
        v = v.repeat_interleave(groups, dim=1) if groups > 1 else v
        out = (probs @ v).transpose(1, 2).reshape(b, rows.shape[1], -1)  # [B, R, H*hd]
        h = _gather_rows(hidden, rows) + attn.o_proj(out)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def lm_logits(self, hidden: Tensor) -> Tensor:
        return self._lm_head(self._norm(hidden))

    def visual_grid(self) -> Tensor:
        return self._grid()
