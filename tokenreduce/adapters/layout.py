"""Where each visual token sits on its image: shared by the adapters' ``visual_grid``.

An adapter describes every image (or video) of a batch, in input order, as a small table with
one row per visual token in the order the model writes them into the sequence:
``(panel, row, col, newline)``.  A *panel* is one 2-D grid of an image (LLaVA-NeXT: the base
image is panel 0, the high-resolution crop grid panel 1; Qwen2.5-VL video: one panel per
temporal slice); ``newline`` marks LLaVA-NeXT's ``image_newline`` tokens (column = the grid
width, one past the last patch).  :func:`place_items` lays those tables onto the visual
positions of ``input_ids``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def grid_table(rows: int, cols: int, panel: int = 0, newline: bool = False) -> Tensor:
    """``[rows * (cols + newline), 4]`` long: a raster grid (plus a newline token per row)."""
    r = torch.arange(rows).repeat_interleave(cols + int(newline))
    c = torch.arange(cols + int(newline)).repeat(rows)
    is_newline = (c == cols).long() if newline else torch.zeros_like(c)
    return torch.stack([torch.full_like(r, panel), r, c, is_newline], dim=-1)


def place_items(media: Tensor, items: list[Tensor]) -> Tensor:
    """Lay per-item token tables onto the media positions of a batch.

    Args:
        media: ``[B, S]`` bool, True at the tokens that carry image/video features (all of them,
            including padding-free positions only).
        items: one ``[n_i, 4]`` table per image/video in input order (row-major over the batch).

    Returns:
        ``[B, S, 4]`` long: (panel index within the sample, row, col, newline flag); zeros at
        non-media positions.
    """
    b, s = media.shape
    out = torch.zeros(b, s, 4, dtype=torch.long, device=media.device)
    where = torch.nonzero(media)  # [M, 2] in row-major order
    total = sum(int(t.shape[0]) for t in items)
    if total != where.shape[0]:
        raise ValueError(
            f"the inputs have {where.shape[0]} visual tokens but the image sizes describe {total}; "
            "the image placeholders do not match the images"
        )
    start, panels_used = 0, [0] * b
    for table in items:
        n = int(table.shape[0])
        if n == 0:
            continue
        rows = where[start : start + n]
        sample = int(rows[0, 0])
        if int(rows[-1, 0]) != sample:
            raise ValueError("an image's visual tokens span two samples of the batch")
        table = table.to(media.device).clone()
        table[:, 0] += panels_used[sample]
        panels_used[sample] = int(table[:, 0].max()) + 1
        out[rows[:, 0], rows[:, 1]] = table
        start += n
    return out


def runs(mask: Tensor) -> list[list[tuple[int, int]]]:
    """Per sample, the ``(start, end)`` (end exclusive) of each run of True in ``mask`` ``[B, S]``."""
    padded = torch.nn.functional.pad(mask.long(), (1, 1))
    edges = padded[:, 1:] - padded[:, :-1]  # +1 at a start, -1 one past an end
    out = []
    for row in edges.cpu():
        starts = torch.nonzero(row == 1).flatten().tolist()
        ends = torch.nonzero(row == -1).flatten().tolist()
        out.append(list(zip(starts, ends)))
    return out
