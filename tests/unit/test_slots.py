"""The cut's slot bookkeeping (tokenreduce.adapters.cut.slots) on small hand-checked cases, and
the hook lifecycle (cut.hooks): no model needed."""

from __future__ import annotations

import pytest
import torch

from tokenreduce.adapters.cut import slots as sl
from tokenreduce.adapters.cut.hooks import Hooks
from tokenreduce.core.types import Selection

T, F = True, False


def t(x, dtype=torch.long):
    return torch.tensor(x, dtype=dtype)


def b(x):
    return torch.tensor(x, dtype=torch.bool)


def test_initial_slots_cover_the_input():
    valid = t([[0, 1, 1, 1], [1, 1, 1, 1]])  # left padding in row 0
    positions = t([[[0, 1, 2, 3]]])  # [A=1, 1, S]
    s = sl.initial_slots(valid, positions)
    assert s.orig.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert s.valid.dtype == torch.bool and s.valid.tolist() == [[F, T, T, T], [T, T, T, T]]
    assert s.pos.shape == (1, 2, 4) and not s.renumbered


def test_visual_slots_follow_the_original_positions():
    is_visual = b([[F, T, T, F, T]])
    slots = sl.Slots(orig=t([[0, 2, 3, 4]]), valid=b([[F, T, T, T]]), pos=t([[[0, 2, 3, 4]]]))
    # slot 0 is padding (orig 0 is not visual anyway); slots 1..3 are originals 2, 3, 4
    assert sl.visual_slots(is_visual, slots).tolist() == [[F, T, F, T]]


def test_candidates_are_left_aligned_and_padded():
    visual = b([[F, T, F, T, T], [T, F, F, F, F]])
    orig = t([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]])
    c = sl.candidates(visual, orig)
    assert c.index.tolist() == [[1, 3, 4], [0, 0, 0]]
    assert c.valid.tolist() == [[T, T, T], [T, F, F]]
    assert c.original.tolist() == [[11, 13, 14], [20, -1, -1]]


def test_keep_counts_cap_at_the_current_candidates():
    budget = {8: 4, 6: 3}.__getitem__
    got = sl.keep_counts(budget, n_original=t([8, 6, 0]), n_current=t([3, 5, 0]))
    assert got.tolist() == [3, 3, 0]  # min(4, 3), min(3, 5), no visual tokens


def test_keep_mask_keeps_text_and_the_selected_candidates():
    slot_valid = b([[T, T, T, T, T], [F, T, T, T, T]])
    visual = b([[F, T, F, T, T], [F, T, T, F, F]])
    c = sl.candidates(visual, torch.arange(5).expand(2, -1))
    sel = Selection(index=t([[0, 2], [1, 0]]), valid=b([[T, T], [T, F]]))  # row 0: slots 1, 4; row 1: slot 2
    keep, chosen = sl.keep_mask(slot_valid, visual, c, sel)
    assert chosen.tolist() == [[F, T, F, F, T], [F, F, T, F, F]]
    assert keep.tolist() == [[T, T, T, F, T], [F, F, T, T, T]]


def test_left_pad_ragged_rows():
    keep = b([[T, F, T, T], [F, F, F, T]])  # 3 and 1 kept
    gather, valid = sl.left_pad(keep)
    assert gather.tolist() == [[0, 2, 3], [1, 2, 3]]
    assert valid.tolist() == [[T, T, T], [F, F, T]]


@pytest.mark.parametrize("axes", [1, 3])
def test_reduce_keep_and_renumber_policies(axes):
    pos = torch.tensor([[5, 6, 7, 8], [0, 1, 2, 3]]).unsqueeze(0).expand(axes, -1, -1)
    slots = sl.Slots(orig=torch.arange(4).expand(2, -1), valid=torch.ones(2, 4, dtype=torch.bool), pos=pos)
    keep = b([[T, F, T, T], [F, F, F, T]])
    kept, gather = sl.reduce(slots, keep, "keep")
    assert gather.tolist() == [[0, 2, 3], [1, 2, 3]]
    assert kept.orig.tolist() == [[0, 2, 3], [1, 2, 3]] and kept.valid.tolist() == [[T, T, T], [F, F, T]]
    assert kept.pos.shape == (axes, 2, 3) and kept.pos[-1].tolist() == [[5, 7, 8], [1, 2, 3]]
    assert not kept.renumbered
    renum, _ = sl.reduce(slots, keep, "renumber")
    assert renum.pos[-1].tolist() == [[0, 1, 2], [0, 0, 0]] and renum.renumbered
    assert torch.equal(renum.orig, kept.orig) and torch.equal(renum.valid, kept.valid)
    # a later cut under "keep" stays renumbered
    again, _ = sl.reduce(renum, b([[T, F, T], [F, F, T]]), "keep")
    assert again.renumbered and again.pos[0].tolist() == [[0, 2], [0, 0]]


def test_decode_offset_maps_original_onto_renumbered_positions():
    positions = t([[[0, 1, 2, 3]]])
    valid = torch.ones(2, 4, dtype=torch.bool)
    slots = sl.Slots(orig=torch.arange(4).expand(2, -1), valid=valid, pos=positions.expand(-1, 2, -1))
    keep = b([[T, F, T, T], [F, F, F, T]])
    kept, _ = sl.reduce(slots, keep, "keep")
    assert sl.decode_offset(positions, valid, kept).tolist() == [0, 0]
    renum, _ = sl.reduce(slots, keep, "renumber")
    offset = sl.decode_offset(positions, valid, renum)
    assert offset.tolist() == [1, 3]  # next ids 4 and 4 become 3 and 1
    step = t([[[4], [4]]])  # [A, B, q]: the first decode token, original numbering
    assert sl.decode_positions(step, offset).tolist() == [[[3], [1]]]


def test_max_valid_ignores_padding_and_takes_every_axis():
    pos = t([[[9, 1, 2]], [[0, 1, 5]]])  # [A=2, B=1, 3]
    assert sl.max_valid(pos, b([[F, T, T]])).tolist() == [5]
    assert sl.max_valid(pos, b([[T, T, F]])).tolist() == [9]


def test_decode_keys_and_queries():
    slots = sl.Slots(orig=t([[0, 2, 3], [1, 2, 3]]), valid=b([[T, T, T], [F, F, T]]), pos=t([[[0, 2, 3], [1, 2, 3]]]))
    valid2d = b([[T, T, T, T, T, T], [T, T, T, T, F, T]])  # prefill of 4, two generated
    order, valid = sl.decode_keys(slots, valid2d, orig_len=4)
    assert order.tolist() == [[0, 2, 3, 4, 5], [1, 2, 3, 4, 5]]
    assert valid.tolist() == [[T, T, T, T, T], [F, F, T, F, T]]
    assert sl.decode_queries(total=6, q=1, b=2, device=None).tolist() == [[5], [5]]


def test_write_merged_replaces_anchors_only():
    hidden = torch.arange(16, dtype=torch.float32).view(2, 4, 2)
    visual_index = t([[1, 3], [1, 3]])
    merged = torch.tensor([[[70.0, 71], [80, 81]], [[50, 51], [60, 61]]])
    sel = Selection(index=t([[0, 1], [0, 0]]), valid=b([[T, T], [T, F]]), hidden=merged)
    out = sl.write_merged(hidden, visual_index, sel)
    assert out[0].tolist() == [[0, 1], [70, 71], [4, 5], [80, 81]]
    # row 1 keeps one candidate; its padding entry (index 0 again) must not undo the merge
    assert out[1].tolist() == [[8, 9], [50, 51], [12, 13], [14, 15]]
    assert hidden[0, 1].tolist() == [2, 3]  # the input is not mutated


def test_gather_rows_and_rows():
    hidden = torch.arange(12, dtype=torch.float32).view(2, 3, 2)
    assert sl.gather_rows(hidden, t([[2, 0], [1, 1]])).tolist() == [[[4, 5], [0, 1]], [[8, 9], [8, 9]]]
    assert sl.rows(t([[5, 6, 7], [8, 9, 10]]), b([[T, F, T], [F, F, F]])) == [[5, 7], []]


def test_hooks_remove_everything_once_and_roll_back_on_error():
    layer = torch.nn.Linear(2, 2)
    calls, undone = [], []
    hooks = Hooks()
    hooks.on_remove(lambda: undone.append("first"))
    hooks.pre_hook(layer, lambda m, args, kwargs: calls.append(1))
    layer(torch.zeros(1, 2))
    assert calls == [1] and hooks.active and len(hooks) == 2
    hooks.remove_all()
    hooks.remove_all()  # idempotent
    layer(torch.zeros(1, 2))
    assert calls == [1] and undone == ["first"] and not hooks.active

    failing = Hooks()
    with pytest.raises(RuntimeError, match="boom"):
        with failing.installing():
            failing.pre_hook(layer, lambda m, args, kwargs: calls.append(2))
            raise RuntimeError("boom")
    layer(torch.zeros(1, 2))
    assert calls == [1] and not failing.active and not layer._forward_pre_hooks
