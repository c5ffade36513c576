"""The cut engine's state machine: a compiled plan attached to a Llama-family VLM.

Forward pre-hooks only: one on the VLM tells prefill from decode, one on the language model
reads the positions and locates the visual candidates, one on each decoder layer from the first
cut on gives that layer what it should see.  A stage's cut layer scores, selects and gathers;
decode steps never cut, they only see masks and positions for the shorter per-layer caches.
The parts: :mod:`.hooks` (lifecycle), :mod:`.guards` (refused calls), :mod:`.slots`
(bookkeeping), :mod:`.layer_kwargs` (mask and RoPE rewriting).  See ``docs/cut.md``.
"""

from __future__ import annotations

import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tokenreduce.core.checks import check_scores, check_selection
from tokenreduce.core.errors import AlreadyAttachedError, PlanError
from tokenreduce.core.plan import ClampWarning, CompiledPlan, CompiledStage
from tokenreduce.core.types import VISION_NEEDS, StageTrace, TokenView, Trace

from ..llama_signals import LlamaSignals
from ..vision_signals import VisionCapture, VisionSignals
from . import guards
from . import layer_kwargs as lk
from . import slots as sl
from .hooks import Hooks
from .slots import Slots

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import DecoderAdapter

__all__ = ["VISION_NEEDS", "AlreadyAttachedError", "CutAttachment", "StageState", "attachment_of", "check_unattached"]


#: top-level forward kwargs not kept after the prefill (large, and no layout reads them)
_NOT_KEPT = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs", "past_key_values", "inputs_embeds")


#: the attached modules (each model and its language model) -> their attachment; an entry
#: disappears at detach (the model itself is never marked, so it stays bit-identical)
_ATTACHED: weakref.WeakKeyDictionary[torch.nn.Module, CutAttachment] = weakref.WeakKeyDictionary()
_ATTACHED_LOCK = threading.RLock()  # check-then-register is atomic across threads


def attachment_of(model: torch.nn.Module) -> CutAttachment | None:
    """The attachment attached to ``model`` (a VLM or its language model) now, if any."""
    with _ATTACHED_LOCK:
        return _ATTACHED.get(model)


def check_unattached(*modules: torch.nn.Module, allow: CutAttachment | None = None) -> None:
    """Refuse modules that have an attachment (other than ``allow``), naming it."""
    with _ATTACHED_LOCK:
        for module in modules:
            other = _ATTACHED.get(module) if isinstance(module, torch.nn.Module) else None
            if other is not None and other is not allow:
                raise AlreadyAttachedError(
                    f"{type(module).__name__} is already attached: {other!r} (attached in thread {other._thread!r}); "
                    "one attachment per model at a time: detach it first (leave its `with` block or call "
                    ".detach()), or load a second copy of the model for a second plan"
                )


@dataclass
class StageState:
    """A stage's result during the current generation (set at prefill, reused by decode)."""

    index: int
    layer: int
    slots: Slots  # the reduced sequence, left-padded per sample
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


def vision_capture(adapter: DecoderAdapter, plan: CompiledPlan) -> VisionCapture | None:
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
    tower = adapter.vision_tower()
    if tower is None:
        raise PlanError(f"the {adapter.name} adapter cannot capture vision-tower signals")
    layers: set[int] | None = set()
    for cs in stages:  # the union of what the stages' components read (None: every layer)
        wanted = cs.vision_layers()
        layers = None if wanted is None or layers is None else layers | wanted
    return VisionCapture(tower, layers)


def _layout_of(adapter: DecoderAdapter, input_ids: Tensor | None, visual: Tensor, context: dict):
    """The trace's grid layout of one prefill (``Trace.layout``): computed on first use from what
    the prefill saw, so a later prefill under the same attachment does not change it."""

    def layout() -> tuple[Tensor, Tensor]:
        assert input_ids is not None
        grid = adapter.visual_grid(input_ids, visual, context)  # [B, S, 3]
        newline = adapter.visual_newlines(context)
        flag = newline.long() if newline is not None else torch.zeros_like(grid[..., 0])
        return visual, torch.cat([grid, flag.unsqueeze(-1)], dim=-1)

    return layout


class CutAttachment:
    """A compiled plan attached to a VLM through its adapter.  Context manager; ``detach()`` is
    idempotent and leaves the model computing exactly what it computed before."""

    #: record each scoring stage's scores in the trace (``StageTrace.scores`` / ``scored``), for
    #: heat-maps (``tokenreduce viz``); off by default: nothing is copied to the host
    record_scores: bool = False

    def __init__(self, adapter: DecoderAdapter, plan: CompiledPlan, *, record_scores: bool = False):
        guards.check_attention(adapter.attn_implementation)
        self.adapter = adapter
        self.plan = plan
        self.record_scores = record_scores
        self.layers = list(adapter.language_model.layers)
        self.n_layers = len(self.layers)
        self.trace = Trace(n_layers=self.n_layers)
        self._stage_at = {cs.layer: cs for cs in plan.stages}
        self._capture_layers = {cs.layer - 1 for cs in plan.stages if cs.layer >= 1}
        self._states: list[StageState] = []
        self._prefilled = False
        self._orig_len = 0
        self._seen = 0
        self._fwd: _Forward | None = None
        self._input_ids: Tensor | None = None
        self._is_visual: Tensor | None = None
        self._grid: Tensor | None = None
        self._context: dict = {}
        self._right_padding: tuple[int, int] | None = None  # (sample, position) of the last prefill
        self._vision: VisionCapture | None = None
        self._hooks = Hooks()
        self._depth = 0  # open ``with`` blocks
        self._thread = ""  # the thread that attached
        self._attach()

    # -- lifecycle ------------------------------------------------------------------------------
    def _owned(self) -> tuple[torch.nn.Module, ...]:
        """The modules this attachment claims: the model and its language model."""
        return (self.adapter.model, self.adapter.language_model)

    def _attach(self) -> None:
        """Register the hooks; refused (nothing registered) when the model has another attachment."""
        with _ATTACHED_LOCK:
            check_unattached(*self._owned(), allow=self)
            first = min((cs.layer for cs in self.plan.stages), default=self.n_layers)
            with self._hooks.installing() as hooks:
                hooks.on_remove(self._unregister)  # undone last
                for module in self._owned():
                    _ATTACHED[module] = self
                self._thread = threading.current_thread().name
                self._vision = vision_capture(self.adapter, self.plan)
                if self._vision is not None:
                    hooks.on_remove(self._drop_vision)
                hooks.pre_hook(self.adapter.model, self._top_hook)
                hooks.pre_hook(self.adapter.language_model, self._decoder_hook)
                for i, layer in enumerate(self.layers):
                    if i >= first - 1:
                        hooks.pre_hook(layer, self._make_layer_hook(i))
                    if i >= first and self.adapter.uses_layer_output():
                        handle = layer.register_forward_hook(self._make_output_hook(i))
                        hooks.on_remove(handle.remove)

    def _unregister(self) -> None:
        with _ATTACHED_LOCK:
            for module in self._owned():
                if _ATTACHED.get(module) is self:
                    del _ATTACHED[module]

    def __enter__(self) -> CutAttachment:
        """Enter a ``with`` block.  A detached attachment attaches again (with a fresh trace;
        refused while the model has another attachment); nested blocks on an attached one keep
        it attached until the outermost block exits."""
        if not self.attached:
            self._attach()
            self._forget_prefill()
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            self.detach()

    def detach(self) -> None:
        """Remove every hook this attachment registered and forget its state (the trace stays
        readable).  Idempotent; ends the attachment also inside nested ``with`` blocks."""
        self._hooks.remove_all()
        self._depth = 0
        self._states = []
        self._prefilled = False
        self._fwd = None

    def _forget_prefill(self) -> None:
        """What the last prefill left behind (on attaching again)."""
        self.trace = Trace(n_layers=self.n_layers)
        self._input_ids = self._is_visual = self._grid = None
        self._context = {}
        self._right_padding = None

    def _drop_vision(self) -> None:
        if self._vision is not None:
            self._vision.detach()
            self._vision = None

    @property
    def attached(self) -> bool:
        return self._hooks.active

    # -- what the last prefill saw ----------------------------------------------------------------
    @property
    def candidate_mask(self) -> Tensor | None:
        """``[B, S]`` bool: the visual candidates of the last prefill (positions in its input)."""
        return self._is_visual

    def visual_layout(self) -> tuple[Tensor, Tensor]:
        """The last prefill's candidates on their grids: ``(candidate_mask [B, S] bool,
        layout [B, S, 4] long)`` with columns (image/panel, row, col, newline flag); the newline
        flag marks row-end tokens such as LLaVA-NeXT's ``image_newline`` (0 elsewhere)."""
        grid = self.visual_grid()
        newline = self.adapter.visual_newlines(self._context)
        flag = newline.long() if newline is not None else torch.zeros_like(grid[..., 0])
        assert self._is_visual is not None
        return self._is_visual, torch.cat([grid, flag.unsqueeze(-1)], dim=-1)

    def visual_grid(self) -> Tensor:
        """``[B, S, 3]`` long (image/panel, row, col) of every position of the last prefill's
        input (meaningful at the candidates); from the adapter, computed on first use."""
        if self._is_visual is None:
            raise RuntimeError("no prefill has run under this attachment yet")
        return self._visual_grid()

    def _visual_grid(self) -> Tensor:
        if self._grid is None:
            assert self._input_ids is not None and self._is_visual is not None
            self._grid = self.adapter.visual_grid(self._input_ids, self._is_visual, self._context)
        return self._grid

    # -- the top-level hook: prefill or decode ---------------------------------------------------
    def _top_hook(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        guards.check_call(kwargs, cache, self.adapter.check_call)
        mask2d = kwargs.get("attention_mask")
        if past == 0:
            guards.check_prefill(input_ids)
            right_padding = guards.right_padding(mask2d)
            if cache is not None:  # generate()'s prefill: decode steps follow
                guards.check_left_padded(right_padding, "generate()")
            self._prefill_start(input_ids, mask2d, kwargs)
            self._right_padding = right_padding
            return None
        guards.check_decode(self._prefilled, input_ids, self.adapter.is_media_token)
        guards.check_left_padded(self._right_padding, "decoding from the cache of a prefill")
        b, q = input_ids.shape if input_ids is not None else kwargs["inputs_embeds"].shape[:2]
        # the cache of a cut layer is shorter than the sequence, so count the sequence ourselves
        total = self._seen + q
        if mask2d is None:
            mask2d = torch.ones(b, total, dtype=torch.long, device=self._device())
        else:
            guards.check_decode_mask(mask2d, total, self._orig_len)
        self._seen = total
        self._fwd = _Forward(prefill=False, attention_2d=mask2d)
        if kwargs.get("position_ids") is None:
            # the model would derive them from the first layer's cache length, which a cut at
            # layer 0 shortens: pass the ids generate() would pass
            ids = self.adapter.decode_position_ids(mask2d, q)
            if ids is not None:
                return args, {**kwargs, "position_ids": ids}
        return None

    def _device(self):
        return next(self.adapter.language_model.parameters()).device

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

    # -- the language-model hook: positions and candidates ----------------------------------------
    def _decoder_hook(self, module, args, kwargs):
        fwd = self._fwd
        if fwd is None:  # the language model called on its own
            return None
        embeds = kwargs.get("inputs_embeds")
        ref = embeds if embeds is not None else kwargs.get("input_ids", args[0] if args else None)
        b, q = ref.shape[:2]
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        fwd.positions = self.adapter.positions(kwargs.get("position_ids"), b, q, past, ref.device)
        if fwd.prefill:
            valid = fwd.attention_2d.bool()
            fwd.top_kwargs.update(inputs_embeds=embeds, positions=fwd.positions)
            self._is_visual = self.adapter.visual_mask(self._input_ids, fwd.top_kwargs) & valid  # [B, S]
            fwd.top_kwargs.pop("inputs_embeds")
            # what visual_grid may read later (also after decode steps); not the big tensors
            self._context = {k: v for k, v in fwd.top_kwargs.items() if k not in _NOT_KEPT}
            self.trace.original_visual = self._is_visual.sum(-1).tolist()
            self.trace.final_index = [torch.nonzero(v).flatten().tolist() for v in valid]
            self.trace.layout = _layout_of(self.adapter, self._input_ids, self._is_visual, self._context)
            first = min((cs.layer for cs in self.plan.stages), default=None)
            changed = self.adapter.decoder_kwargs(kwargs, first) if first is not None else None
            if changed is not None:
                return args, changed
        return None

    # -- the layer hooks -----------------------------------------------------------------------
    def _make_layer_hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            return self._layer_hook(layer_idx, args, kwargs)

        return hook

    def _make_output_hook(self, layer_idx: int):
        def hook(module, args, output):
            fwd = self._fwd
            if fwd is None or not fwd.prefill:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            new = self.adapter.layer_output(layer_idx, hidden, self._current_stage(layer_idx))
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    def _current_stage(self, layer_idx: int) -> StageState | None:
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
        current = self._layer_kwargs(stage, hidden, orig) if stage is not None else orig
        if fwd.prefill and layer_idx in self._stage_at:
            hidden, new_state = self._cut(self._stage_at[layer_idx], hidden, current, stage)
            if new_state is not None:
                self._states.append(new_state)
                stage = new_state
                current = self._layer_kwargs(new_state, hidden, orig)
        if fwd.prefill and layer_idx in self._capture_layers:
            # what this layer actually consumes (after its own cut, if any): signals of the next
            # stage at layer_offset=-1 read it
            fwd.captured[layer_idx] = (hidden, current)
        if stage is None:
            return None
        if args:
            return (hidden,) + tuple(args[1:]), current
        return args, {**current, "hidden_states": hidden}

    def _layer_kwargs(self, st: StageState, hidden: Tensor, orig: dict) -> dict:
        """Layer kwargs for a layer governed by stage ``st`` (computed once per forward call)."""
        fwd = self._fwd
        assert fwd is not None
        if st.index not in fwd.kwargs_cache:
            impl, rotary = self.adapter.attn_implementation, self.adapter.rotary
            if fwd.prefill:
                new = lk.prefill_kwargs(st.slots, hidden, orig, impl, rotary)
            else:
                valid2d = fwd.attention_2d.bool()
                assert fwd.positions is not None
                new = lk.decode_kwargs(
                    st.slots, st.decode_offset, hidden, orig, impl, rotary, valid2d, self._orig_len, fwd.positions
                )
            fwd.kwargs_cache[st.index] = new
        return {**orig, **fwd.kwargs_cache[st.index]}

    # -- the cut itself ------------------------------------------------------------------------
    def _cut(self, cs: CompiledStage, hidden: Tensor, kwargs: dict, prev: StageState | None):
        """Score, select and gather at stage ``cs``.  Returns (new hidden, new stage state or None)."""
        t0 = time.perf_counter()
        fwd = self._fwd
        assert fwd is not None and fwd.positions is not None and self._is_visual is not None
        valid2d = fwd.attention_2d.bool()
        slots = prev.slots if prev is not None else sl.initial_slots(valid2d, fwd.positions, hidden.device)
        visual = sl.visual_slots(self._is_visual, slots)  # [B, S]
        n_vis = visual.sum(-1)  # [B]
        n_orig = self._is_visual.sum(-1)
        captured = self._vision.take() if (self._vision is not None and cs.needs & VISION_NEEDS) else None
        # the per-sample counts the budget and the trace need, read from the device in one copy
        n_orig_h, n_vis_h, tokens_before = torch.stack([n_orig, n_vis, slots.valid.sum(-1)]).tolist()
        budgets = {n: self.plan.budget(n) for n in set(n_orig_h) if n > 0}  # (requested, kept) per stage
        requested = [budgets[n][0][cs.index] if n > 0 else 0 for n in n_orig_h]
        keep = sl.keep_counts(lambda n: budgets[n][1][cs.index], n_orig_h, n_vis_h, hidden.device)  # [B]
        if bool((keep >= n_vis).all()):  # nothing to remove: the stage is the identity
            kept = sl.rows(slots.orig, visual)
            self._record(cs, tokens_before, tokens_before, n_vis_h, n_vis_h, kept, requested, t0)
            return hidden, None

        cand = sl.candidates(visual, slots.orig)
        view = self._view(cs, hidden, kwargs, slots, cand, n_vis, n_orig, captured)
        scores = None
        recorded: tuple[list[Tensor], list[list[int]]] | None = None
        if cs.scorer is not None:
            scores = cs.scorer.score(view)
            check_scores(cs, scores, cand.valid.shape, valid=cand.valid)
            if self.record_scores:
                host, valid_host, orig_host = scores.detach().float().cpu(), cand.valid.cpu(), cand.original.cpu()
                recorded = (
                    [row[v] for row, v in zip(host, valid_host)],
                    [row[v].tolist() for row, v in zip(orig_host, valid_host)],
                )
        sel = cs.selector.select(view, scores, keep)
        check_selection(cs, sel, keep, n_vis)

        keep_mask, chosen = sl.keep_mask(slots.valid, visual, cand, sel)
        reduced, gather = sl.reduce(slots, keep_mask, cs.policy)
        offset = sl.decode_offset(fwd.positions, valid2d, reduced)
        if sel.hidden is not None:  # merged tokens replace their kept anchors (core rule, types.Selection)
            hidden = sl.write_merged(hidden, cand.index, sel)
        new_hidden = sl.gather_rows(hidden, gather)
        state = StageState(cs.index, cs.layer, reduced, offset)

        kept = sl.rows(slots.orig, chosen)
        counts, visual_after = torch.stack([keep_mask.sum(-1), sel.valid.sum(-1)]).tolist()
        self._record(cs, tokens_before, counts, n_vis_h, visual_after, kept, requested, t0)
        if recorded is not None:
            self.trace.stages[-1].scores, self.trace.stages[-1].scored = recorded
        self.trace.final_index = sl.rows(reduced.orig, reduced.valid)
        return new_hidden, state

    def _view(self, cs, hidden, kwargs, slots: Slots, cand: sl.Candidates, n_vis, n_orig, captured) -> TokenView:
        """What the stage's scorer and selector see."""
        fwd = self._fwd
        assert fwd is not None
        vision = None
        if captured is not None:
            assert self._vision is not None
            vision = VisionSignals(self._vision.tower, captured, n_vis, cand.valid)
        original = cand.original
        signals = LlamaSignals(
            layers=self.layers,
            norm=self.adapter.language_model.norm,
            lm_head=self.adapter.head,
            layer=cs.layer,
            current=(hidden, kwargs),
            previous=fwd.captured.get(cs.layer - 1),
            valid=slots.valid,
            grid=lambda: self._visual_grid().gather(1, original.clamp(min=0).unsqueeze(-1).expand(-1, -1, 3)),
            vision=vision,
        )
        return TokenView(
            layer=cs.layer,
            stage=cs.index,
            hidden=hidden,
            valid=slots.valid,
            visual_index=cand.index,
            visual_valid=cand.valid,
            original_index=original,
            n_original_visual=n_orig,
            signals=signals,
        )

    def _record(
        self, cs: CompiledStage, tokens_before, tokens_after, visual_before, visual_after, kept, requested, t0
    ) -> None:
        st = StageTrace(
            stage=cs.index,
            layer=cs.layer,
            tokens_before=list(tokens_before),
            tokens_after=list(tokens_after),
            visual_before=list(visual_before),
            visual_after=list(visual_after),
            kept=kept,
            seconds=time.perf_counter() - t0,
            requested=list(requested),
        )
        self.trace.stages.append(st)
        if st.clamped and not self.plan.clamp_warned:
            self.plan.clamp_warned = True  # once per compiled plan (tokenreduce eval attaches it per batch)
            warnings.warn(ClampWarning(self._clamp_message(cs, st)), stacklevel=2)

    def _clamp_message(self, cs: CompiledStage, st: StageTrace) -> str:
        b = st.clamped[0]
        name = f"plan {self.plan.plan.name!r}" if self.plan.plan.name else "the plan"
        keep = cs.spec.keep.model_dump(mode="json")
        return (
            f"{name} stages.{cs.index} (layer {cs.layer}, keep {keep}) asks for {st.requested[b]} visual tokens of "
            f"sample {b}, which has {st.visual_before[b]} at that stage, and keeps {st.visual_after[b]}: a keep "
            "count is clamped to at least 1 and at most the visual tokens entering the stage (docs/concepts.md, "
            f"Budget); trace.stages[i].requested records every clamp ({len(st.clamped)} of {len(st.requested)} "
            "sample(s) here); shown once per plan"
        )

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        plan = f" plan {self.plan.plan.name!r}" if self.plan.plan.name else ""
        return f"<CutAttachment {self.adapter.name!r}{plan} {len(self.plan.stages)} stage(s), {state}>"
