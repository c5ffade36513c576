"""What tokenreduce knows about Qwen2-VL beside its adapter: :class:`Qwen2VLSpec`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from tokenreduce.core.arch import TinyCommon, VisionCost

from ..qwen2_5_vl.spec import Qwen2_5_VLSpec, most_square
from . import tiny
from .adapter import Qwen2VLAdapter


class Qwen2VLSpec(Qwen2_5_VLSpec):
    """Qwen2-VL (``Qwen2VLForConditionalGeneration``; Wang et al., arXiv 2409.12191): a ViT with
    full attention in every block, a 2x2 patch merger and a Qwen2 decoder with 3-D M-RoPE.

    Prompts, the ChatML default prompt, synthetic inputs and viz are Qwen2.5-VL's
    (:class:`~tokenreduce.adapters.qwen2_5_vl.spec.Qwen2_5_VLSpec`): the same special tokens, the
    same image processor (14 px patches, temporal patch 2, 2x2 merge, 28 px per visual token).
    What differs:

    * Loading: ``Qwen2VLForConditionalGeneration``; when the stock processor cannot be built (its
      video processor needs torchvision) the image-only
      :class:`~.processor.ImageOnlyQwen2VLProcessor` is loaded instead.
    * Vision FLOPs (true, 2 per multiply-add; ``D`` = ``embed_dim``, ``M = mlp_ratio * D``,
      ``d`` = the merger's output width, ``config.vision_config.hidden_size``): the Conv3d patch
      embedding ``2*P*(3*T*p^2)*D``; per block ``2*(3*P*D^2 + P*D^2 + 2*P*D*M) + 4*D*P^2``
      (qkv, proj, the non-gated fc1/fc2 MLP, full attention over the image's ``P`` patches:
      ``Q K^T`` and ``A V``); the merger ``2*(P/4)*((4D)^2 + 4D*d)``.  ``P`` = patches, from
      ``vision_grid`` (patch rows, patch columns) or the most square factorisation of
      ``n_visual`` merged tokens.  Norms and activations are not counted.
    * Tiny model: a 2-block ViT of width 32; 56^2 to 112^2 pixels per image (a 100x80 image gives
      12 visual tokens).
    """

    model_type: ClassVar[str] = "qwen2_vl"
    display_name: ClassVar[str] = "Qwen2-VL"
    adapter: ClassVar[type | None] = Qwen2VLAdapter

    def image_only_processor(self) -> type:
        from .processor import ImageOnlyQwen2VLProcessor

        return ImageOnlyQwen2VLProcessor

    def model_class(self) -> type:
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    # -- FLOPs ------------------------------------------------------------------------------------
    def vision_flops(
        self,
        config: Any,
        n_visual: int,
        *,
        vision_crops: int | None = None,
        vision_grid: tuple[int, int] | None = None,
    ) -> VisionCost:
        if n_visual < 1:
            raise ValueError(f"n_visual must be >= 1 visual token; got {n_visual}")
        vc = config.vision_config
        merge, patch = int(vc.spatial_merge_size), int(vc.patch_size)
        width, depth = int(vc.embed_dim), int(vc.depth)
        mlp = int(width * vc.mlp_ratio)
        if vision_grid is None:
            mh, mw = most_square(n_visual)
            grid = (mh * merge, mw * merge)
        else:
            grid = (int(vision_grid[0]), int(vision_grid[1]))
            if grid[0] % merge or grid[1] % merge or grid[0] * grid[1] != n_visual * merge * merge:
                raise ValueError(
                    f"vision_grid={tuple(vision_grid)} (patch rows, columns) must be multiples of the merge size "
                    f"{merge} with rows*cols = {merge * merge} * n_visual = {merge * merge * n_visual}"
                )
        patches = grid[0] * grid[1]
        embed = 2 * patches * int(vc.in_channels) * int(vc.temporal_patch_size) * patch * patch * width
        linear = 2 * (3 * patches * width * width + patches * width * width + 2 * patches * width * mlp)
        attention = 4 * width * patches * patches
        ctx = width * merge * merge
        merger = 2 * (patches // (merge * merge)) * (ctx * ctx + ctx * int(vc.hidden_size))
        detail = {
            "tower": "Qwen2-VL ViT",
            "grid_patches": list(grid),
            "patches": patches,
            "full_attention_blocks": depth,
        }
        return VisionCost(embed + depth * (linear + attention), merger, detail)

    def count_vision_flops(
        self, model: Any, config: Any, cost: VisionCost, counted: Callable[[Callable[[], Any]], int]
    ) -> tuple[int, int]:
        """The patch embedding, one block (the blocks are identical; counting all 32 on meta takes
        seconds longer) times ``depth`` with the ``cu_seqlens`` of one image, the merger."""
        import torch
        from transformers.vision_utils import get_vision_attention_seqlens

        device = next(model.parameters()).device
        vc = config.vision_config
        visual = model.model.visual
        rows, cols = cost.detail["grid_patches"]
        cu_seqlens, _ = get_vision_attention_seqlens(torch.tensor([[1, rows, cols]]), vc)
        patches = rows * cols
        flat = vc.in_channels * vc.temporal_patch_size * vc.patch_size * vc.patch_size
        pix = torch.empty(patches, flat, device=device)
        hd = vc.embed_dim // vc.num_heads
        pe = (torch.empty(patches, hd, device=device), torch.empty(patches, hd, device=device))
        x = torch.empty(patches, vc.embed_dim, device=device)
        block = visual.blocks[0]
        tower = counted(lambda: visual.patch_embed(pix))
        tower += len(visual.blocks) * counted(lambda: block(x, cu_seqlens=cu_seqlens, position_embeddings=pe))
        return tower, counted(lambda: visual.merger(x))

    # -- tiny test model --------------------------------------------------------------------------
    def tiny_config(self, common: TinyCommon, **kwargs: Any) -> Any:
        """See :func:`.tiny.tiny_config` (``text_layers=4``, ``vocab_size``)."""
        return tiny.tiny_config(self.config_class(), common, **kwargs)

    def tiny_processor(self, tokenizer: Any, **kwargs: Any) -> Any:
        """See :func:`.tiny.tiny_processor` (no options)."""
        return tiny.tiny_processor(tokenizer, **kwargs)
