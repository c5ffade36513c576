"""Keep counts known before an image is seen, and the position layout of a reduced prompt.

A serving engine such as vLLM writes each image's placeholder tokens into the prompt in its
processor, before any embedding exists, and sizes its KV cache from them.  A plan can run there
only if every reduction happens on the encoder side (one stage cutting before decoder layer 0)
and its keep count follows from the image's token count and the plan alone.  In tokenreduce the
second part always holds (a selector returns exactly the ``keep`` its stage was given,
:class:`~tokenreduce.core.strategy.Selector`), so what is refused here is everything else:

* a stage after layer 0 (FastV, PDrop, SparseVLM, DART, PIO's LLM-side stage ...): it cuts
  inside the decoder, which the engine runs as one fused forward;
* a layer-0 stage whose components read decoder signals (attention rows, key states, a layer
  probe): they exist only once the decoder runs.

:func:`static_keep_count` is then the count the transformers path keeps for a sample with that
many visual tokens (:meth:`Plan.budget`, the same arithmetic), and :func:`reduced_positions`
the position ids of the reduced prompt under the plan's policy, as
:func:`tokenreduce.adapters.cut.slots.reduce` lays them out: ``keep`` gives every surviving
token its original id (gaps where tokens were dropped), ``renumber`` contiguous ids.
Used by :mod:`tokenreduce.integrations.vllm` (``docs/vllm.md``).  The same caveat as EVS, vLLM's
own video pruning (arXiv:2510.14624): the budget is fixed per image, never per content.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import PlanError
from .plan import CompiledPlan, PositionPolicy
from .strategy import hook
from .support import method_of
from .types import Need

__all__ = [
    "DECODER_NEEDS",
    "EncoderStage",
    "encoder_stage",
    "encoder_side_problems",
    "reduced_positions",
    "static_keep_count",
]

#: signals that exist only while the decoder runs: a stage reading them cannot run before it
DECODER_NEEDS = Need.ATTENTION_ROWS | Need.KEY_STATES | Need.LAYER_PROBE


def encoder_side_problems(compiled: CompiledPlan) -> list[str]:
    """Why ``compiled`` cannot run entirely on the encoder side: one line per offending stage
    (empty: it can; a plan without stages always can)."""
    problems = []
    for cs in compiled.stages:
        spec = cs.spec
        what = f"stages.{cs.index} ({method_of(_one_stage(compiled, cs.index))} before layer {cs.layer})"
        if cs.layer != 0:
            problems.append(f"{what} cuts inside the decoder")
            continue
        needs = Need.NONE
        for comp in cs.components:
            needs |= hook(comp, "needs")
        decoder = needs & DECODER_NEEDS
        if decoder:
            names = [getattr(spec, part).name for part in ("scorer", "selector") if getattr(spec, part) is not None]
            problems.append(f"{what} reads decoder signals [{decoder.describe()}] ({', '.join(names)})")
    return problems


def _one_stage(compiled: CompiledPlan, index: int):
    return compiled.plan.model_copy(update={"stages": [compiled.plan.stages[index]], "layer_average": None})


@dataclass(frozen=True)
class EncoderStage:
    """The encoder-side part of a plan, checked: ``stage`` is its layer-0 stage (None: the plan
    has no stage and keeps every visual token), ``policy`` the position policy of the kept tokens."""

    compiled: CompiledPlan
    policy: PositionPolicy

    @property
    def stage(self):
        return self.compiled.stages[0] if self.compiled.stages else None


def encoder_stage(compiled: CompiledPlan, engine: str = "this engine") -> EncoderStage:
    """``compiled`` as an :class:`EncoderStage`, or :class:`PlanError` naming each stage that
    ``engine`` cannot run and saying that the transformers path (``tokenreduce.apply``) can."""
    problems = encoder_side_problems(compiled)
    if problems:
        name = f"plan {compiled.plan.name!r}" if compiled.plan.name else "the plan"
        raise PlanError(
            f"{name} cannot run on {engine}: only an encoder-side stage (one stage before decoder layer 0 whose "
            f"scorer and selector read vision-tower signals or the visual embeddings) can, because {engine} writes "
            "the image placeholders before the model runs and runs the decoder as one fused forward; "
            + "; ".join(problems)
            + ". These stages run on Hugging Face transformers: tokenreduce.apply(model, plan) or `tokenreduce run`"
        )
    if compiled.plan.layer_average is not None and compiled.n_layers is None:
        raise PlanError("this plan's budget is a layer_average: build it with n_layers (the model depth)")
    policy = compiled.stages[0].policy if compiled.stages else compiled.plan.positions
    return EncoderStage(compiled, policy)


def static_keep_count(compiled: CompiledPlan, n_visual: int) -> int:
    """Visual tokens the plan keeps of an image (or sample) of ``n_visual`` visual tokens: the
    count the transformers path keeps (:meth:`CompiledPlan.budget`, clamp included).  Refuses a
    plan that is not encoder-side only (:func:`encoder_stage`)."""
    if isinstance(n_visual, bool) or not isinstance(n_visual, int) or n_visual < 0:
        raise ValueError(f"n_visual must be a non-negative integer (visual tokens of one image); got {n_visual!r}")
    stage = encoder_stage(compiled).stage
    if stage is None or n_visual == 0:
        return n_visual
    return compiled.budget(n_visual)[1][0]


def reduced_positions(positions: Tensor, kept: Tensor, policy: PositionPolicy) -> Tensor:
    """Position ids of a prompt after a cut: ``positions`` ``[S]`` or ``[A, S]`` (A rotary axes,
    e.g. 3 for M-RoPE) of the unreduced prompt, ``kept`` ``[S]`` bool (True at every surviving
    token: the text and the kept visual tokens).  ``keep``: the original ids of the kept tokens
    (``[..., S']``, gaps where tokens were dropped); ``renumber``: ``0..S'-1`` on every axis.
    The next generated token continues after the largest id returned."""
    if policy not in ("keep", "renumber"):
        raise ValueError(f"policy must be 'keep' or 'renumber'; got {policy!r}")
    if kept.dtype != torch.bool or kept.dim() != 1 or kept.shape[0] != positions.shape[-1]:
        raise ValueError(
            f"kept must be a [S] bool mask over the prompt's {positions.shape[-1]} tokens; "
            f"got {tuple(kept.shape)} {kept.dtype}"
        )
    if policy == "keep":
        return positions[..., kept]
    n = int(kept.sum())
    ids = torch.arange(n, dtype=positions.dtype, device=positions.device)
    return ids.expand(*positions.shape[:-1], n).clone()
