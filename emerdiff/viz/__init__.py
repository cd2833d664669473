"""Palettes, overlays and the paper-style figure functions (one style for every figure)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from emerdiff.files import write_atomic_bytes
from emerdiff.sd.images import ImageInput, load_image

if TYPE_CHECKING:
    from emerdiff.method.vocabulary import OpenVocabResult


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


def stamp_model(fig: Any, model: str, note: str = "") -> None:
    """Footer naming the model (and an optional note) at the bottom-left of a figure."""
    text = f"model: {model}" + (f"  ·  {note}" if note else "")
    fig.text(0.005, 0.005, text, ha="left", va="bottom", fontsize=7, color="0.35")


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


def _finish(fig: Any, model: str, note: str = "") -> Any:
    engine = fig.get_layout_engine()
    if engine is None:
        fig.tight_layout(rect=(0, 0.03, 1, 1))
    else:  # constrained/compressed: keep the footer's strip free
        engine.set(rect=(0, 0.03, 1, 0.97))
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


# ------------------------------------------------------------------ paper-style figures
def segmentation_panels(image: Any, seg: Any, model: str, gt: np.ndarray | None = None,
                        title: str | None = None) -> Any:
    """One row: image, low-res k-means, nearest, bilinear, EmerDiff (and GT if given).

    ``seg`` is a :class:`emerdiff.Segmentation`; every map is shown as an overlay.
    """
    img = to_uint8(image)
    size = img.shape[:2]
    from emerdiff.sd.images import resize_labels

    panels = [("image", img),
              (f"low-res k-means ({seg.lowres_labels.shape[0]}x{seg.lowres_labels.shape[1]})",
               overlay(img, resize_labels(seg.lowres_labels, size), 0.6)),
              ("nearest upsampling", overlay(img, seg.nearest_labels)),
              ("bilinear upsampling", overlay(img, seg.bilinear_labels)),
              ("EmerDiff", overlay(img, seg.labels))]
    if gt is not None:
        g = np.where(np.asarray(gt) == 255, 0, gt)
        panels.append(("ground truth", overlay(img, g)))
    fig, axes = _axes_grid(1, len(panels), title=title)
    for ax, (name, arr) in zip(axes[0], panels):
        show(ax, arr, name)
    return _finish(fig, model, f"K={seg.num_segments}")


def teaser_grid(images: Sequence[Any], segs: Sequence[Any], model: str, names: Sequence[str] | None = None) -> Any:
    """Paper Fig. 1: pairs of (image, EmerDiff overlay), one column pair per image."""
    n = len(images)
    fig, axes = _axes_grid(2, n, title="EmerDiff: pixel-level segments from a frozen diffusion model")
    for j, (img, seg) in enumerate(zip(images, segs)):
        u = to_uint8(img)
        show(axes[0, j], u, names[j] if names else None)
        show(axes[1, j], overlay(u, seg.labels))
    axes[0, 0].set_ylabel("image")
    axes[1, 0].set_ylabel("EmerDiff")
    return _finish(fig, model)


def key_observation(image: Any, lowres_mask: np.ndarray, plus: Any, minus: Any, difference: np.ndarray,
                    model: str, strength: float | None = None) -> Any:
    """Paper Fig. 2: the perturbed low-res mask, I+, I-, and the difference map ||I- - I+||."""
    size = to_uint8(plus).shape[:2]
    fig, axes = _axes_grid(1, 4, title="Key observation: perturbing one low-res segment changes only its pixels")
    lam = f"{strength:g}" if strength is not None else "λ"
    show(axes[0, 0], highlight_mask(resize_image(image, size), lowres_mask), "image + perturbed mask")
    show(axes[0, 1], to_uint8(plus), f"I+ (+{lam})")
    show(axes[0, 2], to_uint8(minus), f"I- (-{lam})")
    im = show(axes[0, 3], difference, "difference ||I- - I+||", cmap=HEATMAP_CMAP)
    fig.colorbar(im, ax=axes[0, 3], fraction=0.046, pad=0.02)
    return _finish(fig, model)


def upsampling_vs_emerdiff(images: Sequence[Any], segs: Sequence[Any], model: str,
                           gts: Sequence[np.ndarray | None] | None = None,
                           scores: Sequence[Mapping[str, float]] | None = None,
                           names: Sequence[str] | None = None) -> Any:
    """Paper Fig. 4: nearest / bilinear upsampling of the low-res segments vs EmerDiff, per image row."""
    cols = ["image", "low-res", "nearest", "bilinear", "EmerDiff"]
    has_gt = gts is not None and any(g is not None for g in gts)
    if has_gt:
        cols.append("ground truth")
    fig, axes = _axes_grid(len(images), len(cols), title="Naive upsampling vs EmerDiff")
    from emerdiff.sd.images import resize_labels

    for i, (img, seg) in enumerate(zip(images, segs)):
        u = to_uint8(img)
        maps = [u, overlay(u, resize_labels(seg.lowres_labels, u.shape[:2]), 0.6),
                overlay(u, seg.nearest_labels), overlay(u, seg.bilinear_labels), overlay(u, seg.labels)]
        if has_gt:
            g = gts[i] if gts is not None else None
            maps.append(overlay(u, np.where(g == 255, 0, g)) if g is not None else np.ones_like(u) * 255)
        for j, arr in enumerate(maps):
            show(axes[i, j], arr, cols[j] if i == 0 else None)
            # scores under each image (a title on rows > 0 would sit on the image above)
            if scores is not None and scores[i] and cols[j] in ("nearest", "bilinear", "EmerDiff"):
                key = cols[j].lower()
                if key in scores[i] and scores[i][key] is not None and np.isfinite(scores[i][key]):
                    axes[i, j].set_xlabel(f"mIoU {scores[i][key]:.1f}")
        if names is not None:
            axes[i, 0].set_ylabel(names[i])
    return _finish(fig, model)


def heatmap_grid(maps: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str], col_labels: Sequence[str],
                 model: str, title: str, shared_scale: bool = False, cell: float = 1.8) -> Any:
    """A grid of difference-map heat maps (rows x cols), e.g. layer x timestep or lambda x mask."""
    rows, cols = len(maps), max(len(r) for r in maps)
    fig, axes = _axes_grid(rows, cols, cell=cell, title=title)
    vmax = max(float(np.max(m)) for r in maps for m in r) if shared_scale else None
    for i, r in enumerate(maps):
        for j, m in enumerate(r):
            show(axes[i, j], m, col_labels[j] if i == 0 else None, cmap=HEATMAP_CMAP, vmin=0, vmax=vmax)
        axes[i, 0].set_ylabel(row_labels[i], fontsize=7)
    return _finish(fig, model, "shared colour scale" if shared_scale else "per-panel colour scale")


def failure_cases(entries: Sequence[Mapping[str, Any]], model: str) -> Any:
    """Rows of (image + mask, difference map, EmerDiff labels) with a caption naming the failure.

    entries: dicts with keys ``image``, ``mask`` (low-res bool), ``difference``, ``labels``, ``caption``.
    """
    fig, axes = _axes_grid(len(entries), 3, title="Failure cases")
    for i, e in enumerate(entries):
        u = to_uint8(e["image"])
        show(axes[i, 0], highlight_mask(u, e["mask"]), "image + mask" if i == 0 else None)
        show(axes[i, 1], e["difference"], "difference map" if i == 0 else None, cmap=HEATMAP_CMAP)
        show(axes[i, 2], overlay(u, e["labels"]), "EmerDiff" if i == 0 else None)
        axes[i, 0].set_ylabel(e.get("caption", ""), fontsize=7)
    return _finish(fig, model)


# ------------------------------------------------------------------ probe plots
def _seaborn() -> tuple[Any, Any]:
    """pandas and seaborn, which the probe plots need and the core install lacks (the notebooks extra)."""
    try:
        import pandas as pd
        import seaborn as sns
    except ImportError as e:
        raise ImportError(f"the probe plots need seaborn and pandas ({e.name} is missing): "
                          "pip install 'emerdiff[notebooks]'") from e
    return pd, sns


def probe_heatmap(rows: Sequence[Mapping[str, Any]], index: str, columns: str, value: str, model: str,
                  title: str, fmt: str = ".2f", ax: Any = None) -> Any:
    """Seaborn heat map of ``value`` averaged over rows sharing (index, columns)."""
    import matplotlib.pyplot as plt

    pd, sns = _seaborn()

    df = pd.DataFrame(list(rows))
    table = df.pivot_table(index=index, columns=columns, values=value, aggfunc="mean", sort=False)
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * max(table.shape[1], 2), 1.0 + 0.3 * max(table.shape[0], 2)))
    else:
        fig = ax.figure
    sns.heatmap(table, annot=True, fmt=fmt, cmap="viridis", ax=ax, cbar_kws={"label": value})
    ax.set_title(title)
    return _finish(fig, model)


def probe_bars(rows: Sequence[Mapping[str, Any]], x: str, y: str, model: str, title: str,
               hue: str | None = None, rotate: bool = True) -> Any:
    """Seaborn bar plot of ``y`` per ``x`` (mean and spread over the rows sharing x)."""
    import matplotlib.pyplot as plt

    pd, sns = _seaborn()

    df = pd.DataFrame(list(rows))
    n = df[x].nunique()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * n + 2), 3.6))
    sns.barplot(data=df, x=x, y=y, hue=hue, ax=ax, errorbar="sd")
    if rotate:
        ax.tick_params(axis="x", rotation=75, labelsize=6)
    ax.set_title(title)
    return _finish(fig, model)


def sweep_lines(rows: Sequence[Mapping[str, Any]], x: str, ys: Sequence[str], model: str, title: str,
                hue: str | None = None) -> Any:
    """One panel per metric in ``ys``: line of the mean over images/seeds vs ``x`` with a sd band."""
    import matplotlib.pyplot as plt

    pd, sns = _seaborn()

    df = pd.DataFrame(list(rows))
    ys = [y for y in ys if y in df and df[y].notna().any()]
    fig, axes = plt.subplots(1, max(len(ys), 1), figsize=(3.6 * max(len(ys), 1), 3.2), squeeze=False)
    for ax, y in zip(axes[0], ys):
        sns.lineplot(data=df, x=x, y=y, hue=hue, marker="o", errorbar="sd", ax=ax)
        ax.set_title(y)
    fig.suptitle(title)
    return _finish(fig, model)


# ------------------------------------------------------------------ evaluation
def _finite(x: Any) -> bool:
    return x is not None and math.isfinite(x)


def _xerr(v: Mapping[str, Any]) -> list[list[float]] | None:
    """matplotlib's asymmetric error of an interval dict (None without an interval)."""
    if not (_finite(v["lo"]) and _finite(v["hi"])):
        return None
    return [[v["value"] - v["lo"]], [v["hi"] - v["value"]]]


def comparison_figure(comparison: Mapping[str, Any], model: str, names: Sequence[str] = ("A", "B"),
                      protocols: Sequence[str] | None = None, note: str = "") -> Any:
    """Two evaluation runs side by side: mIoU of A and B and their difference, with intervals.

    ``comparison`` is what :func:`emerdiff.evaluation.compare.compare_runs` returns (``emerdiff compare
    --json``; NaN or None bounds both mean "no interval"). One column per protocol. Top row: one
    horizontal bar per method and run (A blue, B orange), its error bar the run's interval.
    Bottom row: A - B per method both runs have, a dot with its paired interval, black where the
    interval excludes 0. A method missing from one run has no bar there.

    Args:
        comparison: ``{"rows": [{"protocol", "method", "a", "b", "a-b"}, ...], "shared_images",
            "bootstrap": {"level", ...}}``; each of a, b, a-b ``{"value", "lo", "hi"}`` or None.
        model: the model named in the footer.
        names: what A and B are (legend and title).
        protocols: the columns, in order (default: every protocol of the rows).
        note: appended to the footer (e.g. which scenes).
    """
    import matplotlib.pyplot as plt

    if len(names) != 2:
        raise ValueError(f"names: give two names, one for run A and one for run B; got {list(names)}")
    held = list(dict.fromkeys(r["protocol"] for r in comparison["rows"]))
    protocols = held if protocols is None else list(protocols)
    missing = [p for p in protocols if p not in held]
    if missing or not protocols:
        raise ValueError(f"the comparison has no rows for protocol(s) {missing or protocols}; it holds {held}")
    rows = {(r["protocol"], r["method"]): r for r in comparison["rows"] if r["protocol"] in protocols}
    methods = list(dict.fromkeys(m for _, m in rows))
    # the same rows in every bottom panel (their y axes are shared): methods with a difference anywhere
    both = [m for m in methods if any(rows.get((p, m), {}).get("a-b") is not None for p in protocols)]
    fig, axes = plt.subplots(2, len(protocols), figsize=(3.8 * len(protocols), 6.2), sharey="row", squeeze=False)
    for j, protocol in enumerate(protocols):
        top, bottom = axes[0, j], axes[1, j]
        for k, (side, color) in enumerate((("a", "tab:blue"), ("b", "tab:orange"))):
            labelled = False
            for i, method in enumerate(methods):
                v = rows.get((protocol, method), {}).get(side)
                if v is None or not _finite(v["value"]):
                    continue
                top.barh(i + (k - 0.5) * 0.35, v["value"], height=0.33, color=color, xerr=_xerr(v), capsize=2,
                         label=None if labelled else f"{side.upper()}: {names[k]}")
                labelled = True
        for y, method in enumerate(both):
            d = rows.get((protocol, method), {}).get("a-b")
            if d is None or not _finite(d["value"]):
                continue
            excludes0 = _xerr(d) is not None and (d["lo"] > 0 or d["hi"] < 0)
            bottom.errorbar(d["value"], y, xerr=_xerr(d), fmt="o", color="black" if excludes0 else "grey", capsize=3)
        bottom.axvline(0, color="grey", linewidth=0.8, linestyle="--")
        bottom.set_yticks(range(len(both)), both)
        top.set_yticks(range(len(methods)), methods)
        top.set_title(protocol.replace("_", " "))
        top.set_xlabel("mIoU (%)")
        bottom.set_xlabel("A - B (mIoU points)")
    for ax in axes[:, 0]:  # the first method on top; once per row: the row shares its y axis, and
        ax.invert_yaxis()  # inverting every panel flips it back for an even number of protocols
    handles = {label: h for ax in axes[0] for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(list(handles.values()), list(handles), loc="lower right", ncol=2, fontsize=8)
    boot = comparison.get("bootstrap") or {}
    spread = (f"{round(boot.get('level', 0.95) * 100)} % paired bootstrap intervals"
              if boot.get("resamples", 1) else "no intervals (0 resamples)")
    fig.suptitle(f"A = {names[0]} vs B = {names[1]}: {comparison['shared_images']} shared images, {spread}")
    stamp_model(fig, model, note)
    fig.tight_layout(rect=(0, 0.05, 1, 1))  # the bottom strip: footer and legend
    return fig


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


def legend_figure(image: ImageInput, result: OpenVocabResult, title: str = "", caveat: str = "") -> Any:
    """Image beside its class map, with a legend of the classes present and an optional caveat line
    (in red, above the legend) when the labeller's names are not to be trusted."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    img = load_image(image).permute(1, 2, 0).numpy()
    pal = palette(len(result.vocabulary))
    present = [int(c) for c in np.unique(result.class_map)]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.6))
    axes[0].imshow(img)
    axes[0].set_title("image")
    axes[1].imshow(overlay(img, result.class_map, alpha=0.6))
    axes[1].set_title("classes (EmerDiff masks)")
    for ax in axes:
        ax.axis("off")
    handles = [Patch(color=pal[c] / 255.0, label=result.vocabulary[c]) for c in present]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    bottom = 0.08
    if caveat:
        import textwrap

        fig.text(0.5, 0.075, textwrap.fill(caveat, 120), ha="center", va="bottom", fontsize=8, color="#b00000")
        bottom = 0.08 + 0.035 * (1 + len(caveat) // 120)
    fig.tight_layout(rect=(0, bottom, 1, 0.95))
    return fig
