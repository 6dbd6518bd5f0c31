"""Image grids on disk, optionally labelled: a title strip above the grid, a label above each column and left of
each row, drawn with PIL (no matplotlib here). A labelled PNG records where its bare grid sits (text chunk
GRID_BOX), so a reader can cut the labels off again (bare_grid)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

PADDING = 1  # pixels of white between and around the images
GRID_BOX = "grid_box"  # PNG text chunk of a labelled grid: "left,top" of the bare grid in the picture
MARGIN = 3  # pixels of white around each text


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, title: str = "",
              row_labels: Sequence[str] = (), column_labels: Sequence[str] = ()) -> Path:
    """Save float images in [0, 1] (N, C, H, W) as one PNG grid, `nrow` images a row; with a `title` above it
    (wrapped to the grid's width), a label above each column and left of each row (as many as the grid has)."""
    from torchvision.utils import make_grid  # here: torchvision costs every process that imports the engine 1.4 s

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = images.detach().float().clamp(0, 1).cpu()
    nrow = nrow or max(1, int(math.sqrt(len(images))))
    grid = make_grid(images, nrow=nrow, padding=PADDING, pad_value=1.0)
    from PIL import Image

    picture = Image.fromarray(grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy())
    if not (title or row_labels or column_labels):
        picture.save(path)
        return path
    columns, rows = min(nrow, len(images)), math.ceil(len(images) / nrow)
    cell = (images.shape[-1] + PADDING, images.shape[-2] + PADDING)
    labelled, box = _labelled(picture, cell, title, list(row_labels)[:rows], list(column_labels)[:columns])
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(GRID_BOX, f"{box[0]},{box[1]}")
    labelled.save(path, pnginfo=info)
    return path


def bare_grid(path: str | Path) -> np.ndarray:
    """The RGB pixels (H, W, 3, uint8) of a grid that save_grid wrote, without its labels."""
    from PIL import Image

    with Image.open(path) as im:
        left, top = (int(v) for v in im.text.get(GRID_BOX, "0,0").split(","))
        return np.asarray(im.convert("RGB"))[top:, left:]


def _font(cell_height: int):
    from PIL import ImageFont

    size = max(10, min(16, cell_height // 3))  # readable beside 28-64-pixel images
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _labelled(picture, cell: tuple[int, int], title: str, row_labels: list[str], column_labels: list[str]):
    """The picture on a white canvas with the labels around it, and (left, top) of the picture there."""
    from PIL import Image, ImageDraw

    font = _font(cell[1])
    draw = ImageDraw.Draw(picture)  # only measures text here
    line_height = max(draw.textbbox((0, 0), "Ag-", font=font)[3], 1) + 2
    left = max((draw.textlength(s, font=font) for s in row_labels), default=0)
    left = math.ceil(left) + 2 * MARGIN if row_labels else 0
    lines = _wrap(title, picture.width + left - 2 * MARGIN, draw, font)
    top = (len(lines) + bool(column_labels)) * line_height + (MARGIN if lines or column_labels else 0)
    canvas = Image.new("RGB", (picture.width + left, picture.height + top), "white")
    canvas.paste(picture, (left, top))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((MARGIN, MARGIN + i * line_height), line, fill="black", font=font)
    y = MARGIN + len(lines) * line_height
    for j, label in enumerate(column_labels):
        centre = left + PADDING + j * cell[0] + (cell[0] - PADDING) / 2
        draw.text((centre - draw.textlength(label, font=font) / 2, y), label, fill="black", font=font)
    for i, label in enumerate(row_labels):
        centre = top + PADDING + i * cell[1] + (cell[1] - PADDING) / 2
        draw.text((left - MARGIN - draw.textlength(label, font=font), centre - line_height / 2), label,
                  fill="black", font=font)
    return canvas, (left, top)


def _wrap(text: str, width: float, draw, font) -> list[str]:
    """The text's words in lines no wider than `width` pixels (a longer word gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines
