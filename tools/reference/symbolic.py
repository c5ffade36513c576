"""Stage 0 of the scenes recipe: pre-train the language model on symbolic scenes.

A real LLaVA starts from a language model that already reasons over text; the scenes reference
model starts from scratch, and its decoder is what learns slowly: measured with perfect perception
(every grid cell given to an 8-layer decoder of width 64 as one token built from its shape,
colour, size, row and column), the relation questions stay at chance for about 4,000 steps and
then are all answered (TRAINING.md). At 576 visual tokens a step costs about 0.9 s, so those
steps cannot be paid for with pixels. Stage 0 pays for them on short sequences instead:

- each visual token is replaced by a *symbol*: the sum of learned embeddings (:class:`SceneSymbols`)
  of the per-patch labels of :func:`tools.reference.train._token_tags` (shape, colour and size of
  the object covering the patch, or none; row and column of its grid cell);
- of the 576 patches only a few per cell are kept (:func:`sample_patches`: 1-3 patches of each
  object and 1-3 of each cell's background), each at the position id its patch has in the real
  prompt, so the question tokens sit exactly where they will with the full image and the decoder
  sees the RoPE distances of the real model;
- the loss is the answer and ``</s>`` of the scenes questions, as in stage 2.

Stage 1 then trains the vision tower and projector to output the symbol of every patch (besides its
linear classification heads), and stage 2 trains the whole model on the pixels as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tokenreduce.reference import scenes as scenes_task

__all__ = ["LABEL_CLASSES", "SceneSymbols", "sample_patches", "symbolic_batch", "symbolic_logits"]

#: classes of the five per-patch labels: shape (none + 4), colour (none + 6), size (none + 2),
#: cell row (3), cell column (3); the column order of :func:`tools.reference.train._token_tags`.
LABEL_CLASSES = (
    1 + len(scenes_task.SCENE_SHAPES),
    1 + len(scenes_task.SCENE_COLORS),
    1 + len(scenes_task.SIZES),
    3,
    3,
)


class SceneSymbols(torch.nn.Module):
    """The symbol of a patch: the sum of one learned embedding per label (``[..., 5]`` int64 labels
    -> ``[..., width]``).

    Each table starts with orthonormal rows (every value of a label at distance sqrt(2) from every
    other, when ``width`` is at least the number of values), not with the language model's small normal init: at std 0.02 in width 64 the rows of
    the three sizes start 0.2 apart and stayed there through 18,000 steps of stage 0 (size questions
    at chance while every other label separated to 1.5-2.1), a saddle the wider start avoids.
    """

    def __init__(self, width: int, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.tables = torch.nn.ModuleList(torch.nn.Embedding(n, width) for n in LABEL_CLASSES)
            for table in self.tables:
                torch.nn.init.orthogonal_(table.weight)

    def row_distances(self) -> list[float]:
        """The smallest distance between two rows of each label table (a stuck label shows as ~0)."""
        return [float(torch.pdist(table.weight.detach()).min()) for table in self.tables]

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.shape[-1] != len(LABEL_CLASSES):
            raise ValueError(f"labels must end in {len(LABEL_CLASSES)} columns, got shape {tuple(labels.shape)}")
        return sum(table(labels[..., k]) for k, table in enumerate(self.tables))  # type: ignore[return-value]


def sample_patches(
    labels: torch.Tensor, generator: torch.Generator, low: int = 1, high: int = 3, per_cell: bool = False
) -> torch.Tensor:
    """Indices (ascending) of the patches one symbolic scene keeps: for every grid cell and every
    distinct (shape, colour, size) in it (an object, or the background), ``low..high`` of its
    patches (all of them when it has fewer), drawn with ``generator``.

    ``per_cell``: one patch per grid cell instead: of the object whose own cell it is (the cell
    holding most of its patches), else of the cell's background (the easier scenes stage 0 starts
    with). A cell whose every patch is covered by neighbours and has no own object keeps none.

    Args:
        labels: ``[N, 5]`` per-patch labels of one image (:func:`tools.reference.train._token_tags`).
    """
    if not 1 <= low <= high:
        raise ValueError(f"need 1 <= low <= high, got low={low} high={high}")
    # one group id per patch: (row, col, shape, colour, size) packed into an integer
    key = (((labels[:, 3] * 3 + labels[:, 4]) * 5 + labels[:, 0]) * 7 + labels[:, 1]) * 3 + labels[:, 2]
    order = torch.randperm(len(labels), generator=generator)
    if per_cell:
        cell = labels[:, 3] * 3 + labels[:, 4]
        what = (labels[:, 0] * 7 + labels[:, 1]) * 3 + labels[:, 2]  # the object (0: background)
        home: dict[int, int] = {}  # object -> the cell holding most of its patches (its own cell)
        for obj in what.unique().tolist():
            if obj:
                home[obj] = int(torch.bincount(cell[what == obj], minlength=9).argmax())
        best: dict[int, int] = {}
        for i in order.tolist():
            c, obj = int(cell[i]), int(what[i])
            own = obj and home[obj] == c
            if c not in best or (own and not int(what[best[c]])):
                if own or not obj:  # an object's patch only in its own cell; else the background
                    best[c] = i
        return torch.tensor(sorted(best.values()), dtype=torch.long)
    counts = torch.randint(low, high + 1, (int(key.max()) + 1,), generator=generator)
    taken: dict[int, int] = {}
    keep = []
    for i in order.tolist():
        k = int(key[i])
        if taken.get(k, 0) < int(counts[k]):
            taken[k] = taken.get(k, 0) + 1
            keep.append(i)
    return torch.tensor(sorted(keep), dtype=torch.long)


def symbolic_batch(
    symbols: SceneSymbols,
    embed: torch.nn.Embedding,
    head_ids: torch.Tensor,
    n_visual: int,
    scenes: Sequence[tuple[torch.Tensor, torch.Tensor]],
    suffixes: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded decoder inputs of symbolic prompts.

    Each sequence is ``head_ids`` (the prompt up to the image: ``<s> user :``), then the kept
    patches' symbols at position ids ``len(head_ids) + patch index``, then its suffix (question,
    ``assistant :``, answer, ``</s>``) from position ``len(head_ids) + n_visual`` on: the positions
    these tokens have in the full prompt.

    Args:
        scenes: per sequence ``(labels [N, 5], kept patch indices [K])``.
        suffixes: per sequence its suffix token ids.

    Returns:
        ``(inputs_embeds [Q, T, D], attention_mask [Q, T], position_ids [Q, T])``.
    """
    h = len(head_ids)
    rows = []
    for (labels, kept), suffix in zip(scenes, suffixes):
        x = torch.cat([embed(head_ids), symbols(labels[kept]), embed(suffix)])
        pos = torch.cat([torch.arange(h), h + kept, h + n_visual + torch.arange(len(suffix))])
        rows.append((x, pos))
    t = max(len(x) for x, _ in rows)
    width = rows[0][0].shape[1]
    inputs = torch.zeros(len(rows), t, width)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    positions = torch.zeros(len(rows), t, dtype=torch.long)
    for q, (x, pos) in enumerate(rows):
        inputs[q, t - len(x) :] = x
        mask[q, t - len(x) :] = 1
        positions[q, t - len(x) :] = pos
    return inputs, mask, positions


def symbolic_logits(model, inputs: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``[Q, 2, V]``: the logits that predict the answer and ``</s>`` (the last suffix tokens of
    left-padded sequences) from a LLaVA model's language model and head."""
    hidden = model.model.language_model(
        inputs_embeds=inputs, attention_mask=mask, position_ids=positions, use_cache=False
    ).last_hidden_state
    return model.lm_head(hidden[:, -3:-1])
