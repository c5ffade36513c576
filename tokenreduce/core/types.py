"""The data exchanged between adapters, scorers and selectors.

Shapes use these letters: ``B`` batch, ``S`` current sequence length at the cut, ``N`` visual
candidates per sample (padded to the batch maximum, see ``visual_valid``), ``d`` hidden size,
``k`` kept tokens per sample (padded to the batch maximum, see ``Selection.valid``).

Samples may differ in how many visual tokens they have (ragged batches), so every per-sample
quantity comes with a boolean validity mask instead of relying on equal lengths.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


class Need(enum.Flag):
    """Signals a strategy reads and an adapter can supply.

    Strategies declare ``needs``; adapters declare ``provides``.  Building a plan fails when a
    strategy needs a signal that the model's adapter cannot provide.
    """

    NONE = 0
    #: hidden states at the cut, their validity and the visual candidates (always provided)
    HIDDEN = enum.auto()
    #: attention probabilities of chosen query rows at a decoder layer, recomputed from the
    #: layer's own projections (works under sdpa and flash-attention)
    ATTENTION_ROWS = enum.auto()
    #: key states (after RoPE) at a decoder layer
    KEY_STATES = enum.auto()
    #: a differentiable forward of one decoder layer (optionally at a few query rows only) plus
    #: the final norm and the LM head: what gradient-saliency scorers need
    LAYER_PROBE = enum.auto()
    #: CLS-to-patch attention in the vision tower
    VISION_CLS_ATTENTION = enum.auto()
    #: (image, row, column) of each visual token on its image's grid
    VISUAL_GRID = enum.auto()
    #: key states of the patch tokens at a vision-tower layer
    VISION_KEYS = enum.auto()
    #: the vision features the projector receives (e.g. CLIP layer -2 output) and the projector
    #: itself, for methods that merge tokens in the vision-feature space (VisionZip)
    VISION_FEATURES = enum.auto()
    #: attention each patch receives in the vision tower (mean over query rows, per visual
    #: token): the saliency of towers without a CLS token (Qwen family)
    VISION_ATTENTION = enum.auto()

    def describe(self) -> str:
        """Comma-separated lower-case names of the flags set, e.g. ``"attention_rows, visual_grid"``."""
        names = [m.name.lower() for m in Need if m and m in self and m.name]
        return ", ".join(names) or "none"


#: the signals of the vision tower, which exist only at a stage cutting at layer 0 (the first)
VISION_NEEDS = Need.VISION_CLS_ATTENTION | Need.VISION_KEYS | Need.VISION_FEATURES | Need.VISION_ATTENTION


@runtime_checkable
class SignalSource(Protocol):
    """Architecture-specific signals an adapter computes on request for one stage.

    Layer arguments are offsets relative to the cut layer ``K`` of the stage: offset 0 is the
    decoder layer that will consume the reduced sequence (layer K), offset -1 the layer that
    produced the hidden states at the cut (layer K-1).  All returned tensors are on the model's
    device; probabilities are float32.
    """

    provides: Need

    def attention_rows(self, query_index: Tensor, layer_offset: int = -1) -> Tensor:
        """Attention probabilities of the queries at ``query_index`` (``[B, Q]`` positions in the
        current sequence) over all keys of the current sequence, per head: ``[B, H, Q, S]``
        float32.  Padding keys get probability 0; causal masking applies."""
        ...

    def key_states(self, layer_offset: int = -1) -> Tensor:
        """Key states after RoPE at a decoder layer: ``[B, H_kv, S, head_dim]``."""
        ...

    def layer_forward(self, hidden: Tensor, rows: Tensor | None, layer_offset: int = 0) -> Tensor:
        """Differentiable forward of one decoder layer on ``hidden`` (``[B, S, d]``) with the
        current positions and a causal+padding mask, no KV cache.  With ``rows`` (``[B, R]``
        positions) only those query rows are computed (keys and values still come from every
        position) and ``[B, R, d]`` is returned; with ``None`` the full ``[B, S, d]``."""
        ...

    def layer_module_forward(self, hidden: Tensor, layer_offset: int = 0) -> Tensor:
        """Differentiable forward of the model's own decoder-layer module (its attention
        implementation) on ``hidden`` (``[B, S, d]``) with the current positions and a
        causal+padding mask, no KV cache, no hooks: ``[B, S, d]``.  A reference for
        :meth:`layer_forward` (same values at every valid position)."""
        ...

    def final_norm(self, hidden: Tensor) -> Tensor:
        """The language model's final norm: ``[..., d] -> [..., d]`` (differentiable)."""
        ...

    def lm_logits(self, hidden: Tensor) -> Tensor:
        """Final norm then LM head: ``[..., d] -> [..., vocab]`` (differentiable)."""
        ...

    def visual_grid(self) -> Tensor:
        """``[B, N, 3]`` long: (image index within the sample, row, column) of each candidate."""
        ...

    # -- vision-tower signals (Need.VISION_*): only at a stage cutting at layer 0, the first
    # stage of a plan, whose candidates are exactly the patch tokens the vision tower produced.
    # Vision layers are encoder-layer indices (negative = from the end, -2 = the second to
    # last); a signal "at layer i" is computed from the input of encoder layer i, i.e. it is
    # what layer i's own attention sees (``attentions[i]`` of an eager run).

    def vision_cls_attention(self, layer: int, heads: str = "sum") -> Tensor:
        """Attention from the CLS query to each candidate's patch in vision layer ``layer``,
        softmax over CLS + all patches of its image, then summed (``heads="sum"``) or averaged
        (``"mean"``) over heads: ``[B, N]`` float32 (0 at invalid candidates)."""
        ...

    def vision_keys(self, layer: int, heads: str = "mean") -> Tensor:
        """Key states (``k_proj`` of the layer-normed input) of each candidate's patch at vision
        layer ``layer``: ``[B, N, head_dim]`` averaged over heads (``"mean"``) or ``[B, N, d_v]``
        with heads concatenated (``"concat"``); vision dtype."""
        ...

    def vision_features(self) -> Tensor:
        """``[B, N, d_v]``: the vision features the projector turned into each candidate (for
        LLaVA the CLS-free ``vision_feature_layer`` hidden states); vision dtype."""
        ...

    def vision_cls_features(self) -> Tensor:
        """``[B, N, d_v]``: the CLS token's feature at the layer :meth:`vision_features` reads (the
        token LLaVA's ``default`` selection drops), repeated on every candidate of its image;
        vision dtype.  Part of ``Need.VISION_FEATURES`` (VisionZip keeps the CLS token)."""
        ...

    def project_vision(self, features: Tensor) -> Tensor:
        """The model's projector: ``[..., d_v] -> [..., d]`` (hidden-state dtype)."""
        ...


@dataclass
class TokenView:
    """What a scorer or selector sees at one cut: tensors plus on-demand signals.

    Attributes:
        layer: the cut layer K (0 = before the first decoder layer).
        stage: index of the stage in the plan.
        hidden: ``[B, S, d]`` hidden states entering layer K (model dtype).
        valid: ``[B, S]`` bool, False at padding slots.
        visual_index: ``[B, N]`` long, positions of the visual candidates in the current sequence
            (ascending; 0 where ``visual_valid`` is False).
        visual_valid: ``[B, N]`` bool.
        original_index: ``[B, N]`` long, positions of the candidates in the original input
            sequence (-1 where invalid).
        n_original_visual: ``[B]`` long, visual tokens of each sample before any stage.
        signals: the adapter's :class:`SignalSource` for this stage.
    """

    layer: int
    stage: int
    hidden: Tensor
    valid: Tensor
    visual_index: Tensor
    visual_valid: Tensor
    original_index: Tensor
    n_original_visual: Tensor
    signals: SignalSource
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    @property
    def n_visual(self) -> Tensor:
        """``[B]`` long: visual candidates per sample at this cut."""
        return self.visual_valid.sum(-1)

    def visual_hidden(self) -> Tensor:
        """``[B, N, d]`` hidden states of the visual candidates (zeros where invalid)."""
        if "visual_hidden" not in self.cache:
            idx = self.visual_index.unsqueeze(-1).expand(-1, -1, self.hidden.shape[-1])
            h = self.hidden.gather(1, idx)
            self.cache["visual_hidden"] = h.masked_fill(~self.visual_valid.unsqueeze(-1), 0)
        return self.cache["visual_hidden"]


@dataclass
class Selection:
    """The visual candidates a selector keeps.

    Attributes:
        index: ``[B, k]`` long, indices into the candidate list (0..N-1), strictly ascending in the
            valid part of each row; padded with 0 where ``valid`` is False.
        valid: ``[B, k]`` bool; row ``b`` has exactly ``keep[b]`` True entries, at the front.
        hidden: optional ``[B, k, d]`` (the hidden states' dtype): new hidden states for the kept
            tokens, for methods that merge dropped tokens into kept ones (VisionZip's contextual
            tokens, SparseVLM's recycling, PIO's encoder-side merge).  None keeps them unchanged.

    Merged tokens (one rule, decided in core): a merged token always *replaces a kept anchor
    token* and takes the anchor's slot, i.e. its place in the sequence and its position id
    (the original id under the ``keep`` policy, the renumbered one under ``renumber``).  No
    token is ever inserted, so a stage keeps exactly ``keep`` visual tokens whether or not it
    merges, the sequence order stays the original order, and per-layer counts, FLOPs and
    KV-cache accounting need no special case.  A method whose paper appends merged tokens at
    new positions picks an anchor among the tokens it merges (documented per method).
    """

    index: Tensor
    valid: Tensor
    hidden: Tensor | None = None

    @classmethod
    def from_lists(cls, rows: list[list[int]] | list[Tensor], device=None) -> Selection:
        """Build from one index list per sample (any order; sorted here)."""
        rows = [torch.as_tensor(r, dtype=torch.long, device=device).flatten().sort().values for r in rows]
        k = max((len(r) for r in rows), default=0)
        index = torch.zeros(len(rows), k, dtype=torch.long, device=device)
        valid = torch.zeros(len(rows), k, dtype=torch.bool, device=device)
        for b, r in enumerate(rows):
            index[b, : len(r)] = r
            valid[b, : len(r)] = True
        return cls(index, valid)

    @classmethod
    def from_mask(cls, keep_mask: Tensor) -> Selection:
        """Build from a ``[B, N]`` bool mask of kept candidates (vectorised, order preserved)."""
        counts = keep_mask.sum(-1)
        k = int(counts.max()) if keep_mask.numel() else 0
        n = keep_mask.shape[-1]
        # stable sort puts kept candidates first, in ascending order
        order = torch.argsort((~keep_mask).to(torch.int8), dim=-1, stable=True)[:, :k]
        valid = torch.arange(k, device=keep_mask.device).unsqueeze(0) < counts.unsqueeze(1)
        index = torch.where(valid, order, torch.zeros_like(order)) if n else order
        return cls(index, valid)

    def to_lists(self) -> list[list[int]]:
        return [row[v].tolist() for row, v in zip(self.index, self.valid)]


@dataclass
class StageTrace:
    """What one stage did during the last prefill.

    Attributes:
        stage: index in the plan; layer: cut layer K.
        tokens_before / tokens_after: per-sample sequence length (valid tokens) before and after.
        visual_before / visual_after: per-sample visual-token counts.
        kept: per sample, the kept visual tokens as indices into the original input sequence.
        seconds: wall time spent scoring and selecting (host clock).
        requested: per sample, the visual tokens the stage's ``keep`` asked for before the clamp
            to ``1..visual_before`` (0 for a sample without visual tokens); where it differs from
            ``visual_after`` the count was clamped (see :attr:`clamped`).
        scores: per sample, ``[n]`` float32 (CPU) scores the stage's scorer gave its candidates,
            aligned with :attr:`scored`; recorded only when the attachment's ``record_scores``
            is set and the stage scored (it has a scorer and removed tokens); else None.
        scored: per sample, the original sequence positions of the scored candidates (ascending),
            or None with :attr:`scores`.
    """

    stage: int
    layer: int
    tokens_before: list[int]
    tokens_after: list[int]
    visual_before: list[int]
    visual_after: list[int]
    kept: list[list[int]]
    seconds: float = 0.0
    requested: list[int] = field(default_factory=list)
    scores: list[Tensor] | None = None
    scored: list[list[int]] | None = None

    @property
    def clamped(self) -> list[int]:
        """The samples whose requested count was clamped (kept more or fewer than requested)."""
        return [b for b, (want, got) in enumerate(zip(self.requested, self.visual_after)) if want != got]


@dataclass
class Trace:
    """The record of the last prefill forward under an attachment.

    ``final_index[b]`` maps each valid position of the model's output sequence (e.g. the rows of
    ``logits``) to its position in the original input.  ``layout`` (set by the attachment at the
    prefill, None on a hand-built trace) computes the prefill's visual tokens on their grids on
    first use: ``(visual [B, S] bool, cells [B, S, 4] long)`` with columns (panel, row, col,
    newline flag), as the adapter's ``Need.VISUAL_GRID`` describes them; see :meth:`kept_grid`
    and ``docs/concepts.md`` (Trace).
    """

    stages: list[StageTrace] = field(default_factory=list)
    n_layers: int = 0
    original_visual: list[int] = field(default_factory=list)
    final_index: list[list[int]] = field(default_factory=list)
    layout: Callable[[], tuple[Tensor, Tensor]] | None = field(default=None, repr=False, compare=False)
    _cells: list[tuple[Tensor, Tensor]] | None = field(default=None, init=False, repr=False, compare=False)

    def visual_cells(self, sample: int = 0) -> tuple[Tensor, Tensor]:
        """The visual tokens of one sample on their grids: ``(positions [N] long, cells [N, 4]
        long)``; positions in the original input sequence (ascending), cells (panel, row, col,
        newline flag).  ``panel`` is the image within the sample (LLaVA-NeXT: ``2i`` the base
        grid and ``2i + 1`` the high-resolution grid of image ``i``, whose row-end newline tokens
        sit at column ``W'`` with flag 1; Qwen2.5-VL: images and video frames in order)."""
        if self._cells is None:
            if self.layout is None:
                raise ValueError(
                    "this trace has no grid layout: only a trace recorded by an attachment's prefill knows "
                    "where its visual tokens sit"
                )
            visual, cells = self.layout()
            self._cells = []
            for b in range(visual.shape[0]):
                pos = torch.nonzero(visual[b]).flatten()
                self._cells.append((pos.cpu(), cells[b, pos].cpu()))
        if not 0 <= sample < len(self._cells):
            raise IndexError(f"sample={sample}: the trace has {len(self._cells)} sample(s) (0..{len(self._cells) - 1})")
        return self._cells[sample]

    def kept_grid(self, with_newline: bool = False) -> list[list[Tensor]]:
        """The visual tokens each stage kept, on their grids: ``[stage][sample]`` ->
        ``[k, 3]`` long rows (panel, row, col) in the order of :attr:`StageTrace.kept`
        (original position, ascending); ``[k, 4]`` with the newline flag when ``with_newline``.
        Stages that removed nothing list every token entering them."""
        out = []
        for st in self.stages:
            per_sample = []
            for b, kept in enumerate(st.kept):
                pos, cells = self.visual_cells(b)
                kept_pos = torch.as_tensor(kept, dtype=torch.long)
                at = torch.searchsorted(pos, kept_pos)
                if bool((at >= len(pos)).any()) or not bool((pos[at.clamp(max=len(pos) - 1)] == kept_pos).all()):
                    raise ValueError(f"stage {st.stage} sample {b}: kept positions are not visual tokens of the layout")
                per_sample.append(cells[at] if with_newline else cells[at, :3])
            out.append(per_sample)
        return out

    def visual_per_layer(self, sample: int = 0) -> list[int]:
        """Visual tokens seen by each decoder layer for one sample (length ``n_layers``)."""
        counts = []
        current = self.original_visual[sample] if self.original_visual else 0
        by_layer = {s.layer: s.visual_after[sample] for s in self.stages}
        for layer in range(self.n_layers):
            current = by_layer.get(layer, current)
            counts.append(current)
        return counts

    def layer_average(self, sample: int = 0) -> float:
        """Average visual tokens per decoder layer for one sample."""
        counts = self.visual_per_layer(sample)
        return sum(counts) / len(counts) if counts else 0.0

    def clamped(self) -> list[tuple[int, int]]:
        """``(stage, sample)`` of every keep count that was clamped (:attr:`StageTrace.clamped`)."""
        return [(st.stage, b) for st in self.stages for b in st.clamped]
