"""Slot bookkeeping of a cut, as pure functions on tensors (no model, no hooks).

After a cut the sequence is shorter and re-padded on the left per sample; each *slot* of the
reduced sequence remembers where it came from (:class:`Slots`).  Every function here takes
tensors and returns new ones; none mutates its inputs.  The seam these serve is described in
``docs/cut.md`` and ``docs/writing-an-adapter.md``.

Shapes: ``B`` batch, ``S`` current length, ``N`` candidates (padded to the batch maximum),
``A`` RoPE axes (1 for 1-D RoPE, 3 for M-RoPE).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tokenreduce.core.types import Selection

__all__ = [
    "Candidates",
    "Slots",
    "candidates",
    "decode_keys",
    "decode_offset",
    "decode_positions",
    "decode_queries",
    "gather_rows",
    "initial_slots",
    "keep_counts",
    "keep_mask",
    "left_pad",
    "max_valid",
    "reduce",
    "rows",
    "visual_slots",
    "write_merged",
]


@dataclass(frozen=True)
class Slots:
    """The current sequence of a prefill, one entry per slot.

    Attributes:
        orig: ``[B, S]`` long, position of each slot in the original input sequence.
        valid: ``[B, S]`` bool, False at padding slots.
        pos: ``[A, B, S]`` long, the RoPE position ids each slot carries.
        renumbered: whether ``pos`` differs from the original position ids.
    """

    orig: Tensor
    valid: Tensor
    pos: Tensor
    renumbered: bool = False


@dataclass(frozen=True)
class Candidates:
    """The visual candidates of the current sequence, left-aligned per sample.

    Attributes:
        index: ``[B, N]`` long, slot of each candidate (0 at padding entries).
        valid: ``[B, N]`` bool.
        original: ``[B, N]`` long, position in the original input (-1 at padding entries).
    """

    index: Tensor
    valid: Tensor
    original: Tensor


def initial_slots(valid: Tensor, positions: Tensor, device: torch.device | None = None) -> Slots:
    """The slots of an uncut prefill: every original position, ``valid`` = the 2-D attention mask,
    ``positions`` ``[A, B or 1, S]`` the model's RoPE ids."""
    b, s = valid.shape
    orig = torch.arange(s, device=device if device is not None else valid.device).expand(b, -1)
    return Slots(orig, valid.bool(), positions.expand(-1, b, -1), False)


def visual_slots(is_visual: Tensor, slots: Slots) -> Tensor:
    """``[B, S]`` bool: which valid slots hold a visual candidate (``is_visual`` over the original input)."""
    return is_visual.gather(1, slots.orig) & slots.valid


def keep_counts(
    budget: Callable[[int], int],
    n_original: Tensor | Sequence[int],
    n_current: Tensor | Sequence[int],
    device: torch.device | None = None,
) -> Tensor:
    """``[B]`` long: candidates to keep per sample, ``budget(n_original)`` capped at ``n_current``
    (0 for a sample without visual tokens).  The counts may be tensors (each read from the device
    in one copy) or host integers; the result is on ``device`` (default: ``n_current``'s)."""
    if device is None and isinstance(n_current, Tensor):
        device = n_current.device
    n_o = n_original.tolist() if isinstance(n_original, Tensor) else list(n_original)
    n_c = n_current.tolist() if isinstance(n_current, Tensor) else list(n_current)
    counts = [min(budget(int(n)), int(c)) if n > 0 else 0 for n, c in zip(n_o, n_c)]
    return torch.tensor(counts, dtype=torch.long, device=device)


def candidates(visual: Tensor, orig: Tensor) -> Candidates:
    """The candidates (``visual`` ``[B, S]`` True) of each sample in sequence order, left-aligned
    and padded to the batch maximum; ``orig`` maps slots to original positions."""
    n_vis = visual.sum(-1)
    n_max = int(n_vis.max())
    order = torch.argsort((~visual).to(torch.int8), dim=-1, stable=True)[:, :n_max]
    valid = torch.arange(n_max, device=visual.device).unsqueeze(0) < n_vis.unsqueeze(1)
    index = torch.where(valid, order, torch.zeros_like(order))
    original = torch.where(valid, orig.gather(1, index), torch.full_like(order, -1))
    return Candidates(index, valid, original)


def keep_mask(slot_valid: Tensor, visual: Tensor, cand: Candidates, sel: Selection) -> tuple[Tensor, Tensor]:
    """``(keep [B, S], chosen [B, S])``: the slots that survive (valid non-visual ones and the
    selected candidates) and the selected candidates alone."""
    b, n = cand.valid.shape
    s = slot_valid.shape[1]
    dev = slot_valid.device
    chosen = torch.zeros(b, n, dtype=torch.long, device=dev).scatter_add(1, sel.index, sel.valid.long()) > 0
    chosen_slots = (
        torch.zeros(b, s, dtype=torch.long, device=dev).scatter_add(1, cand.index, (chosen & cand.valid).long()) > 0
    )
    return (slot_valid & ~visual) | chosen_slots, chosen_slots


def left_pad(keep: Tensor) -> tuple[Tensor, Tensor]:
    """``(gather [B, S'], valid [B, S'])``: the kept slots of each row in order, padded on the left
    (S' = the largest keep count); ``gather`` indexes the current slots."""
    s = keep.shape[1]
    s_new = int(keep.sum(-1).max())
    gather = torch.argsort(keep.to(torch.int8), dim=-1, stable=True)[:, s - s_new :]
    return gather, keep.gather(1, gather)


def reduce(slots: Slots, keep: Tensor, policy: str) -> tuple[Slots, Tensor]:
    """The slots that survive ``keep`` (left-padded) and the ``gather`` index that produced them.

    ``policy``: ``"keep"`` carries each slot's position ids over; ``"renumber"`` gives the kept
    slots contiguous ids ``0, 1, ...`` (equal on every axis; padding slots get 0).
    """
    gather, valid = left_pad(keep)
    axes = slots.pos.shape[0]
    if policy == "renumber":
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0).unsqueeze(0).expand(axes, -1, -1)
        renumbered = True
    else:
        pos = slots.pos.gather(2, gather.unsqueeze(0).expand(axes, -1, -1))
        renumbered = slots.renumbered
    return Slots(slots.orig.gather(1, gather), valid, pos, renumbered), gather


def max_valid(pos: Tensor, valid: Tensor) -> Tensor:
    """``[B]``: the largest position id over the axes and valid slots of each row."""
    return pos.masked_fill(~valid.unsqueeze(0), torch.iinfo(pos.dtype).min).amax(dim=(0, 2))


def decode_offset(positions: Tensor, valid: Tensor, slots: Slots) -> Tensor:
    """``[B]``: original decode position minus the position the reduced sequence continues at.

    Decoding continues after the largest id of the prefill (``positions`` ``[A, B or 1, S]`` and
    ``valid`` ``[B, S]`` describe the original sequence); the offset maps that numbering onto
    the numbering of ``slots``.  Zero under the ``keep`` policy.
    """
    b = valid.shape[0]
    return max_valid(positions.expand(-1, b, -1), valid) - max_valid(slots.pos, slots.valid)


def decode_positions(positions: Tensor, offset: Tensor) -> Tensor:
    """``[A, B, q]``: a decode step's original ids ``positions`` moved by each row's ``offset``."""
    return positions - offset.view(1, -1, 1)


def decode_keys(slots: Slots, valid2d: Tensor, orig_len: int) -> tuple[Tensor, Tensor]:
    """``(order [B, K], valid [B, K])`` of the keys a decode step sees after a cut: the prefill's
    slots followed by the tokens generated since (``valid2d`` ``[B, total]``, the step's mask)."""
    b, total = valid2d.shape
    new = torch.arange(orig_len, total, device=slots.orig.device).expand(b, -1)
    return torch.cat([slots.orig, new], dim=1), torch.cat([slots.valid, valid2d[:, orig_len:]], dim=1)


def decode_queries(total: int, q: int, b: int, device: torch.device | None) -> Tensor:
    """``[B, q]``: the original positions of a decode step's ``q`` tokens in a sequence of ``total``."""
    return torch.arange(total - q, total, device=device).expand(b, -1)


def write_merged(hidden: Tensor, visual_index: Tensor, sel: Selection) -> Tensor:
    """``hidden`` with the kept candidates' rows replaced by ``sel.hidden`` (a new tensor).

    A merged token replaces its kept anchor (the rule of :class:`~tokenreduce.core.types.Selection`).
    Only valid entries are written (they name distinct slots), so padding entries of a ragged
    selection never overwrite a merged row.
    """
    assert sel.hidden is not None
    slots = visual_index.gather(1, sel.index)  # [B, k] positions in the current sequence
    rows = torch.arange(slots.shape[0], device=slots.device).unsqueeze(1).expand_as(slots)
    out = hidden.clone()
    out[rows[sel.valid], slots[sel.valid]] = sel.hidden[sel.valid].to(hidden.dtype)
    return out


def gather_rows(hidden: Tensor, gather: Tensor) -> Tensor:
    """``[B, S', d]``: the rows ``gather`` ``[B, S']`` of ``hidden`` ``[B, S, d]``."""
    return hidden.gather(1, gather.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def rows(values: Tensor, mask: Tensor) -> list[list[int]]:
    """Per row, the entries of ``values`` ``[B, S]`` where ``mask`` is True, as Python lists (one
    copy to the host for the whole batch, not one per row)."""
    values, mask = values.cpu(), mask.cpu()
    return [row[m].tolist() for row, m in zip(values, mask)]
