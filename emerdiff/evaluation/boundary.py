"""Boundary metrics of a class map against its ground truth: Boundary IoU, trimap IoU, boundary F.

The region metrics (mIoU) count every pixel alike; the pixels where two readouts of the same
segments differ lie near edges. These metrics look there only.

- **Boundary IoU** (Cheng et al., CVPR 2021, "Boundary IoU: Improving Object-Centric Image
  Segmentation Evaluation"): per class c, ``|G_d ∩ P_d| / |G_d ∪ P_d|``, where ``G_d`` are the GT
  pixels of c within ``d`` px of the contour of c's GT mask, and ``P_d`` likewise in the
  prediction. ``d`` defaults to the paper's 2 % of the image diagonal, rounded, at least 1 px
  (4 px at 128 x 128, 14 px at 512 x 512).
- **Trimap IoU** at width ``w``: the ordinary IoU of each class restricted to the band of pixels
  within ``w`` px of a GT boundary (a boundary between two different GT classes). At a width that
  covers every image it is the plain mIoU.
- **Boundary F** (as DAVIS's F, per class): a predicted contour pixel of class c is a hit if a GT
  contour pixel of c lies within ``tolerance`` px (precision), and the other way round
  (recall); F = 2PR / (P + R). Tolerance defaults to DAVIS's 0.8 % of the diagonal, rounded up
  (2 px at 128 x 128). Matching is by distance, not one-to-one (as DAVIS, unlike BSDS).

Conventions (shared by all three)
- Distances are Euclidean between pixel centres. A pixel is within ``r`` px of a contour when a
  pixel of another label lies within distance ``r`` of it (its 4-neighbours are at 1), so the
  contour of a mask is its inner one-pixel ring.
- The image frame is not a contour (Cheng et al.'s code pads with background, which makes it
  one): a region that runs off the image has no boundary there, in GT and prediction alike.
- GT pixels equal to ``ignore_index`` (void) are neither scored nor a contour: a class region
  that meets void has no boundary there, and no void pixel counts for either side. An image whose
  GT holds a single class has no GT boundary (no trimap band).
- A predicted label ``num_classes`` means "no class" (a mask left unmatched by a protocol): its
  region has contours like any other, but is never scored as a class.
- Dataset level, as the project's mIoU (:mod:`emerdiff.evaluation.metrics`): the per-class
  counts are summed over images, then each class's score is taken, then the mean over the
  classes present (NaN classes, absent on both sides, are left out). Scores are 0-100.

:class:`BoundaryMetrics` holds the settings and turns one image's maps into a count array
``(S, C)`` (:meth:`BoundaryMetrics.counts`), which sums over images (with bootstrap weights, in
:func:`emerdiff.evaluation.protocols.protocol_boundary_totals`) and scores with
:meth:`BoundaryMetrics.scores`. :func:`boundary_iou`, :func:`trimap_iou` and :func:`boundary_f`
score a single image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from emerdiff.evaluation.metrics import iou_from_totals

BAND_RATIO = 0.02  # Boundary IoU's d: 2 % of the image diagonal (Cheng et al.)
TOLERANCE_RATIO = 0.008  # boundary F's tolerance: 0.8 % of the diagonal (DAVIS)
TRIMAP_WIDTHS: tuple[float, ...] = (1, 2, 4, 8, 16)


# --------------------------------------------------------------------------- geometry
@lru_cache(maxsize=64)
def _offsets(radius: float, half: bool) -> tuple[tuple[int, int, int], ...]:
    """Pixel offsets ``(dy, dx, dy² + dx²)`` of the disk of ``radius`` (centre excluded), nearest
    first; ``half``: one of each pair ``o, -o``."""
    r = int(math.floor(radius))
    out = [(dy, dx, dy * dy + dx * dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)
           if 0 < dy * dy + dx * dx <= radius * radius and (not half or dy > 0 or (dy == 0 and dx > 0))]
    return tuple(sorted(out, key=lambda o: o[2]))


def _pair(shape: tuple[int, int], dy: int, dx: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Slices ``a, b`` such that ``x[b]`` is ``x[a]`` moved by ``(dy, dx)`` (the overlap only)."""
    h, w = shape
    a = (slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx)))
    b = (slice(max(0, dy), h - max(0, -dy)), slice(max(0, dx), w - max(0, -dx)))
    return a, b


def distance_to_other_label(labels: np.ndarray, radius: float, void: int | None = None) -> np.ndarray:
    """Euclidean distance (px) from each pixel to the nearest pixel of another label, ``inf``
    beyond ``radius``; pixels labelled ``void`` are never "another label" (their own value is
    meaningless). The image frame is not another label.

    Two exact computations give the same distances; the cheaper one runs: comparing the map with
    its shifts over a small disk, or one distance transform per label for a wide one.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D map, got shape {labels.shape}")
    values = np.unique(labels)
    if math.pi * radius * radius / 2 <= 8 * len(values):  # about the half disk's offsets, without listing them
        return _distance_by_shifts(labels, radius, void)
    return _distance_by_transform(labels, radius, void, values)


def _distance_by_shifts(labels: np.ndarray, radius: float, void: int | None) -> np.ndarray:
    dist2 = np.full(labels.shape, np.inf)
    valid = None if void is None else labels != void
    for dy, dx, d2 in _offsets(float(radius), True):
        a, b = _pair(labels.shape, dy, dx)
        differ = labels[a] != labels[b]
        if valid is not None:
            differ &= valid[a] & valid[b]
        hit = np.where(differ, float(d2), np.inf)
        np.minimum(dist2[a], hit, out=dist2[a])  # the relation is symmetric: both ends get it
        np.minimum(dist2[b], hit, out=dist2[b])
    return np.sqrt(dist2)


def _distance_by_transform(labels: np.ndarray, radius: float, void: int | None,
                           values: np.ndarray | None = None) -> np.ndarray:
    from scipy.ndimage import distance_transform_edt

    out = np.full(labels.shape, np.inf)
    is_void = None if void is None else labels == void
    for v in np.unique(labels) if values is None else values:
        if void is not None and v == void:
            continue
        mine = labels == v
        inside = mine if is_void is None else mine | is_void  # void is not another label
        if inside.all():
            continue
        dist = distance_transform_edt(inside)
        out[mine] = dist[mine]
    out[out > radius] = np.inf
    return out


def _matched(source: np.ndarray, target: np.ndarray, tolerance: float) -> np.ndarray:
    """Pixels whose label in ``source`` (>= 0: a contour pixel of that class) equals ``target``'s
    label at some pixel within ``tolerance`` px (``target`` < 0: no contour there)."""
    hit = (source >= 0) & (source == target)
    for dy, dx, _ in _offsets(float(tolerance), False):
        a, b = _pair(source.shape, dy, dx)
        hit[a] |= (source[a] >= 0) & (source[a] == target[b])
    return hit


def default_band(shape: Sequence[int]) -> int:
    """Boundary IoU's ``d`` for an image of ``shape``: 2 % of its diagonal, rounded, >= 1 px."""
    return max(1, int(round(BAND_RATIO * math.hypot(shape[0], shape[1]))))


def default_tolerance(shape: Sequence[int]) -> int:
    """Boundary F's tolerance for an image of ``shape``: 0.8 % of its diagonal, rounded up, >= 1 px."""
    return max(1, int(math.ceil(TOLERANCE_RATIO * math.hypot(shape[0], shape[1]))))


# --------------------------------------------------------------------------- the metrics
@dataclass(frozen=True)
class BoundaryMetrics:
    """Settings of the boundary metrics and their per-image counts.

    Attributes:
        band: Boundary IoU's ``d`` in px; None: :func:`default_band` of each image (2 % of its diagonal).
        widths: trimap band widths in px, one trimap IoU each.
        tolerance: boundary F's matching distance in px; None: :func:`default_tolerance` of each image.
        ignore_index: GT value of void pixels.
    """

    band: float | None = None
    widths: tuple[float, ...] = TRIMAP_WIDTHS
    tolerance: float | None = None
    ignore_index: int = 255

    def __post_init__(self) -> None:
        for name, value in (("band", self.band), ("tolerance", self.tolerance)):
            if value is not None and not value >= 1:
                raise ValueError(f"BoundaryMetrics {name}={value}: give a distance >= 1 px, or None for the default")
        if not self.widths or any(not w > 0 for w in self.widths):
            raise ValueError(f"BoundaryMetrics widths={self.widths}: give one or more band widths > 0 px")
        object.__setattr__(self, "widths", tuple(self.widths))

    @property
    def names(self) -> tuple[str, ...]:
        """Metric names, in the order of :meth:`scores` (also results.csv's column names)."""
        return ("boundary_iou", "boundary_f", *(f"trimap_iou_{w:g}" for w in self.widths))

    @property
    def num_rows(self) -> int:
        """``S``: rows of a count array (3 Boundary IoU totals, 4 boundary F counts, 3 per width)."""
        return 7 + 3 * len(self.widths)

    def settings(self, shape: Sequence[int] | None = None) -> dict[str, object]:
        """The settings as results.json records them; with ``shape`` (an image's) also the
        distances the defaults take there (``band_px``, ``tolerance_px``)."""
        out: dict[str, object] = {
            "band": self.band if self.band is not None else f"{BAND_RATIO:.0%} of the image diagonal, rounded",
            "tolerance": (self.tolerance if self.tolerance is not None
                          else f"{TOLERANCE_RATIO:.1%} of the image diagonal, rounded up"),
            "trimap_widths_px": list(self.widths)}
        if shape is not None:
            out.update(image_shape=list(shape)[:2],
                       band_px=self.band if self.band is not None else default_band(shape),
                       tolerance_px=self.tolerance if self.tolerance is not None else default_tolerance(shape))
        return out

    def gt_geometry(self, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(gt, distance of each GT pixel to another GT class)``: the part of :meth:`counts` that depends
        on the GT alone, to compute once per image and pass to every prediction of it."""
        gt = np.asarray(gt)
        band = self.band if self.band is not None else default_band(gt.shape)
        return gt, distance_to_other_label(gt, max(band, *self.widths, 1), void=self.ignore_index)

    def counts(self, pred: np.ndarray, gt: np.ndarray | tuple[np.ndarray, np.ndarray],
               num_classes: int) -> np.ndarray:
        """``(S, C)`` counts of one image (they sum over images): Boundary IoU totals (intersection,
        GT band, predicted band), boundary F counts (predicted contour hits, predicted contour,
        GT contour hits, GT contour), then per width the trimap totals (true positives, GT, predicted).

        Args:
            pred: class map, ``0 .. num_classes`` (``num_classes``: no class), the GT's shape.
            gt: GT class map (``ignore_index`` void), or :meth:`gt_geometry` of it.
            num_classes: C.
        """
        gt, dist_gt = gt if isinstance(gt, tuple) else self.gt_geometry(gt)
        pred = np.asarray(pred)
        c = int(num_classes)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}; resize the "
                             "prediction to the GT (nearest) first")
        valid = gt != self.ignore_index
        bad_gt = valid & ((gt < 0) | (gt >= c))
        if bad_gt.any():
            raise ValueError(f"ground-truth values {np.unique(gt[bad_gt])[:10].tolist()} are neither classes "
                             f"0..{c - 1} nor ignore_index={self.ignore_index}")
        if pred.size and (pred.min() < 0 or pred.max() > c):
            raise ValueError(f"predicted classes {int(pred.min())}..{int(pred.max())} outside 0..{c} "
                             f"({c} = no class); map unmatched masks to {c}")
        band = self.band if self.band is not None else default_band(gt.shape)
        tol = self.tolerance if self.tolerance is not None else default_tolerance(gt.shape)
        dist_pred = distance_to_other_label(pred, max(band, 1))
        scored = valid & (pred < c)  # predicted pixels of a class, on labelled GT

        def hist(values: np.ndarray) -> np.ndarray:
            return np.bincount(values.astype(np.int64), minlength=c)[:c]

        out = np.zeros((self.num_rows, c))
        g_band, p_band = valid & (dist_gt <= band), scored & (dist_pred <= band)
        out[0] = hist(gt[g_band & p_band & (gt == pred)])
        out[1], out[2] = hist(gt[g_band]), hist(pred[p_band])
        g_edge, p_edge = valid & (dist_gt <= 1), scored & (dist_pred <= 1)
        g_lab, p_lab = np.where(g_edge, gt, -1), np.where(p_edge, pred, -2)
        out[3], out[4] = hist(pred[_matched(p_lab, g_lab, tol)]), hist(pred[p_edge])
        out[5], out[6] = hist(gt[_matched(g_lab, p_lab, tol)]), hist(gt[g_edge])
        hit = valid & (gt == pred)
        for j, w in enumerate(self.widths):
            trimap = valid & (dist_gt <= w)
            out[7 + 3 * j] = hist(gt[trimap & hit])
            out[8 + 3 * j], out[9 + 3 * j] = hist(gt[trimap]), hist(pred[trimap & scored])
        return out

    def per_class(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        """Each metric per class (0-100, NaN: class absent on both sides) from counts ``(..., S, C)``."""
        counts = np.asarray(counts, dtype=np.float64)
        out = {"boundary_iou": iou_from_totals(counts[..., 0:3, :])}
        hits_p, n_p, hits_g, n_g = (counts[..., i, :] for i in range(3, 7))
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(n_p > 0, hits_p / np.where(n_p > 0, n_p, 1), 0.0)
            recall = np.where(n_g > 0, hits_g / np.where(n_g > 0, n_g, 1), 0.0)
            f = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        out["boundary_f"] = np.where((n_p > 0) | (n_g > 0), f * 100.0, np.nan)
        for j, w in enumerate(self.widths):
            out[f"trimap_iou_{w:g}"] = iou_from_totals(counts[..., 7 + 3 * j:10 + 3 * j, :])
        return out

    def scores(self, counts: np.ndarray) -> dict[str, np.ndarray | float]:
        """Each metric's mean over the classes present, from counts ``(S, C)`` (floats) or a
        stack ``(B, S, C)`` (arrays ``(B,)``); NaN where no class is present."""
        counts = np.asarray(counts, dtype=np.float64)
        out: dict[str, np.ndarray | float] = {}
        for name, per in self.per_class(counts).items():
            present = np.isfinite(per).any(axis=-1)
            with np.errstate(invalid="ignore"):
                mean = np.where(present, np.nanmean(np.where(present[..., None], per, 0.0), axis=-1), np.nan)
            out[name] = float(mean) if counts.ndim == 2 else mean
        return out


# --------------------------------------------------------------------------- one image
def boundary_iou(pred: np.ndarray, gt: np.ndarray, num_classes: int, band: float | None = None,
                 ignore_index: int = 255) -> float:
    """Boundary IoU (0-100, mean over classes) of one class map; ``band``: d in px (default 2 % of the diagonal)."""
    metrics = BoundaryMetrics(band=band, widths=(1,), ignore_index=ignore_index)
    return float(metrics.scores(metrics.counts(pred, gt, num_classes))["boundary_iou"])


def trimap_iou(pred: np.ndarray, gt: np.ndarray, num_classes: int, widths: Sequence[float] = TRIMAP_WIDTHS,
               ignore_index: int = 255) -> dict[float, float]:
    """Trimap IoU (0-100) of one class map at each band width (px): ``{width: mIoU within the band}``."""
    metrics = BoundaryMetrics(widths=tuple(widths), ignore_index=ignore_index)
    res = metrics.scores(metrics.counts(pred, gt, num_classes))
    return {w: float(res[f"trimap_iou_{w:g}"]) for w in metrics.widths}


def boundary_f(pred: np.ndarray, gt: np.ndarray, num_classes: int, tolerance: float | None = None,
               ignore_index: int = 255) -> float:
    """Boundary F (0-100, mean over classes) of one class map; ``tolerance`` in px (default 0.8 % of the diagonal)."""
    metrics = BoundaryMetrics(tolerance=tolerance, widths=(1,), ignore_index=ignore_index)
    return float(metrics.scores(metrics.counts(pred, gt, num_classes))["boundary_f"])
