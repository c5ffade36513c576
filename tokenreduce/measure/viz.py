"""Pictures of the visual tokens each plan keeps: one panel per plan, side by side (docs/cli.md, viz).

For every input image (one row of the figure) and every plan (one panel), the picture the model
sees is drawn with its token grid (``(panel, row, col)`` of the adapter's ``visual_grid``:
LLaVA-1.5 one square grid; LLaVA-NeXT the base image and the high-resolution grid; Qwen2.5-VL
the merged 28-px grid), and the cells are marked by how long their token survived the plan's
stages:

* removed by the first stage: dimmed to ``dim`` of their brightness;
* removed by stage ``j >= 1``: tinted with stage ``j``'s colour (the legend names the layer);
* kept to the end: untouched.

The panel title gives the plan's name, the per-stage counts (``576 > L1:92 > L10:54 ...``) and
the achieved layer average; with a question, two caption lines give it and the model's answer
under the plan (the input panel: the unreduced model's answer and the gold answer).  An
optional first panel shows the input with its token grid, and with ``heatmap`` every stage that
scored gets a panel of its scorer's scores over the grid (``StageTrace.scores``, recorded with
the attachment's ``record_scores``), the tokens it removed marked with a dot.

The figure is drawn with matplotlib (Agg) in pixel units (1 pt = 1 px): the PNG is exactly
``columns * panel_size`` by ``rows * (header + panel_size)`` pixels, and the same drawing saves
as PDF and SVG, with vector text, grid and marks.

Pictures: the architecture's :meth:`~tokenreduce.core.arch.ArchSpec.panel_pictures` gives the
picture the model sees under a panel where it differs from the input (LLaVA-1.5: the
preprocessed crop; LLaVA-NeXT: the preprocessed base image); other panels show the original
image.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

__all__ = [
    "VizSettings",
    "TokenLayout",
    "token_layout",
    "attachment_layout",
    "trace_layout",
    "survival_levels",
    "score_values",
    "Panel",
    "VizFigure",
    "render_panel",
    "render_figure",
    "task_inputs",
    "visualize",
    "STAGE_COLORS",
]

#: colours of stages 1, 2, ... (stage 0's removals are dimmed instead)
STAGE_COLORS = ((255, 170, 0), (230, 60, 60), (170, 70, 230), (40, 140, 255), (20, 190, 120), (240, 90, 190))
_GRID_COLOR = (0.5, 0.5, 0.5, 0.43)
#: matplotlib draws at 72 dpi, so that a point is a pixel of the PNG
_DPI = 72


class VizSettings(BaseModel):
    """The ``viz`` section of the config."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(
        default_factory=list,
        description="image files, one figure row each, asked `question` (default: pictures from `source`)",
    )
    source: Literal["task", "synthetic"] = Field(
        default="task",
        description="pictures when `images` is empty: the reference task's first n_images questions (the task "
        "conf's fixed shuffle, with their questions and gold answers) or synthetic pictures asked `question`",
    )
    n_images: int = Field(default=3, ge=1, description="pictures (figure rows) taken from `source`")
    image_size: list[int] | None = Field(
        default=None,
        min_length=2,
        max_length=2,
        description="synthetic picture size [width, height] (default: the architecture's test size)",
    )
    question: str = Field(
        default="what color is the shape?", description="the question asked about `images` and synthetic pictures"
    )
    panel_size: int = Field(default=256, ge=32, description="pixels of a panel's picture area (square)")
    header: int = Field(
        default=84,
        ge=0,
        description="pixels of a panel's title area above the picture: title (>= 14), counts (>= 30), legend "
        "(>= 48), question (>= 64) and answer (>= 80)",
    )
    show_input: bool = Field(default=True, description="first panel: the input with its token grid, nothing removed")
    dim: float = Field(default=0.2, ge=0.0, le=1.0, description="brightness of tokens removed by the first stage")
    heatmap: bool = Field(default=False, description="after each plan's panel, one panel per scoring stage: its scores")
    cmap: str = Field(default="viridis", description="matplotlib colour map of the score heat-maps")
    answers: bool = Field(
        default=True, description="generate the answers of the captions (greedy; false: one prefill per plan)"
    )
    max_new_tokens: int = Field(default=8, ge=1, description="answer length limit of the captions")
    formats: list[Literal["pdf", "svg"]] = Field(
        default_factory=lambda: ["pdf", "svg"], description="also write the figure in these formats next to `file`"
    )
    file: str = Field(default="kept_tokens.png", description="file name of the PNG in the output folder")
    seed: int = 0

    @field_validator("cmap")
    @classmethod
    def _known_cmap(cls, value: str) -> str:
        import matplotlib

        if value not in matplotlib.colormaps:
            some = ", ".join(["viridis", "magma", "inferno", "plasma", "cividis", "coolwarm", "gray"])
            raise ValueError(f"unknown matplotlib colour map {value!r}; e.g. {some}")
        return value


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


def trace_layout(trace: Any, sample: int) -> TokenLayout:
    """One sample's visual tokens on their grids, from a trace recorded by an attachment
    (:meth:`tokenreduce.Trace.visual_cells`)."""
    pos, cells = trace.visual_cells(sample)
    return TokenLayout(pos, cells[:, 0], cells[:, 1], cells[:, 2], cells[:, 3].bool())


def score_values(layout: TokenLayout, scored: Sequence[int], scores: Tensor) -> Tensor:
    """``[N]`` float32: each visual token's score at one stage (NaN: not a candidate there, i.e.
    removed by an earlier stage).

    Args:
        layout: the sample's tokens.
        scored: the original positions of the stage's candidates (``trace.stages[i].scored[b]``).
        scores: their scores, aligned (``trace.stages[i].scores[b]``).
    """
    values = torch.full((len(layout.positions),), float("nan"))
    scored_pos = torch.as_tensor(list(scored), dtype=torch.long)
    if len(scored_pos) != len(scores):
        raise ValueError(f"score_values: {len(scored_pos)} scored positions but {len(scores)} scores")
    at = torch.searchsorted(layout.positions, scored_pos)
    ok = at < len(layout.positions)
    ok[ok.clone()] = layout.positions[at[ok]] == scored_pos[ok]
    if not bool(ok.all()):
        raise ValueError("score_values: scored positions that are not visual tokens of the layout")
    values[at] = scores.detach().float().cpu()
    return values


def task_inputs(task: Any, n: int) -> tuple[list[Image.Image], list[str], list[str]]:
    """The first ``n`` questions of a task conf (its fixed shuffle,
    :func:`tokenreduce.measure.tasks.load_task`): ``(images, questions, gold answers)``."""
    from .tasks import TaskSettings, load_task

    settings = task if isinstance(task, TaskSettings) else TaskSettings.model_validate(dict(task))
    examples = load_task(settings.model_copy(update={"n": n}))
    return [ex.image() for ex in examples], [ex.question for ex in examples], [ex.answer for ex in examples]


# -- panels -------------------------------------------------------------------------------------
@dataclass
class Panel:
    """What one panel shows.

    Attributes:
        layout: the sample's visual tokens on their grids.
        pictures: grid panel index -> the picture drawn under it.
        levels: ``[N]`` from :func:`survival_levels` (kept/removed marks), or None.
        n_stages: stages of the plan (level ``n_stages`` = kept to the end).
        scores: ``[N]`` from :func:`score_values` (a heat-map; NaN cells dimmed), or None.
        removed: ``[N]`` bool, tokens marked with a dot (on a heat-map: those its stage removed).
        title, subtitle: the first two title lines; legend: (RGB colour, label) swatches;
        lines: caption lines under them (question, answer).
    """

    layout: TokenLayout
    pictures: Mapping[int, Image.Image]
    levels: Tensor | None = None
    n_stages: int = 0
    scores: Tensor | None = None
    removed: Tensor | None = None
    title: str = ""
    subtitle: str = ""
    legend: Sequence[tuple[tuple[int, int, int], str]] = ()
    lines: Sequence[str] = ()
    colorbar: tuple[float, float] | None = None


@dataclass
class VizFigure:
    """Panels (one row per image) drawn with matplotlib; :attr:`size` in PNG pixels.

    ``save(path)`` writes by the file's suffix (``.png`` exactly :attr:`size` pixels, ``.pdf`` and
    ``.svg`` vector, other Pillow formats from the PNG); :meth:`image` gives the PIL picture.
    """

    rows: list[list[Panel]]
    panel_size: int
    header: int
    dim: float = 0.2
    cmap: str = "viridis"
    _figure: Any = field(default=None, init=False, repr=False)

    @property
    def size(self) -> tuple[int, int]:
        return (self.panel_size * len(self.rows[0]), (self.header + self.panel_size) * len(self.rows))

    def figure(self):
        """The matplotlib ``Figure`` (drawn once)."""
        if self._figure is None:
            self._figure = _draw_figure(self)
        return self._figure

    def image(self) -> Image.Image:
        """The PNG rendering as an RGB PIL image of :attr:`size`."""
        buffer = io.BytesIO()
        self._savefig(buffer, "png")
        buffer.seek(0)
        with Image.open(buffer) as im:
            return im.convert("RGB")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        suffix = path.suffix.lower().lstrip(".")
        if suffix in ("png", "pdf", "svg"):
            with open(path, "wb") as f:
                self._savefig(f, suffix)
        else:
            self.image().save(path)
        return path

    def _savefig(self, f, fmt: str) -> None:
        import matplotlib

        metadata = {"png": {"Software": None}, "pdf": {"CreationDate": None}, "svg": {"Date": None}}[fmt]
        with matplotlib.rc_context({"svg.hashsalt": "tokenreduce", "svg.fonttype": "none", "pdf.fonttype": 42}):
            self.figure().savefig(f, format=fmt, dpi=_DPI, metadata=metadata, facecolor="white")


def _draw_figure(fig_spec: VizFigure):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not fig_spec.rows or not fig_spec.rows[0]:
        raise ValueError("VizFigure: no panels")
    if any(len(r) != len(fig_spec.rows[0]) for r in fig_spec.rows):
        raise ValueError(f"VizFigure: rows of unequal length {[len(r) for r in fig_spec.rows]}")
    w, h = fig_spec.size
    # a hair over the size: the canvas truncates w / dpi * dpi, which can fall just under w
    fig = Figure(figsize=((w + 0.01) / _DPI, (h + 0.01) / _DPI), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ph = fig_spec.header + fig_spec.panel_size
    for r, row in enumerate(fig_spec.rows):
        for c, panel in enumerate(row):
            _draw_panel(ax, c * fig_spec.panel_size, r * ph, panel, fig_spec)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    return fig


def _rgb(color: tuple[int, int, int], alpha: float = 1.0) -> tuple[float, float, float, float]:
    return (color[0] / 255, color[1] / 255, color[2] / 255, alpha)


def _fit(text: str, size: float, width: float) -> str:
    """``text`` cut (with "...") to fit ``width`` pixels at font ``size``."""
    from matplotlib.textpath import TextPath

    def fits(t: str) -> bool:
        return TextPath((0, 0), t, size=size).get_extents().width <= width

    if not text or fits(text):
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # the longest prefix that fits with "..."
        mid = (lo + hi + 1) // 2
        if fits(text[:mid] + "..."):
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + "..."


def _draw_panel(ax, x: float, y: float, panel: Panel, spec: VizFigure) -> None:
    from matplotlib.collections import LineCollection
    from matplotlib.patches import Rectangle

    size, header, layout = spec.panel_size, spec.header, panel.layout
    clip = Rectangle((x, y), size, header + size, transform=ax.transData, visible=False)
    ax.add_patch(clip)
    panels = layout.panels()
    slot_w = size // max(1, len(panels))
    cmap = _colormap(spec.cmap)
    lo, hi = panel.colorbar or _finite_range(panel.scores)
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
        grid_w = cell_w * cols
        x0 = x + i * slot_w + (slot_w - pic_w) // 2
        y0 = y + header + (size - pic_h) // 2
        picture = np.asarray(panel.pictures[p].convert("RGB"))
        ax.imshow(picture, extent=(x0, x0 + grid_w, y0 + pic_h, y0), interpolation="bilinear", aspect="auto")
        idx = torch.nonzero(sel).flatten()
        row, col, newline = layout.row[idx], layout.col[idx], layout.newline[idx]
        overlay = np.zeros((rows, cols, 4))
        strip_overlay = np.zeros((rows, 1, 4))
        strip_overlay[..., :3], strip_overlay[..., 3] = 0.5, 0.0
        colors = _cell_colors(panel, idx, spec.dim, cmap, lo, hi)  # [n, 4]
        for j in range(len(idx)):
            r, c = int(row[j]), int(col[j])
            if bool(newline[j]):
                strip_overlay[r, 0] = (0.5, 0.5, 0.5, 1.0)
                if colors[j, 3] > 0:
                    strip_overlay[r, 0] = _over(colors[j], strip_overlay[r, 0])
            else:
                overlay[r, c] = colors[j]
        ax.imshow(overlay, extent=(x0, x0 + grid_w, y0 + pic_h, y0), interpolation="nearest", aspect="auto")
        if has_newline:
            ax.imshow(
                strip_overlay,
                extent=(x0 + grid_w, x0 + grid_w + strip * cell_w, y0 + pic_h, y0),
                interpolation="nearest",
                aspect="auto",
            )
        right = x0 + grid_w + strip * cell_w
        segments = [[(x0 + c * cell_w, y0), (x0 + c * cell_w, y0 + pic_h)] for c in range(cols + 1)]
        segments += [[(x0, y0 + r * cell_h), (right, y0 + r * cell_h)] for r in range(rows + 1)]
        if has_newline:
            segments.append([(right, y0), (right, y0 + pic_h)])
        ax.add_collection(LineCollection(segments, colors=[_GRID_COLOR], linewidths=0.5))
        if panel.removed is not None:
            marked = panel.removed[idx]
            if bool(marked.any()):
                cx = torch.where(newline, torch.full_like(col, 0), col).float()
                xs = torch.where(newline, torch.full_like(cx, grid_w + strip * cell_w / 2), (cx + 0.5) * cell_w) + x0
                ys = y0 + (row.float() + 0.5) * cell_h
                dot = max(1.0, min(cell_w, cell_h) / 4)
                ax.scatter(
                    xs[marked].numpy(),
                    ys[marked].numpy(),
                    s=dot**2,
                    c="white",
                    edgecolors="black",
                    linewidths=0.3,
                    marker="o",
                )
    _draw_header(ax, x, y, panel, spec, clip, cmap)


def _over(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """``top`` (RGBA, straight alpha) composited over an opaque ``bottom``."""
    a = top[3]
    return np.array([*(top[:3] * a + bottom[:3] * (1 - a)), 1.0])


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def _finite_range(values: Tensor | None) -> tuple[float, float]:
    if values is None:
        return 0.0, 1.0
    finite = values[torch.isfinite(values)]
    if finite.numel() == 0:
        return 0.0, 1.0
    return float(finite.min()), float(finite.max())


def _cell_colors(panel: Panel, idx: Tensor, dim: float, cmap, lo: float, hi: float) -> np.ndarray:
    """``[n, 4]`` RGBA (straight alpha) overlay of the tokens ``idx`` of a panel."""
    colors = np.zeros((len(idx), 4))
    if panel.scores is not None:
        values = panel.scores[idx].numpy()
        finite = np.isfinite(values)
        scaled = (values - lo) / (hi - lo) if hi > lo else np.full_like(values, 0.5)
        colors[finite] = cmap(np.clip(scaled[finite], 0, 1))
        colors[finite, 3] = 0.7
        colors[~finite] = (0, 0, 0, 1 - dim)  # removed before this stage
        return colors
    if panel.levels is None:
        return colors
    levels = panel.levels[idx]
    for j, level in enumerate(levels.tolist()):
        if level == 0 and panel.n_stages > 0:
            colors[j] = (0, 0, 0, 1 - dim)
        elif level < panel.n_stages:
            colors[j] = _rgb(STAGE_COLORS[(level - 1) % len(STAGE_COLORS)], 150 / 255)
    return colors


def _draw_header(ax, x: float, y: float, panel: Panel, spec: VizFigure, clip, cmap) -> None:
    from matplotlib.patches import Rectangle

    header, size = spec.header, spec.panel_size
    width = size - 8

    def text(ty: float, s: str, fs: float, color, tx: float = 4, w: float = width) -> None:
        t = ax.text(x + tx, y + ty, _fit(s, fs, w), fontsize=fs, color=color, va="top", ha="left")
        t.set_clip_path(clip)

    if header < 14:
        return
    text(2, panel.title, 13, "black")
    if panel.subtitle and header >= 30:
        text(19, panel.subtitle, 11, (0.24, 0.24, 0.24))
    if header >= 48:
        tx = 4.0
        if panel.colorbar is not None or panel.scores is not None:
            text(35, "low", 11, (0.24, 0.24, 0.24), tx, 24)
            tx += 22
            bar = np.linspace(0, 1, 64).reshape(1, -1)
            ax.imshow(bar, cmap=cmap, extent=(x + tx, x + tx + 48, y + 46, y + 37), aspect="auto")
            ax.add_patch(Rectangle((x + tx, y + 37), 48, 9, fill=False, edgecolor=(0.35, 0.35, 0.35), linewidth=0.5))
            text(35, "high", 11, (0.24, 0.24, 0.24), tx + 51, 30)
            tx += 51 + 30
            if panel.removed is not None:
                ax.scatter([x + tx + 5], [y + 41.5], s=16, c="white", edgecolors="black", linewidths=0.3)
                text(35, "removed here", 11, (0.24, 0.24, 0.24), tx + 12, size - tx - 16)
        for color, label in panel.legend:
            if tx + 30 > size:
                break
            ax.add_patch(
                Rectangle((x + tx, y + 37), 9, 9, facecolor=_rgb(color), edgecolor=(0.35, 0.35, 0.35), linewidth=0.5)
            )
            from matplotlib.textpath import TextPath

            label = _fit(label, 11, size - tx - 16)
            text(35, label, 11, (0.24, 0.24, 0.24), tx + 12, size - tx - 16)
            tx += 20 + TextPath((0, 0), label, size=11).get_extents().width
    for k, line in enumerate(panel.lines[:2]):
        if header >= 64 + 16 * k:
            text(51 + 15 * k, line, 11, "black")


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
    scores: Tensor | None = None,
    lines: Sequence[str] = (),
    cmap: str = "viridis",
) -> Image.Image:
    """One panel as an RGB PIL image of ``size`` x (``header`` + ``size``) pixels.

    Args:
        layout: the sample's visual tokens on their grids.
        pictures: panel index -> picture drawn under that grid.
        levels: ``[N]`` from :func:`survival_levels`, or ``None`` to draw the grid only (input panel).
        n_stages: stages of the plan (level ``n_stages`` = kept to the end).
        size, header: picture area side and title height in pixels.
        title, subtitle: two title lines; legend: (colour, label) swatches on a third line.
        scores: ``[N]`` from :func:`score_values`: a heat-map instead of ``levels``.
        lines: caption lines (question, answer).
    """
    panel = Panel(layout, pictures, levels, n_stages, scores, None, title, subtitle, legend, lines)
    return VizFigure([[panel]], size, header, dim, cmap).image()


def render_figure(rows: Sequence[Sequence[Image.Image]]) -> Image.Image:
    """Panel pictures (equal sizes) laid out in a grid: one row per sample, one column per panel."""
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


def _fmt(v: float) -> str:
    return f"{v:.3g}" if math.isfinite(v) else str(v)


def _answers(loaded: Any, inputs: Mapping[str, Any], max_new_tokens: int) -> list[str]:
    """Greedy answers of the model (under whatever is attached) to ``inputs``."""
    from .fidelity import trim_at_eos

    model = loaded.model
    eos, pad = model.generation_config.eos_token_id, model.generation_config.pad_token_id
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=False)
    if pad is None and eos is not None:
        kwargs["pad_token_id"] = eos if isinstance(eos, int) else eos[0]
    out = model.generate(**inputs, **kwargs)
    generated = out[:, inputs["input_ids"].shape[1] :]
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in trim_at_eos(generated, eos, pad)]


def visualize(
    loaded: Any,
    plans: Mapping[str, Any],
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    settings: VizSettings | None = None,
    *,
    questions: Sequence[str] | None = None,
    golds: Sequence[str] | None = None,
) -> tuple[VizFigure, dict[str, Any]]:
    """Run each plan on the images and draw what it kept.

    Args:
        loaded: a :class:`tokenreduce.models.LoadedModel` with a processor (tiny or pretrained).
        plans: display name -> plan (Plan, dict or preset name); validated before any forward.
        images: B pictures (PIL); prompts: B prompts with the image placeholder.
        settings: :class:`VizSettings` (``answers``: greedy answers for the captions, else one
            prefill per plan; ``heatmap``: score panels).
        questions, golds: B questions and gold answers for the captions (optional).

    Returns:
        (figure, record): the :class:`VizFigure` is ``columns * panel_size`` wide (columns: the
        input panel, one per plan, and with ``heatmap`` one per scoring stage of each plan) and
        ``B * (header + panel_size)`` high; the record lists, per plan and sample, the per-stage
        counts, the answer, the kept tokens' grid cells ``[panel, row, col]`` at the end and after
        each stage (``Trace.kept_grid``).
    """
    import tokenreduce

    settings = settings or VizSettings()
    compiled = {name: tokenreduce.compile_for(loaded.model, plan) for name, plan in plans.items()}
    if not compiled:
        raise ValueError("visualize: no plans")
    for key, values in (("prompts", prompts), ("questions", questions), ("golds", golds)):
        if values is not None and len(values) != len(images):
            raise ValueError(f"visualize: {len(images)} images but {len(values)} {key}")
    inputs = loaded.processor_inputs(list(prompts), list(images))
    answers: dict[str, list[str]] = {}
    if settings.answers:
        with torch.no_grad():
            answers["vanilla"] = _answers(loaded, inputs, settings.max_new_tokens)
    runs = {}
    for name, (adapter, plan) in compiled.items():
        with torch.no_grad(), adapter.attach(loaded.model, plan) as att:
            att.record_scores = settings.heatmap
            if settings.answers:
                answers[name] = _answers(loaded, inputs, settings.max_new_tokens)
            else:
                loaded.model(**inputs, use_cache=False)
        runs[name] = (att.trace, plan)
    first = next(iter(runs.values()))[0]
    layouts = [trace_layout(first, b) for b in range(len(images))]

    def lines(b: int, name: str) -> list[str]:
        out = [f"Q: {questions[b]}"] if questions is not None else []
        if name in answers:
            answer = f"A: {answers[name][b]!r}" if name != "vanilla" else f"A (unreduced): {answers[name][b]!r}"
            out.append(answer + (f"  gold {golds[b]!r}" if golds is not None and name == "vanilla" else ""))
        return out

    rows: list[list[Panel]] = [[] for _ in images]
    record: dict[str, Any] = {"samples": [], "plans": {}}
    pictures = []
    for b, layout in enumerate(layouts):
        pics = panel_pictures(loaded.arch, inputs, loaded.processor, images[b], b, layout.panels())
        pictures.append(pics)
        grids = {p: list(layout.extent(p)) for p in layout.panels()}
        sample: dict[str, Any] = {"n_visual": len(layout.positions), "panels": grids}
        if questions is not None:
            sample["question"] = questions[b]
        if golds is not None:
            sample["gold"] = golds[b]
        if "vanilla" in answers:
            sample["answer"] = answers["vanilla"][b]
        record["samples"].append(sample)
        if settings.show_input:
            rows[b].append(
                Panel(
                    layout,
                    pics,
                    title="input",
                    subtitle=f"{len(layout.positions)} visual tokens",
                    lines=lines(b, "vanilla"),
                )
            )
    for name, (trace, plan) in runs.items():
        layers = [st.layer for st in trace.stages]
        kept_grid = trace.kept_grid()
        entries = []
        for b, layout in enumerate(layouts):
            kept = [st.kept[b] for st in trace.stages]
            levels = survival_levels(layout, kept)
            subtitle, legend = _stage_texts(trace, b, layers, len(kept), settings.dim)
            rows[b].append(Panel(layout, pictures[b], levels, len(kept), title=name, subtitle=subtitle, legend=legend))
            rows[b][-1].lines = lines(b, name)
            entry: dict[str, Any] = {
                "visual_before": trace.original_visual[b],
                "stages": [{"layer": st.layer, "visual_after": st.visual_after[b]} for st in trace.stages],
                "layer_average": trace.layer_average(b),
                "kept_cells": kept_grid[-1][b].tolist() if kept_grid else _all_cells(layout),
                "kept_cells_per_stage": [g[b].tolist() for g in kept_grid],
            }
            if name in answers:
                entry["answer"] = answers[name][b]
            if settings.heatmap:
                entry["scores"] = []
                for st in trace.stages:
                    if st.scores is None:
                        continue
                    values = score_values(layout, st.scored[b], st.scores[b])
                    removed = torch.isfinite(values) & ~torch.isin(layout.positions, torch.as_tensor(st.kept[b]))
                    scorer = plan.stages[st.stage].spec.scorer
                    lo, hi = _finite_range(values)
                    rows[b].append(
                        Panel(
                            layout,
                            pictures[b],
                            scores=values,
                            removed=removed,
                            title=f"{name}: L{st.layer} {scorer.name if scorer else ''} scores",
                            subtitle=f"{int(torch.isfinite(values).sum())} scored, {st.visual_after[b]} kept; "
                            f"{_fmt(lo)} .. {_fmt(hi)}",
                            lines=lines(b, name),
                        )
                    )
                    entry["scores"].append({"stage": st.stage, "layer": st.layer, "min": lo, "max": hi})
            entries.append(entry)
        record["plans"][name] = entries
    if len({len(r) for r in rows}) != 1:  # pragma: no cover - every sample of a stage is scored
        raise ValueError(f"visualize: rows of unequal length {[len(r) for r in rows]}")
    figure = VizFigure(rows, settings.panel_size, settings.header, settings.dim, settings.cmap)
    record["figure_size"] = list(figure.size)
    return figure, record


def _all_cells(layout: TokenLayout) -> list[list[int]]:
    return torch.stack([layout.panel, layout.row, layout.col], -1).tolist()
