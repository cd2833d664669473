"""Segmentation metrics and the two evaluation protocols of EmerDiff (docs/METHOD.md).

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

Protocols
Every image contributes K' low-resolution masks; the three per-pixel label
maps (EmerDiff, nearest and bilinear upsampling) use the same mask ids, so a
mask -> class assignment applies to all three. Per image we only need the
joint histogram ``counts[m, c]`` (pixels of mask m with GT class c) of each
label map: the dataset confusion of any assignment is a sum of those.

- :func:`hungarian_protocol` (traditional unsupervised protocol): the mask
  embeddings of *all* images are clustered with k-means into as many clusters
  as classes; each method's dataset-level (class x cluster) confusion is
  matched one-to-one with :func:`hungarian_match`; mIoU.
- :func:`concept_protocol` (the paper's modified protocol): one concept
  embedding per GT class, the mean low-res feature over the class's
  downsampled pixels accumulated over the dataset; each mask takes the class
  of the most cosine-similar concept; mIoU without Hungarian matching.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

METHODS: tuple[str, ...] = ("emerdiff", "nearest", "bilinear")
# Segmentation attribute holding each method's per-pixel mask-id map.
METHOD_FIELDS: dict[str, str] = {
    "emerdiff": "labels",
    "nearest": "nearest_labels",
    "bilinear": "bilinear_labels",
}
PROTOCOLS: tuple[str, ...] = ("hungarian", "concept")


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


# --------------------------------------------------------------------------- per-image records
def mask_class_counts(mask_ids: np.ndarray, gt: np.ndarray, num_masks: int, num_classes: int,
                      ignore_index: int = 255) -> np.ndarray:
    """Joint histogram ``counts[m, c]``: pixels of mask ``m`` with GT class ``c`` (ignore skipped).

    ``mask_ids`` is resized (nearest) to the GT shape when they differ.
    """
    mask_ids = np.asarray(mask_ids)
    if mask_ids.shape != np.shape(gt):
        mask_ids = resize_nearest(mask_ids, np.shape(gt))
    return confusion_matrix(mask_ids, gt, num_classes, ignore_index, num_pred=num_masks).T.copy()


def resize_nearest(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resize of an integer map, sampling at pixel centres."""
    labels = np.asarray(labels)
    h, w = labels.shape
    H, W = int(shape[0]), int(shape[1])
    rows = np.minimum(((np.arange(H) + 0.5) * h / H).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * w / W).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


@dataclass
class ImageRecord:
    """What the protocols need from one segmented image.

    Attributes:
        image_id: identifier.
        counts: method -> ``(K', C)`` joint histogram of mask ids and GT classes.
        mask_embeddings: ``(K', D)`` embedding of each low-res mask.
        query_features: ``(h*w, D)`` low-res features (Step A queries).
        lowres_labels: ``(h, w)`` low-res mask ids.
        lowres_gt: ``(h, w)`` GT downsampled to the feature grid (nearest, at
            token centres), ``ignore_index`` where void.
        locality: optional ``(K',)`` share of difference energy inside each mask.
        meta: free-form (segmentation config, model name).
    """

    image_id: str
    counts: dict[str, np.ndarray]
    mask_embeddings: np.ndarray
    query_features: np.ndarray
    lowres_labels: np.ndarray
    lowres_gt: np.ndarray
    locality: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_masks(self) -> int:
        return int(self.mask_embeddings.shape[0])


def segmentation_field(seg: Any, name: str) -> Any:
    """Field `name` of a segmentation object or mapping (None if absent)."""
    return seg.get(name) if isinstance(seg, Mapping) else getattr(seg, name, None)


def build_record(image_id: str, seg: Any, gt: np.ndarray, num_classes: int,
                 ignore_index: int = 255, methods: Sequence[str] = METHODS) -> ImageRecord:
    """An :class:`ImageRecord` from a segmentation (object or mapping) and its GT map.

    ``seg`` needs ``labels``, ``nearest_labels``, ``bilinear_labels`` (mask
    ids, any size: resized to the GT with nearest if different),
    ``lowres_labels``, ``mask_embeddings``, ``query_features`` and optionally
    ``locality``, ``config``, ``model``.
    """
    gt = np.asarray(gt)
    emb = np.asarray(segmentation_field(seg, "mask_embeddings"), dtype=np.float32)
    feats = np.asarray(segmentation_field(seg, "query_features"), dtype=np.float32)
    low = np.asarray(segmentation_field(seg, "lowres_labels")).astype(np.int64)
    k = emb.shape[0]
    if low.size != feats.shape[0]:
        raise ValueError(f"lowres_labels has {low.size} tokens but query_features {feats.shape[0]}")
    counts = {}
    for m in methods:
        ids = segmentation_field(seg, METHOD_FIELDS[m])
        if ids is None:
            raise ValueError(f"segmentation lacks {METHOD_FIELDS[m]!r} needed for method {m!r}")
        counts[m] = mask_class_counts(ids, gt, k, num_classes, ignore_index)
    loc = segmentation_field(seg, "locality")
    meta = {}
    for key in ("config", "model"):
        value = segmentation_field(seg, key)
        if value is not None:
            meta[key] = value
    return ImageRecord(
        image_id=image_id,
        counts=counts,
        mask_embeddings=emb,
        query_features=feats,
        lowres_labels=low,
        lowres_gt=resize_nearest(gt, low.shape).astype(np.int64),
        locality=None if loc is None else np.asarray(loc, dtype=np.float64),
        meta=meta,
    )


def _assignment_confusion(records: Iterable[ImageRecord], assignments: Iterable[np.ndarray],
                          method: str, num_classes: int, num_targets: int) -> np.ndarray:
    """Dataset confusion ``(C, T)`` when each image's mask m is assigned target a[m]."""
    conf = np.zeros((num_classes, num_targets), dtype=np.int64)
    for rec, assign in zip(records, assignments):
        onehot = np.zeros((rec.num_masks, num_targets), dtype=np.int64)
        onehot[np.arange(rec.num_masks), assign] = 1
        conf += rec.counts[method].T @ onehot
    return conf


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _locality(records: Sequence[ImageRecord]) -> float | None:
    values = [r.locality for r in records if r.locality is not None and np.size(r.locality)]
    return float(np.mean(np.concatenate(values))) if values else None


# --------------------------------------------------------------------------- protocols
def dataset_clusters(records: Iterable[ImageRecord], num_clusters: int, seed: int = 0, normalize: bool = True,
                     n_init: int = 10) -> tuple[list[np.ndarray], int]:
    """k-means of the mask embeddings of all images: each image's mask -> cluster ids, and k
    (``num_clusters`` capped at the number of masks)."""
    from sklearn.cluster import KMeans

    embeddings = [np.asarray(rec.mask_embeddings, dtype=np.float64) for rec in records]
    if not embeddings:
        raise ValueError("no records to evaluate")
    x = np.concatenate(embeddings)
    if normalize:
        x = _l2_normalize(x)
    k = min(num_clusters, len(x))
    ids = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x)
    return np.split(ids, np.cumsum([len(e) for e in embeddings])[:-1]), k


def hungarian_protocol(records: Sequence[ImageRecord], num_classes: int,
                       class_names: Sequence[str] | None = None,
                       methods: Sequence[str] = METHODS, num_clusters: int | None = None,
                       seed: int = 0, normalize: bool = True, criterion: str = "iou",
                       n_init: int = 10) -> dict[str, Any]:
    """Traditional unsupervised protocol: dataset k-means of mask embeddings + Hungarian.

    Args:
        records: one :class:`ImageRecord` per image (a lazy Sequence is fine;
            it is read twice).
        num_classes: number of GT classes; also the number of k-means clusters
            unless ``num_clusters`` is given (capped at the number of masks).
        normalize: L2-normalise embeddings before k-means (cosine geometry,
            as the concept protocol uses).
        criterion: matching criterion of :func:`hungarian_match`.
    Returns:
        ``{"protocol", "methods": {method: scores + cluster_to_class}, ...}``.
    """
    assignments, k = dataset_clusters(records, num_clusters or num_classes, seed, normalize, n_init)
    out: dict[str, Any] = {"protocol": "hungarian", "num_images": len(assignments),
                           "num_masks": int(sum(len(a) for a in assignments)), "num_clusters": int(k),
                           "methods": {}}
    for m in methods:
        conf = _assignment_confusion(records, assignments, m, num_classes, k)
        mapping = hungarian_match(conf, criterion)
        res = scores(remap_confusion(conf, mapping, num_classes), class_names)
        res["cluster_to_class"] = mapping.tolist()
        out["methods"][m] = res
    loc = _locality(records)
    if loc is not None:
        out["methods"].get("emerdiff", {})["locality"] = loc
    return out


def concept_embeddings(records: Iterable[ImageRecord], num_classes: int,
                       ignore_index: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """Per-class mean of the low-res features over the class's downsampled pixels.

    Returns ``(concepts (C, D), token_counts (C,))``; rows of classes without
    any token are NaN.
    """
    sums: np.ndarray | None = None
    counts = np.zeros(num_classes, dtype=np.int64)
    for rec in records:
        gt = np.asarray(rec.lowres_gt).reshape(-1)
        feats = np.asarray(rec.query_features, dtype=np.float64)
        if sums is None:
            sums = np.zeros((num_classes, feats.shape[1]))
        valid = gt != ignore_index
        np.add.at(sums, gt[valid], feats[valid])
        counts += np.bincount(gt[valid], minlength=num_classes)[:num_classes]
    if sums is None:
        raise ValueError("no records to evaluate")
    with np.errstate(invalid="ignore", divide="ignore"):
        concepts = sums / counts[:, None]
    concepts[counts == 0] = np.nan
    return concepts, counts


def assign_to_concepts(mask_embeddings: np.ndarray, concepts: np.ndarray) -> np.ndarray:
    """Class of the most cosine-similar concept for each mask (NaN concepts never win)."""
    present = np.isfinite(concepts).all(axis=1)
    if not present.any():
        raise ValueError("no class has a concept embedding")
    sim = _l2_normalize(mask_embeddings) @ _l2_normalize(np.nan_to_num(concepts)).T
    sim[:, ~present] = -np.inf
    return np.argmax(sim, axis=1).astype(np.int64)


def concept_protocol(records: Sequence[ImageRecord], num_classes: int,
                     class_names: Sequence[str] | None = None,
                     methods: Sequence[str] = METHODS, ignore_index: int = 255) -> dict[str, Any]:
    """The paper's modified protocol: nearest concept (cosine) per mask, mIoU, no Hungarian.

    The concepts are computed from the same records (dataset-level, as in the
    paper); they use GT labels, so this measures how well the masks separate
    known concepts, not an unsupervised labelling.
    """
    concepts, token_counts = concept_embeddings(records, num_classes, ignore_index)
    assignments = [assign_to_concepts(rec.mask_embeddings, concepts) for rec in records]
    out: dict[str, Any] = {"protocol": "concept", "num_images": len(assignments),
                           "num_concepts": int((token_counts > 0).sum()), "methods": {}}
    for m in methods:
        conf = _assignment_confusion(records, assignments, m, num_classes, num_classes)
        out["methods"][m] = scores(conf, class_names)
    loc = _locality(records)
    if loc is not None:
        out["methods"].get("emerdiff", {})["locality"] = loc
    return out


def evaluate_records(records: Sequence[ImageRecord], protocol: str, num_classes: int,
                     class_names: Sequence[str] | None = None, ignore_index: int = 255,
                     methods: Sequence[str] = METHODS, seed: int = 0) -> dict[str, Any]:
    """Run one protocol (``"hungarian"`` or ``"concept"``) on per-image records."""
    if protocol == "hungarian":
        return hungarian_protocol(records, num_classes, class_names, methods, seed=seed)
    if protocol == "concept":
        return concept_protocol(records, num_classes, class_names, methods, ignore_index)
    raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")


def summary_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Flat rows (protocol, method, miou, pixel_accuracy, ..., locality) of a protocol result."""
    rows = []
    for method, res in result["methods"].items():
        rows.append({
            "protocol": result["protocol"],
            "method": method,
            "miou": res["miou"],
            "pixel_accuracy": res["pixel_accuracy"],
            "num_classes_present": res["num_classes_present"],
            "num_images": result["num_images"],
            "locality": res.get("locality"),
        })
    return rows


# --------------------------------------------------------------------------- uncertainty
def bootstrap_protocols(records: Sequence[ImageRecord], num_classes: int, methods: Sequence[str] = METHODS,
                        reference: str = "emerdiff", n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                        ignore_index: int = 255) -> dict[str, dict[str, dict[str, float]]]:
    """Percentile bootstrap over images of both dataset-level protocols.

    Each resample draws the images with replacement and recomputes, per protocol, every
    method's mIoU and its difference to ``reference`` (paired: the same resample for all
    methods). Hungarian: the dataset k-means clusters are fitted once on all images (as
    :func:`hungarian_protocol`, seed 0) and the one-to-one matching is redone per resample.
    Concept: the concept embeddings and every mask's nearest concept are recomputed per
    resample. Returns ``{protocol: {method or "reference-method": {"value", "lo", "hi"}}}``;
    ``value`` is the estimate on all images (equal to the protocol functions' mIoU).
    """
    recs = list(records)
    if not recs:
        raise ValueError("no records to evaluate")
    n = len(recs)
    rng = np.random.default_rng(seed)
    weights = np.vstack([np.ones(n, dtype=np.int64), rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)])
    owner = np.concatenate([np.full(r.num_masks, i) for i, r in enumerate(recs)])
    counts = {m: np.concatenate([r.counts[m] for r in recs]).astype(np.float64) for m in methods}  # (M, C)
    emb = np.concatenate([r.mask_embeddings for r in recs]).astype(np.float64)
    clusters, k = dataset_clusters(recs, num_classes)
    clusters = np.concatenate(clusters)
    # per-image class sums of the low-res features and token counts (concept embeddings)
    dim = recs[0].query_features.shape[1]
    class_sums = np.zeros((n, num_classes, dim))
    class_tokens = np.zeros((n, num_classes))
    for i, r in enumerate(recs):
        gt = np.asarray(r.lowres_gt).reshape(-1)
        valid = gt != ignore_index
        np.add.at(class_sums[i], gt[valid], np.asarray(r.query_features, dtype=np.float64)[valid])
        class_tokens[i] = np.bincount(gt[valid], minlength=num_classes)[:num_classes]
    emb_n = _l2_normalize(emb)

    def confusion(method: str, w_mask: np.ndarray, target: np.ndarray, size: int) -> np.ndarray:
        onehot = np.zeros((len(target), size))
        onehot[np.arange(len(target)), target] = 1.0
        return np.rint((counts[method] * w_mask[:, None]).T @ onehot).astype(np.int64)  # integer pixel counts

    draws: dict[str, dict[str, list[float]]] = {"hungarian": {}, "concept": {}}
    for w in weights:
        w_mask = w[owner].astype(np.float64)
        for m in methods:
            conf = confusion(m, w_mask, clusters, k)
            draws["hungarian"].setdefault(m, []).append(
                miou(remap_confusion(conf, hungarian_match(conf), num_classes)))
        tokens = w @ class_tokens
        with np.errstate(invalid="ignore", divide="ignore"):
            concepts = np.einsum("i,icd->cd", w.astype(np.float64), class_sums) / tokens[:, None]
        sim = emb_n @ _l2_normalize(np.nan_to_num(concepts)).T
        sim[:, tokens == 0] = -np.inf
        assign = sim.argmax(1)
        for m in methods:
            draws["concept"].setdefault(m, []).append(miou(confusion(m, w_mask, assign, num_classes)))
    tail = (1.0 - level) / 2 * 100
    out: dict[str, dict[str, dict[str, float]]] = {}
    for protocol, per_method in draws.items():
        values = {m: np.asarray(v) for m, v in per_method.items()}
        if reference in values:
            for m in methods:
                if m != reference:
                    values[f"{reference}-{m}"] = values[reference] - values[m]
        out[protocol] = {name: {"value": float(v[0]), "lo": float(np.nanpercentile(v[1:], tail)),
                                "hi": float(np.nanpercentile(v[1:], 100 - tail))} for name, v in values.items()}
    return out
