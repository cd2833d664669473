"""Segmentation metrics: confusion matrices, IoU, Hungarian matching, scores of one label map,
and the statistics of probe tables (docs/METHOD.md, "Evaluation protocols").

Conventions
- A confusion matrix has ground-truth classes on rows and predictions on
  columns: ``conf[c, p]`` = number of non-ignored pixels of class ``c``
  predicted as ``p``. In class space it is ``(C, C)`` or ``(C, C + 1)``: an
  extra last column collects pixels whose prediction is no class at all
  (e.g. a predicted cluster left unmatched by the Hungarian matching); they
  count against recall only.
- Scores are percentages (0-100), as the paper reports them. A class absent
  from both ground truth and prediction has IoU NaN and is left out of the
  mean, as in the usual benchmarks.
- A class-space confusion is summarised, for scoring, by its *totals*: per class the true
  positives, the GT pixels (row sums, the no-class column included) and the predicted pixels
  (column sums of the class columns). :func:`scores_from_totals` gives exactly the scores
  :func:`scores` gives of the confusion they came from.

The per-image records and the dataset protocols built on these live in
:mod:`emerdiff.evaluation.records` and :mod:`emerdiff.evaluation.protocols`.

Scores of one label map (the probes' and notebooks' rows): :func:`hungarian_miou`
(per-image Hungarian mIoU), :func:`boundary_alignment` (label-free, image edges),
:func:`silhouette` (label-free, feature space), :func:`score_labels` (both of the
first two for a :class:`~emerdiff.evaluation.datasets.ProbeImage`); :func:`summarize` and
:func:`best` tabulate rows of scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from emerdiff.sd.images import resize_labels

if TYPE_CHECKING:
    from emerdiff.evaluation.datasets import ProbeImage

# --------------------------------------------------------------------------- metrics
def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                     ignore_index: int = 255, num_pred: int | None = None) -> np.ndarray:
    """Pixel confusion matrix ``conf[gt_class, pred]`` (int64).

    Args:
        pred: predicted ids, ``0 .. num_pred-1`` (any integer array).
        gt: ground-truth class ids ``0 .. num_classes-1`` or ``ignore_index``.
        num_classes: number of GT classes (rows).
        ignore_index: GT value of pixels that are not counted at all.
        num_pred: number of prediction ids (columns); default ``num_classes``.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    num_pred = num_classes if num_pred is None else int(num_pred)
    valid = gt != ignore_index
    g = gt[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    if g.size and (g.min() < 0 or g.max() >= num_classes):
        bad = np.unique(g[(g < 0) | (g >= num_classes)])[:10].tolist()
        raise ValueError(f"ground-truth values {bad} are neither classes 0..{num_classes - 1} "
                         f"nor ignore_index={ignore_index}")
    if p.size and (p.min() < 0 or p.max() >= num_pred):
        bad = np.unique(p[(p < 0) | (p >= num_pred)])[:10].tolist()
        raise ValueError(f"predicted values {bad} outside 0..{num_pred - 1}")
    flat = np.bincount(g * num_pred + p, minlength=num_classes * num_pred)
    return flat.reshape(num_classes, num_pred).astype(np.int64)


def per_class_iou(conf: np.ndarray) -> np.ndarray:
    """IoU of each class (0-100) from a class-space confusion; NaN if absent on both sides.

    ``conf`` is ``(C, P)`` with ``P >= C``; columns ``>= C`` are predictions of
    no class (they enlarge the union of the GT class only).
    """
    conf = np.asarray(conf, dtype=np.float64)
    c, p = conf.shape
    if p < c:  # fewer predicted ids than classes: the missing ones are never predicted
        conf = np.pad(conf, ((0, 0), (0, c - p)))
    tp = np.diag(conf[:, :c])
    union = conf.sum(axis=1) + conf[:, :c].sum(axis=0) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)
    return iou * 100.0


def miou(conf: np.ndarray) -> float:
    """Mean IoU (0-100) over classes present in the GT or the prediction."""
    iou = per_class_iou(conf)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def pixel_accuracy(conf: np.ndarray) -> float:
    """Share of non-ignored pixels predicted as their GT class (0-100)."""
    conf = np.asarray(conf, dtype=np.float64)
    c = conf.shape[0]
    total = conf.sum()
    return float(np.trace(conf[:, :c]) / total * 100.0) if total > 0 else float("nan")


def scores(conf: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU, pixel accuracy, per-class IoU (JSON friendly: NaN -> None)."""
    iou = per_class_iou(conf)
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(iou))]
    return {
        "miou": miou(conf),
        "pixel_accuracy": pixel_accuracy(conf),
        "num_classes_present": int(np.isfinite(iou).sum()),
        "per_class_iou": {n: (None if not np.isfinite(v) else float(v)) for n, v in zip(names, iou)},
    }


def confusion_totals(conf: np.ndarray) -> np.ndarray:
    """``(3, C)`` totals of a class-space confusion ``(C, P)``, ``P >= C`` (columns ``>= C``:
    no class): true positives, GT pixels (row sums) and predicted pixels of each class."""
    conf = np.asarray(conf, dtype=np.float64)
    c = conf.shape[0]
    if conf.shape[1] < c:  # fewer predicted ids than classes: the missing ones are never predicted
        conf = np.pad(conf, ((0, 0), (0, c - conf.shape[1])))
    return np.stack([np.diag(conf[:, :c]), conf.sum(axis=1), conf[:, :c].sum(axis=0)])


def iou_from_totals(totals: np.ndarray) -> np.ndarray:
    """IoU (0-100) of each class from totals ``(..., 3, C)`` (:func:`confusion_totals`, or a stack
    of them); NaN where a class is absent on both sides. The arithmetic of :func:`per_class_iou`."""
    totals = np.asarray(totals, dtype=np.float64)
    tp, gt, pred = totals[..., 0, :], totals[..., 1, :], totals[..., 2, :]
    union = gt + pred - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan) * 100.0


def miou_rows(totals: np.ndarray) -> np.ndarray:
    """mIoU of each of a stack of totals ``(B, 3, C)`` (NaN where no class is present)."""
    iou = iou_from_totals(totals)
    out = np.full(len(iou), np.nan)
    ok = np.isfinite(iou).any(axis=1)
    out[ok] = np.nanmean(iou[ok], axis=1)
    return out


def scores_from_totals(totals: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """:func:`scores` from totals ``(3, C)``: equal to ``scores`` of the confusion they summarise."""
    totals = np.asarray(totals, dtype=np.float64)
    iou = iou_from_totals(totals)
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(iou))]
    total = totals[1].sum()
    return {
        "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "pixel_accuracy": float(totals[0].sum() / total * 100.0) if total > 0 else float("nan"),
        "num_classes_present": int(np.isfinite(iou).sum()),
        "per_class_iou": {n: (None if not np.isfinite(v) else float(v)) for n, v in zip(names, iou)},
    }


# --------------------------------------------------------------------------- matching
def hungarian_match(confusion: np.ndarray, criterion: str = "iou") -> np.ndarray:
    """One-to-one matching of predicted clusters to classes (scipy linear_sum_assignment).

    Args:
        confusion: ``(C, P)`` pixel counts, GT classes x predicted clusters;
            ``P`` may differ from ``C``.
        criterion: ``"iou"`` maximises the summed IoU of matched pairs,
            ``"overlap"`` the matched pixel count (the classic accuracy matching).
    Returns:
        ``mapping`` of length P: class of each cluster, -1 for clusters left
        unmatched (when P > C).
    """
    conf = np.asarray(confusion, dtype=np.float64)
    if conf.ndim != 2:
        raise ValueError("confusion must be 2-D (classes x clusters)")
    if criterion == "iou":
        union = conf.sum(axis=1, keepdims=True) + conf.sum(axis=0, keepdims=True) - conf
        gain = np.divide(conf, union, out=np.zeros_like(conf), where=union > 0)
    elif criterion == "overlap":
        gain = conf
    else:
        raise ValueError(f"criterion must be 'iou' or 'overlap', got {criterion!r}")
    rows, cols = linear_sum_assignment(gain, maximize=True)
    mapping = np.full(conf.shape[1], -1, dtype=np.int64)
    mapping[cols] = rows
    return mapping


def remap_confusion(confusion: np.ndarray, mapping: np.ndarray, num_classes: int) -> np.ndarray:
    """Class-space confusion ``(C, C+1)`` from a cluster confusion and cluster -> class map.

    Clusters mapped to -1 land in the last column (predicted as no class).
    """
    conf = np.asarray(confusion)
    mapping = np.asarray(mapping, dtype=np.int64)
    target = np.where(mapping < 0, num_classes, mapping)
    out = np.zeros((conf.shape[0], num_classes + 1), dtype=np.int64)
    for j in range(conf.shape[1]):
        out[:, target[j]] += conf[:, j]
    return out


# --------------------------------------------------------------------------- scores of one label map
def hungarian_miou(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = 255) -> float:
    """Per-image mIoU (0-100) after one-to-one Hungarian matching of predicted ids to classes.

    ``pred`` is resized (nearest) to the ground truth's shape when they differ.
    """
    pred = np.asarray(pred)
    if pred.shape != np.shape(gt):
        pred = resize_labels(pred, tuple(np.shape(gt)))
    num_pred = int(pred.max(initial=0)) + 1
    conf = confusion_matrix(pred, gt, num_classes, ignore_index, num_pred=num_pred)
    return miou(remap_confusion(conf, hungarian_match(conf), num_classes))


def boundary_alignment(labels: np.ndarray, image: np.ndarray) -> float:
    """Mean Sobel gradient on segment boundaries / mean gradient overall (1 = chance).

    ``labels`` is resized (nearest) to the image when sizes differ.
    """
    from scipy import ndimage

    img = np.asarray(image, np.float32)
    img = img / 255.0 if np.asarray(image).dtype == np.uint8 else img
    grey = img.mean(-1) if img.ndim == 3 else img
    labels = np.asarray(labels)
    if labels.shape != grey.shape:
        labels = resize_labels(labels, grey.shape)
    grad = np.hypot(ndimage.sobel(grey, 0), ndimage.sobel(grey, 1))
    edge = np.zeros(labels.shape, bool)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    mean = float(grad.mean())
    if not edge.any() or mean <= 0:
        return float("nan")
    return float(grad[edge].mean() / mean)


def silhouette(features: np.ndarray, labels: np.ndarray, seed: int = 0, max_samples: int = 2048) -> float:
    """Cosine silhouette of a clustering in [-1, 1]; NaN with fewer than 2 clusters."""
    from sklearn.metrics import silhouette_score

    labels = np.asarray(labels).reshape(-1)
    n = len(np.unique(labels))
    if n < 2 or n >= labels.size:
        return float("nan")
    size = min(max_samples, labels.size)  # subsample large token grids (64x64 = 4096 tokens)
    return float(silhouette_score(np.asarray(features, np.float32), labels, metric="cosine",
                                  sample_size=size if size < labels.size else None, random_state=seed))


def score_labels(labels: np.ndarray, item: ProbeImage) -> dict[str, float]:
    """``miou`` (NaN without GT) and ``boundary`` of a label map at any size against a
    :class:`~emerdiff.evaluation.datasets.ProbeImage` (image and, if known, its ground truth)."""
    labels = np.asarray(labels)
    out = {"boundary": boundary_alignment(labels, item.image), "miou": float("nan")}
    if item.label is not None and item.num_classes is not None:
        out["miou"] = hungarian_miou(labels, item.label, item.num_classes, item.ignore_index)
    return out



# --------------------------------------------------------------------------- table statistics
def summarize(rows: Sequence[Mapping[str, Any]], by: str | Sequence[str], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Mean, sd and count of ``metrics`` per group of ``by`` (NaNs skipped), in first-seen order."""
    keys = [by] if isinstance(by, str) else list(by)
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, members in groups.items():
        row: dict[str, Any] = dict(zip(keys, key))
        row["n"] = len(members)
        for m in metrics:
            vals = np.array([float(r[m]) for r in members if r.get(m) is not None], np.float64)
            vals = vals[np.isfinite(vals)]
            row[m] = float(vals.mean()) if vals.size else float("nan")
            row[m + "_sd"] = float(vals.std()) if vals.size > 1 else 0.0 if vals.size else float("nan")
        out.append(row)
    return out


def best(rows: Sequence[Mapping[str, Any]], metric: str, by: str) -> Any:
    """The ``by`` value with the highest mean ``metric`` (None if every value is NaN)."""
    table = [r for r in summarize(rows, by, [metric]) if np.isfinite(r[metric])]
    return max(table, key=lambda r: r[metric])[by] if table else None
