"""What a decoder layer after a cut receives instead of the full-length kwargs the language model
computed: the attention mask, the rotary ``(cos, sin)`` and ``position_ids``.

The language model computes these once for the full sequence and hands the same objects to
every layer; a layer after a cut sees fewer tokens, so its kwargs are rebuilt for the reduced
sequence.  See ``docs/cut.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..masks import build_mask
from . import slots as sl
from .slots import Slots

#: ``(hidden, positions [A, B, S]) -> (cos, sin)`` as the decoder computes them
Rotary = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

__all__ = ["Rotary", "decode_kwargs", "prefill_kwargs"]


def _result(mask: Tensor | None, cos: Tensor, sin: Tensor) -> dict:
    # ``position_ids`` only serves flash-attention's packed-sequence detection, which would
    # read the gaps of kept original ids as sequence boundaries: the reduced sequence is one
    # sequence per row, described by the mask.
    return {"attention_mask": mask, "position_embeddings": (cos, sin), "position_ids": None}


def prefill_kwargs(slots: Slots, hidden: Tensor, orig: dict, impl: str, rotary: Rotary) -> dict:
    """Kwargs for a prefill layer that sees the reduced sequence ``slots``.

    RoPE: the rows of the model's own tables at the kept slots, or (positions renumbered) the
    tables recomputed by ``rotary``.  Mask: causal in original order, padding masked, in the
    format of the attention implementation ``impl``.
    """
    cos, sin = orig["position_embeddings"]
    b = slots.orig.shape[0]
    if slots.renumbered:
        cos, sin = rotary(hidden, slots.pos)
    else:  # original ids: gather the rotary tables the model computed
        idx = slots.orig.unsqueeze(-1).expand(-1, -1, cos.shape[-1])
        cos, sin = cos.expand(b, -1, -1).gather(1, idx), sin.expand(b, -1, -1).gather(1, idx)
    slot = torch.arange(slots.orig.shape[1], device=hidden.device).expand(b, -1)
    mask = build_mask(impl, slots.orig, slots.valid, slots.orig, slots.valid, hidden.dtype, self_slot=slot)
    return _result(mask, cos, sin)


def decode_kwargs(
    slots: Slots,
    offset: Tensor,
    hidden: Tensor,
    orig: dict,
    impl: str,
    rotary: Rotary,
    valid2d: Tensor,
    orig_len: int,
    positions: Tensor,
) -> dict:
    """Kwargs for a decode-step layer whose cache holds the prefill's reduced sequence ``slots``.

    Only the key dimension of the mask refers to pruned positions; ``valid2d`` ``[B, total]`` is
    the step's 2-D mask, ``orig_len`` the prefill's length, ``positions`` ``[A, B, q]`` the step's
    original ids (moved by ``offset`` when the positions were renumbered).
    """
    cos, sin = orig["position_embeddings"]
    b, total = valid2d.shape
    q = hidden.shape[1]
    k_order, k_valid = sl.decode_keys(slots, valid2d, orig_len)
    q_order = sl.decode_queries(total, q, b, hidden.device)
    mask = build_mask(impl, q_order, valid2d[:, total - q :], k_order, k_valid, hidden.dtype)
    if slots.renumbered:
        cos, sin = rotary(hidden, sl.decode_positions(positions, offset))
    return _result(mask, cos, sin)
