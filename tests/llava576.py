"""A tiny LLaVA with LLaVA-1.5-7B's budget geometry (576 visual tokens from 336 px / patch 14,
32 decoder layers), built once per attention implementation and shared by the generate()-level
tests of the presets."""

from __future__ import annotations

from tokenreduce.testing.tiny import build_tiny, make_inputs, make_processor

PROMPTS = ["USER: <image> what color is the shape? ASSISTANT:", "<image> what shape?"]
N_VISUAL, DEPTH = 576, 32
_CACHE: dict = {}


def llava(attn: str = "sdpa"):
    if ("llava", attn) not in _CACHE:
        _CACHE["llava", attn] = build_tiny(
            "llava", attn_implementation=attn, image_size=336, patch=14, text_layers=DEPTH
        )
    return _CACHE["llava", attn]


def llava_inputs(prompts, seed=0):
    if "proc" not in _CACHE:
        _CACHE["proc"] = make_processor("llava", image_size=336, patch=14)
    return make_inputs("llava", prompts, seed=seed, processor=_CACHE["proc"])
