"""The engine-independent half of the vLLM plugin: plans per image, the encoder-side stage run on
one batch of images, and the kept-index channels that carry each kept token's place to the
position recomputation.  Nothing here imports vLLM, so the default test suite checks it against
the transformers path on the shipped reference models (``tests/integrations/test_vllm_encoder.py``).

The stage runs with the same scorer and selector objects as :func:`tokenreduce.apply`: every
image is one sample whose candidates are its patch tokens; the hidden states at the cut (layer 0)
are the projected image features, which is what the transformers path's layer 0 sees at those
positions.  Vision-tower signals come from :class:`~tokenreduce.adapters.vision_signals.VisionSignals`
over captured encoder-layer inputs; the grid from the adapter's own helper.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from tokenreduce.adapters.llava.adapter import LlavaAdapter, square_grid
from tokenreduce.adapters.vision_signals import VisionSignals, VisionTower
from tokenreduce.core.checks import check_scores, check_selection
from tokenreduce.core.errors import PlanError
from tokenreduce.core.plan import Plan, build_plan, parse_plan
from tokenreduce.core.static_budget import EncoderStage, encoder_stage, static_keep_count
from tokenreduce.core.types import VISION_NEEDS, Need, Selection, TokenView

ENGINE = "vLLM"
#: the key of the plan in ``hf_overrides`` (engine default) and ``mm_processor_kwargs`` (per request)
PLAN_KEY = "tokenreduce_plan"
#: channels appended to each reduced image embedding: the kept patch index and the policy (:func:`encode_index`)
INDEX_CHANNELS = 3
#: channels appended to each reduced image embedding of a model with per-image grids (:func:`encode_grid_index`)
GRID_INDEX_CHANNELS = INDEX_CHANNELS + 2
_BASE = 256  # integers below 256 are exact in bf16, fp16 and fp32


def plan_json(spec: Plan | dict | str | None) -> str:
    """The canonical JSON of a plan (a :class:`Plan`, a mapping, a preset name or a plan's JSON),
    validated with the same pydantic models as everywhere; ``""`` for no plan (every visual token
    kept).  Called for every request: the validation of a given spec is cached."""
    if spec is None or spec == "":
        return ""
    if isinstance(spec, Plan):
        return _canonical(spec)
    if isinstance(spec, str):
        return _plan_json_text(spec)
    try:
        key = json.dumps(spec, sort_keys=True)
    except TypeError:  # a mapping holding component objects: validated each time
        return _canonical(parse_plan(spec))
    return _plan_json_text(key)


@lru_cache(maxsize=256)
def _plan_json_text(text: str) -> str:
    spec: Any = text
    if text.lstrip().startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(
                f"{PLAN_KEY}: not valid JSON ({exc}); give a preset name, a mapping or a plan's JSON"
            ) from None
    return _canonical(parse_plan(spec))


def _canonical(plan: Plan) -> str:
    return json.dumps(plan.model_dump(mode="json", exclude_none=True), sort_keys=True)


@lru_cache(maxsize=64)
def compile_encoder_plan(text: str, n_layers: int, adapter: type = LlavaAdapter) -> EncoderStage:
    """The plan of :func:`plan_json`'s text, built for a model of ``n_layers`` decoder layers whose
    transformers adapter is ``adapter`` (what it provides decides which components build: LLaVA's
    CLIP tower has CLS attention, Qwen2.5-VL's tower the attention each patch receives) and checked
    to run entirely on the encoder side (:class:`PlanError` otherwise)."""
    if not text:
        return encoder_stage(build_plan(Plan(), n_layers=n_layers), ENGINE)
    compiled = build_plan(json.loads(text), n_layers=n_layers, adapter=adapter)
    return encoder_stage(compiled, ENGINE)


def engine_plan(config: Any) -> str:
    """The engine's plan (``hf_overrides``' ``tokenreduce_plan`` on the model config) as :func:`plan_json`."""
    return plan_json(getattr(config, PLAN_KEY, None))


def request_plan(config: Any, kwargs: Any) -> str:
    """A request's plan (``mm_processor_kwargs``' ``tokenreduce_plan``), else the engine's."""
    return plan_json(kwargs[PLAN_KEY]) if kwargs.get(PLAN_KEY) is not None else engine_plan(config)


def plan_field(text: str) -> Tensor:
    """A plan's JSON as the ``uint8`` row a per-image field carries (one zero byte for no plan)."""
    return torch.tensor(list(text.encode()) or [0], dtype=torch.uint8)


def plan_text(value: Any) -> str:
    """Inverse of :func:`plan_field`: the plan JSON carried by a per-image ``uint8`` field (a tensor or
    an object with ``.data``; trailing zero padding dropped)."""
    data = value.data if hasattr(value, "data") and not isinstance(value, Tensor) else value
    raw = bytes(torch.as_tensor(data).flatten().to(torch.uint8).tolist())
    return raw.rstrip(b"\0").decode()


def keep_count(stage: EncoderStage, n_visual: int) -> int:
    """Placeholder tokens an image of ``n_visual`` visual tokens gets under ``stage``'s plan."""
    return static_keep_count(stage.compiled, n_visual)


def encode_index(index: Tensor, policy: str, dtype: torch.dtype) -> Tensor:
    """``[k]`` kept patch indices -> ``[k, 3]`` channels (high and low base-256 digits, 1 for the
    ``keep`` policy else 0), exact in any float dtype: appended to the embeddings, they carry the
    kept places through vLLM's encoder cache to the position recomputation."""
    index = index.long()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= _BASE * _BASE):
        raise ValueError(f"patch indices must be in 0..{_BASE * _BASE - 1}; got {index.min()}..{index.max()}")
    flag = torch.full_like(index, int(policy == "keep"))
    return torch.stack([index // _BASE, index % _BASE, flag], dim=-1).to(dtype)


def decode_index(channels: Tensor) -> tuple[Tensor, str]:
    """Inverse of :func:`encode_index`: ``[k, 3]`` -> (``[k]`` long, policy)."""
    digits = channels.float().round().long()
    policy = "keep" if digits.numel() and bool(digits[0, 2] == 1) else "renumber"
    return digits[:, 0] * _BASE + digits[:, 1], policy


def encode_grid_index(index: Tensor, width: int, policy: str, dtype: torch.dtype) -> Tensor:
    """:func:`encode_index` plus two channels holding the width of the image's token grid (high
    and low base-256 digits): ``[k, GRID_INDEX_CHANNELS]``, for images whose tokens lie on a grid
    of their own size (Qwen2.5-VL's dynamic resolution), so the 2-D place of each kept token can be
    recovered (:func:`grid_offsets`)."""
    if not 0 < width < _BASE * _BASE:
        raise ValueError(f"grid width must be in 1..{_BASE * _BASE - 1}; got {width}")
    channels = encode_index(index, policy, dtype)
    w = torch.tensor([width // _BASE, width % _BASE], dtype=dtype, device=channels.device)
    return torch.cat([channels, w.expand(channels.shape[0], 2)], dim=-1)


def decode_grid_index(channels: Tensor) -> tuple[Tensor, int, str]:
    """Inverse of :func:`encode_grid_index`: ``[k, 5]`` -> (``[k]`` long, width, policy)."""
    index, policy = decode_index(channels[:, :INDEX_CHANNELS])
    digits = channels[:, INDEX_CHANNELS:].float().round().long()
    width = int(digits[0, 0] * _BASE + digits[0, 1]) if digits.numel() else 1
    return index, width, policy


def grid_offsets(index: Tensor, width: int) -> Tensor:
    """``[3, k]`` M-RoPE id offsets (temporal, row, column) of the tokens ``index`` ``[k]`` of one
    image whose token grid is ``width`` tokens wide, in raster order: ``(0, index // width,
    index % width)``, the layout of Qwen2.5-VL's image tokens from the image's first id."""
    index = index.long()
    return torch.stack([torch.zeros_like(index), index // width, index % width])


def prompt_positions(runs: list[tuple[int, int, int]], n_tokens: int, policy: str) -> tuple[Tensor, int]:
    """1-D position ids of a reduced prompt of ``n_tokens`` tokens whose image placeholders are
    ``runs`` ``(offset, kept, original)`` (in prompt order), before the kept places are known.

    ``renumber``: ``0..n_tokens-1``.  ``keep``: every text token has the id it has in the
    unreduced prompt; an image's ``kept`` placeholders get provisional ids ``start..start+kept-1``
    from its first original id ``start`` (:func:`place_kept` moves them to ``start + index``);
    the text after it continues at ``start + original``.  Returns the ids and the delta of the
    next position (``max id + 1 - n_tokens``).  The 1-D case of :func:`layout_positions`."""
    layouts = [(offset, kept, torch.arange(original).unsqueeze(0)) for offset, kept, original in runs]
    ids, delta = layout_positions(layouts, n_tokens, policy)
    return ids[0], delta


def layout_positions(runs: list[tuple[int, int, Tensor]], n_tokens: int, policy: str) -> tuple[Tensor, int]:
    """Position ids ``[A, n_tokens]`` (A rotary axes) of a reduced prompt whose image placeholders
    are ``runs`` ``(offset, kept, layout)``: ``layout`` ``[A, original]`` holds the id offsets of the
    image's original tokens from its first id (``arange`` on one axis for LLaVA; temporal, row and
    column for an M-RoPE image, :func:`grid_offsets`), starting at zero.

    ``renumber``: ``0..n_tokens-1`` on every axis.  ``keep``: text tokens get the ids they have in
    the unreduced prompt (text continues at ``start + max(layout) + 1`` after an image whose first
    id is ``start``), the image's ``kept`` placeholders provisional ids ``start + layout[:, :kept]``
    until :func:`place_kept` moves them to ``start + layout[:, index]``.  Returns the ids and the
    delta of the next position (``max id + 1 - n_tokens``), as vLLM's M-RoPE models do."""
    axes = runs[0][2].shape[0] if runs else 1
    if policy == "renumber" or not runs:
        return torch.arange(n_tokens).expand(axes, -1).clone(), 0
    ids = torch.empty(axes, n_tokens, dtype=torch.long)
    text_at, next_id = 0, 0
    for offset, kept, layout in sorted(runs, key=lambda r: r[0]):
        if layout.shape[0] != axes or kept > layout.shape[1]:
            raise ValueError(f"image at {offset}: layout {tuple(layout.shape)} for {kept} kept tokens on {axes} axes")
        ids[:, text_at:offset] = torch.arange(next_id, next_id + offset - text_at)
        start = next_id + offset - text_at
        ids[:, offset : offset + kept] = start + layout[:, :kept].long()
        span = int(layout.max()) + 1 if layout.numel() else 0
        text_at, next_id = offset + kept, start + span
    ids[:, text_at:] = torch.arange(next_id, next_id + n_tokens - text_at)
    last = int(ids.max()) if n_tokens else -1
    return ids, last + 1 - n_tokens


def place_kept(positions: Tensor, visual: Tensor, chunks: list[Tensor], first: int, policy: str) -> Tensor:
    """Positions ``[A, N]`` of a prompt (as :func:`layout_positions` gave them) with the image
    tokens scheduled from prompt index ``first`` on moved to their original ids: ``visual`` ``[N]``
    bool marks the placeholders, ``chunks`` the kept places of the embeddings scheduled, in order:
    ``[k]`` indices (the same offset on every axis) or ``[A, k]`` id offsets (:func:`grid_offsets`).
    ``renumber``: unchanged."""
    if policy == "renumber":
        return positions
    out = positions.clone()
    where = torch.nonzero(visual[first:]).flatten() + first
    index = torch.cat(chunks, dim=-1) if chunks else torch.empty(0, dtype=torch.long)
    where = where[: index.shape[-1]]
    # the first id of each run: provisional ids are start + offset within the run
    run_start = torch.ones_like(visual)
    run_start[1:] = visual[1:] & ~visual[:-1]
    run_start &= visual
    start_at = torch.cummax(torch.where(run_start, torch.arange(visual.numel()), torch.zeros_like(out[0])), 0).values
    base = out[:, start_at[where]]
    out[:, where] = base + index.to(out.dtype)
    return out


# -- the stage on a batch of images ------------------------------------------------------------------
class EncoderSignals:
    """The signals an encoder-side stage reads, for a batch of images each its own sample: the
    visual grid and (when the stage reads them) the vision-tower signals."""

    def __init__(self, grid: Tensor, vision: VisionSignals | None, provides: Need):
        self._grid = grid
        self._vision = vision
        self.provides = provides

    def _need_vision(self) -> VisionSignals:
        if self._vision is None:
            raise RuntimeError("vision-tower signals were not captured for this stage")
        return self._vision

    def visual_grid(self) -> Tensor:
        return self._grid

    def vision_cls_attention(self, layer: int, heads: str = "sum") -> Tensor:
        return self._need_vision().cls_attention(layer, heads)

    def vision_attention(self, layer: int, heads: str = "sum") -> Tensor:
        """The attention each patch receives (towers without CLS token, ``Need.VISION_ATTENTION``)."""
        return self._need_vision().attention_received(layer, heads)  # type: ignore[attr-defined]  # Qwen towers

    def vision_keys(self, layer: int, heads: str = "mean") -> Tensor:
        return self._need_vision().keys(layer, heads)

    def vision_features(self) -> Tensor:
        return self._need_vision().features()

    def vision_cls_features(self) -> Tensor:
        return self._need_vision().cls_features()

    def project_vision(self, features: Tensor) -> Tensor:
        return self._need_vision().project(features)


@dataclass
class Reduced:
    """One image after the stage: its embeddings ``[k, d]`` and the kept patch indices ``[k]``."""

    embeddings: Tensor
    index: Tensor


def reduce_images(
    stage: EncoderStage,
    features: Tensor,
    tower: VisionTower | None,
    captured: Callable[[], dict[Any, Any]] | None,
    *,
    grid_width: int | None = None,
    provides: Need = LlavaAdapter.provides,
) -> list[Reduced]:
    """Run ``stage`` on a batch of images: ``features`` ``[I, P, d]`` are the projected image
    features (the LLM's inputs at the image's positions); ``tower`` and ``captured`` (the captured
    encoder-layer inputs, encoder layer -> ``[I, 1 + P, d_v]``; for a Qwen-family tower, what
    :class:`~tokenreduce.adapters.qwen_vision_signals.QwenVisionSignals` reads) serve the
    vision-tower signals.  The images lie on a square grid (LLaVA), or on one ``grid_width``
    tokens wide (raster order); ``provides`` are the signals the model's adapter provides.
    Every image keeps :func:`keep_count` tokens, chosen by the plan's own scorer and selector."""
    n_img, p, _ = features.shape
    device = features.device
    all_index = torch.arange(p, device=device)
    cs = stage.stage
    if cs is None or n_img == 0:
        return [Reduced(features[i], all_index) for i in range(n_img)]
    k = keep_count(stage, p)
    if k >= p:
        return [Reduced(features[i], all_index) for i in range(n_img)]
    valid = torch.ones(n_img, p, dtype=torch.bool, device=device)
    n_vis = torch.full((n_img,), p, dtype=torch.long, device=device)
    vision = None
    if cs.needs & VISION_NEEDS:
        if tower is None or captured is None:
            raise RuntimeError("this stage reads vision-tower signals, but the model exposes no vision tower")
        vision = VisionSignals(tower, captured(), n_vis, valid)
    visual = torch.ones(n_img, p, dtype=torch.bool, device=device)
    if grid_width is None:
        grid = square_grid(torch.zeros(n_img, p, dtype=torch.long, device=device), visual, p)
    else:
        grid = grid_offsets(all_index, grid_width).T.unsqueeze(0).expand(n_img, -1, -1)
    index = all_index.unsqueeze(0).expand(n_img, -1)
    view = TokenView(
        layer=0,
        stage=cs.index,
        hidden=features,
        valid=valid,
        visual_index=index,
        visual_valid=valid,
        original_index=index,
        n_original_visual=n_vis,
        signals=EncoderSignals(grid, vision, provides),
    )
    scores = None
    if cs.scorer is not None:
        scores = cs.scorer.score(view)
        check_scores(cs, scores, valid.shape, valid=valid)
    keep = torch.full((n_img,), k, dtype=torch.long, device=device)
    sel: Selection = cs.selector.select(view, scores, keep)
    check_selection(cs, sel, keep, n_vis)
    out = []
    for i in range(n_img):
        kept = sel.index[i][sel.valid[i]]
        rows = features[i, kept]
        if sel.hidden is not None:  # merged tokens replace their kept anchors (types.Selection)
            rows = sel.hidden[i][sel.valid[i]].to(features.dtype)
        out.append(Reduced(rows, kept))
    return out
