"""Reference ("oracle") pruned greedy decode for LLaVA-style models (Llama decoder), written by hand.

This is what a hook-based token-reduction implementation is tested against: it runs the decoder
layers one by one (no hooks, no ``generate()``), drops tokens between layers exactly as the stages
say, and decodes greedily with its own ``DynamicCache``. Batch size 1, no padding.

Position conventions, per stage ``(K, kept_original_positions, policy)`` applied before layer K:

- ``"keep"``: surviving tokens keep the rotary positions they had (the original positions
  0..S-1 unless an earlier stage renumbered them); decode tokens continue the same numbering.
- ``"renumber"``: surviving tokens get contiguous positions ``0..n'-1`` (n' = number kept); decode
  step t then uses position ``n' + t`` in layers >= K, i.e. the original decode position ``S + t``
  shifted down by the number of tokens removed so far.

Layers before the first stage see all S tokens at positions 0..S-1 and decode at ``S + t``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

Stage = tuple[int, "Sequence[int] | torch.Tensor", str]


def _is_qwen(model) -> bool:
    """M-RoPE models (the Qwen family): their VLM computes 3-D ids with ``get_rope_index``."""
    return hasattr(getattr(model, "model", None), "get_rope_index")


def oracle_positions(model, input_ids: torch.Tensor, extra: dict) -> torch.Tensor:
    """``[A, S]`` RoPE ids of a single prompt: ``arange`` (A = 1) for LLaVA; Qwen2.5-VL's
    M-RoPE ids (A = 3) from the model's own ``get_rope_index``."""
    if not _is_qwen(model):
        return torch.arange(input_ids.shape[1]).unsqueeze(0)
    pos, _ = model.model.get_rope_index(
        input_ids,
        extra["mm_token_type_ids"],
        image_grid_thw=extra.get("image_grid_thw"),
        video_grid_thw=extra.get("video_grid_thw"),
    )
    return pos[:, 0]  # [3, S]


def oracle_inputs_embeds(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    image_sizes: torch.Tensor | None = None,
    extra: dict | None = None,
) -> torch.Tensor:
    """The decoder's input embeddings, built as LLaVA / LLaVA-NeXT do.

    Token embeddings of ``input_ids`` with the projected image features written, in order, into
    the image-token positions (``config.image_token_id``).

    Args:
        input_ids: ``[B, S]`` int64.
        pixel_values: LLaVA ``[B, 3, H, W]``; LLaVA-NeXT ``[B, n_patches, 3, H, W]``.
        image_sizes: LLaVA-NeXT only: ``[B, 2]`` original (height, width).

    Returns:
        ``[B, S, D]`` in the model dtype.
    """
    embeds = model.get_input_embeddings()(input_ids)
    if _is_qwen(model):  # image features in image-token order
        extra = extra or {}
        embeds = embeds.clone()
        for ids, pix, thw in (
            (model.config.image_token_id, pixel_values, extra.get("image_grid_thw")),
            (model.config.video_token_id, extra.get("pixel_values_videos"), extra.get("video_grid_thw")),
        ):
            if pix is None:
                continue
            get = (
                model.model.get_image_features if ids == model.config.image_token_id else model.model.get_video_features
            )
            feats = torch.cat(list(get(pix, thw, return_dict=True).pooler_output), dim=0).to(embeds.dtype)
            where = input_ids == ids
            if int(where.sum()) != feats.shape[0]:
                raise ValueError(f"{int(where.sum())} media tokens but {feats.shape[0]} features")
            embeds[where] = feats
        return embeds
    kwargs = {} if image_sizes is None else {"image_sizes": image_sizes}
    features = model.model.get_image_features(
        pixel_values=pixel_values,
        vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        return_dict=True,
        **kwargs,
    ).pooler_output  # list of [n_visual_i, D], one per image
    features = torch.cat(list(features), dim=0).to(embeds.dtype)  # [N_vis, D]
    image_mask = input_ids == model.config.image_token_id  # [B, S]
    if int(image_mask.sum()) != features.shape[0]:
        raise ValueError(f"{int(image_mask.sum())} image tokens but {features.shape[0]} image features")
    embeds = embeds.clone()
    embeds[image_mask] = features
    return embeds


def _causal_mask(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive causal mask ``[1, 1, n, n]``: 0 on and below the diagonal, dtype min above."""
    return torch.triu(torch.full((1, 1, n, n), torch.finfo(dtype).min, dtype=dtype), diagonal=1)


@torch.no_grad()
def oracle_generate(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    stages: Sequence[Stage],
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    image_sizes: torch.Tensor | None = None,
    extra: dict | None = None,
) -> tuple[list[int], torch.Tensor]:
    """Greedy decode with tokens dropped before given decoder layers (no EOS stopping).

    Args:
        model: a ``LlavaForConditionalGeneration`` (or LLaVA-NeXT) with a Llama decoder.
        input_ids: ``[1, S]`` int64, no padding.
        pixel_values: as the processor returns them.
        stages: ``(K, kept_original_positions, policy)`` with K strictly increasing in
            ``[0, num_layers)``; ``kept_original_positions`` are ascending indices into the original
            prefill sequence 0..S-1 (a subset of the previous stage's set, containing S-1) that
            survive into layers >= K; ``policy`` is ``"keep"`` or ``"renumber"`` (module docstring).
        max_new_tokens: number of greedy steps.
        attention_mask: optional ``[1, S]``; must be all ones.
        image_sizes: LLaVA-NeXT only, as the processor returns it.
        extra: Qwen2.5-VL only: ``mm_token_type_ids``, ``image_grid_thw`` (and video inputs).
            Positions are then 3-D M-RoPE ids: ``keep`` gathers them, ``renumber`` gives
            contiguous ids equal on all axes; decoding continues at the largest id + 1.

    Returns:
        ``(tokens, logits)``: ``max_new_tokens`` generated ids and the raw (unprocessed) logits
        ``[max_new_tokens, vocab]`` (model dtype) that chose them.
    """
    if input_ids.shape[0] != 1:
        raise ValueError("oracle_generate supports batch size 1 only")
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError("oracle_generate does not support padding")
    decoder = model.model.language_model
    layers = decoder.layers
    embeds = oracle_inputs_embeds(model, input_ids, pixel_values, image_sizes, extra)  # [1, S, D]
    S = embeds.shape[1]
    qwen = _is_qwen(model)

    def rotary(h, pos):  # pos [A, n]
        return decoder.rotary_emb(h, pos[:, None] if qwen else pos)

    stage_at: dict[int, tuple[torch.Tensor, str]] = {}
    last_k = -1
    for k, kept, policy in stages:
        if not last_k < k < len(layers):
            raise ValueError(f"stage layers must increase within [0, {len(layers)}): got {k} after {last_k}")
        if policy not in ("keep", "renumber"):
            raise ValueError(f"unknown policy {policy!r}")
        stage_at[k] = (torch.as_tensor(kept, dtype=torch.long).flatten(), policy)
        last_k = k

    cache = DynamicCache()
    kept_orig = torch.arange(S)  # [n] original position of each current row
    rope_pos = oracle_positions(model, input_ids, extra or {})  # [A, n] rotary ids of each current row
    decode_base = int(rope_pos.max()) + 1  # rotary id of the first decode token (changes at renumber)
    layer_decode_base: list[int] = []

    # prefill
    h = embeds
    for i, layer in enumerate(layers):
        if i in stage_at:
            kept, policy = stage_at[i]
            if kept.numel() == 0 or not bool((kept[1:] > kept[:-1]).all()) or int(kept[-1]) != S - 1:
                raise ValueError(f"stage {i}: kept positions must be ascending and contain the last one")
            if not bool(torch.isin(kept, kept_orig).all()):
                raise ValueError(f"stage {i}: kept positions are not a subset of the previous stage's")
            rows = torch.searchsorted(kept_orig, kept)  # [n'] rows of the current h to keep
            h = h[:, rows]
            kept_orig = kept
            if policy == "keep":
                rope_pos = rope_pos[:, rows]
            else:
                rope_pos = torch.arange(kept.numel()).expand(rope_pos.shape[0], -1)
                decode_base = kept.numel()
        layer_decode_base.append(decode_base)
        cos_sin = rotary(h, rope_pos)  # ([1, n, hd], [1, n, hd])
        h = layer(
            h,
            attention_mask=_causal_mask(h.shape[1], h.dtype),
            position_embeddings=cos_sin,
            past_key_values=cache,
            use_cache=True,
        )
    logits = model.lm_head(decoder.norm(h[:, -1]))  # [1, V]

    # greedy decode: one token, attending to everything in the cache (no mask needed)
    tokens: list[int] = []
    step_logits: list[torch.Tensor] = []
    for t in range(max_new_tokens):
        step_logits.append(logits[0])
        next_id = logits.argmax(-1)  # [1]
        tokens.append(int(next_id))
        if t == max_new_tokens - 1:
            break
        h = decoder.embed_tokens(next_id)[:, None]  # [1, 1, D]
        for i, layer in enumerate(layers):
            pos = torch.tensor([[layer_decode_base[i] + t]]).expand(rope_pos.shape[0], 1)
            cos_sin = rotary(h, pos)
            h = layer(h, attention_mask=None, position_embeddings=cos_sin, past_key_values=cache, use_cache=True)
        logits = model.lm_head(decoder.norm(h[:, -1]))
    return tokens, torch.stack(step_logits)  # [steps, V]
