"""``TokenReduceQwen2_5_VLForConditionalGeneration``: vLLM's Qwen2.5-VL with a plan's encoder-side stage.

Imported by vLLM only (through :func:`tokenreduce.integrations.vllm.register`).  The same three
pieces as the LLaVA class (:mod:`.llava`), on Qwen2.5-VL's dynamic-resolution images and its own
M-RoPE (no engine override of the rotary layout):

* the processor writes :func:`~tokenreduce.core.static_budget.static_keep_count` placeholders per
  image (an image of ``t*h*w / merge**2`` tokens) and passes the plan to the model as a per-image
  field; the plan is built against tokenreduce's Qwen2.5-VL adapter, so CLS-attention methods are
  refused and their received-attention forms (scorer ``vision_attn``, selector ``pio_ve_qwen``) run;
* ``embed_multimodal`` runs the windowed ViT once per group of images sharing a plan and a grid,
  with its block inputs captured, then the plan's scorer and selector
  (:func:`~.encoder.reduce_images`, the signals of
  :class:`~tokenreduce.adapters.qwen_vision_signals.QwenVisionSignals`), and appends each kept
  token's index and its image's grid width as extra channels;
* positions: ``get_mrope_input_positions`` lays out the reduced prompt (``keep``: text tokens keep
  their unreduced 3-D ids, :func:`~.encoder.layout_positions`; ``renumber``: ``0..n-1`` on every
  axis) and ``recompute_mrope_positions`` moves each kept image token to its original
  (temporal, row, column) id once its index is known, as tokenreduce's transformers path does
  (:func:`tokenreduce.core.static_budget.reduced_positions`); decoding continues after the largest
  id.

Videos are not reduced by this class: a request with a video is refused (serve videos with
vLLM's own class and its EVS pruning).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import BatchFeature
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from tokenreduce.adapters.qwen2_5_vl.adapter import Qwen2_5_VLAdapter
from tokenreduce.adapters.qwen2_5_vl.processor import ImageOnlyQwen2_5_VLProcessor
from tokenreduce.adapters.qwen_vision_signals import QwenVisionTower

from .encoder import (
    GRID_INDEX_CHANNELS,
    PLAN_KEY,
    compile_encoder_plan,
    decode_grid_index,
    encode_grid_index,
    engine_plan,
    grid_offsets,
    keep_count,
    layout_positions,
    place_kept,
    plan_field,
    plan_text,
    reduce_images,
    request_plan,
)

VIDEO_REFUSED = (
    "TokenReduceQwen2_5_VLForConditionalGeneration reduces images only; videos are not supported "
    "(serve them with vLLM's Qwen2_5_VLForConditionalGeneration and its video_pruning_rate)"
)


def _text_layers(config) -> int:
    text = getattr(config, "text_config", config)
    return int(text.num_hidden_layers)


def _stage(config, text: str):
    return compile_encoder_plan(text, _text_layers(config), Qwen2_5_VLAdapter)


class TokenReduceQwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    def get_hf_processor(self, **kwargs: object):
        # images only: the shipped checkpoints carry no video processor (tokenreduce's processor class)
        kwargs.pop(PLAN_KEY, None)
        return self.ctx.get_hf_processor(ImageOnlyQwen2_5_VLProcessor, **kwargs)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}


class TokenReduceQwen2_5_VLProcessor(Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL's processor, writing the plan's keep count of placeholders per image."""

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        if hf_data.get("videos"):
            raise ValueError(VIDEO_REFUSED)
        return super()._call_hf_processor(hf_data, {k: v for k, v in hf_kwargs.items() if k != PLAN_KEY})

    def _postprocess_hf_mm_data(
        self,
        mm_inputs: Mapping[str, object],
        hf_processor_mm_kwargs: Mapping[str, object],
        processed_data: BatchFeature,
    ) -> BatchFeature:
        processed = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
        grid = processed.get("image_grid_thw")
        if grid is None:
            return processed
        text = request_plan(self.info.get_hf_config(), hf_processor_mm_kwargs)
        _stage(self.info.get_hf_config(), text)  # refuse a bad plan here, with its message
        processed[PLAN_KEY] = plan_field(text).unsqueeze(0).expand(len(grid), -1).clone()
        return processed

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            **super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
            PLAN_KEY: MultiModalFieldConfig.batched("image"),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, Any],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()
        stage = _stage(config, request_plan(config, hf_processor_mm_kwargs))
        merge = int(config.vision_config.spatial_merge_size)
        image_token = int(config.image_token_id)

        def replacement(item_idx: int) -> list[int]:
            grid = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data
            return [image_token] * keep_count(stage, int(torch.as_tensor(grid).prod()) // (merge * merge))

        return [PromptReplacement(modality="image", target=[image_token], replacement=replacement)]


def _qkv(block, h: Tensor) -> tuple[Tensor, Tensor]:
    """``(q, k)`` ``[P, H, hd]`` before RoPE from vLLM's fused (parallel) ``qkv`` linear."""
    attn = block.attn
    out, _ = attn.qkv(h)
    qkv = out.reshape(h.shape[0], 3, int(attn.num_attention_heads_per_partition), -1)
    return qkv[:, 0], qkv[:, 1]


class _Capture:
    """Hooks on vLLM's Qwen2.5-VL tower: the grid of each run, every block's input (``[P, d_v]``
    in the tower's window order, read at its pre-attention norm) with its attention's ``cu_seqlens``
    and RoPE tables (vLLM's half-width tables
    widened to the ``[P, head_dim]`` layout the signals read), and the merger's input (at its norm)."""

    def __init__(self, visual) -> None:
        self.inputs: dict[Any, Any] = {}
        visual.register_forward_pre_hook(self._run, with_kwargs=True)
        # vLLM's compilable blocks and merger are called past their own hooks: their first submodules are not
        visual.merger.ln_q.register_forward_pre_hook(self._merger)
        for i, block in enumerate(visual.blocks):
            block.norm1.register_forward_pre_hook(self._block_input(i))
            block.attn.register_forward_pre_hook(self._block_attention(i), with_kwargs=True)

    def _run(self, module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self.inputs = {"grid_thw": torch.as_tensor(grid, dtype=torch.long)}

    def _merger(self, module, args):
        self.inputs["merger"] = args[0].reshape(-1, args[0].shape[-1])

    def _block_input(self, i: int):
        def hook(module, args):
            self.inputs[i] = (args[0].reshape(-1, args[0].shape[-1]), None, None)

        return hook

    def _block_attention(self, i: int):
        def hook(module, args, kwargs):
            cos, sin = kwargs.get("rotary_pos_emb_cos"), kwargs.get("rotary_pos_emb_sin")
            pe = None if cos is None else (torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1))
            self.inputs[i] = (self.inputs[i][0], kwargs.get("cu_seqlens"), pe)

        return hook

    def take(self) -> dict[Any, Any]:
        inputs, self.inputs = self.inputs, {}
        return inputs


@MULTIMODAL_REGISTRY.register_processor(
    TokenReduceQwen2_5_VLProcessor, info=TokenReduceQwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class TokenReduceQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL running a tokenreduce plan's encoder-side stage (``docs/vllm.md``)."""

    #: read by the plugin's runner hook: position recomputation must be on for this model
    tokenreduce_recomputes_positions = True

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _stage(self.config, engine_plan(self.config))  # a bad engine plan fails at start-up
        # embeddings carry extra channels: keep vLLM's fixed-shape encoder paths (CUDA graphs) off
        self.is_multimodal_pruning_enabled = True
        visual = self.visual
        self._capture = _Capture(visual)
        merge = int(visual.spatial_merge_size)

        def window_index(grid: Tensor) -> Tensor:
            return visual.prepare_encoder_metadata(grid.tolist(), device=torch.device("cpu"))["window_index"]

        def project(features: Tensor) -> Tensor:
            out = visual.merger(features.reshape(-1, features.shape[-1] // (merge * merge)))
            return out.view(*features.shape[:-1], -1)

        self._tower = QwenVisionTower(
            tower=visual,
            layers=list(visual.blocks),
            projector=project,
            feature_input_layer=len(visual.blocks) - 1,
            patches=0,
            merge=merge,
            window_index=window_index,
            qkv=_qkv,
            norm=lambda block: block.norm1,
        )

    # -- the encoder-side stage ---------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object):
        plans = kwargs.pop(PLAN_KEY, None)
        if kwargs.get("pixel_values_videos") is not None or kwargs.get("video_embeds") is not None:
            raise ValueError(VIDEO_REFUSED)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            raise ValueError("TokenReduceQwen2_5_VLForConditionalGeneration needs pixel values (no image_embeds)")
        grid = image_input["image_grid_thw"].long()
        pixels = image_input["pixel_values"]
        sizes = grid.prod(-1).tolist()
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        merge = int(self.visual.spatial_merge_size)
        n_img = len(sizes)
        texts = [plan_text(plans[i]) for i in range(n_img)] if plans is not None else [""] * n_img
        out: list[Tensor] = [pixels] * n_img
        keys = [(texts[i], tuple(grid[i].tolist())) for i in range(n_img)]
        for key in dict.fromkeys(keys):  # images sharing a plan and a grid run as one batch
            text, (t, h, w) = key
            rows = [i for i, k in enumerate(keys) if k == key]
            if t != 1:
                raise ValueError(f"an image must have one temporal patch; got grid {(t, h, w)}")
            stage = _stage(self.config, text)
            batch = torch.cat([pixels[starts[i] : starts[i] + sizes[i]] for i in rows])
            self._capture.take()
            emb = self.visual(batch, grid_thw=grid[rows].tolist())
            captured = self._capture.take()
            width = w // merge
            features = emb.view(len(rows), -1, emb.shape[-1])
            reduced = reduce_images(
                stage,
                features,
                self._tower,
                lambda c=captured: c,
                grid_width=width,
                provides=Qwen2_5_VLAdapter.provides,
            )
            for i, r in zip(rows, reduced):
                index = encode_grid_index(r.index, width, stage.policy, r.embeddings.dtype)
                out[i] = torch.cat([r.embeddings, index], dim=-1)
        return out

    # -- positions --------------------------------------------------------------------------------
    def _policy(self, mm_features) -> str:
        for f in mm_features:
            if f.data is not None and PLAN_KEY in f.data:
                return _stage(self.config, plan_text(f.data[PLAN_KEY])).policy
        return _stage(self.config, engine_plan(self.config)).policy

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[Tensor, int]:
        merge = int(self.config.vision_config.spatial_merge_size)
        runs = []
        for f in mm_features:
            if f.modality != "image":
                raise ValueError(VIDEO_REFUSED)
            _, h, w = (int(x) for x in torch.as_tensor(f.data["image_grid_thw"].data).tolist())
            layout = grid_offsets(torch.arange((h // merge) * (w // merge)), w // merge)
            runs.append((f.mm_position.offset, f.mm_position.length, layout))
        if not runs:
            return torch.arange(len(input_tokens)).expand(3, -1).clone(), 0
        return layout_positions(runs, len(input_tokens), self._policy(mm_features))

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        d = self.config.text_config.hidden_size
        decoded = [decode_grid_index(e[:, d:]) for e in multimodal_embeddings if e.shape[-1] == d + GRID_INDEX_CHANNELS]
        stripped = [e[:, :d] for e in multimodal_embeddings]
        if not decoded:
            return stripped, mrope_positions, int(mrope_positions.max()) + 1 - mrope_positions.shape[-1]
        device = mrope_positions.device
        ids = torch.as_tensor(input_ids, device=device)
        visual = ids == self.config.image_token_id
        offsets = [grid_offsets(index.to(device), width) for index, width, _ in decoded]
        positions = place_kept(mrope_positions, visual, offsets, num_computed_tokens, decoded[0][2])
        return stripped, positions, int(positions.max()) + 1 - positions.shape[-1]
