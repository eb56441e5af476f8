"""The report pictures, drawn with PIL (matplotlib is not a dependency): labelled image grids and bar charts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cinedit.runtime.files import atomic_path

BG, FG, GRID = (255, 255, 255), (20, 20, 20), (200, 200, 200)


def font(size: int = 14) -> ImageFont.ImageFont:
    """PIL's bundled scalable font (no font files needed on the machine)."""
    return ImageFont.load_default(size=size)


def save_png(image: Image.Image, path: Path) -> Path:
    """Write a PNG atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def error_map(err: np.ndarray, gain: float = 4.0) -> np.ndarray:
    """Absolute error (..., H, W) in [0, 1] -> uint8 RGB (..., H, W, 3) on a black-red-yellow-white scale."""
    e = np.clip(err * gain, 0.0, 1.0)
    rgb = np.stack([np.clip(3 * e, 0, 1), np.clip(3 * e - 1, 0, 1), np.clip(3 * e - 2, 0, 1)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def image_grid(
    rows: list[tuple[str, list[np.ndarray]]], title: str, cell_height: int = 160, label_width: int = 130
) -> Image.Image:
    """Rows of uint8 (H, W, 3) images, each row labelled on the left, under a title line.

    Images are scaled to `cell_height` (nearest-neighbour when enlarging, so pixels stay visible).
    """
    f, pad = font(14), 4
    h0, w0 = rows[0][1][0].shape[:2]
    cw = max(1, round(w0 * cell_height / h0))
    ncol = max(len(imgs) for _, imgs in rows)
    width = max(label_width + ncol * (cw + pad), round(f.getlength(title)) + 2 * pad)
    height = 24 + len(rows) * (cell_height + pad)
    canvas = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 4), title, fill=FG, font=f)
    for r, (label, imgs) in enumerate(rows):
        y = 24 + r * (cell_height + pad)
        draw.text((pad, y + cell_height // 2 - 8), label, fill=FG, font=f)
        for c, img in enumerate(imgs):
            im = Image.fromarray(img)
            resample = Image.Resampling.NEAREST if cell_height >= im.height else Image.Resampling.LANCZOS
            canvas.paste(im.resize((cw, cell_height), resample), (label_width + c * (cw + pad), y))
    return canvas


def stack(images: list[Image.Image], gap: int = 12) -> Image.Image:
    """Images one under the other on a white canvas."""
    width = max(im.width for im in images)
    out = Image.new("RGB", (width, sum(im.height for im in images) + gap * (len(images) - 1)), BG)
    y = 0
    for im in images:
        out.paste(im, (0, y))
        y += im.height + gap
    return out


def bar_chart(
    bars: list[tuple[str, float | None, tuple[int, int, int]]],
    title: str,
    note: str = "",
    vmax: float = 100.0,
    bar_width: int = 420,
) -> Image.Image:
    """Horizontal bars (label, value or None for missing, colour) on a 0..vmax axis with gridlines every 20%."""
    f, small = font(14), font(12)
    label_w, row_h, top = 200, 22, 48
    width, height = label_w + bar_width + 90, top + row_h * len(bars) + 36
    canvas = Image.new("RGB", (width, height), BG)
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), title, fill=FG, font=f)
    if note:
        draw.text((8, 26), note, fill=(90, 90, 90), font=small)
    x0, bottom = label_w, top + row_h * len(bars)
    for k in range(6):
        x = x0 + round(bar_width * k / 5)
        draw.line([(x, top - 4), (x, bottom)], fill=GRID)
        draw.text((x - 8, bottom + 4), f"{vmax * k / 5:g}", fill=FG, font=small)
    for i, (label, value, colour) in enumerate(bars):
        y = top + i * row_h
        draw.text((8, y + 3), label, fill=FG, font=small)
        if value is None:
            draw.text((x0 + 4, y + 3), "missing", fill=(150, 150, 150), font=small)
            continue
        frac = min(max(value / vmax, 0.0), 1.0)
        draw.rectangle([x0, y + 3, x0 + max(1, round(bar_width * frac)), y + row_h - 3], fill=colour)
        draw.text((x0 + round(bar_width * frac) + 4, y + 3), f"{value:.2f}", fill=FG, font=small)
    return canvas
