"""KV-cache size: the closed form from per-layer token counts, and the real size of a cache.

After a prefill, decoder layer ``l`` of a Llama-family model holds keys and values of shape
``[B, H_kv, n_l, head_dim]`` each, where ``n_l`` is the number of tokens that entered the layer
(layers after a tokenreduce cut hold fewer).  Per sample::

    kv_bytes = sum_l 2 * n_l * H_kv * head_dim * bytes_per_element

LLaMA-7B in fp16 (32 layers, 32 x 128 = 4096 key/value width): 2 * 4096 * 2 * 32 bytes =
0.5 MiB per token, so 636 tokens = 318 MiB (the PIO-FVLM README's "318 MB" is MiB).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def kv_bytes(per_layer_tokens: Sequence[int], kv_width: int, dtype_bytes: int) -> int:
    """Bytes of keys and values over all layers for one sample.

    Args:
        per_layer_tokens: tokens held by each decoder layer's cache (length = number of layers).
        kv_width: ``num_key_value_heads * head_dim`` (4096 for LLaMA-7B, 512 for Qwen2.5-VL-7B).
        dtype_bytes: bytes per element of the cache (2 for fp16/bf16, 4 for fp32).
    """
    if kv_width <= 0 or dtype_bytes <= 0:
        raise ValueError(f"kv_width and dtype_bytes must be positive; got {kv_width} and {dtype_bytes}")
    if any(n < 0 for n in per_layer_tokens):
        raise ValueError(f"per-layer token counts must be >= 0; got {list(per_layer_tokens)}")
    return int(sum(2 * int(n) * kv_width * dtype_bytes for n in per_layer_tokens))


def cache_bytes(cache: Any) -> int:
    """Real size of a ``transformers`` cache: the sum of ``numel * element_size`` of every layer's
    key and value tensors (transformers 5.x layout: ``cache.layers[i].keys`` / ``.values``, each
    ``[B, H_kv, n_i, head_dim]``).  Uninitialised layers count 0."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"{type(cache).__name__} has no .layers; expected a transformers 5.x Cache (e.g. DynamicCache)")
    total = 0
    for layer in layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return int(total)


def cache_tokens(cache: Any) -> list[int]:
    """Tokens held by each layer of a cache (``keys.shape[-2]``; 0 for an empty layer)."""
    out = []
    for layer in getattr(cache, "layers", []):
        t = getattr(layer, "keys", None)
        out.append(int(t.shape[-2]) if isinstance(t, torch.Tensor) and t.dim() >= 2 else 0)
    return out
