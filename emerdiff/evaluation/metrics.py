"""Segmentation metrics and the evaluation protocols (docs/METHOD.md, "Evaluation protocols").

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

Records
Every image contributes an :class:`ImageRecord`: per method (EmerDiff,
nearest and bilinear upsampling, and any other method a record holds) the
joint histogram ``counts[m, c]`` (pixels of mask m with GT class c, at GT
resolution) of that method's per-pixel mask-id map, plus the masks'
embeddings. EmerDiff and the two upsamplings label pixels with the same K'
low-resolution masks, so they share one embedding array; a method with masks
of its own (e.g. DiffSeg's) carries its own (``ImageRecord.method_embeddings``).
Every protocol below is a function of these records, so all of them are
computed from one cached run without segmenting again.

Protocols (names as in results files and ``--protocol``)
- ``per_image_hungarian`` (as DiffSeg and DiffCut report): each image's masks
  are matched one-to-one to the GT classes present in that image
  (:func:`hungarian_match` on the image's own confusion); unmatched masks
  predict no class; the matched confusions are pooled over the dataset; mIoU.
- ``dataset_hungarian`` (the traditional unsupervised protocol EmerDiff
  reports): the mask embeddings of *all* images are clustered with k-means into
  as many clusters as classes; each method's dataset-level (class x cluster)
  confusion is matched one-to-one; mIoU.
- ``concept`` (the paper's modified protocol): one concept embedding per GT
  class; each mask takes the class of the most cosine-similar concept; mIoU
  without matching. The concept of class c is the paper's: the mean, over
  the dataset's pixels of class c, of the embedding of the mask each pixel
  belongs to (:func:`mask_concept_embeddings`), so it depends on the method's
  label map.
- ``concept_token_mean`` (our earlier variant, kept for continuity): the same
  protocol with the concept = mean low-resolution token feature over the
  class's GT downsampled to the token grid (:func:`concept_embeddings`), the
  same for every method.

Oracle protocol (not in :data:`PROTOCOLS`; asked for by name, e.g. by
``training.heldout``): ``majority``: every mask takes the GT class
holding most of its pixels in its own image (many-to-one, using the labels).
No mask labelling can score a higher pixel accuracy with the same label map,
so it measures the label map's boundaries apart from any assignment step: a
readout that places pixels better than upsampling wins here first.

:func:`bootstrap_protocols` adds a paired percentile bootstrap over images to
every protocol's mIoU and to the differences between methods.

Scores of one label map (the probes' and notebooks' rows): :func:`hungarian_miou`
(per-image Hungarian mIoU), :func:`boundary_alignment` (label-free, image edges),
:func:`silhouette` (label-free, feature space), :func:`score_labels` (both of the
first two for a :class:`~emerdiff.evaluation.datasets.ProbeImage`); :func:`summarize` and
:func:`best` tabulate rows of scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from emerdiff.sd.images import resize_labels

if TYPE_CHECKING:
    from emerdiff.evaluation.datasets import ProbeImage

METHODS: tuple[str, ...] = ("emerdiff", "nearest", "bilinear")
# Segmentation attribute holding each method's per-pixel mask-id map.
METHOD_FIELDS: dict[str, str] = {
    "emerdiff": "labels",
    "nearest": "nearest_labels",
    "bilinear": "bilinear_labels",
}
PROTOCOLS: tuple[str, ...] = ("per_image_hungarian", "dataset_hungarian", "concept", "concept_token_mean")
# Oracle protocols: computed on request (they use GT labels to assign masks), never by default.
ORACLE_PROTOCOLS: tuple[str, ...] = ("majority",)
KNOWN_PROTOCOLS: tuple[str, ...] = PROTOCOLS + ORACLE_PROTOCOLS
# concept-embedding variant -> its protocol name ("mask_mean" is the paper's and the default)
CONCEPT_VARIANTS: dict[str, str] = {"mask_mean": "concept", "token_mean": "concept_token_mean"}

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



# --------------------------------------------------------------------------- per-image records
def mask_class_counts(mask_ids: np.ndarray, gt: np.ndarray, num_masks: int, num_classes: int,
                      ignore_index: int = 255) -> np.ndarray:
    """Joint histogram ``counts[m, c]``: pixels of mask ``m`` with GT class ``c`` (ignore skipped).

    ``mask_ids`` is resized (nearest) to the GT shape when they differ.
    """
    mask_ids = np.asarray(mask_ids)
    if mask_ids.shape != np.shape(gt):
        mask_ids = resize_labels(mask_ids, np.shape(gt))
    return confusion_matrix(mask_ids, gt, num_classes, ignore_index, num_pred=num_masks).T.copy()



@dataclass
class ImageRecord:
    """What the protocols need from one segmented image.

    Attributes:
        image_id: identifier.
        counts: method -> ``(K_m, C)`` joint histogram of the method's mask ids
            (at GT resolution) and GT classes.
        mask_embeddings: ``(K', D)`` embedding of each low-res mask (shared by
            every method without an entry in ``method_embeddings``).
        query_features: ``(h*w, D)`` low-res features (Step A queries).
        lowres_labels: ``(h, w)`` low-res mask ids.
        lowres_gt: ``(h, w)`` GT downsampled to the feature grid (nearest, at
            token centres), ``ignore_index`` where void.
        locality: optional ``(K',)`` share of difference energy inside each mask.
        meta: free-form (segmentation config, model name).
        method_embeddings: method -> ``(K_m, D)`` embeddings of a method whose
            masks are its own (not the K' low-res masks), e.g. DiffSeg's.
    """

    image_id: str
    counts: dict[str, np.ndarray]
    mask_embeddings: np.ndarray
    query_features: np.ndarray
    lowres_labels: np.ndarray
    lowres_gt: np.ndarray
    locality: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    method_embeddings: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_masks(self) -> int:
        """Number of shared low-res masks K'."""
        return int(self.mask_embeddings.shape[0])

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods this record holds, in stored order."""
        return tuple(self.counts)

    def embeddings(self, method: str) -> np.ndarray:
        """``(K_m, D)`` embeddings of the masks whose ids ``method``'s label map uses."""
        return self.method_embeddings.get(method, self.mask_embeddings)


def segmentation_field(seg: Any, name: str) -> Any:
    """Field `name` of a segmentation object or mapping (None if absent)."""
    return seg.get(name) if isinstance(seg, Mapping) else getattr(seg, name, None)


def extra_method_items(seg: Any, extra_methods: Mapping[str, Mapping[str, Any]] | None = None,
                       ) -> dict[str, Mapping[str, Any]]:
    """Methods of ``seg`` beyond :data:`METHOD_FIELDS`: its ``extra_labels`` (shared mask ids)
    and ``extra_methods`` (or the given ``extra_methods``), name -> ``{"labels", "mask_embeddings"?}``."""
    items: dict[str, Mapping[str, Any]] = {
        name: {"labels": labels} for name, labels in (segmentation_field(seg, "extra_labels") or {}).items()}
    more = segmentation_field(seg, "extra_methods") if extra_methods is None else extra_methods
    for name, item in (more or {}).items():
        if name in items:
            raise ValueError(f"method {name!r} is both in extra_labels and extra_methods; keep one")
        items[name] = item
    return items


def build_record(image_id: str, seg: Any, gt: np.ndarray, num_classes: int,
                 ignore_index: int = 255, methods: Sequence[str] = METHODS,
                 extra_methods: Mapping[str, Mapping[str, Any]] | None = None) -> ImageRecord:
    """An :class:`ImageRecord` from a segmentation (object or mapping) and its GT map.

    ``seg`` needs ``labels``, ``nearest_labels``, ``bilinear_labels`` (mask
    ids, any size: resized to the GT with nearest if different),
    ``lowres_labels``, ``mask_embeddings``, ``query_features`` and optionally
    ``locality``, ``config``, ``model``.

    Further methods are scored too: ``seg``'s ``extra_labels`` (name -> mask-id
    map in the shared low-res mask ids, as ``Segmentation.extra_labels``) and
    ``extra_methods`` (default: ``seg``'s field of that name) name ->
    ``{"labels": mask ids, "mask_embeddings": (K_m, D) or absent}``. Without ``mask_embeddings`` the
    ids must be the shared low-res masks (e.g. a refinement of them); with it
    they are the method's own masks (e.g. DiffSeg's segments), embedded like
    the shared ones (mean query feature inside each mask, so that every
    protocol, token-mean concepts included, compares like with like).
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
    own: dict[str, np.ndarray] = {}
    for name, item in extra_method_items(seg, extra_methods).items():
        if name in counts or "-" in name:
            raise ValueError(f"extra method name {name!r} is taken or contains '-' (reserved for differences "
                             "such as 'emerdiff-nearest'); rename it")
        ids = np.asarray(item["labels"])
        if item.get("mask_embeddings") is not None:
            own[name] = np.asarray(item["mask_embeddings"], dtype=np.float32)
        k_m = own[name].shape[0] if name in own else k
        if ids.size and (ids.min() < 0 or ids.max() >= k_m):
            raise ValueError(f"method {name!r}: mask ids {int(ids.min())}..{int(ids.max())} outside 0..{k_m - 1} "
                             f"({'its own' if name in own else 'the shared'} {k_m} masks)")
        counts[name] = mask_class_counts(ids, gt, k_m, num_classes, ignore_index)
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
        lowres_gt=resize_labels(gt, low.shape).astype(np.int64),
        locality=None if loc is None else np.asarray(loc, dtype=np.float64),
        meta=meta,
        method_embeddings=own,
    )


def record_methods(records: Iterable[ImageRecord]) -> tuple[str, ...]:
    """The methods of the first record (the protocols check that every record has them)."""
    for rec in records:
        return rec.methods
    raise ValueError("no records to evaluate")


def _check_record(rec: ImageRecord, methods: Sequence[str]) -> None:
    missing = [m for m in methods if m not in rec.counts]
    if missing:
        raise ValueError(f"record {rec.image_id!r} lacks method(s) {missing} that other images have "
                         f"(it holds {list(rec.counts)}); re-run evaluate so that every image has the same "
                         "methods, or pass methods= explicitly")
    for m in methods:
        k_m, k_e = rec.counts[m].shape[0], rec.embeddings(m).shape[0]
        if k_m != k_e:
            raise ValueError(f"record {rec.image_id!r}, method {m!r}: counts have {k_m} masks but its "
                             f"embeddings {k_e}")


def _methods(records: Sequence[ImageRecord], methods: Sequence[str] | None) -> tuple[str, ...]:
    return tuple(methods) if methods is not None else record_methods(records)


def _embedding_groups(records: Sequence[ImageRecord], methods: Sequence[str]) -> dict[str | None, list[str]]:
    """Methods grouped by whose masks they label: None = the shared low-res masks, else a method's own."""
    first = records[0]
    groups: dict[str | None, list[str]] = {}
    for m in methods:
        groups.setdefault(m if m in first.method_embeddings else None, []).append(m)
    return groups


def _assignment_confusion(records: Iterable[ImageRecord], assignments: Iterable[np.ndarray],
                          method: str, num_classes: int, num_targets: int) -> np.ndarray:
    """Dataset confusion ``(C, T)`` when each image's mask m is assigned target a[m]."""
    conf = np.zeros((num_classes, num_targets), dtype=np.int64)
    for rec, assign in zip(records, assignments):
        counts = rec.counts[method]
        onehot = np.zeros((counts.shape[0], num_targets), dtype=np.int64)
        onehot[np.arange(counts.shape[0]), assign] = 1
        conf += counts.T @ onehot
    return conf


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _locality(records: Sequence[ImageRecord]) -> float | None:
    values = [r.locality for r in records if r.locality is not None and np.size(r.locality)]
    return float(np.mean(np.concatenate(values))) if values else None


def _add_locality(out: dict[str, Any], records: Sequence[ImageRecord]) -> None:
    # locality is a property of EmerDiff's difference maps, reported on its row only
    loc = _locality(records)
    if loc is not None and "emerdiff" in out["methods"]:
        out["methods"]["emerdiff"]["locality"] = loc


# --------------------------------------------------------------------------- protocols
def per_image_match(counts: np.ndarray, criterion: str = "iou") -> np.ndarray:
    """Class of each mask of one image by one-to-one matching to the classes present in it.

    Args:
        counts: ``(K, C)`` pixels of mask k with GT class c in this image.
        criterion: as :func:`hungarian_match`.
    Returns:
        ``(K,)`` class per mask, -1 for masks left unmatched (more masks than
        classes present). Absent classes are never matched: a free mask would
        otherwise take one at zero gain and turn into false positives.
    """
    conf = np.asarray(counts).T  # (C, K)
    present = np.flatnonzero(conf.sum(axis=1) > 0)
    mapping = np.full(conf.shape[1], -1, dtype=np.int64)
    if present.size == 0 or conf.shape[1] == 0:
        return mapping
    sub = hungarian_match(conf[present], criterion)
    matched = sub >= 0
    mapping[matched] = present[sub[matched]]
    return mapping


def per_image_hungarian_protocol(records: Sequence[ImageRecord], num_classes: int,
                                 class_names: Sequence[str] | None = None,
                                 methods: Sequence[str] | None = None, criterion: str = "iou") -> dict[str, Any]:
    """Per-image Hungarian protocol (DiffSeg, DiffCut): match each image's masks to its own classes.

    Each image's masks are matched one-to-one to the GT classes present in it
    (:func:`per_image_match`), unmatched masks predict no class, and the
    class-space confusions are summed over the dataset before the mIoU (not an
    average of per-image mIoUs). ``methods`` defaults to every method the records hold.
    """
    methods = _methods(records, methods)
    confs = {m: np.zeros((num_classes, num_classes + 1), dtype=np.int64) for m in methods}
    n = 0
    for rec in records:
        _check_record(rec, methods)
        n += 1
        for m in methods:
            confs[m] += remap_confusion(rec.counts[m].T, per_image_match(rec.counts[m], criterion), num_classes)
    if n == 0:
        raise ValueError("no records to evaluate")
    out: dict[str, Any] = {"protocol": "per_image_hungarian", "num_images": n, "criterion": criterion,
                           "methods": {m: scores(confs[m], class_names) for m in methods}}
    _add_locality(out, records)
    return out


def _kmeans_ids(x: np.ndarray, num_clusters: int, seed: int, normalize: bool, n_init: int) -> tuple[np.ndarray, int]:
    from sklearn.cluster import KMeans

    x = np.asarray(x, dtype=np.float64)
    if normalize:
        x = _l2_normalize(x)
    k = min(num_clusters, len(x))
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x), k


def dataset_clusters(records: Iterable[ImageRecord], num_clusters: int, seed: int = 0, normalize: bool = True,
                     n_init: int = 10, method: str | None = None) -> tuple[list[np.ndarray], int]:
    """k-means of the mask embeddings of all images: each image's mask -> cluster ids, and k
    (``num_clusters`` capped at the number of masks). ``method``: cluster that method's
    masks (its own embeddings if it has them); default the shared low-res masks."""
    embeddings = [np.asarray(rec.mask_embeddings if method is None else rec.embeddings(method), dtype=np.float64)
                  for rec in records]
    if not embeddings:
        raise ValueError("no records to evaluate")
    ids, k = _kmeans_ids(np.concatenate(embeddings), num_clusters, seed, normalize, n_init)
    return np.split(ids, np.cumsum([len(e) for e in embeddings])[:-1]), k


def dataset_hungarian_protocol(records: Sequence[ImageRecord], num_classes: int,
                               class_names: Sequence[str] | None = None,
                               methods: Sequence[str] | None = None, num_clusters: int | None = None,
                               seed: int = 0, normalize: bool = True, criterion: str = "iou",
                               n_init: int = 10) -> dict[str, Any]:
    """Dataset-level Hungarian protocol (EmerDiff's "traditional" one): k-means of all mask
    embeddings + one Hungarian matching per method.

    Args:
        records: one :class:`ImageRecord` per image (a lazy Sequence is fine;
            it is read several times).
        num_classes: number of GT classes; also the number of k-means clusters
            unless ``num_clusters`` is given (capped at the number of masks).
        methods: default every method the records hold. Methods labelling the
            shared low-res masks share one clustering; a method with masks of
            its own gets its own clustering (same settings).
        normalize: L2-normalise embeddings before k-means (cosine geometry,
            as the concept protocol uses).
        criterion: matching criterion of :func:`hungarian_match`.
    Returns:
        ``{"protocol", "methods": {method: scores + cluster_to_class}, ...}``.
    """
    methods = _methods(records, methods)
    for rec in records:
        _check_record(rec, methods)
    out: dict[str, Any] = {"protocol": "dataset_hungarian", "methods": {}}
    for source, group in _embedding_groups(records, methods).items():
        assignments, k = dataset_clusters(records, num_clusters or num_classes, seed, normalize, n_init, source)
        if source is None or "num_images" not in out:
            out.update(num_images=len(assignments), num_masks=int(sum(len(a) for a in assignments)),
                       num_clusters=int(k))
        for m in group:
            conf = _assignment_confusion(records, assignments, m, num_classes, k)
            mapping = hungarian_match(conf, criterion)
            res = scores(remap_confusion(conf, mapping, num_classes), class_names)
            res["cluster_to_class"] = mapping.tolist()
            if source is not None:
                res["num_clusters"] = int(k)
            out["methods"][m] = res
    out["methods"] = {m: out["methods"][m] for m in methods}
    _add_locality(out, records)
    return out


def concept_embeddings(records: Iterable[ImageRecord], num_classes: int,
                       ignore_index: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """Token-mean concepts (variant ``token_mean``): per-class mean of the low-res features over
    the class's GT pixels downsampled to the token grid, accumulated over the dataset.

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
    return _class_means(sums, counts)


def _class_means(sums: np.ndarray | None, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class means from summed embeddings and pixel counts (NaN rows for classes without pixels)."""
    if sums is None:
        raise ValueError("no records to evaluate")
    with np.errstate(invalid="ignore", divide="ignore"):
        concepts = sums / counts[:, None]
    concepts[counts == 0] = np.nan
    return concepts, counts


def mask_concept_embeddings(records: Iterable[ImageRecord], num_classes: int,
                            method: str = "emerdiff") -> tuple[np.ndarray, np.ndarray]:
    """The paper's concepts (variant ``mask_mean``): the concept of class c is the mean, over
    the dataset's (non-ignored) pixels of class c, of the embedding of the mask that
    ``method``'s label map puts the pixel in.

    From the records' joint histograms: ``sum_images counts.T @ embeddings`` divided by the
    class's pixel count. Returns ``(concepts (C, D), pixel_counts (C,))``; rows of classes
    without pixels are NaN.
    """
    sums: np.ndarray | None = None
    pixels = np.zeros(num_classes, dtype=np.int64)
    for rec in records:
        counts = np.asarray(rec.counts[method], dtype=np.int64)  # (K, C)
        emb = np.asarray(rec.embeddings(method), dtype=np.float64)
        if sums is None:
            sums = np.zeros((num_classes, emb.shape[1]))
        sums += counts.T.astype(np.float64) @ emb
        pixels += counts.sum(axis=0)
    return _class_means(sums, pixels)


def assign_to_concepts(mask_embeddings: np.ndarray, concepts: np.ndarray) -> np.ndarray:
    """Class of the most cosine-similar concept for each mask (NaN concepts never win)."""
    present = np.isfinite(concepts).all(axis=1)
    if not present.any():
        raise ValueError("no class has a concept embedding")
    sim = _l2_normalize(mask_embeddings) @ _l2_normalize(np.nan_to_num(concepts)).T
    sim[:, ~present] = -np.inf
    return np.argmax(sim, axis=1).astype(np.int64)


def _in_concept_space(rec: ImageRecord, method: str, concepts: np.ndarray) -> np.ndarray:
    emb = rec.embeddings(method)
    if emb.shape[1] != concepts.shape[1]:
        raise ValueError(f"record {rec.image_id!r}, method {method!r}: mask embeddings have {emb.shape[1]} dims but "
                         f"the concepts {concepts.shape[1]}; token-mean concepts need mask embeddings in the "
                         "token-feature space (e.g. the mean query feature inside each mask)")
    return emb


def concept_protocol(records: Sequence[ImageRecord], num_classes: int,
                     class_names: Sequence[str] | None = None,
                     methods: Sequence[str] | None = None, ignore_index: int = 255,
                     variant: str = "mask_mean") -> dict[str, Any]:
    """The paper's modified protocol: nearest concept (cosine) per mask, mIoU, no Hungarian.

    Args:
        variant: ``"mask_mean"`` (default, the paper's): concepts from each
            method's own label map (:func:`mask_concept_embeddings`), so each
            method is scored against concepts built from its own segmentation;
            ``"token_mean"``: one set of token-feature concepts for every method
            (:func:`concept_embeddings`); protocol name ``concept_token_mean``.
        methods: default every method the records hold.

    The concepts are computed from the same records (dataset-level, as in the
    paper); they use GT labels, so this measures how well the masks separate
    known concepts, not an unsupervised labelling.
    """
    if variant not in CONCEPT_VARIANTS:
        raise ValueError(f"unknown concept variant {variant!r}; choose from {list(CONCEPT_VARIANTS)}")
    methods = _methods(records, methods)
    for rec in records:
        _check_record(rec, methods)
    out: dict[str, Any] = {"protocol": CONCEPT_VARIANTS[variant], "concept_variant": variant, "methods": {}}
    if variant == "token_mean":
        concepts, token_counts = concept_embeddings(records, num_classes, ignore_index)
        out["num_concepts"] = int((token_counts > 0).sum())
    for m in methods:
        if variant == "mask_mean":  # each method's concepts come from its own label map
            concepts, pixels = mask_concept_embeddings(records, num_classes, m)
            out.setdefault("num_concepts", int((pixels > 0).sum()))
        assignments = [assign_to_concepts(_in_concept_space(rec, m, concepts), concepts) for rec in records]
        out["num_images"] = len(assignments)
        res = scores(_assignment_confusion(records, assignments, m, num_classes, num_classes), class_names)
        if variant == "mask_mean":
            res["num_concepts"] = int((pixels > 0).sum())
        out["methods"][m] = res
    _add_locality(out, records)
    return out


def majority_assignments(records: Iterable[ImageRecord], method: str) -> list[np.ndarray]:
    """Per image, each of ``method``'s masks -> the GT class with most of its pixels (ties: lowest id)."""
    return [np.asarray(rec.counts[method]).argmax(axis=1) for rec in records]


def majority_protocol(records: Sequence[ImageRecord], num_classes: int, class_names: Sequence[str] | None = None,
                      methods: Sequence[str] | None = None) -> dict[str, Any]:
    """Oracle protocol ``majority``: each method's masks labelled with their own majority GT class.

    The upper bound of pixel accuracy over every labelling of a method's masks (each mask's
    best class is chosen independently), so the differences between methods here are
    differences of their label maps alone. mIoU pooled over the dataset, as the others.
    """
    methods = _methods(records, methods)
    for rec in records:
        _check_record(rec, methods)
    out: dict[str, Any] = {"protocol": "majority", "methods": {}}
    for m in methods:
        assignments = majority_assignments(records, m)
        out["num_images"] = len(assignments)
        out["methods"][m] = scores(_assignment_confusion(records, assignments, m, num_classes, num_classes),
                                   class_names)
    _add_locality(out, records)
    return out


def evaluate_records(records: Sequence[ImageRecord], protocol: str, num_classes: int,
                     class_names: Sequence[str] | None = None, ignore_index: int = 255,
                     methods: Sequence[str] | None = None, seed: int = 0) -> dict[str, Any]:
    """Run one protocol of :data:`KNOWN_PROTOCOLS` on per-image records (``seed``: dataset k-means)."""
    if protocol == "majority":
        return majority_protocol(records, num_classes, class_names, methods)
    if protocol == "per_image_hungarian":
        return per_image_hungarian_protocol(records, num_classes, class_names, methods)
    if protocol == "dataset_hungarian":
        return dataset_hungarian_protocol(records, num_classes, class_names, methods, seed=seed)
    for variant, name in CONCEPT_VARIANTS.items():
        if protocol == name:
            return concept_protocol(records, num_classes, class_names, methods, ignore_index, variant)
    raise ValueError(f"unknown protocol {protocol!r}; choose from {list(KNOWN_PROTOCOLS)}")


def summary_rows(result: Mapping[str, Any],
                 intervals: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None) -> list[dict[str, Any]]:
    """Flat rows (protocol, method, miou, miou_lo, miou_hi, pixel_accuracy, ..., locality) of a
    protocol result; ``miou_lo``/``miou_hi`` from ``intervals`` (:func:`bootstrap_protocols`), None without."""
    rows = []
    per = (intervals or {}).get(result["protocol"], {})
    for method, res in result["methods"].items():
        ci = per.get(method) or {}
        rows.append({
            "protocol": result["protocol"],
            "method": method,
            "miou": res["miou"],
            "miou_lo": ci.get("lo"),
            "miou_hi": ci.get("hi"),
            "pixel_accuracy": res["pixel_accuracy"],
            "num_classes_present": res["num_classes_present"],
            "num_images": result["num_images"],
            "locality": res.get("locality"),
        })
    return rows


def per_class_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (protocol, method, class): ``class_id``, ``class`` name and ``iou`` (None if
    the class is absent from both GT and prediction)."""
    rows = []
    for method, res in result["methods"].items():
        for class_id, (name, iou) in enumerate(res["per_class_iou"].items()):
            rows.append({"protocol": result["protocol"], "method": method, "class_id": class_id,
                         "class": name, "iou": iou})
    return rows


# --------------------------------------------------------------------------- uncertainty
def bootstrap_weights(num_images: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """``(n_boot + 1, num_images)`` image multiplicities: row 0 all ones (the full data), then
    ``n_boot`` seeded resamples of the images with replacement."""
    if num_images < 1:
        raise ValueError("no records to evaluate")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    rng = np.random.default_rng(seed)
    return np.vstack([np.ones(num_images, dtype=np.int64),
                      rng.multinomial(num_images, np.full(num_images, 1.0 / num_images), size=n_boot)])


def _miou_rows(tp: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """mIoU of each row of stacked per-class true positives, GT and predicted pixel totals
    (the same arithmetic as :func:`per_class_iou` and :func:`miou`)."""
    union = gt + pred - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan) * 100.0
    out = np.full(len(iou), np.nan)
    ok = np.isfinite(iou).any(axis=1)
    out[ok] = np.nanmean(iou[ok], axis=1)
    return out


def _onehot(ids: np.ndarray, size: int) -> Any:
    """Sparse ``(size, len(ids))`` matrix with a 1 at (ids[j], j)."""
    from scipy.sparse import csr_matrix

    return csr_matrix((np.ones(len(ids)), (ids, np.arange(len(ids)))), shape=(size, len(ids)))


def protocol_draws(records: Sequence[ImageRecord], num_classes: int, weights: np.ndarray,
                   protocols: Sequence[str] = PROTOCOLS, methods: Sequence[str] | None = None,
                   ignore_index: int = 255, seed: int = 0, criterion: str = "iou",
                   num_clusters: int | None = None, normalize: bool = True,
                   n_init: int = 10) -> dict[str, dict[str, np.ndarray]]:
    """mIoU of every method under every protocol, once per row of ``weights``.

    Args:
        records: one per image (read once).
        weights: ``(B, n)`` multiplicity of each image in each draw
            (:func:`bootstrap_weights`); an all-ones row gives the protocols' own values.
        seed: k-means seed of ``dataset_hungarian`` (as :func:`dataset_hungarian_protocol`).
    Per draw, everything data-dependent is redone on the weighted images: per-image
    matchings are summed with the weights; the dataset Hungarian matching is redone on
    the weighted confusion (the k-means clusters are fitted once, on all images); the
    concept embeddings and every mask's nearest concept are recomputed.
    Returns ``{protocol: {method: (B,) mIoU}}``.
    """
    unknown = [p for p in protocols if p not in KNOWN_PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol(s) {unknown}; choose from {list(KNOWN_PROTOCOLS)}")
    records = list(records) if not isinstance(records, Sequence) else records
    methods = _methods(records, methods)
    n, c = len(records), num_classes
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] != n:
        raise ValueError(f"weights must be (draws, {n} images), got shape {weights.shape}")
    groups = _embedding_groups(records, methods)
    source_of = {m: s for s, ms in groups.items() for m in ms}
    counts: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    owner: dict[str | None, list[np.ndarray]] = {s: [] for s in groups}
    emb: dict[str | None, list[np.ndarray]] = {s: [] for s in groups}
    per_image = {m: np.zeros((3, n, c)) for m in methods} if "per_image_hungarian" in protocols else {}
    tok_img, tok_cls, tok_sum, tok_cnt = [], [], [], []
    for i, rec in enumerate(records):
        _check_record(rec, methods)
        for s in groups:
            e = rec.mask_embeddings if s is None else rec.embeddings(s)
            emb[s].append(np.asarray(e, dtype=np.float64))
            owner[s].append(np.full(len(e), i))
        for m in methods:
            counts[m].append(np.asarray(rec.counts[m], dtype=np.float64))
            if per_image:
                conf = remap_confusion(rec.counts[m].T, per_image_match(rec.counts[m], criterion), c)
                per_image[m][:, i] = np.diag(conf[:, :c]), conf.sum(axis=1), conf[:, :c].sum(axis=0)
        if "concept_token_mean" in protocols:
            gt = np.asarray(rec.lowres_gt).reshape(-1)
            valid = gt != ignore_index
            feats = np.asarray(rec.query_features, dtype=np.float64)[valid]
            for cls in np.unique(gt[valid]):
                sel = gt[valid] == cls
                tok_img.append(i)
                tok_cls.append(int(cls))
                tok_sum.append(feats[sel].sum(axis=0))
                tok_cnt.append(int(sel.sum()))
    cnt = {m: np.concatenate(v) for m, v in counts.items()}  # (M, C) per method
    own = {s: np.concatenate(v) for s, v in owner.items()}
    raw = {s: np.concatenate(v) for s, v in emb.items()}
    unit = {s: _l2_normalize(v) for s, v in raw.items()}
    out: dict[str, dict[str, np.ndarray]] = {}

    if "per_image_hungarian" in protocols:
        out["per_image_hungarian"] = {m: _miou_rows(*(weights @ per_image[m][j] for j in range(3)))
                                      for m in methods}

    clusters: dict[str | None, tuple[Any, int]] = {}
    if "dataset_hungarian" in protocols:
        for s in groups:
            ids, k = _kmeans_ids(raw[s], num_clusters or c, seed, normalize, n_init)
            clusters[s] = (_onehot(ids, k), k)
        out["dataset_hungarian"] = {m: np.empty(len(weights)) for m in methods}
    if "majority" in protocols:  # the assignment uses GT only: the same in every draw
        majority = {m: np.argmax(cnt[m], axis=1) for m in methods}
        out["majority"] = {m: np.empty(len(weights)) for m in methods}
    if any(p in protocols for p in CONCEPT_VARIANTS.values()):
        for p in CONCEPT_VARIANTS.values():
            if p in protocols:
                out[p] = {m: np.empty(len(weights)) for m in methods}
    if tok_img:
        tok_img_a, tok_cls_a = np.asarray(tok_img), np.asarray(tok_cls)
        tok_sum_a, tok_cnt_a = np.asarray(tok_sum), np.asarray(tok_cnt, dtype=np.float64)
        for m in methods:  # the same check and message as the protocol's
            _in_concept_space(records[0], m, tok_sum_a)

    def nearest_concept(s: str | None, sums: np.ndarray, pixels: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            concepts = sums / pixels[:, None]
        sim = unit[s] @ _l2_normalize(np.nan_to_num(concepts)).T
        sim[:, pixels == 0] = -np.inf
        return sim.argmax(axis=1)

    def draw(b: int, w: np.ndarray) -> None:
        if "concept_token_mean" in protocols:
            from scipy.sparse import csr_matrix

            pick = csr_matrix((w[tok_img_a], (tok_cls_a, np.arange(len(tok_img_a)))), shape=(c, len(tok_img_a)))
            token_sums, tokens = pick @ tok_sum_a, pick @ tok_cnt_a
            token_assign = {s: nearest_concept(s, token_sums, tokens) for s in groups}
        for m in methods:
            s = source_of[m]
            weighted = cnt[m] * w[own[s]][:, None]  # (M, C) pixel counts of this draw
            if "majority" in protocols:
                out["majority"][m][b] = miou((_onehot(majority[m], c) @ weighted).T)
            if "dataset_hungarian" in protocols:
                onehot, k = clusters[s]
                conf = np.rint((onehot @ weighted).T).astype(np.int64)  # (C, k)
                out["dataset_hungarian"][m][b] = miou(remap_confusion(conf, hungarian_match(conf, criterion), c))
            for variant, p in CONCEPT_VARIANTS.items():
                if p not in protocols:
                    continue
                if variant == "mask_mean":
                    assign = nearest_concept(s, weighted.T @ raw[s], weighted.sum(axis=0))
                else:
                    assign = token_assign[s]
                out[p][m][b] = miou((_onehot(assign, c) @ weighted).T)

    with _few_blas_threads(sum(len(v) for v in raw.values()) * raw[next(iter(raw))].shape[1]):
        for b, w in enumerate(weights):
            draw(b, w)
    return {p: out[p] for p in protocols}


def _few_blas_threads(size: int) -> Any:
    """One BLAS thread while a draw's matrices are small (``size`` = masks x embedding dims):
    there, on a busy CPU, thread start-up and spinning cost several times the work itself."""
    from contextlib import nullcontext

    if size > 2_000_000:
        return nullcontext()
    try:
        from threadpoolctl import threadpool_limits  # scikit-learn's own dependency
    except ImportError:  # pragma: no cover - scikit-learn always brings it
        return nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def interval(draws: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """``{"value": draws[0], "lo", "hi"}``: percentile interval of ``draws[1:]`` (NaN without resamples)."""
    draws = np.asarray(draws, dtype=np.float64)
    tail = (1.0 - level) / 2 * 100
    rest = draws[1:][np.isfinite(draws[1:])]
    if rest.size == 0:
        return {"value": float(draws[0]), "lo": float("nan"), "hi": float("nan")}
    return {"value": float(draws[0]), "lo": float(np.percentile(rest, tail)),
            "hi": float(np.percentile(rest, 100 - tail))}


def summarize_draws(draws: Mapping[str, np.ndarray], level: float = 0.95) -> dict[str, dict[str, float]]:
    """Intervals of each method and of the difference of every pair of methods, ``"a-b"`` for
    a before b in ``draws``' order (paired: the same resample for both)."""
    names = list(draws)
    out = {m: interval(draws[m], level) for m in names}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            out[f"{a}-{b}"] = interval(np.asarray(draws[a]) - np.asarray(draws[b]), level)
    return out


def bootstrap_protocols(records: Sequence[ImageRecord], num_classes: int, methods: Sequence[str] | None = None,
                        n_boot: int = 1000, level: float = 0.95, seed: int = 0, ignore_index: int = 255,
                        protocols: Sequence[str] = PROTOCOLS, cluster_seed: int = 0,
                        ) -> dict[str, dict[str, dict[str, float]]]:
    """Paired percentile bootstrap over images of every protocol (:func:`protocol_draws`).

    Each resample draws the images with replacement (``seed``) and recomputes every method's
    mIoU under every protocol, and the difference of every pair of methods on the same
    resample. ``cluster_seed`` is the dataset k-means seed. Returns ``{protocol: {method or
    "a-b": {"value", "lo", "hi"}}}``; ``value`` is the estimate on all images (equal to the
    protocol functions' mIoU).
    """
    weights = bootstrap_weights(len(records), n_boot, seed)
    draws = protocol_draws(records, num_classes, weights, protocols, methods, ignore_index, seed=cluster_seed)
    return {p: summarize_draws(d, level) for p, d in draws.items()}


def compare_records(records_a: Sequence[ImageRecord], records_b: Sequence[ImageRecord], num_classes: int,
                    protocols: Sequence[str] = PROTOCOLS, n_boot: int = 1000, level: float = 0.95,
                    seed: int = 0, ignore_index: int = 255,
                    cluster_seeds: tuple[int, int] = (0, 0)) -> list[dict[str, Any]]:
    """Paired comparison of two runs on the same images (``records_a[i]`` and ``records_b[i]``
    are the same image).

    Both runs' protocols are recomputed on these images with the same resamples, so the
    difference A - B of each protocol x method gets a paired interval. Methods present in one
    run only get rows with the other side None. Returns rows ``{"protocol", "method", "a",
    "b", "a-b"}``, each value an :func:`interval` dict or None.
    """
    ids_a = [r.image_id for r in records_a]
    ids_b = [r.image_id for r in records_b]
    if ids_a != ids_b:
        raise ValueError("compare_records needs the same images in the same order in both runs")
    weights = bootstrap_weights(len(records_a), n_boot, seed)
    draws_a = protocol_draws(records_a, num_classes, weights, protocols, None, ignore_index, seed=cluster_seeds[0])
    draws_b = protocol_draws(records_b, num_classes, weights, protocols, None, ignore_index, seed=cluster_seeds[1])
    methods = list(dict.fromkeys([*record_methods(records_a), *record_methods(records_b)]))
    rows = []
    for p in protocols:
        for m in methods:
            a, b = draws_a[p].get(m), draws_b[p].get(m)
            rows.append({"protocol": p, "method": m,
                         "a": None if a is None else interval(a, level),
                         "b": None if b is None else interval(b, level),
                         "a-b": None if a is None or b is None else interval(a - b, level)})
    return rows


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
