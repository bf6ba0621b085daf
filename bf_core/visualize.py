"""Pictures of what the method did: fusion-map strips and contact sheets (PIL only)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

ID_COLOUR = (255, 140, 0)  # where the ID line won
SEMANTIC_COLOUR = (30, 60, 120)  # where the semantic line won
LABEL_HEIGHT = 14


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str) -> None:
    draw.text(xy, text, fill=(255, 255, 255))


def fusion_map_image(id_wins, cell: int = 96) -> Image.Image:
    """One decision map (h, w) of bools as a colour image ``cell`` pixels wide."""
    mask = np.asarray(id_wins, dtype=bool)
    rgb = np.where(mask[..., None], np.array(ID_COLOUR, np.uint8), np.array(SEMANTIC_COLOUR, np.uint8))
    height = max(1, round(cell * mask.shape[0] / mask.shape[1]))
    return Image.fromarray(rgb.astype(np.uint8)).resize((cell, height), Image.NEAREST)


def render_fusion_strip(fusion_maps, steps: Sequence[int] | None = None, sample: int = 0,
                        cell: int = 96, max_cells: int = 12, image: Image.Image | None = None
                        ) -> Image.Image:
    """A strip of where the ID line won (orange) vs the semantic line (blue), step by step.

    fusion_maps: (S, N, 1, h, w) bool tensor or array from ``return_fusion_maps=True``.
    steps: their step indices (labels). At most ``max_cells`` evenly spaced steps are shown;
    with ``image`` the final picture is added at the right for comparison.
    """
    maps = np.asarray(fusion_maps.cpu() if hasattr(fusion_maps, "cpu") else fusion_maps)
    if maps.ndim != 5 or maps.shape[0] == 0:
        raise ValueError("fusion_maps must be a non-empty (S, N, 1, h, w) array; call the wrapped "
                         "pipeline with return_fusion_maps=True")
    steps = list(steps) if steps is not None else list(range(maps.shape[0]))
    picks = np.unique(np.linspace(0, maps.shape[0] - 1, min(max_cells, maps.shape[0])).round()
                      .astype(int))
    cells = [fusion_map_image(maps[k, sample, 0], cell) for k in picks]
    labels = [f"step {steps[k]}: {maps[k, sample].mean():.0%} ID" for k in picks]
    if image is not None:
        cells.append(image.convert("RGB").resize((cell, cells[0].height)))
        labels.append("result")
    strip = Image.new("RGB", (cell * len(cells), cells[0].height + LABEL_HEIGHT), (0, 0, 0))
    draw = ImageDraw.Draw(strip)
    for index, (picture, text) in enumerate(zip(cells, labels, strict=True)):
        strip.paste(picture, (index * cell, LABEL_HEIGHT))
        _label(draw, (index * cell + 2, 1), text)
    return strip


def contact_sheet(images: Sequence[Image.Image], labels: Sequence[str] | None = None,
                  columns: int = 4, cell: int = 256) -> Image.Image:
    """Images in a grid, each scaled to ``cell`` pixels wide, with an optional label above."""
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    labels = list(labels) if labels is not None else [""] * len(images)
    rows = (len(images) + columns - 1) // columns
    heights = [round(cell * im.height / im.width) for im in images]
    row_height = max(heights) + LABEL_HEIGHT
    sheet = Image.new("RGB", (cell * min(columns, len(images)), row_height * rows), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for index, (picture, text) in enumerate(zip(images, labels, strict=False)):
        x, y = (index % columns) * cell, (index // columns) * row_height
        sheet.paste(picture.convert("RGB").resize((cell, heights[index])), (x, y + LABEL_HEIGHT))
        _label(draw, (x + 2, y + 1), text)
    return sheet
