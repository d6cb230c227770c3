"""A layer x expert load heatmap as an image array (no plotting library needed)."""

from __future__ import annotations

import numpy as np
import torch

# A few viridis anchor colours, interpolated: dark = below mean load, yellow = hottest.
_VIRIDIS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)


def _colour(values: np.ndarray) -> np.ndarray:
    """values in [0, 1] -> RGB uint8."""
    position = np.clip(values, 0, 1) * (len(_VIRIDIS) - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, len(_VIRIDIS) - 1)
    frac = (position - low)[..., None]
    return (_VIRIDIS[low] * (1 - frac) + _VIRIDIS[high] * frac).astype(np.uint8)


def load_heatmap(before: torch.Tensor, after: torch.Tensor, cell: int = 12) -> np.ndarray:
    """[L, E] loads before and after -> an RGB image, two panels side by side.

    Each cell shows load / mean load of its layer on one colour scale shared by both panels
    (0 .. the largest ratio), so the panels compare directly.
    """
    def ratio(load: torch.Tensor) -> np.ndarray:
        load = load.double()
        return (load / load.mean(1, keepdim=True).clamp_min(1e-12)).numpy()

    panels = [ratio(before), ratio(after)]
    top = max(float(p.max()) for p in panels) or 1.0
    gap = np.full((before.shape[0] * cell, cell // 2, 3), 255, dtype=np.uint8)
    images = [np.kron(_colour(p / top), np.ones((cell, cell, 1), dtype=np.uint8)) for p in panels]
    return np.concatenate([images[0], gap, images[1]], axis=1)


def write_png(image: np.ndarray, path: str) -> None:
    """Save an RGB uint8 array as PNG (zlib + the PNG chunk format; no imaging library)."""
    import struct
    import zlib

    height, width, _ = image.shape
    raw = b"".join(b"\x00" + image[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
