"""The image figures: the paper's (Figs. 1, 2, 4, the ablation grid, failure cases), the contact
sheet of a segmentation's difference maps and the open-vocabulary legend figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from emerdiff.sd.images import ImageInput, load_image, resize_labels
from emerdiff.viz.core import (
    HEATMAP_CMAP,
    _axes_grid,
    _finish,
    highlight_mask,
    overlay,
    palette,
    resize_image,
    show,
    to_uint8,
)

if TYPE_CHECKING:
    from emerdiff.method.vocabulary import OpenVocabResult

DIFFERENCE = "||I- - I+|| per pixel"  # what a difference map's colour bar measures
SCORE_PROTOCOL = "mIoU (%), per-image Hungarian matching"  # what metrics.score_labels' "miou" is


def segmentation_panels(image: Any, seg: Any, model: str, gt: np.ndarray | None = None,
                        title: str | None = None) -> Any:
    """One row: image, low-res k-means, nearest, bilinear, EmerDiff (and GT if given).

    ``seg`` is a :class:`emerdiff.Segmentation`; every map is shown as an overlay.
    """
    img = to_uint8(image)
    size = img.shape[:2]
    panels = [("image", img),
              (f"low-res k-means ({seg.lowres_labels.shape[0]}x{seg.lowres_labels.shape[1]})",
               overlay(img, resize_labels(seg.lowres_labels, size))),
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
    axes[1, 0].set_ylabel("EmerDiff labels")
    return _finish(fig, model)


def _energy_inside(difference: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(share of the map's energy sum(d²) inside the mask, the mask's share of the image), the mask
    brought to the map's size: what the map shows, for a caption (the method's measure is
    :func:`emerdiff.method.measures.locality_scores`)."""
    d = np.asarray(difference, np.float64)
    m = resize_labels(np.asarray(mask).astype(np.int64), d.shape[-2:]).astype(bool)
    total = float((d ** 2).sum())
    return (float((d[m] ** 2).sum()) / total if total > 0 else float("nan")), float(m.mean())


def key_observation(image: Any, lowres_mask: np.ndarray, plus: Any, minus: Any, difference: np.ndarray,
                    model: str, strength: float | None = None) -> Any:
    """Paper Fig. 2: the perturbed low-res mask, I+, I-, and the difference map ||I- - I+||.

    The title states only what the panels show: how much of the change lies inside the mask
    (share of sum(d²)) against the mask's share of the image (chance).
    """
    size = to_uint8(plus).shape[:2]
    lam = f"{strength:g}" if strength is not None else "λ"
    inside, area = _energy_inside(difference, lowres_mask)
    title = (f"Key observation: perturbing the outlined low-res segment by ±{lam} changes the image;\n"
             f"{inside:.0%} of the change (sum of d²) lies inside the segment, which covers {area:.0%} of the image")
    fig, axes = _axes_grid(1, 4, title=title)
    show(axes[0, 0], highlight_mask(resize_image(image, size), lowres_mask), "image + perturbed mask")
    show(axes[0, 1], to_uint8(plus), f"I+ (+{lam})")
    show(axes[0, 2], to_uint8(minus), f"I- (-{lam})")
    im = show(axes[0, 3], difference, "difference map d", cmap=HEATMAP_CMAP, vmin=0)
    fig.colorbar(im, ax=axes[0, 3], fraction=0.046, pad=0.02, label=DIFFERENCE)
    return _finish(fig, model)


def upsampling_vs_emerdiff(images: Sequence[Any], segs: Sequence[Any], model: str,
                           gts: Sequence[np.ndarray | None] | None = None,
                           scores: Sequence[Mapping[str, float]] | None = None,
                           names: Sequence[str] | None = None, protocol: str = SCORE_PROTOCOL) -> Any:
    """Paper Fig. 4: nearest / bilinear upsampling of the low-res segments vs EmerDiff, per image row.

    ``scores``: per image, ``{"nearest" | "bilinear" | "emerdiff": value}``, written under the
    panels; ``protocol`` says what the value is (the title names it).
    """
    cols = ["image", "low-res", "nearest", "bilinear", "EmerDiff"]
    has_gt = gts is not None and any(g is not None for g in gts)
    if has_gt:
        cols.append("ground truth")
    title = "Naive upsampling vs EmerDiff" + (f" (under each panel: {protocol})" if scores is not None else "")
    fig, axes = _axes_grid(len(images), len(cols), title=title)
    for i, (img, seg) in enumerate(zip(images, segs)):
        u = to_uint8(img)
        maps = [u, overlay(u, resize_labels(seg.lowres_labels, u.shape[:2])),
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


SCALES = ("row", "column", "shared")


def heatmap_grid(maps: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str], col_labels: Sequence[str],
                 model: str, title: str, scale: str = "row", cell: float = 1.8,
                 colorbar_label: str = DIFFERENCE) -> Any:
    """A grid of difference-map heat maps (rows x cols), e.g. lambda x (layer, timestep).

    ``scale``: "row" (one colour scale per row, its colour bar at the row's end: panels of a row
    compare, and the bars give each row's magnitude), "column" (one per column, bar below) or
    "shared" (one for the whole grid). Every scale starts at 0.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    rows, cols = len(maps), max(len(r) for r in maps)
    fig, axes = _axes_grid(rows, cols, cell=cell, title=title)

    def top(cells: Sequence[np.ndarray]) -> float:
        return max(float(np.max(m)) for m in cells) or 1.0

    for i, r in enumerate(maps):
        for j, m in enumerate(r):
            vmax = (top(r) if scale == "row" else top([rr[j] for rr in maps if j < len(rr)]) if scale == "column"
                    else top([mm for rr in maps for mm in rr]))
            im = show(axes[i, j], m, col_labels[j] if i == 0 else None, cmap=HEATMAP_CMAP, vmin=0, vmax=vmax)
            if scale == "row" and j == len(r) - 1:
                fig.colorbar(im, ax=axes[i, :], shrink=0.9, pad=0.01, aspect=12)
            if scale == "column" and i == rows - 1:
                fig.colorbar(im, ax=axes[:, j], location="bottom", shrink=0.9, pad=0.01, aspect=12)
            if scale == "shared" and i == rows - 1 and j == len(r) - 1:
                fig.colorbar(im, ax=axes, shrink=0.6, label=colorbar_label)
        for j in range(len(r), cols):
            axes[i, j].axis("off")
        axes[i, 0].set_ylabel(row_labels[i], fontsize=7)
    return _finish(fig, model, f"colour: {colorbar_label}, one scale per {scale}" if scale != "shared"
                   else f"colour: {colorbar_label}, one scale for all panels")


def failure_cases(entries: Sequence[Mapping[str, Any]], model: str) -> Any:
    """Rows of (image + mask, difference map, EmerDiff labels) with a caption naming the failure.

    entries: dicts with keys ``image``, ``mask`` (low-res bool), ``difference``, ``labels``, ``caption``
    and optionally ``mask_id``: then the third panel is that case's own outcome, the pixels EmerDiff
    labels as the mask (the rest dimmed), rather than the whole labelling.
    """
    fig, axes = _axes_grid(len(entries), 3, title="Failure cases")
    for i, e in enumerate(entries):
        u = to_uint8(e["image"])
        show(axes[i, 0], highlight_mask(u, e["mask"]), "image + mask" if i == 0 else None)
        im = show(axes[i, 1], e["difference"], "difference map" if i == 0 else None, cmap=HEATMAP_CMAP, vmin=0)
        fig.colorbar(im, ax=axes[i, 1], fraction=0.046, pad=0.02)
        labels = np.asarray(e["labels"])
        if e.get("mask_id") is not None:
            won = labels == int(e["mask_id"])
            show(axes[i, 2], highlight_mask(overlay(u, labels), won, dim=0.3),
                 "its EmerDiff pixels" if i == 0 else None)
            axes[i, 2].set_xlabel(f"{won.mean():.1%} of the pixels", fontsize=7)
        else:
            show(axes[i, 2], overlay(u, labels), "EmerDiff" if i == 0 else None)
        axes[i, 0].set_ylabel(e.get("caption", ""), fontsize=7)
    return _finish(fig, model, f"colour of the difference maps: {DIFFERENCE}, one scale per row")


def contact_sheet(image: Any, maps: Any, lowres_labels: np.ndarray, mask_ids: Sequence[int] | None = None,
                  scores: Sequence[float] | None = None, model: str = "", title: str | None = None,
                  per_row: int = 4) -> Any:
    """One tile per mask: the mask outlined over the image | its difference map.

    Each map is scaled to its own maximum (given in its title): on one shared scale the few
    strongest maps left the others black (issue 29). ``image`` any form :func:`to_uint8` takes
    (shown at the maps' size); ``scores``: one number per mask (e.g. locality), in its title.
    """
    m = maps.detach().float().cpu().numpy() if hasattr(maps, "detach") else np.asarray(maps, np.float32)
    ids = list(range(len(m))) if mask_ids is None else list(mask_ids)
    img = resize_image(image, m.shape[-2:])
    tiles = min(per_row, len(m))
    rows = -(-len(m) // tiles)
    fig, axes = _axes_grid(rows, 2 * tiles, cell=1.7, title=title)
    im = None
    for n, (i, d) in enumerate(zip(ids, m)):
        r, c = divmod(n, tiles)
        peak = float(d.max(initial=0))
        show(axes[r, 2 * c], highlight_mask(img, np.asarray(lowres_labels) == i), f"mask {i}")
        label = f"map {i}, max {peak:.2g}" + (f"\nlocality {scores[n]:.2f}" if scores is not None else "")
        im = show(axes[r, 2 * c + 1], d / peak if peak > 0 else d, label, cmap=HEATMAP_CMAP, vmin=0, vmax=1)
    for ax in axes.flat[2 * len(m):]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.6, label="share of the map's own maximum")
    return _finish(fig, model, f"each map scaled to its own maximum ({DIFFERENCE})")


def legend_figure(image: ImageInput, result: OpenVocabResult, title: str = "", caveat: str = "",
                  gt: np.ndarray | None = None) -> Any:
    """Image beside its class map, with a legend of the classes present and an optional caveat line
    (in red, above the legend) when the labeller's names are not to be trusted.

    ``gt``: a ground-truth class map whose ids index the same vocabulary (255: void), drawn as a
    third panel in the same colours, so a reader can check the names.
    """
    import textwrap

    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    img = load_image(image).permute(1, 2, 0).numpy()
    pal = palette(len(result.vocabulary))
    present = {int(c) for c in np.unique(result.class_map)}
    panels = [("image", img), ("classes (EmerDiff masks)", overlay(img, result.class_map))]
    if gt is not None:
        g = np.asarray(gt)
        valid = g != 255
        present |= {int(c) for c in np.unique(g[valid])}
        shown = overlay(img, np.where(valid, g, 0))
        shown[~valid] = img[~valid]
        panels.append(("ground truth", shown))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.6))
    for ax, (name, arr) in zip(axes, panels):
        ax.imshow(arr)
        ax.set_title(name)
        ax.axis("off")
    handles = [Patch(color=pal[c] / 255.0, label=result.vocabulary[c]) for c in sorted(present)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    rows = -(-len(handles) // 6)
    bottom = 0.02 + 0.05 * rows
    if caveat:
        wrapped = textwrap.fill(caveat, 40 * len(panels))
        fig.text(0.5, bottom, wrapped, ha="center", va="bottom", fontsize=8, color="#b00000")
        bottom += 0.035 * (1 + wrapped.count("\n"))
    fig.tight_layout(rect=(0, bottom + 0.01, 1, 0.95))
    return fig


# Colours of readout_wins: right by A only, right by B only, wrong by both (RGB 0-255).
WIN_COLOURS = {"a": (235, 120, 0), "b": (30, 110, 235), "both_wrong": (200, 200, 200)}


def readout_wins(images: Sequence[Any], gts: Sequence[np.ndarray], labels_a: Sequence[np.ndarray],
                 labels_b: Sequence[np.ndarray], model: str, names: tuple[str, str] = ("EmerDiff", "guided filter"),
                 titles: Sequence[str] | None = None, ignore_index: int = 255, note: str = "") -> Any:
    """Where each of two readouts wins, pixel by pixel, on the same scenes (issue 26).

    One column per scene: the image above, below it the image dimmed with every pixel that one readout
    labels right and the other wrong coloured (orange: ``names[0]`` alone right, blue: ``names[1]`` alone
    right), pixels both get wrong in light grey; void pixels and pixels both get right stay dimmed.
    ``labels_a``/``labels_b``: class maps in the GT's class ids (e.g. each mask's majority class), the
    GTs' shape; the counts of each colour are under each panel.
    """
    n = len(images)
    if not (len(gts) == len(labels_a) == len(labels_b) == n) or n == 0:
        raise ValueError("readout_wins needs one GT and two class maps per image, and at least one image")
    title = (f"Where each readout wins: orange = right by {names[0]} only, blue = right by {names[1]} only, "
             "grey = wrong by both")
    fig, axes = _axes_grid(2, n, cell=2.4, title=None)
    fig.suptitle(title, fontsize=8)
    for j in range(n):
        gt = np.asarray(gts[j])
        img = resize_image(images[j], gt.shape)
        a, b = np.asarray(labels_a[j]), np.asarray(labels_b[j])
        if a.shape != gt.shape or b.shape != gt.shape:
            raise ValueError(f"image {j}: class maps {a.shape} / {b.shape} must have the GT's shape {gt.shape}")
        valid = gt != ignore_index
        right_a, right_b = valid & (a == gt), valid & (b == gt)
        only_a, only_b, neither = right_a & ~right_b, right_b & ~right_a, valid & ~right_a & ~right_b
        shown = (img.astype(np.float64) * 0.35 + 255 * 0.65 * 0.35).astype(np.uint8)
        for mask, key in ((only_a, "a"), (only_b, "b"), (neither, "both_wrong")):
            shown[mask] = WIN_COLOURS[key]
        show(axes[0, j], img, titles[j] if titles is not None else None)
        show(axes[1, j], shown)
        axes[1, j].set_xlabel(f"{names[0]} only: {int(only_a.sum())} px\n{names[1]} only: {int(only_b.sum())} px",
                              fontsize=7)
    return _finish(fig, model, note)
