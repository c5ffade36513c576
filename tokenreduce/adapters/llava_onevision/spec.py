"""What tokenreduce knows about LLaVA-OneVision beside its adapter: :class:`LlavaOnevisionSpec`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from tokenreduce.core.arch import SyntheticImage, TinyCommon, VisionCost
from tokenreduce.core.errors import UnsupportedModelError

from ..llava.spec import clip_layer_flops
from ..llava_next.spec import LlavaNextSpec
from . import tiny
from .adapter import LlavaOnevisionAdapter

if TYPE_CHECKING:  # pragma: no cover
    from torch import Generator


def max_crops(config: Any) -> int:
    """The ``N`` of ``vision_aspect_ratio`` "anyres_max_N" (the crop budget before downscaling)."""
    ratio = str(getattr(config, "vision_aspect_ratio", "anyres_max_9"))
    prefix = "anyres_max_"
    if not ratio.startswith(prefix) or not ratio[len(prefix) :].isdigit():
        raise UnsupportedModelError(f"llava_onevision: vision_aspect_ratio must be 'anyres_max_<N>'; got {ratio!r}")
    return int(ratio[len(prefix) :])


def crop_grid(config: Any, height: int, width: int) -> tuple[int, int, int, int]:
    """``(crops_h, crops_w, rows, cols)`` of a single image of ``height x width`` pixels: the
    anyres crop grid (best pinpoint / crop size) and the patch grid the LLM sees after the
    padding is removed and, above ``1.1**2 * max`` crops of patches, the bilinear downscale."""
    from transformers.image_processing_utils import select_best_resolution

    vc = config.vision_config
    crop, side = int(vc.image_size), int(vc.image_size) // int(vc.patch_size)
    best_h, best_w = select_best_resolution((height, width), config.image_grid_pinpoints)
    crops_h, crops_w = best_h // crop, best_w // crop
    rows, cols = crops_h * side, crops_w * side
    if width / height > cols / rows:  # resized to the full width: padding rows above and below
        kept = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - kept) // 2)
    else:  # resized to the full height: padding columns left and right
        kept = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - kept) // 2)
    scale = math.sqrt(rows * cols / (max_crops(config) * side * side))
    if scale > 1.1:
        rows, cols = int(rows // scale), int(cols // scale)
    return crops_h, crops_w, rows, cols


def image_tokens(config: Any, height: int, width: int) -> int:
    """Visual tokens of a single image (a one-image prompt): base grid + crop grid + one newline
    token per crop-grid row."""
    side = int(config.vision_config.image_size) // int(config.vision_config.patch_size)
    _, _, rows, cols = crop_grid(config, height, width)
    return side * side + rows * (cols + 1)


def pinpoint_for(config: Any, n_visual: int | None) -> tuple[tuple[int, int], int, int]:
    """The grid pinpoint ``(height, width)`` whose image (exactly that size: no padding) gives the
    visual-token count closest to ``n_visual`` (the largest when ``None``), its count and its crops
    (base image included); among equal counts the fewest crops."""
    options = []
    for h, w in config.image_grid_pinpoints:
        crops_h, crops_w, _, _ = crop_grid(config, int(h), int(w))
        options.append(((int(h), int(w)), image_tokens(config, int(h), int(w)), 1 + crops_h * crops_w))
    if n_visual is None:
        return max(options, key=lambda o: (o[1], -o[2]))
    return min(options, key=lambda o: (abs(o[1] - n_visual), o[2], -o[1]))


class LlavaOnevisionSpec(LlavaNextSpec):
    """LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): a SigLIP tower on anyres-max
    crops, a 2-layer projector, a Qwen2 decoder.

    * Prompt: ``<image>``, expanded into base grid + unpadded (and, for large images, downscaled)
      crop grid + one newline token per grid row; ChatML turns (``<|im_start|>user ...``).
      7B at a 1152x1152 image: 729 + 81 x 82 = 7371 tokens.
    * Loading: the stock processor also builds a video processor, which needs torchvision; when
      it cannot be built the image-only :class:`~.processor.ImageOnlyLlavaOnevisionProcessor` is
      loaded instead.
    * Synthetic inputs: the image size is the grid pinpoint whose token count is closest to
      ``n_visual`` (default: the largest; among equal counts the fewest crops); ``pixel_values``
      ``[B, 1 + crops, 3, H, W]`` plus ``image_sizes`` ``[B, 2]``.
    * Vision FLOPs: per crop, the patch convolution ``2*P*(3*p^2)*D`` and every SigLIP layer on
      ``P`` tokens (no CLS); projector ``2*P*(D_in*d + d*d)`` per crop (unpadding and the
      downscale come after it).  Crops: ``vision_crops`` (tower forwards, base image included), or
      those of the pinpoint closest to ``n_visual``.
    * viz: the preprocessed base image under panel 0 (LLaVA-NeXT's).
    * Tiny model: 56 px crops, pinpoints up to 2x2 crops, "anyres_max_2" (a 100x80 image gives 44
      visual tokens, a 200x200 image is downscaled); no options.
    """

    model_type: ClassVar[str] = "llava_onevision"
    display_name: ClassVar[str] = "LLaVA-OneVision"
    adapter: ClassVar[type | None] = LlavaOnevisionAdapter
    tiny_options: ClassVar[tuple[str, ...]] = ()
    tiny_image_size: ClassVar[tuple[int, int]] = (100, 80)
    tiny_chat_template: ClassVar[str | None] = tiny.CHAT_TEMPLATE

    def default_prompt(self) -> str:
        """The llava-hf OneVision ChatML turn with the short-answer instruction."""
        return (
            f"<|im_start|>user {self.image_placeholder}\n{{question}}\nAnswer the question using a single word or "
            "phrase.<|im_end|>\n<|im_start|>assistant\n"
        )

    def image_only_processor(self) -> type:
        from .processor import ImageOnlyLlavaOnevisionProcessor

        return ImageOnlyLlavaOnevisionProcessor

    def model_class(self) -> type:
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration

    # -- synthetic inputs -------------------------------------------------------------------------
    def synthetic_image(
        self, config: Any, batch_size: int, n_visual: int | None, generator: Generator
    ) -> SyntheticImage:
        import torch

        size = int(config.vision_config.image_size)
        (h, w), n_vis, crops = pinpoint_for(config, n_visual)
        pixel_values = torch.randn(batch_size, crops, 3, size, size, generator=generator)
        return SyntheticImage({"pixel_values": pixel_values, "image_sizes": torch.tensor([[h, w]] * batch_size)}, n_vis)

    # -- FLOPs ------------------------------------------------------------------------------------
    def vision_flops(
        self,
        config: Any,
        n_visual: int,
        *,
        vision_crops: int | None = None,
        vision_grid: tuple[int, int] | None = None,
    ) -> VisionCost:
        vc = config.vision_config
        if getattr(vc, "model_type", "") != "siglip_vision_model":
            raise UnsupportedModelError(
                f"vision FLOPs of llava_onevision know SigLIP towers only; got {getattr(vc, 'model_type', None)!r}"
            )
        if vision_grid is not None:
            raise ValueError(
                "vision_grid does not apply to llava_onevision (anyres crops of a fixed size); pass vision_crops, "
                "the tower forwards of the image (base image included)"
            )
        width, mlp, depth = int(vc.hidden_size), int(vc.intermediate_size), int(vc.num_hidden_layers)
        patch, size, channels = int(vc.patch_size), int(vc.image_size), int(getattr(vc, "num_channels", 3))
        patches = (size // patch) ** 2
        if vision_crops is None:
            crops = pinpoint_for(config, n_visual)[2]
        else:
            crops = int(vision_crops)
            if crops < 1:
                raise ValueError(f"vision_crops must be >= 1; got {vision_crops}")
        per_crop = 2 * patches * channels * patch * patch * width + depth * clip_layer_flops(patches, width, mlp)
        layers = config.vision_feature_layer
        n_feature_layers = len(layers) if isinstance(layers, (list, tuple)) else 1
        d = int(config.get_text_config().hidden_size)
        proj = 2 * patches * (width * n_feature_layers * d + d * d)
        detail = {
            "tower": "SigLIP",
            "crops": crops,
            "tokens_per_crop": patches,
            "layers_run": depth,
            "vision_feature_layer": layers,
            "projector_tokens_per_crop": patches,
        }
        return VisionCost(crops * per_crop, crops * proj, detail)

    def count_vision_flops(
        self, model: Any, config: Any, cost: VisionCost, counted: Callable[[Callable[[], Any]], int]
    ) -> tuple[int, int]:
        """The SigLIP model on ``crops`` images with ``output_hidden_states``, then the projector
        on the selected features (every patch: "full")."""
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
        projector_flops = counted(lambda: model.model.multi_modal_projector(feats))
        return tower_flops, projector_flops

    # -- tiny test model --------------------------------------------------------------------------
    def tiny_config(self, common: TinyCommon, **kwargs: Any) -> Any:
        """See :func:`.tiny.tiny_config` (``text_layers=4``, ``vocab_size``)."""
        return tiny.tiny_config(self.config_class(), common, **kwargs)

    def tiny_processor(self, tokenizer: Any, **kwargs: Any) -> Any:
        """See :func:`.tiny.tiny_processor` (no options)."""
        return tiny.tiny_processor(tokenizer, **kwargs)
