"""Attention masks for a reduced sequence, in the format each attention implementation expects.

After a cut, layers >= K see a shorter (and possibly re-padded) sequence, so the mask that the
model computed once for the full sequence no longer fits.  Instead of gathering that mask, the
adapters rebuild it from first principles, which is exactly what transformers computes for
Llama-family decoders: a key is visible to a query when it is a valid (non-padding) token and
its position in the *original* sequence is not after the query's.

Formats (transformers 5.x):

* ``sdpa``: ``None`` (causal, no padding) or a bool ``[B, 1, q, k]`` mask, True = attend;
* ``eager``: a float ``[B, 1, q, k]`` additive mask, 0 = attend, ``finfo(dtype).min`` = masked;
* ``flash_attention_*``: ``None`` or the 2-D ``[B, k]`` padding mask (causality is implicit).

Padding query rows attend to themselves only, so no row is fully masked (no NaN anywhere).
"""

from __future__ import annotations

import torch
from torch import Tensor

SUPPORTED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


def build_mask(
    impl: str,
    q_order: Tensor,
    q_valid: Tensor,
    k_order: Tensor,
    k_valid: Tensor,
    dtype: torch.dtype,
    self_slot: Tensor | None = None,
    fast_path: bool = True,
) -> Tensor | None:
    """Mask for queries ``q_order`` ([B, q] original positions) over keys ``k_order`` ([B, k]).

    ``self_slot``: ``[B, q]`` key slot of each query (for padding query rows to attend to
    themselves); ``None`` when the queries are not among the keys' padding slots (decode).

    Fast path: returns None when no query or key of the batch is padding and nothing is masked
    beyond plain causality, so the implementation runs without a mask: flash-attention always
    (causality is implicit), sdpa when ``q == k`` (a prefill after a cut: the slots keep the
    original order, so causal by slot is causal by original position; sdpa takes its
    ``is_causal`` kernel) or ``q == 1`` (a decode step sees every key).  ``fast_path=False``
    always builds the explicit mask (the reference the fast path is tested against).
    """
    all_valid = bool((q_valid.all() & k_valid.all()).item())  # one host sync
    q, k = q_order.shape[1], k_order.shape[1]
    if impl.startswith("flash_attention"):
        if all_valid and fast_path:
            return None
        return k_valid.to(torch.long)
    if fast_path and all_valid and impl == "sdpa" and (q == k or q == 1):
        return None
    allowed = k_valid[:, None, :] & (k_order[:, None, :] <= q_order[:, :, None])  # [B, q, k]
    if self_slot is not None:
        own = torch.zeros_like(allowed)
        own.scatter_(2, self_slot.unsqueeze(-1), True)
        allowed = torch.where(q_valid[:, :, None], allowed, own)
    allowed = allowed.unsqueeze(1)  # [B, 1, q, k]
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    raise ValueError(f"attention implementation {impl!r} is not supported; supported: {', '.join(SUPPORTED_ATTENTION)}")
