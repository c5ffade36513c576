"""What tokenreduce knows about LLaVA-NeXT beside its adapter: :class:`LlavaNextSpec`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from tokenreduce.core.arch import SyntheticImage, TinyCommon

from ..llava.spec import LlavaSpec
from . import tiny
from .adapter import LlavaNextAdapter

if TYPE_CHECKING:  # pragma: no cover
    from torch import Generator


def anyres_pinpoint(config: Any, n_visual: int | None) -> tuple[tuple[int, int], int]:
    """The anyres pinpoint (height, width) whose image gives the visual-token count closest to
    ``n_visual`` (the largest when ``None``), and that count: base grid + full high-resolution grid
    + one newline token per grid row (an image exactly at a pinpoint needs no unpadding)."""
    side = int(config.vision_config.image_size) // int(config.vision_config.patch_size)
    base = side * side
    options = []
    for h, w in config.image_grid_pinpoints:
        rows = (h // config.vision_config.image_size) * side
        cols = (w // config.vision_config.image_size) * side
        options.append(((int(h), int(w)), base + rows * cols + rows))
    if n_visual is None:
        return max(options, key=lambda o: (o[1], o[0]))
    return min(options, key=lambda o: (abs(o[1] - n_visual), -o[1]))


class LlavaNextSpec(LlavaSpec):
    """LLaVA-NeXT (``LlavaNextForConditionalGeneration``): LLaVA-1.5's CLIP tower on anyres crops.

    * Prompt: ``<image>``, expanded into base grid + unpadded crop grid + one newline token per
      grid row (LLaVA-NeXT-7B at 672x672: 2928 tokens).
    * Synthetic inputs: the image size is the grid pinpoint whose token count is closest to
      ``n_visual`` (default: the largest); ``pixel_values`` ``[B, 1 + crops, 3, H, W]`` plus
      ``image_sizes`` ``[B, 2]``.
    * Vision FLOPs: LLaVA-1.5's per crop, on the base image and every crop (default
      ``max(1, round(n_visual / P))`` forwards: 5 for the nominal 2880).
    * viz: the preprocessed base image under panel 0; the original image under the
      high-resolution grid (after unpadding it covers exactly the image content).
    * Tiny model: 56 px base, pinpoints ``[[56, 112], [112, 56], [112, 112]]`` (a 100x80 image
      gives 70 visual tokens); no options.
    """

    model_type: ClassVar[str] = "llava_next"
    display_name: ClassVar[str] = "LLaVA-NeXT"
    adapter: ClassVar[type | None] = LlavaNextAdapter
    tiny_options: ClassVar[tuple[str, ...]] = ()
    tiny_image_size: ClassVar[tuple[int, int]] = (100, 80)

    def model_class(self) -> type:
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration

    def synthetic_image(
        self, config: Any, batch_size: int, n_visual: int | None, generator: Generator
    ) -> SyntheticImage:
        import torch

        vc = config.vision_config
        (h, w), n_vis = anyres_pinpoint(config, n_visual)
        crops = (h // vc.image_size) * (w // vc.image_size)
        pixel_values = torch.randn(batch_size, 1 + crops, 3, vc.image_size, vc.image_size, generator=generator)
        return SyntheticImage({"pixel_values": pixel_values, "image_sizes": torch.tensor([[h, w]] * batch_size)}, n_vis)

    def default_crops(self, n_visual: int, patches: int) -> int:
        """Base image + crops of an anyres image of ``n_visual`` tokens: ``max(1, round(n_visual / P))``."""
        return max(1, round(n_visual / patches))

    def panel_pictures(
        self, inputs: Mapping[str, Any], processor: Any, sample: int, panels: Sequence[int]
    ) -> dict[int, Any]:
        pv = inputs.get("pixel_values")
        if pv is None or processor is None or pv.dim() != 5 or 0 not in panels:
            return {}
        return {0: self.denormalize(pv[sample, 0], processor)}

    def tiny_config(self, common: TinyCommon, **kwargs: Any) -> Any:
        """See :func:`.tiny.tiny_config` (``text_layers=4``, decoder sizes)."""
        return tiny.tiny_config(self.config_class(), common, **kwargs)

    def tiny_processor(self, tokenizer: Any, **kwargs: Any) -> Any:
        """See :func:`.tiny.tiny_processor` (no options)."""
        return tiny.tiny_processor(tokenizer, **kwargs)
