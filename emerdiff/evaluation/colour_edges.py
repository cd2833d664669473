"""Where the readout adds what colour cannot (issue 26): boundary and region metrics split by whether a GT
boundary pixel is also a colour edge of the image.

An image-guided upsampling (guided filter, joint bilateral) moves a segment's edge onto the image's colour
edges. Where a ground-truth boundary is a strong colour edge it has what it needs; where the two sides of
a boundary have about the same colour it has nothing to snap to. EmerDiff's readout asks the diffusion
model instead. So the metrics are split:

- **Edge strength** (:func:`edge_strength`): at each pixel, the largest step in any RGB channel (on a
  0-1 scale) to a 4-neighbour, then the maximum of that over the pixel's 3 x 3 neighbourhood (a boundary
  pixel is the inner ring of its region; the step may lie on either side of it).
- **Colour edge**: a GT contour pixel (a labelled pixel with a pixel of another GT class within 1 px, the
  contour of :mod:`emerdiff.evaluation.boundary`) whose strength is at least ``threshold``;
  the other contour pixels are **not a colour edge** (weak or no colour step: camouflage).
- **Bands**: every labelled pixel within ``band`` px of a GT contour (Boundary IoU's d, 2 % of the
  diagonal) takes the split of its nearest contour pixel.

Per split and method (each method's masks labelled by the ``majority`` oracle, each mask its own majority
GT class: the label map apart from any labelling step, and one labelling for every resample):

- ``boundary_recall``: share of the split's GT contour pixels with a predicted contour pixel of the same
  class within ``tolerance`` px (boundary F's recall side, which splits by GT pixel);
- ``band_accuracy``: share of the split's band pixels labelled right;
- ``band_miou``: mIoU within the split's band (per class: true positives / (GT + predicted - true
  positives) over the band's pixels, mean over the classes present).

The per-image counts sum over images with bootstrap weights (the evaluation's own resamples), so every
value and every difference between methods gets a paired interval.

Threshold: :data:`COLOUR_EDGE_THRESHOLD` = 0.55, chosen on the validation scenes 100-139 of the flat
world only (2026-12-03, issue 26, before any score was split by it) as the Otsu threshold of the
edge strengths of their GT contour pixels (0.555; 47 % of the contour pixels fall below it), by
:func:`choose_threshold`. It is a parameter: on photographs choose it again on their validation images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from emerdiff.evaluation.boundary import (
    _matched,
    default_band,
    default_tolerance,
    distance_to_other_label,
)
from emerdiff.evaluation.metrics import iou_from_totals

COLOUR_EDGE_THRESHOLD = 0.55
SPLITS: tuple[str, ...] = ("colour_edge", "not_colour_edge")
METRICS: tuple[str, ...] = ("boundary_recall", "band_accuracy", "band_miou")
LABELLING = "majority"


def edge_strength(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` colour-edge strength of an RGB image (uint8 0-255 or float 0-1): the largest channel step
    to a 4-neighbour, maximised over the 3 x 3 neighbourhood; 0 on a flat area, 1 at a black/white step."""
    img = np.asarray(image)
    img = img.astype(np.float64) / 255.0 if img.dtype == np.uint8 else img.astype(np.float64)
    if img.ndim == 2:
        img = img[..., None]
    step = np.zeros(img.shape[:2])
    dy = np.abs(np.diff(img, axis=0)).max(-1)
    dx = np.abs(np.diff(img, axis=1)).max(-1)
    for a, b, d in ((step[:-1], step[1:], dy), (step[:, :-1], step[:, 1:], dx)):
        np.maximum(a, d, out=a)
        np.maximum(b, d, out=b)
    padded = np.pad(step, 1, mode="edge")
    h, w = step.shape
    return np.max([padded[y:y + h, x:x + w] for y in range(3) for x in range(3)], axis=0)


def contour_strengths(image: np.ndarray, gt: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Edge strengths of the GT contour pixels of one image (what :func:`choose_threshold` pools)."""
    gt = np.asarray(gt)
    contour = (gt != ignore_index) & (distance_to_other_label(gt, 1, void=ignore_index) <= 1)
    return edge_strength(_fit(image, gt.shape))[contour]


def choose_threshold(strengths: Sequence[np.ndarray] | np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (0-1) of pooled contour edge strengths: the cut that best separates weak from strong
    colour steps at GT boundaries. Call it on validation images only."""
    x = np.concatenate([np.ravel(s) for s in strengths]) if isinstance(strengths, Sequence) else np.ravel(strengths)
    if x.size == 0:
        raise ValueError("no GT contour pixels to choose a threshold from")
    hist, edges = np.histogram(np.clip(x, 0, 1), bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    best = np.flatnonzero(between >= between.max() * (1 - 1e-12))  # a gap of empty bins ties: take its middle
    return float((edges[1:][best[0]] + edges[1:][best[-1]]) / 2)


def _fit(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The image at the GT's size (bilinear), as the label maps were scored."""
    img = np.asarray(image)
    if img.shape[:2] == tuple(shape):
        return img
    from PIL import Image

    return np.asarray(Image.fromarray(img.astype(np.uint8)).resize((shape[1], shape[0]), Image.BILINEAR))


class SplitGeometry:
    """The part of one image's split counts that depends on the image and GT alone (computed once per image).

    Attributes: ``gt``, ``split`` (``(H, W)``: 0 colour edge, 1 not, -1 outside every band), ``contour``
    (GT contour pixels), ``band_px``, ``tolerance_px``.
    """

    def __init__(self, image: np.ndarray, gt: np.ndarray, threshold: float = COLOUR_EDGE_THRESHOLD,
                 ignore_index: int = 255, band: float | None = None, tolerance: float | None = None):
        from scipy.ndimage import distance_transform_edt

        gt = np.asarray(gt)
        self.gt, self.ignore_index = gt, ignore_index
        self.band_px = band if band is not None else default_band(gt.shape)
        self.tolerance_px = tolerance if tolerance is not None else default_tolerance(gt.shape)
        valid = gt != ignore_index
        dist = distance_to_other_label(gt, max(self.band_px, 1), void=ignore_index)
        self.contour = valid & (dist <= 1)
        strong = edge_strength(_fit(image, gt.shape)) >= threshold
        self.split = np.full(gt.shape, -1, dtype=np.int64)
        if self.contour.any():
            _, (iy, ix) = distance_transform_edt(~self.contour, return_indices=True)
            nearest_strong = strong[iy, ix]  # the split of each pixel's nearest contour pixel
            in_band = valid & (dist <= self.band_px)
            self.split[in_band] = np.where(nearest_strong[in_band], 0, 1)
            self.split[self.contour] = np.where(strong[self.contour], 0, 1)

    def counts(self, pred: np.ndarray, num_classes: int) -> np.ndarray:
        """``(2, 4 + 3 C)`` counts of one class map (``num_classes`` = no class), per split: recalled contour
        pixels, contour pixels, right band pixels, band pixels, then per class the band's true positives,
        GT pixels and predicted pixels."""
        pred = np.asarray(pred)
        gt, c = self.gt, int(num_classes)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
        scored = pred < c
        p_edge = scored & (distance_to_other_label(pred, 1) <= 1)
        g_lab = np.where(self.contour, gt, -1)
        recalled = _matched(g_lab, np.where(p_edge, pred, -2), self.tolerance_px)
        out = np.zeros((2, 4 + 3 * c))
        hit = gt == pred

        def hist(values: np.ndarray) -> np.ndarray:
            return np.bincount(values.astype(np.int64), minlength=c)[:c]

        for s in range(2):
            contour = self.contour & (self.split == s)
            band = self.split == s
            out[s, 0], out[s, 1] = (recalled & contour).sum(), contour.sum()
            out[s, 2], out[s, 3] = (hit & band).sum(), band.sum()
            out[s, 4:4 + c] = hist(gt[band & hit])
            out[s, 4 + c:4 + 2 * c] = hist(gt[band])
            out[s, 4 + 2 * c:] = hist(pred[band & scored])
        return out


def split_scores(counts: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Each metric (0-100) per split from counts ``(..., 2, 4 + 3 C)``: ``{metric: (..., 2)}``; NaN where a
    split holds no pixel."""
    counts = np.asarray(counts, dtype=np.float64)
    c = int(num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(counts[..., 1] > 0, counts[..., 0] / counts[..., 1] * 100, np.nan)
        accuracy = np.where(counts[..., 3] > 0, counts[..., 2] / counts[..., 3] * 100, np.nan)
        totals = np.stack([counts[..., 4:4 + c], counts[..., 4 + c:4 + 2 * c], counts[..., 4 + 2 * c:]], axis=-2)
        per_class = iou_from_totals(totals)  # (..., 2, C), NaN for a class absent on both sides
        present = np.isfinite(per_class)
        miou = np.where(present.any(axis=-1), np.where(present, per_class, 0.0).sum(axis=-1)
                        / np.maximum(present.sum(axis=-1), 1), np.nan)
    return {"boundary_recall": recall, "band_accuracy": accuracy, "band_miou": miou}


def colour_edge_split(records: Sequence[Any], maps: Sequence[Mapping[str, np.ndarray]], images: Sequence[Any],
                      num_classes: int, weights: np.ndarray, threshold: float = COLOUR_EDGE_THRESHOLD,
                      ignore_index: int = 255, methods: Sequence[str] | None = None, level: float = 0.95,
                      band: float | None = None, tolerance: float | None = None) -> dict[str, Any]:
    """The metrics split by colour edge for every method, with paired intervals over the images.

    Args:
        records: per-image records (:class:`~emerdiff.evaluation.records.ImageRecord`; their counts give
            the majority labelling of each method's masks).
        maps: per image its label maps (``"gt"`` and one mask-id map per method, as
            :class:`~emerdiff.evaluation.records.MapFiles` reads them); read once, in order.
        images: per image the RGB image (uint8 array, or anything with ``load_image()``, or a path).
        weights: ``(B, n)`` image weights, row 0 all ones (the data), the rest resamples
            (:func:`~emerdiff.evaluation.bootstrap.bootstrap_weights`: pass the evaluation's own for pairing).
        threshold: edge strength at which a GT contour pixel counts as a colour edge.
    Returns:
        ``{"threshold", "labelling", "band_px", "tolerance_px", "pixels": {split: {"contour", "band"}},
        "metrics": {metric: {split: {method or "a-b": interval}}}}``.
    """
    from emerdiff.evaluation.bootstrap import summarize_draws
    from emerdiff.evaluation.records import resolve_methods
    from emerdiff.sd.images import resize_labels

    records = list(records) if not isinstance(records, Sequence) else records
    methods = resolve_methods(records, methods)
    weights = np.asarray(weights, dtype=np.float64)
    n, c = len(records), int(num_classes)
    if weights.ndim != 2 or weights.shape[1] != n:
        raise ValueError(f"weights must be (draws, {n} images), got shape {weights.shape}")
    per_image = {m: np.zeros((n, 2, 4 + 3 * c)) for m in methods}
    geometry = None
    seen = 0
    for i, (image_maps, image) in enumerate(zip(maps, images)):
        seen += 1
        gt = np.asarray(image_maps["gt"])
        geometry = SplitGeometry(_as_array(image), gt, threshold, ignore_index, band, tolerance)
        for m in methods:
            ids = np.asarray(image_maps[m])
            if ids.shape != gt.shape:
                ids = resize_labels(ids, gt.shape)
            assign = np.asarray(records[i].counts[m]).argmax(axis=1)  # the majority oracle's labelling
            per_image[m][i] = geometry.counts(assign[ids], c)
    if seen != n:
        raise ValueError(f"{seen} images of label maps for {n} records; give one per record, in order")
    pixels_split = per_image[methods[0]].sum(axis=0)
    scores = {m: split_scores(np.einsum("bn,nsk->bsk", weights, per_image[m]), c) for m in methods}
    out_metrics: dict[str, dict[str, Any]] = {}
    for name in METRICS:
        out_metrics[name] = {}
        for s, split in enumerate(SPLITS):
            out_metrics[name][split] = summarize_draws({m: scores[m][name][:, s] for m in methods}, level, n)
    return {"threshold": float(threshold), "labelling": LABELLING,
            "band_px": None if geometry is None else geometry.band_px,
            "tolerance_px": None if geometry is None else geometry.tolerance_px,
            "pixels": {split: {"contour": int(pixels_split[s, 1]), "band": int(pixels_split[s, 3])}
                       for s, split in enumerate(SPLITS)},
            "metrics": out_metrics}


def _as_array(image: Any) -> np.ndarray:
    if hasattr(image, "load_image"):
        return image.load_image()
    if isinstance(image, np.ndarray):
        return image
    from PIL import Image

    with Image.open(image) as im:
        return np.asarray(im.convert("RGB"))


def split_table(split: Mapping[str, Any], reference: str = "emerdiff") -> list[str]:
    """Markdown lines: per metric and split each method's value with its interval, then ``reference`` minus
    every other method per split (paired), so that the two splits' differences stand side by side."""
    def cell(v: Mapping[str, Any] | None, sign: str = "") -> str:
        if v is None or v.get("value") is None or not np.isfinite(v["value"]):
            return "n/a"
        lo, hi = v.get("lo"), v.get("hi")
        span = "" if lo is None or not np.isfinite(lo) else f" [{lo:{sign}.1f}, {hi:{sign}.1f}]"
        return f"{v['value']:{sign}.1f}{span}"

    px = split["pixels"]
    lines = [f"Colour-edge split (GT boundary pixels with an image colour step >= {split['threshold']:g} vs below; "
             f"{split['labelling']} labelling; band {split['band_px']} px, tolerance {split['tolerance_px']} px; "
             f"contour pixels {px['colour_edge']['contour']} colour edge / {px['not_colour_edge']['contour']} not):",
             "", "| metric | method | colour edge | 95 % interval | not a colour edge | 95 % interval |",
             "|---|---|---|---|---|---|"]
    for name, per in split["metrics"].items():
        for m in per["colour_edge"]:
            if "-" in m:
                continue
            a, b = per["colour_edge"][m], per["not_colour_edge"][m]
            ca, cb = cell(a).split(" ", 1) + [""], cell(b).split(" ", 1) + [""]
            lines.append(f"| {name} | {m} | {ca[0]} | {ca[1]} | {cb[0]} | {cb[1]} |")
    lines += ["", "| metric | difference | colour edge | 95 % interval | not a colour edge | 95 % interval |",
              "|---|---|---|---|---|---|"]
    for name, per in split["metrics"].items():
        for pair in per["colour_edge"]:
            if not pair.startswith(f"{reference}-"):
                continue
            ca = cell(per["colour_edge"][pair], "+").split(" ", 1) + [""]
            cb = cell(per["not_colour_edge"][pair], "+").split(" ", 1) + [""]
            lines.append(f"| {name} | {pair.replace('-', ' - ')} | {ca[0]} | {ca[1]} | {cb[0]} | {cb[1]} |")
    return lines
