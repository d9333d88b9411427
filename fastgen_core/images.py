"""Image grids and PNG files without any image library (zlib + struct), so the core needs no
Pillow and no torchvision."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import torch

from .files import atomic_path


def make_grid(images: torch.Tensor, rows: int, pad: int = 2) -> torch.Tensor:
    """[N, C, H, W] in 0..1 -> one [C, H', W'] image, `rows` rows, filled row by row."""
    n, c, h, w = images.shape
    cols = -(-n // rows)
    grid = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad) * 0.5
    for i in range(n):
        r, col = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y : y + h, x : x + w] = images[i]
    return grid


def write_png(path: str, image: torch.Tensor, scale: int = 1):
    """Write a [C, H, W] (C = 1 or 3) image in 0..1 as an 8-bit PNG, optionally upscaled (nearest)."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if scale > 1:
        array = array.repeat(scale, axis=0).repeat(scale, axis=1)
    h, w, c = array.shape
    color_type = {1: 0, 3: 2}[c]
    raw = b"".join(b"\x00" + np.ascontiguousarray(array[y]).tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(png)


SERIES_COLORS = ((0.95, 0.55, 0.15), (0.25, 0.6, 0.95), (0.4, 0.8, 0.4), (0.85, 0.35, 0.75))


def line_chart(series: dict, width: int = 512, height: int = 256, pad: int = 12, shared: bool = False) -> torch.Tensor:
    """A plain line chart of named series ([H, W, 3] in 0..1, ComfyUI's IMAGE layout), each series
    scaled to its own range so losses of different sizes share one plot (or all to one range with
    `shared`, for series to compare); colours by order; non-finite values are left out."""
    finite = [torch.as_tensor(v, dtype=torch.float32) for v in series.values() if len(v) > 1]
    finite = torch.cat([v[torch.isfinite(v)] for v in finite]) if finite else torch.zeros(0)
    image = torch.full((height, width, 3), 0.12)
    image[pad - 1, pad - 1 : width - pad + 1] = image[height - pad, pad - 1 : width - pad + 1] = 0.4
    for index, values in enumerate(v for v in series.values() if len(v) > 1):
        values = torch.as_tensor(values, dtype=torch.float32)
        values = torch.where(torch.isfinite(values), values, torch.nan)
        scale = finite if shared and finite.numel() else values[torch.isfinite(values)]
        if not scale.numel():
            continue
        low, high = scale.min(), scale.max()
        ys = (values - low) / (high - low) if high > low else torch.full_like(values, 0.5)
        xs = torch.linspace(pad, width - pad - 1, len(values))
        rows = (height - pad - 1 - ys * (height - 2 * pad - 1)).round().long()
        colour = torch.tensor(SERIES_COLORS[index % len(SERIES_COLORS)])
        # draw each segment densely so the line is continuous
        for i in range(len(values) - 1):
            if not (torch.isfinite(ys[i]) and torch.isfinite(ys[i + 1])):
                continue
            x0, y0, x1, y1 = float(xs[i]), int(rows[i]), float(xs[i + 1]), int(rows[i + 1])
            n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
            for f in torch.linspace(0, 1, n).tolist():
                image[int(y0 + (y1 - y0) * f), int(x0 + (x1 - x0) * f)] = colour
    return image
