"""Pictures of what the method did: fusion-map strips and contact sheets (PIL only)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

ID_COLOUR = (255, 140, 0)  # where the ID line (person 1's) won
SEMANTIC_COLOUR = (30, 60, 120)  # where the semantic line won
#: line j's colour is LINE_COLOURS[j]: the semantic line, then one per person
LINE_COLOURS = (SEMANTIC_COLOUR, ID_COLOUR, (40, 200, 90), (220, 50, 160), (240, 230, 60))
LABEL_HEIGHT = 14


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str) -> None:
    draw.text(xy, text, fill=(255, 255, 255))


def line_colour(line: int) -> tuple[int, int, int]:
    """The colour of line ``line`` (0 semantic, j person j); cycles after the fourth person."""
    return LINE_COLOURS[0] if line == 0 else LINE_COLOURS[1 + (line - 1) % (len(LINE_COLOURS) - 1)]


def fusion_map_image(winners, cell: int = 96) -> Image.Image:
    """One decision map (h, w) as a colour image ``cell`` pixels wide: bools (ID line won)
    or ints (which line won: 0 semantic, j person j), one colour per line."""
    lines = np.asarray(winners).astype(np.int64)
    palette = np.array([line_colour(j) for j in range(int(lines.max(initial=0)) + 1)], np.uint8)
    rgb = palette[lines]
    height = max(1, round(cell * lines.shape[0] / lines.shape[1]))
    return Image.fromarray(rgb).resize((cell, height), Image.NEAREST)


def _draw_regions(picture: Image.Image, regions: Sequence | None, sample: int = 0) -> None:
    """Each person's region outlined in its line's colour (the box around its cells);
    a region is (N, h, w), one per image (``result.regions``), or one (h, w) for all."""
    draw = ImageDraw.Draw(picture)
    for person, region in enumerate(regions or [], start=1):
        if region is None:
            continue
        mask = np.asarray(region, dtype=bool)
        mask = mask[sample] if mask.ndim == 3 else mask
        rows, cols = np.nonzero(mask)
        if rows.size == 0:
            continue
        sy, sx = picture.height / mask.shape[0], picture.width / mask.shape[1]
        draw.rectangle([cols.min() * sx, rows.min() * sy, (cols.max() + 1) * sx - 1,
                        (rows.max() + 1) * sy - 1], outline=line_colour(person), width=2)


def render_fusion_strip(fusion_maps, steps: Sequence[int] | None = None, sample: int = 0,
                        cell: int = 96, max_cells: int = 12, image: Image.Image | None = None,
                        regions: Sequence | None = None) -> Image.Image:
    """A strip of where the ID line won (orange) vs the semantic line (blue), step by step.

    fusion_maps: (S, N, 1, h, w) from ``return_fusion_maps=True``: ``result.fusion_maps``
    (bool) or, for several people, ``result.fusion_lines`` (int: one colour per person).
    steps: their step indices (labels). At most ``max_cells`` evenly spaced steps are shown;
    with ``image`` the final picture is added at the right for comparison; ``regions``
    (``result.regions``) outlines each person's region in its colour.
    """
    maps = np.asarray(fusion_maps.cpu() if hasattr(fusion_maps, "cpu") else fusion_maps)
    if maps.ndim != 5 or maps.shape[0] == 0:
        raise ValueError("fusion_maps must be a non-empty (S, N, 1, h, w) array; call the wrapped "
                         "pipeline with return_fusion_maps=True")
    steps = list(steps) if steps is not None else list(range(maps.shape[0]))
    picks = np.unique(np.linspace(0, maps.shape[0] - 1, min(max_cells, maps.shape[0])).round()
                      .astype(int))
    cells = [fusion_map_image(maps[k, sample, 0], cell) for k in picks]
    for picture in cells:
        _draw_regions(picture, regions, sample)
    labels = [f"step {steps[k]}: {(maps[k, sample] > 0).mean():.0%} ID" for k in picks]
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
