"""The cut: how visual tokens leave a Llama-family decoder stack, through forward pre-hooks only.

Seam (design.md §4): a ``forward_pre_hook(with_kwargs=True)`` on the top-level VLM sees
``input_ids`` / ``attention_mask`` and tells prefill from decode; a pre-hook on every decoder
layer of the language model rewrites what that layer receives.  The language model computes the
causal mask, ``position_ids`` and rotary ``(cos, sin)`` once for the full sequence and hands the
same objects to every layer; the hook of a stage's cut layer K scores, selects and gathers
``hidden_states``, and the hooks of every layer >= K pass the matching ``attention_mask``,
``position_ids`` and ``position_embeddings``.  ``DynamicCache`` needs nothing: layers >= K
simply hold fewer entries.  Decode steps never cut; they only see masks and positions for the
shorter per-layer caches.

Bookkeeping per stage (``[B, S']``, S' = the reduced length, left-padded per sample):

* ``slot_orig``: position of each slot in the original input sequence;
* ``slot_valid``: False at padding slots;
* ``slot_pos``: ``[A, B, S']`` the RoPE position ids each slot carries (A = 1 axis for 1-D
  RoPE, 3 for Qwen2.5-VL's M-RoPE); original ids under the ``keep`` policy, contiguous ids
  (equal on every axis) under ``renumber``.

Positions are read where the language model receives them (a pre-hook on the decoder), after
the VLM has computed them: 1-D ids for Llama, 3-D M-RoPE ids (``rope_deltas`` included) for
Qwen2.5-VL.  The visual candidates are located there too, i.e. after the VLM has checked its
image placeholders against the image features, so that its own errors surface unchanged.

Samples are re-padded on the left after a cut, so samples with different keep counts (ragged
batches) each get exactly the computation of their single-sample run.

Nothing here mutates a tensor the caller owns, copies a modeling file or reassigns ``forward``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from tokenreduce.core.errors import PlanError, UnsupportedCallError
from tokenreduce.core.plan import CompiledPlan, CompiledStage
from tokenreduce.core.types import Need, Selection, StageTrace, TokenView, Trace

from .llama_signals import LlamaSignals
from .masks import SUPPORTED_ATTENTION, build_mask
from .vision_signals import VisionCapture, VisionSignals, VisionTower

#: the signals read from the vision tower (captured by :class:`VisionCapture`)
VISION_NEEDS = Need.VISION_CLS_ATTENTION | Need.VISION_KEYS | Need.VISION_FEATURES


def _llama_rotary(decoder) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    return lambda hidden, pos: decoder.rotary_emb(hidden, pos[0])


def _llama_positions(position_ids: Tensor | None, b: int, q: int, past: int, device) -> Tensor:
    """``[1, B, q]``: the 1-D RoPE ids a Llama decoder uses (``arange`` from the cache length when
    the caller passed none, as ``LlamaModel`` does)."""
    if position_ids is None:
        position_ids = torch.arange(past, past + q, device=device).unsqueeze(0)
    return position_ids.reshape(1, -1, q).expand(1, b, q)


@dataclass
class ArchHandles:
    """What the generic cut needs to know about one architecture (filled in by an adapter).

    Positions are handled as ``[A, B, S]`` tensors: ``A = 1`` axis for 1-D RoPE (Llama),
    ``A = 3`` for Qwen2.5-VL's M-RoPE (temporal, height, width).
    """

    top: torch.nn.Module  # the VLM whose forward receives input_ids
    decoder: torch.nn.Module  # the language model: .layers, .norm, .rotary_emb
    lm_head: torch.nn.Module
    # (input_ids [B, S], context) -> bool [B, S]: the reduction candidates.  ``context`` holds
    # the top-level forward kwargs plus "inputs_embeds" ([B, S, d], what the decoder receives;
    # dropped after this call) and "positions" ([A, B, S]); the callback may stash in it what
    # visual_grid needs later.  generate() passes neither pixel values nor image sizes to the
    # prefill call (it precomputes the encoder outputs), so layouts come from what the decoder sees.
    visual_mask: Callable[[Tensor, dict], Tensor]
    # (input_ids, visual mask, context) -> [B, S, 3] long (image/panel, row, col)
    visual_grid: Callable[[Tensor, Tensor, dict], Tensor]
    attn_implementation: str
    name: str = "model"
    # input_ids -> bool: tokens that carry visual features (decode steps must have none)
    is_media_token: Callable[[Tensor], Tensor] | None = None
    # (hidden, positions [A, B, S]) -> (cos, sin) as the decoder computes them
    rotary: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None
    # (the decoder's position_ids kwarg, B, q, cache length, device) -> [A, B, q]
    positions: Callable[..., Tensor] = _llama_positions
    # (top-level module, 2-D mask [B, total], q) -> position_ids to pass to a decode step that has none
    decode_position_ids: Callable[[torch.nn.Module, Tensor, int], Tensor] | None = None
    # top-level forward kwargs -> an error message when the call is not supported (e.g. video)
    check_call: Callable[[dict], str | None] | None = None
    # () -> the vision tower's handles, for plans that read vision-tower signals (Need.VISION_*)
    vision: Callable[[], VisionTower] | None = None

    def __post_init__(self) -> None:
        if self.rotary is None:
            self.rotary = _llama_rotary(self.decoder)
        if self.is_media_token is None:
            self.is_media_token = lambda ids: self.visual_mask(ids, {})


@dataclass
class _StageState:
    """A stage's result during the current generation (set at prefill, reused by decode)."""

    index: int
    layer: int
    slot_orig: Tensor  # [B, S'] long
    slot_valid: Tensor  # [B, S'] bool
    slot_pos: Tensor  # [A, B, S'] long
    renumbered: bool  # whether slot_pos differs from the original position ids
    decode_offset: Tensor  # [B] long: original decode position - this stage's decode position


@dataclass
class _Forward:
    """Per-forward-call state."""

    prefill: bool
    attention_2d: Tensor  # [B, S_total] long/bool validity of the full original sequence
    top_kwargs: dict = field(default_factory=dict)
    positions: Tensor | None = None  # [A, B, q] RoPE ids of this call's tokens (original numbering)
    kwargs_cache: dict = field(default_factory=dict)  # stage index -> rewritten layer kwargs
    captured: dict = field(default_factory=dict)  # layer -> (hidden, kwargs) for signals


class CutAttachment:
    """A compiled plan attached to a Llama-family VLM.  Context manager; ``detach()`` is idempotent."""

    def __init__(self, handles: ArchHandles, plan: CompiledPlan):
        if handles.attn_implementation not in SUPPORTED_ATTENTION:
            raise PlanError(
                f"attention implementation {handles.attn_implementation!r} is not supported by the cut; "
                f"load the model with attn_implementation in {SUPPORTED_ATTENTION}"
            )
        self.h = handles
        self.plan = plan
        self.layers = list(handles.decoder.layers)
        self.n_layers = len(self.layers)
        self.trace = Trace(n_layers=self.n_layers)
        self._stage_at = {cs.layer: cs for cs in plan.stages}
        self._capture_layers = {cs.layer - 1 for cs in plan.stages if cs.layer >= 1}
        self._states: list[_StageState] = []
        self._prefilled = False
        self._orig_len = 0
        self._seen = 0
        self._fwd: _Forward | None = None
        self._is_visual: Tensor | None = None
        self._context: dict = {}
        self._handles: list[Any] = []
        self._vision: VisionCapture | None = None
        first = min((cs.layer for cs in plan.stages), default=self.n_layers)
        try:
            self._vision = self._vision_capture(handles, plan)
            self._handles.append(handles.top.register_forward_pre_hook(self._top_hook, with_kwargs=True))
            self._handles.append(handles.decoder.register_forward_pre_hook(self._decoder_hook, with_kwargs=True))
            for i, layer in enumerate(self.layers):
                if i >= first - 1:
                    self._handles.append(layer.register_forward_pre_hook(self._make_layer_hook(i), with_kwargs=True))
        except BaseException:
            self.detach()
            raise

    # -- context manager ------------------------------------------------------------------------
    def __enter__(self) -> "CutAttachment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def detach(self) -> None:
        """Remove every hook this attachment registered and forget its state."""
        while self._handles:
            self._handles.pop().remove()
        if self._vision is not None:
            self._vision.detach()
            self._vision = None
        self._states = []
        self._prefilled = False
        self._fwd = None

    @staticmethod
    def _vision_capture(handles: ArchHandles, plan: CompiledPlan) -> VisionCapture | None:
        """Hooks on the vision tower when a stage reads vision signals (only a layer-0 stage can:
        its candidates are the patches the tower produced, in order)."""
        stages = [cs for cs in plan.stages if cs.needs & VISION_NEEDS]
        if not stages:
            return None
        for cs in stages:
            if cs.layer != 0:
                raise PlanError(
                    f"stages.{cs.index} cuts at layer {cs.layer} but reads vision-tower signals "
                    f"[{(cs.needs & VISION_NEEDS).describe()}]; those exist only for the candidates the vision "
                    "tower produced, i.e. at a stage with layer 0 (the first stage)"
                )
        if handles.vision is None:
            raise PlanError(f"the {handles.name} adapter cannot capture vision-tower signals")
        layers: set[int] | None = set()
        for cs in stages:
            for comp in (cs.scorer, cs.selector):
                wanted = getattr(comp, "vision_layers", None)
                if comp is None or wanted is None:
                    continue
                got = wanted()
                if got is None:  # the component does not say: capture every layer
                    layers = None
                elif layers is not None:
                    layers |= set(got)
        return VisionCapture(handles.vision(), layers)

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def candidate_mask(self) -> Tensor | None:
        """``[B, S]`` bool: the visual candidates of the last prefill (positions in its input)."""
        return self._is_visual

    def visual_layout(self) -> tuple[Tensor, Tensor]:
        """The last prefill's candidates on their grids: ``(candidate_mask [B, S] bool,
        layout [B, S, 4] long)`` with columns (image/panel, row, col, newline flag); the newline
        flag marks LLaVA-NeXT's ``image_newline`` tokens (0 elsewhere)."""
        grid = self.visual_grid()
        newline = self._context.get("newline")
        flag = newline.long() if newline is not None else torch.zeros_like(grid[..., 0])
        return self._is_visual, torch.cat([grid, flag.unsqueeze(-1)], dim=-1)

    def visual_grid(self) -> Tensor:
        """``[B, S, 3]`` long (image/panel, row, col) of every position of the last prefill's
        input (meaningful at the candidates); from the adapter, computed on first use."""
        if self._is_visual is None:
            raise RuntimeError("no prefill has run under this attachment yet")
        return self._visual_grid()

    # -- the top-level hook: prefill or decode ---------------------------------------------------
    def _top_hook(self, module, args, kwargs):
        for bad in ("output_hidden_states", "output_attentions"):
            if kwargs.get(bad):
                raise UnsupportedCallError(
                    f"{bad}=True is not supported while tokenreduce is attached: layers after a cut see "
                    "fewer tokens, so per-layer outputs have different lengths; detach first, or read "
                    "att.trace for what was kept"
                )
        if kwargs.get("labels") is not None:
            raise UnsupportedCallError(
                "forward(labels=...) is not supported while tokenreduce is attached: the logits come back "
                "for the reduced sequence only; compute the loss from out.logits with att.trace.final_index"
            )
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        if cache is not None and type(cache).__name__ not in ("DynamicCache",):
            raise UnsupportedCallError(
                f"{type(cache).__name__} is not supported while attached (layers after a cut hold fewer "
                "entries); use the default DynamicCache (no cache_implementation='static', no compile)"
            )
        if self.h.check_call is not None:
            problem = self.h.check_call(kwargs)
            if problem:
                raise UnsupportedCallError(problem)
        mask2d = kwargs.get("attention_mask")
        if past == 0:
            if input_ids is None:
                raise UnsupportedCallError(
                    "tokenreduce locates visual tokens from input_ids; this call passed inputs_embeds only"
                )
            self._prefill_start(input_ids, mask2d, kwargs)
            return None
        if not self._prefilled:
            raise UnsupportedCallError(
                "this KV cache was not prefilled under the current attachment (cache reuse across "
                "attachments or turns is not supported); prefill again with an empty cache"
            )
        if input_ids is not None and bool(self.h.is_media_token(input_ids).any()):
            raise UnsupportedCallError(
                "image tokens in a decode step (cache reuse with new images) are not supported; "
                "run a fresh prefill"
            )
        b, q = (input_ids.shape if input_ids is not None else kwargs["inputs_embeds"].shape[:2])
        # the cache of a cut layer is shorter than the sequence, so count the sequence ourselves
        total = self._seen + q
        if mask2d is None:
            mask2d = torch.ones(b, total, dtype=torch.long, device=self._device())
        elif mask2d.shape[1] != total:
            raise UnsupportedCallError(
                f"decode step with an attention_mask of length {mask2d.shape[1]}, expected {total} "
                f"(prefill of {self._orig_len} tokens plus {total - self._orig_len} generated); "
                "steps must follow the prefill one after another"
            )
        self._seen = total
        self._fwd = _Forward(prefill=False, attention_2d=mask2d)
        if kwargs.get("position_ids") is None and self.h.decode_position_ids is not None:
            # the model would derive them from the first layer's cache length, which a cut at
            # layer 0 shortens: pass the ids generate() would pass
            return args, {**kwargs, "position_ids": self.h.decode_position_ids(module, mask2d, q)}
        return None

    def _device(self):
        return next(self.h.decoder.parameters()).device

    def _prefill_start(self, input_ids: Tensor, mask2d: Tensor | None, top_kwargs: dict) -> None:
        b, s = input_ids.shape
        if mask2d is None:
            mask2d = torch.ones(b, s, dtype=torch.long, device=input_ids.device)
        self._orig_len = s
        self._seen = s
        self._input_ids = input_ids
        self._is_visual = None  # located by the decoder hook (after the VLM's own input checks)
        self._grid = None
        self._states = []
        self._prefilled = True
        self._fwd = _Forward(prefill=True, attention_2d=mask2d, top_kwargs=dict(top_kwargs))
        self.trace = Trace(n_layers=self.n_layers)

    def _decoder_hook(self, module, args, kwargs):
        fwd = self._fwd
        if fwd is None:  # the language model called on its own
            return None
        embeds = kwargs.get("inputs_embeds")
        ref = embeds if embeds is not None else kwargs.get("input_ids", args[0] if args else None)
        b, q = ref.shape[:2]
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        fwd.positions = self.h.positions(kwargs.get("position_ids"), b, q, past, ref.device)
        if fwd.prefill:
            valid = fwd.attention_2d.bool()
            fwd.top_kwargs.update(inputs_embeds=embeds, positions=fwd.positions)
            self._is_visual = self.h.visual_mask(self._input_ids, fwd.top_kwargs) & valid  # [B, S]
            fwd.top_kwargs.pop("inputs_embeds")
            # what visual_grid may read later (also after decode steps); not the big tensors
            self._context = {k: v for k, v in fwd.top_kwargs.items() if k not in _NOT_KEPT}
            self.trace.original_visual = self._is_visual.sum(-1).tolist()
            self.trace.final_index = [torch.nonzero(v).flatten().tolist() for v in valid]
        return None

    # -- the layer hooks -----------------------------------------------------------------------
    def _make_layer_hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            return self._layer_hook(layer_idx, args, kwargs)

        return hook

    def _current_stage(self, layer_idx: int) -> _StageState | None:
        state = None
        for st in self._states:
            if st.layer <= layer_idx:
                state = st
        return state

    def _layer_hook(self, layer_idx: int, args, kwargs):
        fwd = self._fwd
        if fwd is None:  # called outside a top-level forward (e.g. a layer used directly)
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        orig = kwargs  # the language model hands every layer the same full-length kwargs
        stage = self._current_stage(layer_idx)
        current = self._rewrite_kwargs(stage, hidden, orig) if stage is not None else orig
        if fwd.prefill and layer_idx in self._stage_at:
            hidden, new_state = self._cut(self._stage_at[layer_idx], hidden, current, orig, stage)
            if new_state is not None:
                self._states.append(new_state)
                stage = new_state
                current = self._rewrite_kwargs(new_state, hidden, orig)
        if fwd.prefill and layer_idx in self._capture_layers:
            # what this layer actually consumes (after its own cut, if any): signals of the next
            # stage at layer_offset=-1 read it
            fwd.captured[layer_idx] = (hidden, current)
        if stage is None:
            return None
        if args:
            return (hidden,) + tuple(args[1:]), current
        return args, {**current, "hidden_states": hidden}

    def _rewrite_kwargs(self, st: _StageState, hidden: Tensor, orig: dict) -> dict:
        """Layer kwargs for a layer governed by stage ``st`` (computed once per forward call)."""
        fwd = self._fwd
        if st.index not in fwd.kwargs_cache:
            fwd.kwargs_cache[st.index] = self._stage_kwargs(st, hidden, orig)
        return {**orig, **fwd.kwargs_cache[st.index]}

    def _stage_kwargs(self, st: _StageState, hidden: Tensor, orig: dict) -> dict:
        fwd = self._fwd
        impl = self.h.attn_implementation
        cos, sin = orig["position_embeddings"]
        mask2d = fwd.attention_2d.bool()
        b = mask2d.shape[0]
        if fwd.prefill:
            if st.renumbered:
                cos, sin = self.h.rotary(hidden, st.slot_pos)
            else:  # original ids: gather the rotary tables the model computed
                idx = st.slot_orig.unsqueeze(-1).expand(-1, -1, cos.shape[-1])
                cos, sin = cos.expand(b, -1, -1).gather(1, idx), sin.expand(b, -1, -1).gather(1, idx)
            slot = torch.arange(st.slot_orig.shape[1], device=hidden.device).expand(b, -1)
            mask = build_mask(impl, st.slot_orig, st.slot_valid, st.slot_orig, st.slot_valid, hidden.dtype, self_slot=slot)
        else:
            total, q = mask2d.shape[1], hidden.shape[1]
            new = torch.arange(self._orig_len, total, device=hidden.device).expand(b, -1)
            k_order = torch.cat([st.slot_orig, new], dim=1)
            k_valid = torch.cat([st.slot_valid, mask2d[:, self._orig_len :]], dim=1)
            q_order = torch.arange(total - q, total, device=hidden.device).expand(b, -1)
            mask = build_mask(impl, q_order, mask2d[:, total - q :], k_order, k_valid, hidden.dtype)
            if st.renumbered:
                cos, sin = self.h.rotary(hidden, fwd.positions - st.decode_offset.view(1, b, 1))
        # ``position_ids`` only serves flash-attention's packed-sequence detection, which would
        # read the gaps of kept original ids as sequence boundaries: the reduced sequence is one
        # sequence per row, described by the mask.
        return {"attention_mask": mask, "position_embeddings": (cos, sin), "position_ids": None}

    # -- the cut itself ------------------------------------------------------------------------
    def _cut(self, cs: CompiledStage, hidden: Tensor, kwargs: dict, orig: dict, prev: _StageState | None):
        """Score, select and gather at stage ``cs``.  Returns (new hidden, new stage state or None)."""
        t0 = time.perf_counter()
        b, s, _ = hidden.shape
        dev = hidden.device
        if prev is None:
            slot_orig = torch.arange(s, device=dev).expand(b, -1)
            slot_valid = self._fwd.attention_2d.bool()
            slot_pos = self._fwd.positions.expand(-1, b, -1)
            renumbered = False
        else:
            slot_orig, slot_valid, slot_pos, renumbered = prev.slot_orig, prev.slot_valid, prev.slot_pos, prev.renumbered
        slot_visual = self._is_visual.gather(1, slot_orig) & slot_valid  # [B, S]
        n_vis = slot_visual.sum(-1)  # [B]
        n_orig = self._is_visual.sum(-1)
        captured = self._vision.take() if (self._vision is not None and cs.needs & VISION_NEEDS) else None
        keep = torch.tensor(
            [min(self.plan.keep_counts(int(n))[cs.index], int(c)) if n > 0 else 0 for n, c in zip(n_orig, n_vis)],
            dtype=torch.long,
            device=dev,
        )
        tokens_before = slot_valid.sum(-1).tolist()
        if bool((keep >= n_vis).all()):  # nothing to remove: the stage is the identity
            kept_orig = [row[v].tolist() for row, v in zip(slot_orig, slot_visual)]
            self._record(cs, tokens_before, tokens_before, n_vis.tolist(), n_vis.tolist(), kept_orig, t0)
            return hidden, None

        # the visual candidates, left-aligned per sample
        n_max = int(n_vis.max())
        order = torch.argsort((~slot_visual).to(torch.int8), dim=-1, stable=True)[:, :n_max]
        visual_valid = torch.arange(n_max, device=dev).unsqueeze(0) < n_vis.unsqueeze(1)
        visual_index = torch.where(visual_valid, order, torch.zeros_like(order))
        original_index = torch.where(visual_valid, slot_orig.gather(1, visual_index), torch.full_like(order, -1))
        vision = None
        if captured is not None:
            vision = VisionSignals(self._vision.tower, captured, n_vis, visual_valid)
        signals = LlamaSignals(
            layers=self.layers,
            norm=self.h.decoder.norm,
            lm_head=self.h.lm_head,
            layer=cs.layer,
            current=(hidden, kwargs),
            previous=self._fwd.captured.get(cs.layer - 1),
            valid=slot_valid,
            grid=lambda: self._visual_grid().gather(1, original_index.clamp(min=0).unsqueeze(-1).expand(-1, -1, 3)),
            vision=vision,
        )
        view = TokenView(
            layer=cs.layer,
            stage=cs.index,
            hidden=hidden,
            valid=slot_valid,
            visual_index=visual_index,
            visual_valid=visual_valid,
            original_index=original_index,
            n_original_visual=n_orig,
            signals=signals,
        )
        scores = None
        if cs.scorer is not None:
            scores = cs.scorer.score(view)
            _check_scores(cs, scores, visual_valid.shape)
        sel = cs.selector.select(view, scores, keep)
        _check_selection(cs, sel, keep, n_vis)

        # keep mask over current slots: valid non-visual tokens + the selected visual ones
        chosen = torch.zeros(b, n_max, dtype=torch.long, device=dev).scatter_add(1, sel.index, sel.valid.long()) > 0
        chosen_slots = torch.zeros(b, s, dtype=torch.long, device=dev).scatter_add(
            1, visual_index, (chosen & visual_valid).long()
        ) > 0
        keep_mask = (slot_valid & ~slot_visual) | chosen_slots
        counts = keep_mask.sum(-1)
        s_new = int(counts.max())
        # left-pad: dropped/padding slots first (stable), kept slots last in their original order
        gather = torch.argsort(keep_mask.to(torch.int8), dim=-1, stable=True)[:, s - s_new :]  # [B, S']
        new_valid = keep_mask.gather(1, gather)
        new_orig = slot_orig.gather(1, gather)
        axes = slot_pos.shape[0]
        if cs.policy == "renumber":
            new_pos = (new_valid.long().cumsum(-1) - 1).clamp(min=0).unsqueeze(0).expand(axes, -1, -1)
            new_renumbered = True
        else:
            new_pos = slot_pos.gather(2, gather.unsqueeze(0).expand(axes, -1, -1))
            new_renumbered = renumbered
        # decode continues after the largest id of the prefill (generate: 1-D ids count on;
        # Qwen2.5-VL adds rope_deltas, which is the same number); the offset maps that
        # original numbering onto the stage's numbering
        decode_offset = _max_valid(self._fwd.positions.expand(-1, b, -1), self._fwd.attention_2d.bool()) - _max_valid(
            new_pos, new_valid
        )
        if sel.hidden is not None:  # merged tokens replace their kept anchors (core rule, types.Selection)
            hidden = _write_merged(hidden, visual_index, sel)
        new_hidden = hidden.gather(1, gather.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        state = _StageState(cs.index, cs.layer, new_orig, new_valid, new_pos, new_renumbered, decode_offset)

        kept_orig = [row[m].tolist() for row, m in zip(slot_orig, chosen_slots)]
        self._record(cs, tokens_before, counts.tolist(), n_vis.tolist(), sel.valid.sum(-1).tolist(), kept_orig, t0)
        self.trace.final_index = [row[v].tolist() for row, v in zip(new_orig, new_valid)]
        return new_hidden, state

    def _visual_grid(self) -> Tensor:
        if self._grid is None:
            self._grid = self.h.visual_grid(self._input_ids, self._is_visual, self._context)
        return self._grid

    def _record(self, cs, tokens_before, tokens_after, visual_before, visual_after, kept, t0):
        self.trace.stages.append(
            StageTrace(
                stage=cs.index,
                layer=cs.layer,
                tokens_before=list(tokens_before),
                tokens_after=list(tokens_after),
                visual_before=list(visual_before),
                visual_after=list(visual_after),
                kept=kept,
                seconds=time.perf_counter() - t0,
            )
        )


#: top-level forward kwargs not kept after the prefill (large, and no layout reads them)
_NOT_KEPT = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs", "past_key_values", "inputs_embeds")


def _max_valid(pos: Tensor, valid: Tensor) -> Tensor:
    """``[B]``: the largest position id over the axes and valid slots of each row."""
    return pos.masked_fill(~valid.unsqueeze(0), torch.iinfo(pos.dtype).min).amax(dim=(0, 2))


def _write_merged(hidden: Tensor, visual_index: Tensor, sel: Selection) -> Tensor:
    """``hidden`` with the kept candidates' rows replaced by ``sel.hidden`` (a new tensor)."""
    d = hidden.shape[-1]
    slots = visual_index.gather(1, sel.index)  # [B, k] positions in the current sequence
    idx = slots.unsqueeze(-1).expand(-1, -1, d)
    # padding entries write back what is already there, so the scatter is a no-op for them
    values = torch.where(sel.valid.unsqueeze(-1), sel.hidden.to(hidden.dtype), hidden.gather(1, idx))
    return hidden.scatter(1, idx, values)


def _component_name(cs: CompiledStage, part: str) -> str:
    ref = getattr(cs.spec, part)
    return ref.name if ref is not None else "?"


def _check_scores(cs: CompiledStage, scores: Tensor, shape) -> None:
    if not isinstance(scores, Tensor) or tuple(scores.shape) != tuple(shape):
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise RuntimeError(
            f"stages.{cs.index}.scorer {_component_name(cs, 'scorer')!r} returned scores of shape {got}; "
            f"expected {tuple(shape)} ([B, N_visual])"
        )


def _check_selection(cs: CompiledStage, sel: Selection, keep: Tensor, n_vis: Tensor) -> None:
    name = _component_name(cs, "selector")
    if not isinstance(sel, Selection):
        raise RuntimeError(f"stages.{cs.index}.selector {name!r} returned {type(sel).__name__}, not a Selection")
    counts = sel.valid.sum(-1)
    if not torch.equal(counts, keep):
        raise RuntimeError(
            f"stages.{cs.index}.selector {name!r} kept {counts.tolist()} tokens per sample; the plan asks for {keep.tolist()}"
        )
    bad = sel.valid & ((sel.index < 0) | (sel.index >= n_vis.unsqueeze(1)))
    if bool(bad.any()):
        raise RuntimeError(f"stages.{cs.index}.selector {name!r} returned indices outside 0..N_visual-1")
    if sel.hidden is not None:
        want = (*sel.index.shape, None)
        if not isinstance(sel.hidden, Tensor) or sel.hidden.dim() != 3 or tuple(sel.hidden.shape[:2]) != want[:2]:
            got = tuple(sel.hidden.shape) if isinstance(sel.hidden, Tensor) else type(sel.hidden).__name__
            raise RuntimeError(
                f"stages.{cs.index}.selector {name!r} returned merged hidden states of shape {got}; "
                f"expected {tuple(sel.index.shape)} + (d,) ([B, k, d])"
            )
    steps = sel.index[:, 1:] - sel.index[:, :-1]
    if bool(((steps <= 0) & sel.valid[:, 1:]).any()):
        raise RuntimeError(f"stages.{cs.index}.selector {name!r} returned indices that are not strictly ascending")
