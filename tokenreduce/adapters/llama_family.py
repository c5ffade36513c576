"""Helpers shared by the adapters of VLMs whose language model is a Llama-family decoder
(LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL): the image token id, the layer layout the cut relies on,
and the 1-D position ids ``generate()`` passes at decode."""

from __future__ import annotations

from torch import Tensor

from tokenreduce.core.errors import UnsupportedModelError


def image_token_id(config) -> int:
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    raise UnsupportedModelError(f"{config.model_type} config has no image_token_id")


def check_llama_family(decoder, name: str) -> None:
    """Refuse decoders whose layers do not have the Llama layout the cut relies on."""
    layer = decoder.layers[0]
    needed = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")
    attn_needed = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
    if not all(hasattr(layer, a) for a in needed) or not all(hasattr(layer.self_attn, a) for a in attn_needed):
        raise UnsupportedModelError(f"{name}: the language model's decoder layers do not have the Llama layout")
    if not all(hasattr(decoder, a) for a in ("norm", "rotary_emb", "layers")):
        raise UnsupportedModelError(f"{name}: the language model lacks norm/rotary_emb/layers")
    window = getattr(decoder.config, "sliding_window", None)
    if window and getattr(decoder.config, "use_sliding_window", True) and getattr(decoder.config, "layer_types", None):
        if any(t != "full_attention" for t in decoder.config.layer_types):
            raise UnsupportedModelError(f"{name}: sliding-window attention layers are not supported yet")


def generate_position_ids(top, mask2d: Tensor, q: int) -> Tensor:
    """``[B, q]``: the 1-D position ids ``generate()`` passes for the last ``q`` tokens."""
    pos = mask2d.long().cumsum(-1) - 1
    return pos.masked_fill(mask2d == 0, 1)[:, -q:]
