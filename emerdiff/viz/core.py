"""The house style: palettes, overlays, image helpers, axis names, the grid and footer every figure
shares, and the writers of figures and their JSON sidecars."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from emerdiff.files import write_atomic_bytes


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


# A label colouring over a photo: at 0.5 and more the colours hid the photo (issue 29); at 0.35 the
# image shows through and neighbouring segments still differ in hue.
OVERLAY_ALPHA = 0.35


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Blend a label colouring over an image. image: (H, W, 3) float [0, 1] or uint8; -> float [0, 1]."""
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


# =========================================================================== figures
# Everything below draws with matplotlib (imported lazily so `import emerdiff.viz`
# stays cheap for the CLI). Every figure function returns the Figure and stamps
# the model it was made with in a footer, so a PNG never loses its provenance.

STYLE: dict[str, Any] = {
    "figure.dpi": 100,
    "savefig.dpi": 120,
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "figure.titlesize": 11,
    "image.interpolation": "nearest",
}
HEATMAP_CMAP = "magma"  # difference maps: dark = untouched, bright = changed by the perturbation


# What a column of the probes' and the evaluation's rows means, for axis labels, legend titles and
# colour bars: a figure never names an axis by a raw key such as "miou" or "short" (issue 29).
# mIoU in these tables is the probes' score (evaluation.metrics.score_labels: one-to-one Hungarian
# matching of segments to classes within each image).
AXIS_NAMES: dict[str, str] = {
    "short": "attention layer (block.attention.kind)",
    "layer": "attention layer",
    "kind": "attention kind",
    "image": "image",
    "miou": "mIoU, per-image Hungarian (%)",
    "boundary": "boundary alignment (1 = chance)",
    "silhouette": "silhouette of the k-means (cosine)",
    "locality": "locality (share of the change inside the mask)",
    "energy": "energy of the difference maps (mean d²)",
    "vanished": "vanished segments (share winning no pixel)",
    "saturated": "saturated pixels (share outside [0, 1])",
    "symmetry": "symmetry of ±λ (1: linear)",
    "setting_agreement": "tokens keeping their segment (share)",
    "feature_timestep": "feature timestep t_f",
    "modulation_timestep": "modulation timestep t_m",
    "readout_steps": "denoising steps after the modulation",
    "lambda": "modulation strength λ",
    "modulation_strength": "modulation strength λ",
    "K": "number of segments K",
    "score": "score",
    "method": "method",
    "mode": "readout",
    "stage": "stage of the readout",
    "region": "region of the image",
    "share": "share of the region's pixels",
    "outcome": "outcome",
    "setting": "readout setting",
    "accuracy": "pixel accuracy, majority mapping (share)",
}


def axis_name(key: str, score: str | None = None) -> str:
    """The words for a column ``key`` (:data:`AXIS_NAMES`); ``score`` names the metric behind a
    generic "score" column (e.g. ``axis_name("score", "miou")``). An unknown key is spelt out
    (underscores to spaces) and marked as a column, so it never passes for a described axis."""
    if key == "score" and score is not None:
        return AXIS_NAMES.get(score, score)
    if key in AXIS_NAMES:
        return AXIS_NAMES[key]
    return f"{key.replace('_', ' ')} (column)"


def declutter_xticks(ax: Any, size: float = 7.0) -> None:
    """Rotate (then shrink) an axis' x tick labels until no two of their drawn boxes overlap."""
    fig = ax.figure
    for rotation, fontsize in ((0, None), (45, None), (90, None), (90, size), (90, size * 0.8)):
        for t in ax.get_xticklabels():
            t.set_rotation(rotation)
            t.set_ha("right" if rotation == 45 else "center")
            t.set_rotation_mode("anchor" if rotation == 45 else "default")
            if fontsize is not None:
                t.set_fontsize(fontsize)
        fig.draw_without_rendering()
        r = fig.canvas.get_renderer()
        boxes = [t.get_window_extent(r) for t in ax.get_xticklabels() if t.get_visible() and t.get_text()]
        if not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]):
            return


def set_style() -> None:
    """Apply the house style (call once per notebook; figure functions do not depend on it)."""
    import matplotlib as mpl

    mpl.rcParams.update(STYLE)


def to_uint8(image: Any) -> np.ndarray:
    """(H, W, 3) uint8 from a uint8 array, a float array in [0, 1], or a (3, H, W) tensor/array."""
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.dtype == np.uint8:
        return arr
    return (np.clip(arr.astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)


def resize_image(image: Any, size: tuple[int, int]) -> np.ndarray:
    """Resize an image (any form :func:`to_uint8` takes) to (H, W) bilinearly -> uint8."""
    arr = to_uint8(image)
    if arr.shape[:2] == tuple(size):
        return arr
    return np.asarray(Image.fromarray(arr).resize((size[1], size[0]), Image.BILINEAR))


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Boolean boundary pixels of a boolean mask (4-neighbourhood)."""
    m = np.asarray(mask, bool)
    edge = np.zeros_like(m)
    edge[:-1] |= m[:-1] != m[1:]
    edge[1:] |= m[:-1] != m[1:]
    edge[:, :-1] |= m[:, :-1] != m[:, 1:]
    edge[:, 1:] |= m[:, :-1] != m[:, 1:]
    return edge & m


def highlight_mask(image: Any, mask: np.ndarray, color: Sequence[int] = (255, 255, 0), dim: float = 0.45) -> np.ndarray:
    """Image with everything outside ``mask`` dimmed and the mask outlined (uint8).

    ``mask`` may be coarser than the image (a low-res segment); it is upsampled nearest.
    """
    img = to_uint8(image).astype(np.float32)
    m = np.asarray(mask, bool)
    if m.shape != img.shape[:2]:
        from emerdiff.sd.images import resize_labels

        m = resize_labels(m.astype(np.int64), img.shape[:2]).astype(bool)
    out = np.where(m[..., None], img, img * dim)
    edge = mask_outline(m)
    # thicken the outline to stay visible at figure size
    thick = edge.copy()
    thick[1:] |= edge[:-1]
    thick[:, 1:] |= edge[:, :-1]
    out[thick] = np.asarray(color, np.float32)
    return out.clip(0, 255).astype(np.uint8)


FOOTER_PT = 7  # the footer's font size


def stamp_model(fig: Any, model: str, note: str = "") -> None:
    """Footer naming the model (and an optional note) at the bottom-left of a figure."""
    text = f"model: {model}" + (f"  ·  {note}" if note else "")
    fig.text(0.005, 0.005, text, ha="left", va="bottom", fontsize=FOOTER_PT, color="0.35")


def _axes_grid(rows: int, cols: int, cell: float = 2.2, title: str | None = None) -> tuple[Any, np.ndarray]:
    import matplotlib.pyplot as plt

    # "compressed": constrained layout for fixed-aspect images; it leaves room for the suptitle,
    # the column titles and the axis labels, which tight_layout let overlap the row above
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols, cell * rows + (0.5 if title else 0.2)),
                             squeeze=False, layout="compressed")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    return fig, axes


def _content_extent(fig: Any) -> tuple[float, float]:
    """(bottom, top) in pixels of everything drawn but the footer: every visible axes with its
    titles, labels and ticks, and the suptitle."""
    fig.draw_without_rendering()
    r = fig.canvas.get_renderer()
    boxes = [ax.get_tightbbox(r) for ax in fig.axes if ax.get_visible()]
    if fig._suptitle is not None and fig._suptitle.get_text():
        boxes.append(fig._suptitle.get_window_extent(r))
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return 0.0, float(fig.bbox.height)
    return min(b.y0 for b in boxes), max(b.y1 for b in boxes)


def _footer_strip(fig: Any) -> float:
    """The figure fraction the footer needs at the bottom: its line and a gap, at least 3 %."""
    return max(0.03, (0.005 * fig.bbox.height + 2.2 * FOOTER_PT * fig.dpi / 72) / fig.bbox.height)


def _fit_height(fig: Any, pad_px: float = 6.0) -> None:
    """Shrink a fixed-aspect (compressed layout) figure's height to its content: a grid of images
    whose width limits their size otherwise leaves empty bands above and below (issue 29). The
    footer keeps its strip at every height."""
    engine = fig.get_layout_engine()
    for _ in range(4):  # each pass re-runs the layout at the new height; two usually settle it
        strip = _footer_strip(fig)
        engine.set(rect=(0, strip, 1, 1 - 0.03))
        bottom, top = _content_extent(fig)
        height = fig.bbox.height
        excess = (height - top) + (bottom - strip * height) - 2 * pad_px
        if excess < 2:
            break
        w, h = fig.get_size_inches()
        fig.set_size_inches(w, max(h - excess / fig.dpi, 1.0))
    engine.set(rect=(0, _footer_strip(fig), 1, 1 - 0.03))


def _finish(fig: Any, model: str, note: str = "") -> Any:
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    engine = fig.get_layout_engine()
    if not isinstance(engine, ConstrainedLayoutEngine):  # none yet, or tight_layout's placeholder
        fig.tight_layout(rect=(0, 0.03, 1, 1))
    else:  # constrained/compressed: keep the footer's strip free, and no empty band
        _fit_height(fig)  # (a layout whose axes fill the figure has no excess: its height stays)
    stamp_model(fig, model, note)
    return fig


def show(ax: Any, image: Any, title: str | None = None, **kw: Any) -> Any:
    """imshow without ticks; returns the AxesImage."""
    im = ax.imshow(image, **kw)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    return im


# ------------------------------------------------------------------ output
def save_figure(fig: Any, out_dir: str | os.PathLike, name: str, formats: Iterable[str] = ("png", "pdf")) -> list[Path]:
    """Write ``fig`` as ``out_dir/name.<fmt>`` for every format; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out / f"{name}.{fmt}"
        fig.savefig(path, bbox_inches="tight")
        paths.append(path)
    return paths


def _jsonable(value: Any) -> Any:
    """NaN/inf -> None, numpy scalars/arrays -> Python, recursively (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (Path,)):
        return str(value)
    return value


def write_sidecar(out_dir: str | os.PathLike, name: str, data: Mapping[str, Any]) -> Path:
    """Write key numbers as strict JSON ``out_dir/name.json`` (NaN becomes null)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    write_atomic_bytes(path, json.dumps(_jsonable(data), indent=2, allow_nan=False).encode())
    return path


class FigureWriter:
    """Saves a notebook's figures (PNG + PDF) into one folder and writes its JSON sidecar.

    ``FigureWriter(out_dir, model).save(fig, "fig1_teaser")`` stamps nothing
    itself (the figure functions do) but remembers every name, so the sidecar
    lists exactly the figures that were written.
    """

    def __init__(self, out_dir: str | os.PathLike, model: str, formats: Sequence[str] = ("png", "pdf")) -> None:
        self.out_dir = Path(out_dir)
        self.model = model
        self.formats = tuple(formats)
        self.figures: list[str] = []
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def save(self, fig: Any, name: str) -> list[Path]:
        paths = save_figure(fig, self.out_dir, name, self.formats)
        if name not in self.figures:
            self.figures.append(name)
        return paths

    def sidecar(self, name: str, data: Mapping[str, Any]) -> Path:
        """``out_dir/name.json`` with ``model`` and ``figures`` added to ``data``."""
        return write_sidecar(self.out_dir, name, {"model": self.model, "figures": list(self.figures), **data})


