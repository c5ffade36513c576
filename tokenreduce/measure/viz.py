"""Pictures of the visual tokens each plan keeps: one panel per plan, side by side.

For every input image (one row of the figure) and every plan (one panel), the picture the model
sees is drawn with a cell per visual token, on the token's grid as the model's adapter reports it
(``(panel, row, col)`` of the adapter's ``visual_grid``: LLaVA-1.5 one square grid; LLaVA-NeXT the base image and the
high-resolution grid; Qwen2.5-VL the merged 28-px grid).  Cells are marked by how long their
token survived the plan's stages:

* removed by the first stage: dimmed to ``dim`` of their brightness;
* removed by stage ``j >= 1``: tinted with stage ``j``'s colour (the legend names the layer);
* kept to the end: untouched.

The panel title gives the plan's name and the per-stage counts (``576 -> L1:92 -> L10:54 ...``)
and the achieved layer average.  An optional first panel shows the input with its token grid.
This is the figure of a comparison of selection strategies, for any list of plans.

Pictures: the architecture's :meth:`~tokenreduce.core.arch.ArchSpec.panel_pictures` gives the
picture the model sees under a panel where it differs from the input (LLaVA-1.5: the
preprocessed crop; LLaVA-NeXT: the preprocessed base image); other panels show the original
image.  Pillow only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

__all__ = [
    "VizSettings",
    "TokenLayout",
    "token_layout",
    "attachment_layout",
    "survival_levels",
    "render_panel",
    "render_figure",
    "visualize",
    "STAGE_COLORS",
]

#: colours of stages 1, 2, ... (stage 0's removals are dimmed instead)
STAGE_COLORS = ((255, 170, 0), (230, 60, 60), (170, 70, 230), (40, 140, 255), (20, 190, 120), (240, 90, 190))
_GRID_COLOR = (128, 128, 128, 110)


class VizSettings(BaseModel):
    """The ``viz`` section of the config."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(
        default_factory=list, description="image files, one figure row each (default: one synthetic picture)"
    )
    image_size: list[int] | None = Field(
        default=None,
        min_length=2,
        max_length=2,
        description="synthetic picture size [width, height] (default: the architecture's test size)",
    )
    question: str = Field(default="what color is the shape?", description="the question in the model's prompt template")
    panel_size: int = Field(default=256, ge=32, description="pixels of a panel's picture area (square)")
    header: int = Field(default=56, ge=0, description="pixels of a panel's title area above the picture")
    show_input: bool = Field(default=True, description="first panel: the input with its token grid, nothing removed")
    dim: float = Field(default=0.2, ge=0.0, le=1.0, description="brightness of tokens removed by the first stage")
    file: str = Field(default="kept_tokens.png", description="file name of the PNG in the output folder")
    seed: int = 0


@dataclass
class TokenLayout:
    """Where the visual tokens of one sample sit.

    Attributes:
        positions: ``[N]`` long, original sequence positions of the visual tokens (ascending).
        panel, row, col: ``[N]`` long each, the token's grid cell (``panel`` = image or grid
            index within the sample).
        newline: ``[N]`` bool, LLaVA-NeXT's row-end tokens (drawn in a strip right of the grid).
    """

    positions: Tensor
    panel: Tensor
    row: Tensor
    col: Tensor
    newline: Tensor

    def panels(self) -> list[int]:
        return sorted(set(self.panel.tolist()))

    def extent(self, panel: int) -> tuple[int, int]:
        """(rows, cols) of a panel's grid, newline tokens excluded."""
        sel = (self.panel == panel) & ~self.newline
        if not bool(sel.any()):
            sel = self.panel == panel
        return int(self.row[sel].max()) + 1, int(self.col[sel].max()) + 1


def attachment_layout(att: Any, input_ids: Tensor) -> list[TokenLayout]:
    """The visual tokens of every sample of the attachment's last prefill, on their grids.

    Reads the attachment's visual mask and visual grid (the adapter's ``visual_grid``, computed
    with the context of the forward, e.g. Qwen2.5-VL's M-RoPE positions or LLaVA-NeXT's newline
    tokens).  Call it inside the ``with`` block, after a forward.  Returns one
    :class:`TokenLayout` per sample.
    """
    visual, grid = att.visual_layout()
    layouts = []
    for b in range(input_ids.shape[0]):
        pos = torch.nonzero(visual[b]).flatten()
        g = grid[b, pos].cpu()
        newline = g[:, 3].bool() if g.shape[-1] > 3 else torch.zeros(len(pos), dtype=torch.bool)
        layouts.append(TokenLayout(pos.cpu(), g[:, 0], g[:, 1], g[:, 2], newline))
    return layouts


def token_layout(model: Any, inputs: Mapping[str, Any]) -> list[TokenLayout]:
    """The visual tokens of every sample of ``inputs`` on their grids (one prefill forward of the
    model under an empty plan, so the adapter computes the grid exactly as during a cut)."""
    import tokenreduce

    with torch.no_grad(), tokenreduce.apply(model, {"stages": []}) as att:
        model(**inputs, use_cache=False)
        return attachment_layout(att, inputs["input_ids"])


def survival_levels(layout: TokenLayout, kept_per_stage: Sequence[Sequence[int]]) -> Tensor:
    """``[N]`` long: for each visual token, how many stages kept it (0 = removed by the first
    stage; ``len(kept_per_stage)`` = kept to the end).

    Args:
        layout: the sample's tokens.
        kept_per_stage: per stage, the original sequence positions it kept (``trace.stages[i].kept[b]``).
    """
    level = torch.zeros(len(layout.positions), dtype=torch.long)
    alive = torch.ones(len(layout.positions), dtype=torch.bool)
    for kept in kept_per_stage:
        alive &= torch.isin(layout.positions, torch.as_tensor(list(kept), dtype=torch.long))
        level += alive.long()
    return level


# -- pictures -----------------------------------------------------------------------------------
def panel_pictures(
    arch: str, inputs: Mapping[str, Any], processor: Any, image: Image.Image, sample: int, panels: Sequence[int]
) -> dict[int, Image.Image]:
    """The picture drawn under each grid panel of one sample: what the architecture's spec gives
    (``arch``: its ``model_type``), else ``image``."""
    from tokenreduce.core.registry import get_registry

    pictures = {p: image for p in panels}
    if inputs.get("pixel_values") is None or processor is None:
        return pictures
    spec = get_registry().spec_for(arch, what="viz")
    pictures.update(spec.panel_pictures(inputs, processor, sample, list(panels)))
    return pictures


# -- drawing ------------------------------------------------------------------------------------
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _space(font) -> float:
    """Width of a word gap: the default font's space is very narrow (2 px at 11 pt)."""
    return max(font.getlength(" "), 0.33 * getattr(font, "size", 11))


def _text_width(text: str, font) -> float:
    words = text.split(" ")
    return sum(font.getlength(w) for w in words) + _space(font) * (len(words) - 1)


def _fit_text(text: str, font, width: float) -> str:
    """``text`` cut (with "...") to fit ``width`` pixels."""
    if _text_width(text, font) <= width:
        return text
    while text and _text_width(text + "...", font) > width:
        text = text[:-1]
    return text + "..."


def _draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, fill, width: float) -> float:
    """Draw ``text`` word by word with readable gaps, cut to ``width``; returns the width used."""
    text = _fit_text(text, font, width)
    x, y = xy
    for word in text.split(" "):
        draw.text((x, y), word, fill=fill, font=font)
        x += font.getlength(word) + _space(font)
    return _text_width(text, font)


def render_panel(
    layout: TokenLayout,
    pictures: Mapping[int, Image.Image],
    levels: Tensor | None,
    n_stages: int,
    *,
    size: int,
    header: int,
    title: str,
    subtitle: str = "",
    legend: Sequence[tuple[tuple[int, int, int], str]] = (),
    dim: float = 0.2,
) -> Image.Image:
    """One panel: ``size`` x (``header`` + ``size``) pixels, RGB.

    Args:
        layout: the sample's visual tokens on their grids.
        pictures: panel index -> picture drawn under that grid.
        levels: ``[N]`` from :func:`survival_levels`, or ``None`` to draw the grid only (input panel).
        n_stages: stages of the plan (level ``n_stages`` = kept to the end).
        size, header: picture area side and title height in pixels.
        title, subtitle: two title lines; legend: (colour, label) swatches on a third line.
    """
    canvas = Image.new("RGB", (size, header + size), (255, 255, 255))
    panels = layout.panels()
    slot_w = size // max(1, len(panels))
    for i, p in enumerate(panels):
        rows, cols = layout.extent(p)
        sel = layout.panel == p
        has_newline = bool((layout.newline & sel).any())
        strip = 0.25 if has_newline else 0.0  # newline tokens: a strip a quarter-cell wide
        aspect = (cols + strip) / rows
        avail_w, avail_h = slot_w - 4, size - 4
        pic_w = min(avail_w, int(avail_h * aspect))
        pic_h = min(avail_h, int(pic_w / aspect))
        cell_w, cell_h = pic_w / (cols + strip), pic_h / rows
        grid_w = int(round(cell_w * cols))
        x0 = i * slot_w + (slot_w - pic_w) // 2
        y0 = header + (size - pic_h) // 2
        picture = pictures[p].convert("RGB").resize((max(1, grid_w), max(1, pic_h)), Image.BILINEAR)
        canvas.paste(picture, (x0, y0))
        overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(overlay)
        idx = torch.nonzero(sel).flatten().tolist()
        for j in idx:
            r, c = int(layout.row[j]), int(layout.col[j])
            if bool(layout.newline[j]):
                box = (x0 + grid_w, y0 + r * cell_h, x0 + grid_w + strip * cell_w, y0 + (r + 1) * cell_h)
                base = (128, 128, 128, 255)
            else:
                box = (x0 + c * cell_w, y0 + r * cell_h, x0 + (c + 1) * cell_w, y0 + (r + 1) * cell_h)
                base = None
            box = tuple(int(round(v)) for v in box)
            box = (box[0], box[1], max(box[0], box[2] - 1), max(box[1], box[3] - 1))
            if base is not None:
                draw.rectangle(box, fill=base)
            if levels is None:
                draw.rectangle(box, outline=_GRID_COLOR)
                continue
            level = int(levels[j])
            if level == 0 and n_stages > 0:
                draw.rectangle(box, fill=(0, 0, 0, int(round(255 * (1 - dim)))))
            elif level < n_stages:
                color = STAGE_COLORS[(level - 1) % len(STAGE_COLORS)]
                draw.rectangle(box, fill=(*color, 150))
        canvas = Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    if header >= 14:
        big, small = _font(13), _font(11)
        _draw_text(draw, (4, 2), title, big, (0, 0, 0), size - 8)
        if subtitle and header >= 30:
            _draw_text(draw, (4, 19), subtitle, small, (60, 60, 60), size - 8)
        if legend and header >= 48:
            x = 4
            for color, label in legend:
                if x + 30 > size:
                    break
                draw.rectangle((x, 37, x + 9, 46), fill=color, outline=(90, 90, 90))
                used = _draw_text(draw, (x + 12, 35), label, small, (60, 60, 60), size - x - 16)
                x += 20 + int(used)
    return canvas


def _stage_texts(trace, sample: int, stage_layers: Sequence[int], n_stages: int, dim: float):
    counts = [f"{trace.original_visual[sample]}"]
    for st in trace.stages:
        counts.append(f"L{st.layer}:{st.visual_after[sample]}")
    subtitle = " > ".join(counts) + f" (average {trace.layer_average(sample):.1f})"
    legend = []
    if n_stages:
        g = int(round(255 * dim))
        legend.append(((g, g, g), f"out L{stage_layers[0]}"))
        for j in range(1, n_stages):
            legend.append((STAGE_COLORS[(j - 1) % len(STAGE_COLORS)], f"out L{stage_layers[j]}"))
        legend.append(((255, 255, 255), "kept"))
    return subtitle, legend


def render_figure(rows: Sequence[Sequence[Image.Image]]) -> Image.Image:
    """Panels (equal sizes) laid out in a grid: one row per sample, one column per panel."""
    if not rows or not rows[0]:
        raise ValueError("render_figure: no panels")
    w, h = rows[0][0].size
    fig = Image.new("RGB", (w * len(rows[0]), h * len(rows)), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            if panel.size != (w, h):
                raise ValueError(f"render_figure: panel ({r}, {c}) is {panel.size}, expected {(w, h)}")
            fig.paste(panel, (c * w, r * h))
    return fig


def visualize(
    loaded: Any,
    plans: Mapping[str, Any],
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    settings: VizSettings | None = None,
) -> tuple[Image.Image, dict[str, Any]]:
    """Run each plan's prefill on the images and draw what it kept.

    Args:
        loaded: a :class:`tokenreduce.models.LoadedModel` with a processor (tiny or pretrained).
        plans: display name -> plan (Plan, dict or preset name); validated before any forward.
        images: B pictures (PIL); prompts: B prompts with the image placeholder.
        settings: :class:`VizSettings`.

    Returns:
        (figure, record): the figure is ``(len(plans) + show_input) * panel_size`` wide and
        ``B * (header + panel_size)`` high; the record lists, per plan and sample, the per-stage
        counts and the kept tokens' grid cells ``[panel, row, col]``.
    """
    import tokenreduce

    settings = settings or VizSettings()
    compiled = {name: tokenreduce.compile_for(loaded.model, plan) for name, plan in plans.items()}
    if not compiled:
        raise ValueError("visualize: no plans")
    inputs = loaded.processor_inputs(list(prompts), list(images))
    runs = {}
    layouts = None
    for name, (adapter, plan) in compiled.items():
        with torch.no_grad(), adapter.attach(loaded.model, plan) as att:
            loaded.model(**inputs, use_cache=False)
            if layouts is None:
                layouts = attachment_layout(att, inputs["input_ids"])
        runs[name] = att.trace
    rows: list[list[Image.Image]] = [[] for _ in images]
    record: dict[str, Any] = {"samples": [], "plans": {}}
    pictures = []
    for b, layout in enumerate(layouts):
        pics = panel_pictures(loaded.arch, inputs, loaded.processor, images[b], b, layout.panels())
        pictures.append(pics)
        grids = {p: list(layout.extent(p)) for p in layout.panels()}
        record["samples"].append({"n_visual": len(layout.positions), "panels": grids})
        if settings.show_input:
            rows[b].append(
                render_panel(
                    layout,
                    pics,
                    None,
                    0,
                    size=settings.panel_size,
                    header=settings.header,
                    title="input",
                    subtitle=f"{len(layout.positions)} visual tokens",
                    dim=settings.dim,
                )
            )
    for name, trace in runs.items():
        layers = [st.layer for st in trace.stages]
        entries = []
        for b, layout in enumerate(layouts):
            kept = [st.kept[b] for st in trace.stages]
            levels = survival_levels(layout, kept)
            subtitle, legend = _stage_texts(trace, b, layers, len(kept), settings.dim)
            rows[b].append(
                render_panel(
                    layout,
                    pictures[b],
                    levels,
                    len(kept),
                    size=settings.panel_size,
                    header=settings.header,
                    title=name,
                    subtitle=subtitle,
                    legend=legend,
                    dim=settings.dim,
                )
            )
            final = levels == len(kept)
            entries.append(
                {
                    "visual_before": trace.original_visual[b],
                    "stages": [{"layer": st.layer, "visual_after": st.visual_after[b]} for st in trace.stages],
                    "layer_average": trace.layer_average(b),
                    "kept_cells": torch.stack([layout.panel, layout.row, layout.col], -1)[final].tolist(),
                }
            )
        record["plans"][name] = entries
    figure = render_figure(rows)
    record["figure_size"] = list(figure.size)
    return figure, record
