"""Synthetic views and signals for the baseline strategies' reference tests (no model).

A batch is ragged and left-padded like the cut builds it: sample ``b`` is
``[pad] * pad_b + [text] * prefix_b + [visual] * n_b + [text] * suffix_b``.  The fake signal
source holds full attention matrices and key states, so a slow reference implementation in a
test can read any entry directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenreduce.core.types import Need, TokenView


@dataclass
class Layout:
    prefix: int
    n_visual: int
    suffix: int

    @property
    def length(self) -> int:
        return self.prefix + self.n_visual + self.suffix


@dataclass
class FakeSignals:
    """A :class:`SignalSource` backed by full tensors.

    ``attn[offset]``: ``[B, H, S, S]`` attention probabilities (causal, padding keys 0);
    ``keys``: ``[B, H_kv, S, hd]`` (offset -1 only); ``norm_weight``: ``[d]`` of an RMS final norm.
    """

    attn: dict[int, torch.Tensor]
    keys: torch.Tensor
    norm_weight: torch.Tensor
    provides: Need = Need.HIDDEN | Need.ATTENTION_ROWS | Need.KEY_STATES
    calls: list = field(default_factory=list)

    def attention_rows(self, query_index: torch.Tensor, layer_offset: int = -1) -> torch.Tensor:
        self.calls.append(("attention_rows", layer_offset, query_index.clone()))
        a = self.attn[layer_offset]  # [B, H, S, S]
        idx = query_index[:, None, :, None].expand(-1, a.shape[1], -1, a.shape[3])
        return a.gather(2, idx).float()

    def key_states(self, layer_offset: int = -1) -> torch.Tensor:
        self.calls.append(("key_states", layer_offset))
        if layer_offset != -1:
            raise ValueError("fake keys exist for layer_offset=-1 only")
        return self.keys

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        self.calls.append(("final_norm",))
        h = hidden.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_weight).to(hidden.dtype)


def random_attention(valid: torch.Tensor, heads: int, gen: torch.Generator, sharp: float = 3.0) -> torch.Tensor:
    """``[B, H, S, S]`` softmax of random logits, causal, padding keys masked (a padding row
    attends to itself)."""
    b, s = valid.shape
    logits = torch.randn(b, heads, s, s, generator=gen) * sharp
    slots = torch.arange(s)
    allowed = (slots[None, :] <= slots[:, None])[None] & valid[:, None, :]  # [B, S, S]
    allowed = allowed | torch.eye(s, dtype=torch.bool)[None]
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1)


def make_view(
    layouts: list[Layout],
    d: int = 16,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 8,
    seed: int = 0,
    hidden: list[torch.Tensor] | None = None,
    layer: int = 2,
) -> tuple[TokenView, FakeSignals]:
    """A left-padded ragged batch.  ``hidden[b]`` (``[length_b, d]``) overrides the random hidden
    states of sample ``b``'s valid slots."""
    gen = torch.Generator().manual_seed(seed)
    B = len(layouts)
    S = max(lay.length for lay in layouts)
    N = max(lay.n_visual for lay in layouts)
    h = torch.randn(B, S, d, generator=gen)
    valid = torch.zeros(B, S, dtype=torch.bool)
    visual_index = torch.zeros(B, N, dtype=torch.long)
    visual_valid = torch.zeros(B, N, dtype=torch.bool)
    original_index = torch.full((B, N), -1, dtype=torch.long)
    for b, lay in enumerate(layouts):
        pad = S - lay.length
        valid[b, pad:] = True
        start = pad + lay.prefix
        visual_index[b, : lay.n_visual] = torch.arange(start, start + lay.n_visual)
        visual_valid[b, : lay.n_visual] = True
        original_index[b, : lay.n_visual] = torch.arange(start, start + lay.n_visual)
        if hidden is not None:
            h[b, pad:] = hidden[b]
    signals = FakeSignals(
        attn={0: random_attention(valid, heads, gen), -1: random_attention(valid, heads, gen)},
        keys=torch.randn(B, kv_heads, S, head_dim, generator=gen),
        norm_weight=torch.rand(d, generator=gen) + 0.5,
    )
    view = TokenView(
        layer=layer,
        stage=0,
        hidden=h,
        valid=valid,
        visual_index=visual_index,
        visual_valid=visual_valid,
        original_index=original_index,
        n_original_visual=torch.tensor([lay.n_visual for lay in layouts]),
        signals=signals,
    )
    return view, signals


def sample_slots(view: TokenView, b: int) -> tuple[list[int], list[int], list[int]]:
    """Sample ``b``'s valid slots as (all valid, visual, text after the last visual) lists."""
    valid = [s for s in range(view.valid.shape[1]) if view.valid[b, s]]
    n = int(view.visual_valid[b].sum())
    visual = view.visual_index[b, :n].tolist()
    last = max(visual) if visual else -1
    text_after = [s for s in valid if s > last]
    return valid, visual, text_after


def split_view(view: TokenView, b: int) -> tuple[TokenView, FakeSignals, int]:
    """Sample ``b`` of a batch as a batch of one without its padding: the same tensors, sliced.
    Returns the view, its signals and the padding removed (slot shift)."""
    sig = view.signals
    pad = int((~view.valid[b]).sum())
    n = int(view.visual_valid[b].sum())
    single = FakeSignals(
        attn={o: a[b : b + 1, :, pad:, pad:] for o, a in sig.attn.items()},
        keys=sig.keys[b : b + 1, :, pad:],
        norm_weight=sig.norm_weight,
    )
    one = TokenView(
        layer=view.layer,
        stage=view.stage,
        hidden=view.hidden[b : b + 1, pad:],
        valid=view.valid[b : b + 1, pad:],
        visual_index=view.visual_index[b : b + 1, :n] - pad,
        visual_valid=view.visual_valid[b : b + 1, :n],
        original_index=view.original_index[b : b + 1, :n],
        n_original_visual=view.n_original_visual[b : b + 1],
        signals=single,
    )
    return one, single, pad
