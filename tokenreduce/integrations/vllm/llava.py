"""``TokenReduceLlavaForConditionalGeneration``: vLLM's LLaVA-1.5 with a plan's encoder-side stage.

Imported by vLLM only (through :func:`tokenreduce.integrations.vllm.register`).  Three pieces:

* the processor writes :func:`~tokenreduce.core.static_budget.static_keep_count` placeholders per
  image (the request's plan from ``mm_processor_kwargs``, else the engine's from ``hf_overrides``)
  and passes the plan and the original token count to the model as per-image fields;
* ``embed_multimodal`` runs the vision tower with its encoder-layer inputs captured, the projector,
  then the plan's scorer and selector (:func:`~.encoder.reduce_images`), and appends each kept
  token's patch index as two extra channels;
* positions: the model declares M-RoPE with every frequency on the first axis (the engine
  overrides set ``mrope_section = [head_dim / 2, 0, 0]``, which is plain RoPE on that axis), so
  that ``get_mrope_input_positions`` can give text tokens their unreduced ids and
  ``recompute_mrope_positions`` (vLLM's hook for pruned multimodal tokens) can move each kept image
  token to its original id once its index is known (``keep``), or leave contiguous ids
  (``renumber``); it also strips the index channels.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import BatchFeature
from vllm.model_executor.models.interfaces import SupportsMRoPE, SupportsMultiModalPruning
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate

from tokenreduce.adapters.vision_signals import VisionTower, resolve_vision_layer

from .encoder import (
    INDEX_CHANNELS,
    PLAN_KEY,
    compile_encoder_plan,
    decode_index,
    encode_index,
    engine_plan,
    keep_count,
    place_kept,
    plan_field,
    plan_text,
    prompt_positions,
    reduce_images,
    request_plan,
)

N_VISUAL_KEY = "tokenreduce_n_visual"


def _text_layers(config) -> int:
    return int(config.text_config.num_hidden_layers)


class TokenReduceLlavaProcessingInfo(LlavaProcessingInfo):
    def get_hf_processor(self, **kwargs: object):
        kwargs.pop(PLAN_KEY, None)
        return super().get_hf_processor(**kwargs)


class TokenReduceLlavaProcessor(LlavaMultiModalProcessor):
    """LLaVA's processor, writing the plan's keep count of placeholders per image."""

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        return super()._call_hf_processor(hf_data, {k: v for k, v in hf_kwargs.items() if k != PLAN_KEY})

    def _postprocess_hf_mm_data(
        self,
        mm_inputs: Mapping[str, object],
        hf_processor_mm_kwargs: Mapping[str, object],
        processed_data: BatchFeature,
    ) -> BatchFeature:
        processed = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
        pixels = processed.get("pixel_values")
        if pixels is None:
            return processed
        config = self.info.get_hf_config()
        text = request_plan(config, hf_processor_mm_kwargs)
        compile_encoder_plan(text, _text_layers(config))  # refuse a bad plan here, with its message
        n_img = len(pixels)
        n_visual = self.info.get_num_image_tokens(image_width=1, image_height=1)  # CLIP: fixed per image
        encoded = plan_field(text)
        processed[PLAN_KEY] = encoded.unsqueeze(0).expand(n_img, -1).clone()
        processed[N_VISUAL_KEY] = torch.full((n_img,), n_visual, dtype=torch.long)
        return processed

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            **super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
            PLAN_KEY: MultiModalFieldConfig.batched("image"),
            N_VISUAL_KEY: MultiModalFieldConfig.batched("image"),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()
        stage = compile_encoder_plan(request_plan(config, hf_processor_mm_kwargs), _text_layers(config))
        image_token_id = config.image_token_index

        def replacement(item_idx: int) -> list[int]:
            images = mm_items.get_items("image", ImageProcessorItems)
            size = images.get_image_size(item_idx)
            n = self.info.get_num_image_tokens(image_width=size.width, image_height=size.height)
            return [image_token_id] * keep_count(stage, n)

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


class _ClipLayer:
    """vLLM's CLIP encoder layer seen with the names the vision signals read (``layer_norm1``,
    ``self_attn.q_proj`` / ``k_proj`` / ``num_heads`` / ``head_dim`` / ``scale``): vLLM fuses the
    three projections into one ``qkv_proj``, whose query and key parts are sliced here."""

    def __init__(self, layer):
        self.layer_norm1 = layer.layer_norm1
        self.self_attn = self
        attn = layer.self_attn
        self._qkv = attn.qkv_proj
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.scale = attn.scale
        self._width = attn.embed_dim

    def _part(self, h: Tensor, which: int) -> Tensor:
        qkv, _ = self._qkv(h)
        return qkv[..., which * self._width : (which + 1) * self._width]

    def q_proj(self, h: Tensor) -> Tensor:
        return self._part(h, 0)

    def k_proj(self, h: Tensor) -> Tensor:
        return self._part(h, 1)


class _Capture:
    """Pre-hooks on vLLM's CLIP encoder layers plus a hook on the encoder's output: the inputs of
    the full tower's layers, numbered as in the checkpoint (vLLM builds the tower only up to the
    feature layer, whose input is the encoder's output)."""

    def __init__(self, model) -> None:
        cfg = model.config
        vision = model.vision_tower.vision_model
        self.real = list(vision.encoder.layers)
        self.n_full = int(cfg.vision_config.num_hidden_layers)
        self.feature_input = resolve_vision_layer(cfg.vision_feature_layer, self.n_full + 1)
        self.inputs: dict[int, Tensor] = {}
        for i, layer in enumerate(self.real):
            layer.register_forward_pre_hook(self._keep(i))
        vision.encoder.register_forward_hook(self._output)

    def _keep(self, i: int):
        def hook(module, args):
            self.inputs[i] = args[0]

        return hook

    def _output(self, module, args, output):
        out = output[-1] if isinstance(output, (list, tuple)) else output
        self.inputs[len(self.real)] = out

    def take(self) -> dict[int, Tensor]:
        inputs, self.inputs = self.inputs, {}
        return inputs


@MULTIMODAL_REGISTRY.register_processor(
    TokenReduceLlavaProcessor, info=TokenReduceLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class TokenReduceLlavaForConditionalGeneration(LlavaForConditionalGeneration, SupportsMRoPE, SupportsMultiModalPruning):
    """vLLM's LLaVA-1.5 running a tokenreduce plan's encoder-side stage (``docs/vllm.md``)."""

    #: read by the plugin's runner hook: position recomputation must be on for this model
    tokenreduce_recomputes_positions = True
    supported_video_pruning_methods = ()

    # the shipped checkpoints name the CLIP tower without its ``vision_model`` level
    hf_to_vllm_mapper = LlavaForConditionalGeneration.hf_to_vllm_mapper | WeightsMapper(
        orig_to_new_regex={re.compile(r"^(model\.)?vision_tower\.(?!vision_model\.)"): r"\1vision_tower.vision_model."}
    )

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        cfg = self.config
        compile_encoder_plan(engine_plan(cfg), _text_layers(cfg))  # a bad engine plan fails at start-up
        self._capture = _Capture(self)
        n_full = self._capture.n_full
        layers: list[Any] = [_ClipLayer(layer) for layer in self._capture.real]
        layers += [None] * (n_full - len(layers))  # not built by vLLM: only their inputs are read
        patches = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        self._tower = VisionTower(
            tower=self.vision_tower,
            layers=layers,
            projector=self.multi_modal_projector,
            feature_input_layer=self._capture.feature_input,
            patches=patches,
        )

    # -- the encoder-side stage ---------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object):
        plans = kwargs.pop(PLAN_KEY, None)
        kwargs.pop(N_VISUAL_KEY, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        self._capture.take()
        features = self._process_image_input(image_input)
        if not isinstance(features, Tensor):
            features = torch.stack(list(features))
        captured = self._capture.take()
        n_img = features.shape[0]
        texts = [plan_text(plans[i]) for i in range(n_img)] if plans is not None else [""] * n_img
        out: list[Tensor] = [features[0]] * n_img
        for text in dict.fromkeys(texts):  # images sharing a plan run as one batch
            rows = [i for i, t in enumerate(texts) if t == text]
            stage = compile_encoder_plan(text, _text_layers(self.config))
            reduced = reduce_images(stage, features[rows], self._tower, lambda rows=rows: _rows(captured, rows))
            for i, r in zip(rows, reduced):
                index = encode_index(r.index, stage.policy, r.embeddings.dtype)
                out[i] = torch.cat([r.embeddings, index], dim=-1)
        return out

    # -- positions --------------------------------------------------------------------------------
    def _policy(self, mm_features) -> str:
        for f in mm_features:
            if f.data is not None and PLAN_KEY in f.data:
                return compile_encoder_plan(plan_text(f.data[PLAN_KEY]), _text_layers(self.config)).policy
        return compile_encoder_plan(engine_plan(self.config), _text_layers(self.config)).policy

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[Tensor, int]:
        runs = []
        for f in mm_features:
            n = int(torch.as_tensor(f.data[N_VISUAL_KEY].data).item()) if f.data is not None else f.mm_position.length
            runs.append((f.mm_position.offset, f.mm_position.length, n))
        ids, delta = prompt_positions(runs, len(input_tokens), self._policy(mm_features))
        return ids.unsqueeze(0).expand(3, -1).clone(), delta

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        d = self.config.text_config.hidden_size
        decoded = [decode_index(e[:, d:]) for e in multimodal_embeddings if e.shape[-1] == d + INDEX_CHANNELS]
        stripped = [e[:, :d] for e in multimodal_embeddings]
        if not decoded:
            return stripped, mrope_positions, int(mrope_positions.max()) + 1 - mrope_positions.shape[-1]
        ids = torch.as_tensor(input_ids, device=mrope_positions.device)
        visual = ids == self.config.image_token_index
        index = [i.to(mrope_positions.device) for i, _ in decoded]
        positions = place_kept(mrope_positions, visual, index, num_computed_tokens, decoded[0][1])
        return stripped, positions, int(positions.max()) + 1 - positions.shape[-1]


def _rows(captured: dict[int, Tensor], rows: list[int]) -> dict[int, Tensor]:
    return {layer: x[rows] for layer, x in captured.items()}
