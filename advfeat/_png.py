"""Image grids as PNG files, with no imaging library: zlib + a 3x5 digit font for the labels."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch
from torch import Tensor

from ._io import atomic_write

__all__ = ["save_grid", "save_scatter"]

_DIGITS = [  # 3 x 5 glyphs, rows top to bottom, 3 bits each
    "111101101101111", "010110010010111", "111001111100111", "111001111001111", "101101111001001",
    "111100111001111", "111100111101111", "111001001001001", "111101111101111", "111101111001111",
]


def _glyph(d: int) -> Tensor:
    return torch.tensor([int(c) for c in _DIGITS[d]], dtype=torch.float32).reshape(5, 3)


def _label(value: int, width: int) -> Tensor:
    """A (7, width) white strip with ``value`` in black digits, scaled to fit."""
    strip = torch.ones(7, width)
    x = 1
    for ch in str(value):
        if x + 3 > width:
            break
        strip[1:6, x:x + 3] = 1 - _glyph(int(ch))
        x += 4
    return strip


def save_grid(path: str | Path, images: Tensor, labels: Tensor | None = None, per_row: int = 10,
              scale: int = 2) -> None:
    """Write ``images`` (N, C, H, W) in [0, 1] as one PNG grid, each with its label drawn under it."""
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {c}")
    rows = (n + per_row - 1) // per_row
    cell_h = h + (7 if labels is not None else 0) + 2
    cell_w = max(w, 12) + 2
    canvas = torch.ones(3, rows * cell_h, per_row * cell_w)
    for i in range(n):
        r, k = divmod(i, per_row)
        top, left = r * cell_h + 1, k * cell_w + 1
        canvas[:, top:top + h, left:left + w] = images[i].float().clamp(0, 1).expand(3, h, w)
        if labels is not None:
            canvas[:, top + h:top + h + 7, left:left + cell_w - 2] = _label(int(labels[i]), cell_w - 2)
    _write(path, canvas, scale)


def _write(path: str | Path, canvas: Tensor, scale: int) -> None:
    canvas = canvas.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    pixels = (canvas * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    height, width = pixels.shape[:2]
    raw = b"".join(b"\x00" + pixels[y].numpy().tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    atomic_write(path, lambda f: f.write(png))


def save_scatter(path: str | Path, xs: list[float], ys: list[float], size: int = 160, scale: int = 2) -> None:
    """A scatter plot of points in [0, 1]^2 (x right, y up) with axes; point i is marked by the digit i + 1."""
    pad = 12
    canvas = torch.ones(3, size + 2 * pad, size + 2 * pad)
    canvas[:, pad:pad + size + 1, pad] = 0  # y axis
    canvas[:, pad + size, pad:pad + size + 1] = 0  # x axis
    for t in range(0, 11):  # ticks every 0.1
        p = pad + round(t * size / 10)
        canvas[:, pad + size:pad + size + 3, p] = 0
        canvas[:, pad + size - p + pad, pad - 3:pad] = 0
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if x != x or y != y:  # NaN
            continue
        cx = pad + round(min(max(x, 0.0), 1.0) * size)
        cy = pad + size - round(min(max(y, 0.0), 1.0) * size)
        canvas[:, max(0, cy - 2):cy + 3, max(0, cx - 2):cx + 3] = torch.tensor([0.8, 0.1, 0.1])[:, None, None]
        label = 1 - _glyph((i + 1) % 10)
        top, left = max(0, cy - 8), min(canvas.shape[2] - 3, cx + 3)
        canvas[:, top:top + 5, left:left + 3] = torch.minimum(canvas[:, top:top + 5, left:left + 3], label)
    _write(path, canvas, scale)
