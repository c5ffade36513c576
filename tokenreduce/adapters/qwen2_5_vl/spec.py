"""What tokenreduce knows about Qwen2.5-VL beside its adapter: :class:`Qwen2_5_VLSpec`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from tokenreduce.core.arch import ArchSpec, SyntheticImage, TinyCommon, VisionCost

from . import tiny
from .adapter import Qwen2_5_VLAdapter

if TYPE_CHECKING:  # pragma: no cover
    from torch import Generator


def most_square(n: int) -> tuple[int, int]:
    """The factorisation ``(a, n // a)`` of ``n`` with ``a <= sqrt(n)`` as large as possible."""
    a = math.isqrt(n)
    while a > 1 and n % a:
        a -= 1
    return a, n // a


def window_lengths(grid_h: int, grid_w: int, merge: int, window_patches: int) -> list[int]:
    """Patch counts of the attention windows of an image of ``grid_h x grid_w`` patches.

    Windows tile the merged grid in ``window_patches // merge`` merged units per side, the last
    window of a row/column holding the remainder (empty windows are dropped), as
    ``transformers.vision_utils.get_vision_window_index`` does."""
    mh, mw = grid_h // merge, grid_w // merge
    ws = max(1, window_patches // merge)

    def chunks(n: int) -> list[int]:
        return [ws] * (n // ws) + ([n % ws] if n % ws else [])

    unit = merge * merge
    return [ch * cw * unit for ch in chunks(mh) for cw in chunks(mw)]


class Qwen2_5_VLSpec(ArchSpec):
    """Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): a windowed ViT with a 2x2 patch
    merger and a Qwen2 decoder with 3-D M-RoPE.

    * Prompt: ``<|vision_start|><|image_pad|><|vision_end|>``; the processor expands
      ``<|image_pad|>`` into one token per merged 28 px cell.  Several images follow each other
      with nothing between them.  No BOS token.
    * Loading: the stock processor also builds a video processor, which needs torchvision; when
      it cannot be built (or the folder was saved from the image-only processor) the image-only
      :class:`~.processor.ImageOnlyQwen2_5_VLProcessor` is loaded instead.
    * Synthetic inputs: a square image of ``round(sqrt(n_visual))`` merged tokens per side
      (default 36: 1008x1008 pixels, 1296 tokens), framed by the vision start/end tokens;
      ``pixel_values`` ``[B * patches, 3 * 2 * 14 * 14]`` plus ``image_grid_thw`` ``[B, 3]``.
    * Vision FLOPs: the Conv3d patch embedding ``2*P*(3*T*p^2)*D``, the blocks
      ``2*(3*P*D^2 + P*D^2 + 3*P*D*M) + 4*D*sum(len_w^2)`` with attention per window
      (``window_size`` 112 px = 4x4 merged tokens = 64 patches; remainder windows at the edge)
      except in ``fullatt_block_indexes`` (one window = the whole image), the merger
      ``2*(P/4)*((4D)^2 + 4D*d)``.  ``P`` = patches, from ``vision_grid`` (patch rows, patch
      columns) or the most square factorisation of ``n_visual`` merged tokens.
    * viz: the original image (the processor only resizes it to the grid).
    * Tiny model: 56^2 to 112^2 pixels per image (a 100x80 image gives 12 visual tokens).
    """

    model_type: ClassVar[str] = "qwen2_5_vl"
    display_name: ClassVar[str] = "Qwen2.5-VL"
    adapter: ClassVar[type | None] = Qwen2_5_VLAdapter
    image_placeholder: ClassVar[str] = "<|vision_start|><|image_pad|><|vision_end|>"
    placeholder_separator: ClassVar[str] = ""
    tiny_image_size: ClassVar[tuple[int, int]] = (100, 80)
    tiny_chat_template: ClassVar[str | None] = tiny.CHAT_TEMPLATE

    def default_prompt(self) -> str:
        """Qwen's ChatML turn: system prompt, the image, the question, the short-answer instruction."""
        return (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"{self.image_placeholder}{{question}}\nAnswer the question using a single word or phrase."
            "<|im_end|>\n<|im_start|>assistant\n"
        )

    def image_only_processor(self) -> type:
        from .processor import ImageOnlyQwen2_5_VLProcessor

        return ImageOnlyQwen2_5_VLProcessor

    def model_class(self) -> type:
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    # -- synthetic inputs -------------------------------------------------------------------------
    def synthetic_image(
        self, config: Any, batch_size: int, n_visual: int | None, generator: Generator
    ) -> SyntheticImage:
        import torch

        vc = config.vision_config
        merge = int(vc.spatial_merge_size)
        side = max(1, round((n_visual or 1296) ** 0.5))
        patches = side * merge
        depth = int(vc.in_channels) * int(vc.temporal_patch_size) * int(vc.patch_size) ** 2
        pixel_values = torch.randn(batch_size * patches * patches, depth, generator=generator)
        return SyntheticImage(
            {"pixel_values": pixel_values, "image_grid_thw": torch.tensor([[1, patches, patches]] * batch_size)},
            side * side,
            before=(int(config.vision_start_token_id),),
            after=(int(config.vision_end_token_id),),
            bos=False,
        )

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
        windows = window_lengths(grid[0], grid[1], merge, int(vc.window_size) // patch)
        full = set(int(i) for i in vc.fullatt_block_indexes)
        embed = 2 * patches * int(vc.in_channels) * int(vc.temporal_patch_size) * patch * patch * width
        linear = 2 * (3 * patches * width * width + patches * width * width + 3 * patches * width * mlp)
        attn_window = 4 * width * sum(w * w for w in windows)
        attn_full = 4 * width * patches * patches
        blocks = sum(linear + (attn_full if i in full else attn_window) for i in range(depth))
        ctx = width * merge * merge
        merger = 2 * (patches // (merge * merge)) * (ctx * ctx + ctx * int(vc.out_hidden_size))
        detail = {
            "tower": "Qwen2.5-VL ViT",
            "grid_patches": list(grid),
            "patches": patches,
            "windows": len(windows),
            "full_attention_blocks": sorted(full),
        }
        return VisionCost(embed + blocks, merger, detail)

    def count_vision_flops(
        self, model: Any, config: Any, cost: VisionCost, counted: Callable[[Callable[[], Any]], int]
    ) -> tuple[int, int]:
        """The patch embedding, one windowed and one full-attention block with the ``cu_seqlens``
        of ``transformers.vision_utils``, each scaled by the number of blocks of its kind (the
        blocks of a kind are identical; counting all 32 on meta takes seconds longer), the merger."""
        import torch
        from transformers.vision_utils import get_vision_attention_seqlens, get_vision_window_index

        device = next(model.parameters()).device
        vc = config.vision_config
        visual = model.model.visual
        rows, cols = cost.detail["grid_patches"]
        grid_thw = torch.tensor([[1, rows, cols]])
        cu_full, _ = get_vision_attention_seqlens(grid_thw, vc)
        _, cu_window = get_vision_window_index(
            grid_thw, spatial_merge_size=vc.spatial_merge_size, window_size=vc.window_size, patch_size=vc.patch_size
        )
        patches = rows * cols
        flat = vc.in_channels * vc.temporal_patch_size * vc.patch_size * vc.patch_size
        pix = torch.empty(patches, flat, device=device)
        hd = vc.hidden_size // vc.num_heads
        pe = (torch.empty(patches, hd, device=device), torch.empty(patches, hd, device=device))
        full = set(vc.fullatt_block_indexes)
        kinds = [i in full for i in range(len(visual.blocks))]
        x = torch.empty(patches, vc.hidden_size, device=device)
        tower = counted(lambda: visual.patch_embed(pix))
        for is_full in (False, True):
            n_kind = kinds.count(is_full)
            if n_kind:
                blk = visual.blocks[kinds.index(is_full)]
                cu = cu_full if is_full else cu_window
                tower += n_kind * counted(lambda: blk(x, cu_seqlens=cu, position_embeddings=pe))  # noqa: B023
        xs = torch.empty(patches, vc.hidden_size, device=device)
        return tower, counted(lambda: visual.merger(xs))

    # -- tiny test model --------------------------------------------------------------------------
    def tiny_config(self, common: TinyCommon, **kwargs: Any) -> Any:
        """See :func:`.tiny.tiny_config` (``text_layers=4``, ``vocab_size``)."""
        return tiny.tiny_config(self.config_class(), common, **kwargs)

    def tiny_processor(self, tokenizer: Any, **kwargs: Any) -> Any:
        """See :func:`.tiny.tiny_processor` (no options)."""
        return tiny.tiny_processor(tokenizer, **kwargs)
