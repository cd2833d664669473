"""Palettes, overlays and the paper-style figure functions (one style for every figure)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def palette(n: int = 256, seed: int = 3) -> np.ndarray:
    """(n, 3) uint8 colours: a fixed qualitative start, then well-spread random hues."""
    base = np.array([
        [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
        [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
        [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0],
        [170, 255, 195], [128, 128, 0], [255, 215, 180], [0, 0, 128], [128, 128, 128],
    ], dtype=np.uint8)
    if n <= len(base):
        return base[:n].copy()
    rng = np.random.default_rng(seed)
    extra = rng.integers(30, 256, size=(n - len(base), 3), dtype=np.int64).astype(np.uint8)
    return np.concatenate([base, extra])


def colorize(labels: np.ndarray) -> np.ndarray:
    """(H, W) int labels -> (H, W, 3) uint8 colours."""
    labels = np.asarray(labels)
    pal = palette(max(int(labels.max(initial=0)) + 1, 1))
    return pal[labels.clip(0)]


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a label colouring over an image. image: (H, W, 3) float [0, 1] or uint8."""
    img = np.asarray(image)
    img = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else img.astype(np.float32)
    col = colorize(labels).astype(np.float32) / 255.0
    return ((1 - alpha) * img + alpha * col).clip(0, 1)


def label_png(labels: np.ndarray) -> Image.Image:
    """Indexed-palette PIL image of a label map (pixel value = label)."""
    labels = np.asarray(labels)
    if labels.max(initial=0) > 255:
        raise ValueError("indexed PNGs hold at most 256 labels")
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(palette(256).reshape(-1).tolist())
    return img
