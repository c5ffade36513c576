"""What tokenreduce knows about Qwen3-VL beside its adapter: :class:`Qwen3VLSpec`."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

from tokenreduce.core.arch import SyntheticImage, TinyCommon, VisionCost

from ..qwen2_5_vl.spec import Qwen2_5_VLSpec, most_square
from . import tiny
from .adapter import Qwen3VLAdapter

if TYPE_CHECKING:  # pragma: no cover
    from torch import Generator, Tensor


class Qwen3VLSpec(Qwen2_5_VLSpec):
    """Qwen3-VL (``Qwen3VLForConditionalGeneration``; Qwen Team, "Qwen3-VL Technical Report",
    arXiv 2511.21631): a ViT with full attention, 16 px patches, learned interpolated position
    embeddings, a 2x2 patch merger and DeepStack mergers; a Qwen3 decoder with interleaved M-RoPE.

    * Prompt: ``<|vision_start|><|image_pad|><|vision_end|>`` as Qwen2.5-VL; the processor
      expands ``<|image_pad|>`` into one token per merged 32 px cell and returns
      ``mm_token_type_ids``, which the model needs for its M-RoPE ids.  No BOS token.
    * Loading: the stock processor also builds a video processor, which needs torchvision; when
      it cannot be built, the image-only :class:`~.processor.ImageOnlyQwen3VLProcessor` is loaded.
    * Synthetic inputs: a square image of ``round(sqrt(n_visual))`` merged tokens per side;
      ``pixel_values`` ``[B * patches, 3 * 2 * 16 * 16]`` plus ``image_grid_thw`` ``[B, 3]``.
    * Vision FLOPs: the Conv3d patch embedding ``2*P*(3*T*p^2)*D``; the blocks
      ``2*(3*P*D^2 + P*D^2 + 2*P*D*M) + 4*D*P^2`` (full attention over the image; GELU MLP of two
      linears); the merger and each DeepStack merger ``2*(P/4)*((4D)^2 + 4D*d)`` (counted as the
      projector: they map vision features into the decoder's width).  ``P`` = patches, from
      ``vision_grid`` (patch rows, patch columns) or the most square factorisation of ``n_visual``
      merged tokens.  The position-embedding interpolation and the rotary tables are elementwise
      (no matmul FLOPs).
    * Tiny model: 64^2 to 160^2 pixels per image (a 128x96 image gives 12 visual tokens), three
      DeepStack taps injected after decoder layers 0, 1 and 2.
    """

    model_type: ClassVar[str] = "qwen3_vl"
    display_name: ClassVar[str] = "Qwen3-VL"
    adapter: ClassVar[type | None] = Qwen3VLAdapter
    tiny_image_size: ClassVar[tuple[int, int]] = (128, 96)
    tiny_chat_template: ClassVar[str | None] = tiny.CHAT_TEMPLATE

    def image_only_processor(self) -> type:
        from .processor import ImageOnlyQwen3VLProcessor

        return ImageOnlyQwen3VLProcessor

    def model_class(self) -> type:
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    # -- synthetic inputs -------------------------------------------------------------------------
    def synthetic_image(
        self, config: Any, batch_size: int, n_visual: int | None, generator: Generator
    ) -> SyntheticImage:
        """As Qwen2.5-VL's, with Qwen3-VL's 16 px patches (default 36x36 merged tokens: a
        1152x1152 image).  ``mm_token_type_ids`` depends on the text layout, which is written
        around the image later: :meth:`token_inputs` adds it."""
        return super().synthetic_image(config, batch_size, n_visual, generator)

    def token_inputs(self, config: Any, input_ids: Tensor) -> dict[str, Tensor]:
        """``mm_token_type_ids`` as the processor writes it (1 at image tokens, 2 at video
        tokens, else 0): the model needs it for its M-RoPE ids."""
        types = (input_ids == int(config.image_token_id)).int()
        return {"mm_token_type_ids": types + 2 * (input_ids == int(config.video_token_id)).int()}

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
        merge, patch = int(vc.spatial_merge_size), int(vc.patch_size)
        width, mlp, depth = int(vc.hidden_size), int(vc.intermediate_size), int(vc.depth)
        if n_visual < 1:
            raise ValueError(f"n_visual must be >= 1 visual token; got {n_visual}")
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
        blocks = depth * (linear + attention)
        ctx = width * merge * merge
        taps = [int(i) for i in vc.deepstack_visual_indexes]
        one_merger = 2 * (patches // (merge * merge)) * (ctx * ctx + ctx * int(vc.out_hidden_size))
        mergers = (1 + len(taps)) * one_merger
        detail = {
            "tower": "Qwen3-VL ViT",
            "grid_patches": list(grid),
            "patches": patches,
            "deepstack_visual_indexes": taps,
            "mergers": 1 + len(taps),
        }
        return VisionCost(embed + blocks, mergers, detail)

    def count_vision_flops(
        self, model: Any, config: Any, cost: VisionCost, counted: Callable[[Callable[[], Any]], int]
    ) -> tuple[int, int]:
        """The patch embedding, one block with the ``cu_seqlens`` of one image scaled by the number
        of blocks (they are identical; counting every block on meta takes seconds longer), the
        merger and the DeepStack mergers."""
        import torch
        from transformers.vision_utils import get_vision_attention_seqlens

        device = next(model.parameters()).device
        vc = config.vision_config
        visual = model.model.visual
        rows, cols = cost.detail["grid_patches"]
        grid_thw = torch.tensor([[1, rows, cols]])
        cu_full, max_len = get_vision_attention_seqlens(grid_thw, vc)
        patches = rows * cols
        flat = vc.in_channels * vc.temporal_patch_size * vc.patch_size * vc.patch_size
        pix = torch.empty(patches, flat, device=device)
        hd = vc.hidden_size // vc.num_heads
        pe = (torch.empty(patches, hd, device=device), torch.empty(patches, hd, device=device))
        x = torch.empty(patches, vc.hidden_size, device=device)
        blk = visual.blocks[0]
        tower = counted(lambda: visual.patch_embed(pix))
        tower += len(visual.blocks) * counted(
            lambda: blk(x, cu_seqlens=cu_full, max_seqlen=max_len, position_embeddings=pe)
        )
        projector = counted(lambda: visual.merger(x))
        for merger in visual.deepstack_merger_list:
            projector += counted(partial(merger, x))
        return tower, projector

    # -- tiny test model --------------------------------------------------------------------------
    def tiny_config(self, common: TinyCommon, **kwargs: Any) -> Any:
        """See :func:`.tiny.tiny_config` (``text_layers=4``, ``vocab_size``)."""
        return tiny.tiny_config(self.config_class(), common, **kwargs)

    def tiny_processor(self, tokenizer: Any, **kwargs: Any) -> Any:
        """See :func:`.tiny.tiny_processor` (no options)."""
        return tiny.tiny_processor(tokenizer, **kwargs)
