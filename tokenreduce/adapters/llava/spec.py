"""What tokenreduce knows about LLaVA-1.5 beside its adapter: :class:`LlavaSpec`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from tokenreduce.core.arch import ArchSpec, SyntheticImage, TinyCommon, VisionCost
from tokenreduce.core.errors import UnsupportedModelError

from . import tiny
from .adapter import LlavaAdapter

if TYPE_CHECKING:  # pragma: no cover
    from torch import Generator


def clip_layer_flops(t: int, width: int, mlp: int) -> int:
    """True FLOPs of one CLIP encoder layer on ``t`` tokens (q, k, v, o; attention; 2-matrix MLP)."""
    return 2 * (4 * t * width * width + 2 * t * t * width + 2 * t * width * mlp)


class LlavaSpec(ArchSpec):
    """LLaVA-1.5 (``LlavaForConditionalGeneration``): a CLIP tower, a 2-layer projector, a Llama decoder.

    * Prompt: ``<image>``, expanded by the processor into ``config.image_seq_length`` tokens (576
      for 336 px images and 14 px patches); several images are joined with spaces.
    * Synthetic inputs: one fixed-size image, ``[B, 3, H, W]`` pixels; ``n_visual`` is ignored.
    * Vision FLOPs: the patch convolution ``2*P*(3*p^2)*D`` plus all ``num_hidden_layers`` CLIP
      layers on ``P + 1`` tokens (Hugging Face runs every layer although LLaVA reads layer -2),
      per crop; projector ``2*P*(D_in*d + d*d)`` per crop (CLS dropped by the "default" feature
      strategy).  LLaVA-1.5 has one crop.
    * viz: the tower's input (the preprocessed crop) under its one grid.
    * Tiny model: 56 px images, 14 px patches (16 visual tokens); ``image_size`` / ``patch`` options.
    """

    model_type: ClassVar[str] = "llava"
    display_name: ClassVar[str] = "LLaVA-1.5"
    adapter: ClassVar[type | None] = LlavaAdapter
    tiny_options: ClassVar[tuple[str, ...]] = ("image_size", "patch")
    tiny_image_size: ClassVar[tuple[int, int]] = (56, 56)
    tiny_chat_template: ClassVar[str | None] = tiny.CHAT_TEMPLATE

    def model_class(self) -> type:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    # -- synthetic inputs -------------------------------------------------------------------------
    def synthetic_image(
        self, config: Any, batch_size: int, n_visual: int | None, generator: Generator
    ) -> SyntheticImage:
        import torch

        vc = config.vision_config
        n_vis = int(getattr(config, "image_seq_length", 0) or (vc.image_size // vc.patch_size) ** 2)
        pixel_values = torch.randn(batch_size, 3, vc.image_size, vc.image_size, generator=generator)
        return SyntheticImage({"pixel_values": pixel_values}, n_vis)

    # -- FLOPs ------------------------------------------------------------------------------------
    def default_crops(self, n_visual: int, patches: int) -> int:
        """Tower forwards of one image when ``vision_crops`` is not given: one."""
        return 1

    def vision_flops(
        self,
        config: Any,
        n_visual: int,
        *,
        vision_crops: int | None = None,
        vision_grid: tuple[int, int] | None = None,
    ) -> VisionCost:
        mt = config.model_type
        vc = config.vision_config
        if getattr(vc, "model_type", "") not in ("clip_vision_model",):
            raise UnsupportedModelError(f"vision FLOPs of {mt} know CLIP towers only; got {vc.model_type!r}")
        width, mlp, depth = int(vc.hidden_size), int(vc.intermediate_size), int(vc.num_hidden_layers)
        patch, size, channels = int(vc.patch_size), int(vc.image_size), int(getattr(vc, "num_channels", 3))
        patches = (size // patch) ** 2
        tokens = patches + 1
        if vision_crops is None:
            crops = self.default_crops(n_visual, patches)
        else:
            crops = int(vision_crops)
            if crops < 1:
                raise ValueError(f"vision_crops must be >= 1; got {vision_crops}")
        per_crop = 2 * patches * channels * patch * patch * width + depth * clip_layer_flops(tokens, width, mlp)
        layers = config.vision_feature_layer
        n_feature_layers = len(layers) if isinstance(layers, (list, tuple)) else 1
        feat = patches if config.vision_feature_select_strategy == "default" else tokens
        d = int(config.get_text_config().hidden_size)
        proj = 2 * feat * (width * n_feature_layers * d + d * d)
        detail = {
            "tower": "CLIP",
            "crops": crops,
            "tokens_per_crop": tokens,
            "layers_run": depth,
            "vision_feature_layer": layers,
            "projector_tokens_per_crop": feat,
        }
        return VisionCost(crops * per_crop, crops * proj, detail)

    def count_vision_flops(
        self, model: Any, config: Any, cost: VisionCost, counted: Callable[[Callable[[], Any]], int]
    ) -> tuple[int, int]:
        """The CLIP model on ``crops`` images with ``output_hidden_states``, then the projector
        on the selected features."""
        import torch

        device = next(model.parameters()).device
        vc = config.vision_config
        crops = cost.detail["crops"]
        pixels = torch.empty(crops, vc.num_channels, vc.image_size, vc.image_size, device=device)
        tower = model.model.vision_tower
        holder: dict[str, Any] = {}

        def run_tower() -> None:
            holder["out"] = tower(pixels, output_hidden_states=True, return_dict=True)

        tower_flops = counted(run_tower)
        layer_sel = config.vision_feature_layer
        hs = holder["out"].hidden_states
        feats = torch.cat([hs[i] for i in layer_sel], -1) if isinstance(layer_sel, (list, tuple)) else hs[layer_sel]
        if config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        projector_flops = counted(lambda: model.model.multi_modal_projector(feats))
        return tower_flops, projector_flops

    # -- viz --------------------------------------------------------------------------------------
    def panel_pictures(
        self, inputs: Mapping[str, Any], processor: Any, sample: int, panels: Sequence[int]
    ) -> dict[int, Any]:
        pv = inputs.get("pixel_values")
        if pv is None or processor is None or pv.dim() != 4:
            return {}
        return {p: self.denormalize(pv[sample], processor) for p in panels}

    # -- tiny test model --------------------------------------------------------------------------
    def tiny_config(self, common: TinyCommon, **kwargs: Any) -> Any:
        """See :func:`.tiny.tiny_config` (``image_size=56``, ``patch=14``, ``text_layers=4``, decoder sizes)."""
        return tiny.tiny_config(self.config_class(), common, **kwargs)

    def tiny_processor(self, tokenizer: Any, **kwargs: Any) -> Any:
        """See :func:`.tiny.tiny_processor` (``image_size=56``, ``patch=14``)."""
        return tiny.tiny_processor(tokenizer, **kwargs)
