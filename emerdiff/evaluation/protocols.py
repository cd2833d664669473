"""The evaluation protocols (docs/METHOD.md, "Evaluation protocols"), each implemented once.

Every protocol is one weighted computation on per-image records
(:class:`~emerdiff.evaluation.records.ImageRecord`): :func:`protocol_totals` scores each
method once per row of an image-weight matrix ``(B, n)``. Row of ones = the protocol on the
data as it is (:func:`evaluate_records`); a bootstrap resample is a row of image multiplicities
(:mod:`emerdiff.evaluation.bootstrap`); integer weights equal repeating the images.

Protocols (names as in results files and ``--protocol``)
- ``per_image_hungarian`` (as DiffSeg and DiffCut report): each image's masks
  are matched one-to-one to the GT classes present in that image
  (:func:`per_image_match`); unmatched masks predict no class; the matched
  confusions are pooled over the dataset; mIoU.
- ``dataset_hungarian`` (the traditional unsupervised protocol EmerDiff
  reports): the mask embeddings of *all* images are clustered with k-means into
  as many clusters as classes (once, on all images); each method's dataset-level
  (class x cluster) confusion is matched one-to-one; mIoU.
- ``concept`` (the paper's modified protocol): one concept embedding per GT
  class; each mask takes the class of the most cosine-similar concept; mIoU
  without matching. The concept of class c is the paper's: the mean, over
  the dataset's pixels of class c, of the embedding of the mask each pixel
  belongs to (:func:`mask_concept_embeddings`), so it depends on the method's label map.
- ``concept_token_mean`` (our earlier variant, kept for continuity): the same
  protocol with the concept = mean low-resolution token feature over the
  class's GT downsampled to the token grid (:func:`concept_embeddings`), the
  same for every method.

Oracle protocol (not in :data:`PROTOCOLS`; asked for by name, e.g. by
``training.heldout``): ``majority``: every mask takes the GT class holding most
of its pixels in its own image (many-to-one, using the labels). No mask labelling
can score a higher pixel accuracy with the same label map, so it measures the label
map's boundaries apart from any assignment step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from emerdiff.evaluation.boundary import BoundaryMetrics
from emerdiff.evaluation.metrics import (
    confusion_totals,
    hungarian_match,
    miou_rows,
    remap_confusion,
    scores_from_totals,
)
from emerdiff.evaluation.records import ImageRecord, check_record, resolve_methods
from emerdiff.sd.images import resize_labels

PROTOCOLS: tuple[str, ...] = ("per_image_hungarian", "dataset_hungarian", "concept", "concept_token_mean")
# Oracle protocols: computed on request (they use GT labels to assign masks), never by default.
ORACLE_PROTOCOLS: tuple[str, ...] = ("majority",)
KNOWN_PROTOCOLS: tuple[str, ...] = PROTOCOLS + ORACLE_PROTOCOLS
# concept-embedding variant -> its protocol name ("mask_mean" is the paper's and the default)
CONCEPT_VARIANTS: dict[str, str] = {"mask_mean": "concept", "token_mean": "concept_token_mean"}


# --------------------------------------------------------------------------- building blocks
def _l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _onehot(ids: np.ndarray, size: int) -> Any:
    """Sparse ``(size, len(ids))`` matrix with a 1 at (ids[j], j)."""
    from scipy.sparse import csr_matrix

    return csr_matrix((np.ones(len(ids)), (ids, np.arange(len(ids)))), shape=(size, len(ids)))


def _class_means(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-class means from summed embeddings and pixel counts (NaN rows for classes without pixels)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        concepts = sums / counts[:, None]
    concepts[counts == 0] = np.nan
    return concepts


def _nearest_concept(unit_embeddings: np.ndarray, concepts: np.ndarray) -> np.ndarray:
    """Class of the most cosine-similar concept for each (already L2-normalised) embedding."""
    present = np.isfinite(concepts).all(axis=1)
    if not present.any():
        raise ValueError("no class has a concept embedding (no labelled pixel in the records)")
    sim = unit_embeddings @ _l2_normalize(np.nan_to_num(concepts)).T
    sim[:, ~present] = -np.inf
    return np.argmax(sim, axis=1).astype(np.int64)


def assign_to_concepts(mask_embeddings: np.ndarray, concepts: np.ndarray) -> np.ndarray:
    """Class of the most cosine-similar concept for each mask (NaN concepts never win)."""
    return _nearest_concept(_l2_normalize(mask_embeddings), concepts)


def per_image_match(counts: np.ndarray, criterion: str = "iou") -> np.ndarray:
    """Class of each mask of one image by one-to-one matching to the classes present in it.

    Args:
        counts: ``(K, C)`` pixels of mask k with GT class c in this image.
        criterion: as :func:`~emerdiff.evaluation.metrics.hungarian_match`.
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


def _kmeans_ids(x: np.ndarray, num_clusters: int, seed: int, normalize: bool, n_init: int) -> tuple[np.ndarray, int]:
    from sklearn.cluster import KMeans

    x = np.asarray(x, dtype=np.float64)
    if normalize:
        x = _l2_normalize(x)
    k = min(num_clusters, len(x))
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x), k


def _token_sums(records: Iterable[ImageRecord], ignore_index: int) -> tuple[np.ndarray, ...]:
    """Per (image, GT class on the token grid): image index, class, summed token features, token count."""
    img, cls, sums, cnt = [], [], [], []
    for i, rec in enumerate(records):
        gt = np.asarray(rec.lowres_gt).reshape(-1)
        valid = gt != ignore_index
        feats = np.asarray(rec.query_features, dtype=np.float64)[valid]
        for c in np.unique(gt[valid]):
            sel = gt[valid] == c
            img.append(i)
            cls.append(int(c))
            sums.append(feats[sel].sum(axis=0))
            cnt.append(int(sel.sum()))
    if not img:
        raise ValueError("no records to evaluate (or no labelled token in them)")
    return np.asarray(img), np.asarray(cls), np.asarray(sums), np.asarray(cnt, dtype=np.float64)


def _token_concepts(tokens: tuple[np.ndarray, ...], num_classes: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token-mean concepts of image weights ``w``: ``(concepts (C, D), token counts (C,))``."""
    from scipy.sparse import csr_matrix

    img, cls, sums, cnt = tokens
    pick = csr_matrix((w[img], (cls, np.arange(len(img)))), shape=(num_classes, len(img)))
    counts = pick @ cnt
    return _class_means(pick @ sums, counts), counts


def concept_embeddings(records: Iterable[ImageRecord], num_classes: int,
                       ignore_index: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """Token-mean concepts (variant ``token_mean``): per-class mean of the low-res features over
    the class's GT pixels downsampled to the token grid, accumulated over the dataset.

    Returns ``(concepts (C, D), token_counts (C,))``; rows of classes without any token are NaN.
    """
    tokens = _token_sums(records, ignore_index)
    concepts, counts = _token_concepts(tokens, num_classes, np.ones(int(tokens[0].max()) + 1))
    return concepts, counts.astype(np.int64)


def mask_concept_embeddings(records: Iterable[ImageRecord], num_classes: int,
                            method: str = "emerdiff") -> tuple[np.ndarray, np.ndarray]:
    """The paper's concepts (variant ``mask_mean``): the concept of class c is the mean, over
    the dataset's (non-ignored) pixels of class c, of the embedding of the mask that
    ``method``'s label map puts the pixel in (``sum counts.T @ embeddings / pixels``).

    Returns ``(concepts (C, D), pixel_counts (C,))``; rows of classes without pixels are NaN.
    """
    records = list(records)
    if not records:
        raise ValueError("no records to evaluate")
    counts = np.concatenate([np.asarray(r.counts[method], dtype=np.float64) for r in records])
    emb = np.concatenate([np.asarray(r.embeddings(method), dtype=np.float64) for r in records])
    pixels = counts.sum(axis=0)
    return _class_means(counts.T @ emb, pixels), pixels.astype(np.int64)


def majority_assignments(records: Iterable[ImageRecord], method: str) -> list[np.ndarray]:
    """Per image, each of ``method``'s masks -> the GT class with most of its pixels (ties: lowest id)."""
    return [np.asarray(rec.counts[method]).argmax(axis=1) for rec in records]


def _embedding_groups(records: Sequence[ImageRecord], methods: Sequence[str]) -> dict[str | None, list[str]]:
    """Methods grouped by whose masks they label: None = the shared low-res masks, else a method's own."""
    groups: dict[str | None, list[str]] = {}
    for m in methods:
        groups.setdefault(m if m in records[0].method_embeddings else None, []).append(m)
    return groups


def _check_concept_space(rec: ImageRecord, method: str, dims: int) -> None:
    if rec.embeddings(method).shape[1] != dims:
        raise ValueError(f"record {rec.image_id!r}, method {method!r}: mask embeddings have "
                         f"{rec.embeddings(method).shape[1]} dims but the concepts {dims}; token-mean concepts need "
                         "mask embeddings in the token-feature space (e.g. the mean query feature inside each mask)")


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


# --------------------------------------------------------------------------- the one implementation
def protocol_totals(records: Sequence[ImageRecord], num_classes: int, weights: np.ndarray,
                    protocols: Sequence[str] = PROTOCOLS, methods: Sequence[str] | None = None,
                    ignore_index: int = 255, seed: int = 0, criterion: str = "iou",
                    num_clusters: int | None = None, normalize: bool = True, n_init: int = 10,
                    on_labels: Callable[[str, str, np.ndarray, np.ndarray], None] | None = None,
                    ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, Any]]]:
    """Every protocol of every method, once per row of image weights.

    Args:
        records: one per image (read once; a lazy Sequence is fine).
        num_classes: GT classes; also the number of dataset k-means clusters unless ``num_clusters``.
        weights: ``(B, n)`` weight of each image in each row: ones = the data as it is; integer
            weights = the images repeated that often (a bootstrap resample).
        protocols: names of :data:`KNOWN_PROTOCOLS`.
        methods: default every method the records hold.
        seed, normalize, n_init: the dataset k-means (fitted once, on all images, unweighted).
        criterion: matching criterion of :func:`~emerdiff.evaluation.metrics.hungarian_match`.
        on_labels: called once per protocol and method, after every row, with ``(protocol, method,
            classes, owner)``: ``classes`` ``(B, masks)`` the class each mask of the method takes in
            each row (-1: no class), ``(1, masks)`` where the labelling does not depend on the weights
            (``per_image_hungarian``, ``majority``); ``owner`` ``(masks,)`` the image index of each
            mask (ascending). The boundary metrics label the maps with it.
    Per row, everything data-dependent is redone on the weighted images: per-image matchings
    are summed with the weights; the dataset Hungarian matching is redone on the weighted
    confusion; the concept embeddings and every mask's nearest concept are recomputed.

    Returns:
        ``(totals, info)``: ``totals[protocol][method]`` is ``(B, 3, C)`` class-space totals
        (:func:`~emerdiff.evaluation.metrics.confusion_totals`) per row; ``info[protocol]`` the
        row-0 details: ``num_images`` and per protocol ``num_masks``/``num_clusters`` (dataset
        Hungarian), ``num_concepts``, and ``methods[m]`` (``cluster_to_class``, ``num_clusters``
        of a method with its own masks, ``num_concepts`` of mask-mean concepts).
    """
    unknown = [p for p in protocols if p not in KNOWN_PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol(s) {unknown}; choose from {list(KNOWN_PROTOCOLS)}")
    records = list(records) if not isinstance(records, Sequence) else records
    if len(records) == 0:
        raise ValueError("no records to evaluate")
    methods = resolve_methods(records, methods)
    n, c = len(records), num_classes
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] != n:
        raise ValueError(f"weights must be (draws, {n} images), got shape {weights.shape}")
    groups = _embedding_groups(records, methods)
    source_of = {m: s for s, ms in groups.items() for m in ms}
    counts: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    owner: dict[str | None, list[np.ndarray]] = {s: [] for s in groups}
    emb: dict[str | None, list[np.ndarray]] = {s: [] for s in groups}
    per_image = {m: np.zeros((n, 3, c)) for m in methods} if "per_image_hungarian" in protocols else {}
    matched: dict[str, list[np.ndarray]] = {m: [] for m in per_image}  # per-image Hungarian classes of each mask
    tokens = _token_sums(records, ignore_index) if "concept_token_mean" in protocols else None
    for i, rec in enumerate(records):
        check_record(rec, methods)
        if tokens is not None:  # token-mean concepts live in the token-feature space
            for m in methods:
                _check_concept_space(rec, m, tokens[2].shape[1])
        for s in groups:
            e = rec.mask_embeddings if s is None else rec.embeddings(s)
            emb[s].append(np.asarray(e, dtype=np.float64))
            owner[s].append(np.full(len(e), i))
        for m in methods:
            counts[m].append(np.asarray(rec.counts[m], dtype=np.float64))
            if per_image:
                matched[m].append(per_image_match(rec.counts[m], criterion))
                per_image[m][i] = confusion_totals(remap_confusion(rec.counts[m].T, matched[m][-1], c))
    cnt = {m: np.concatenate(v) for m, v in counts.items()}  # (masks, C) per method
    own = {s: np.concatenate(v) for s, v in owner.items()}
    raw = {s: np.concatenate(v) for s, v in emb.items()}
    unit = {s: _l2_normalize(v) for s, v in raw.items()}
    rows = len(weights)
    totals: dict[str, dict[str, np.ndarray]] = {p: {m: np.zeros((rows, 3, c)) for m in methods} for p in protocols}
    info: dict[str, dict[str, Any]] = {p: {"num_images": n, "methods": {m: {} for m in methods}} for p in protocols}

    if "per_image_hungarian" in protocols:
        for m in methods:
            totals["per_image_hungarian"][m] = np.stack([weights @ per_image[m][:, j] for j in range(3)], axis=1)
    clusters: dict[str | None, tuple[Any, int, np.ndarray]] = {}
    if "dataset_hungarian" in protocols:
        for s in groups:
            ids, k = _kmeans_ids(raw[s], num_clusters or c, seed, normalize, n_init)
            clusters[s] = (_onehot(ids, k), k, ids)
            if s is None or "num_masks" not in info["dataset_hungarian"]:
                info["dataset_hungarian"].update(num_masks=len(ids), num_clusters=int(k))
            for m in groups[s]:
                if s is not None:
                    info["dataset_hungarian"]["methods"][m]["num_clusters"] = int(k)
    majority = {m: np.argmax(cnt[m], axis=1) for m in methods} if "majority" in protocols else {}
    drawn = ("dataset_hungarian", "concept", "concept_token_mean")  # labellings redone on each row
    labels = ({(p, m): np.empty((rows, len(cnt[m])), np.int64) for p in protocols if p in drawn for m in methods}
              if on_labels is not None else {})

    def score(p: str, m: str, b: int, conf: np.ndarray, classes: np.ndarray | None = None) -> None:
        totals[p][m][b] = confusion_totals(conf)
        if labels and classes is not None:
            labels[(p, m)][b] = classes

    def draw(b: int, w: np.ndarray) -> None:
        token_assign = {}
        if tokens is not None:
            concepts, found = _token_concepts(tokens, c, w)
            token_assign = {s: _nearest_concept(unit[s], concepts) for s in groups}
            if b == 0:
                info["concept_token_mean"]["num_concepts"] = int((found > 0).sum())
        for m in methods:
            s = source_of[m]
            weighted = cnt[m] * w[own[s]][:, None]  # (masks, C) pixel counts of this row
            if "majority" in protocols:
                score("majority", m, b, (_onehot(majority[m], c) @ weighted).T)
            if "dataset_hungarian" in protocols:
                onehot, k, ids = clusters[s]
                conf = np.rint((onehot @ weighted).T).astype(np.int64)  # (C, k)
                mapping = hungarian_match(conf, criterion)
                score("dataset_hungarian", m, b, remap_confusion(conf, mapping, c), mapping[ids])
                if b == 0:
                    info["dataset_hungarian"]["methods"][m]["cluster_to_class"] = mapping.tolist()
            if "concept" in protocols:  # the paper's concepts: from this method's own label map
                pixels = weighted.sum(axis=0)
                assign = _nearest_concept(unit[s], _class_means(weighted.T @ raw[s], pixels))
                score("concept", m, b, (_onehot(assign, c) @ weighted).T, assign)
                if b == 0:
                    found = int((pixels > 0).sum())
                    info["concept"]["methods"][m]["num_concepts"] = found
                    info["concept"].setdefault("num_concepts", found)
            if tokens is not None:
                score("concept_token_mean", m, b, (_onehot(token_assign[s], c) @ weighted).T, token_assign[s])

    if any(p != "per_image_hungarian" for p in protocols):
        with _few_blas_threads(sum(len(v) for v in raw.values()) * raw[next(iter(raw))].shape[1]):
            for b, w in enumerate(weights):
                draw(b, w)
    if on_labels is not None:
        fixed = {"per_image_hungarian": {m: np.concatenate(v) for m, v in matched.items()}, "majority": majority}
        for p in protocols:
            for m in methods:
                classes = labels[(p, m)] if p in drawn else fixed[p][m][None]
                on_labels(p, m, classes, own[source_of[m]])
    return totals, info


def protocol_boundary_totals(records: Sequence[ImageRecord], maps: Sequence[Mapping[str, np.ndarray]],
                             num_classes: int, weights: np.ndarray, protocols: Sequence[str] = PROTOCOLS,
                             methods: Sequence[str] | None = None, ignore_index: int = 255, seed: int = 0,
                             criterion: str = "iou", num_clusters: int | None = None, normalize: bool = True,
                             n_init: int = 10, metrics: BoundaryMetrics | None = None,
                             ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, Any]],
                                        dict[str, dict[str, np.ndarray]]]:
    """:func:`protocol_totals` plus the boundary metrics (:mod:`emerdiff.evaluation.boundary`) of every
    method's label map as each protocol labels its masks, once per row of ``weights``.

    Args:
        maps: per image (in the order of ``records``; a lazy Sequence is fine, read once) its label
            maps: ``"gt"`` and one mask-id map per method (``map_<method>`` of the record files,
            :class:`~emerdiff.evaluation.records.MapFiles`); a method's map is resized (nearest) to
            the GT's shape, as its counts were.
        metrics: the boundary settings (default ``BoundaryMetrics(ignore_index=ignore_index)``).
        The rest: as :func:`protocol_totals`.
    Each row labels the masks as that row's protocol run did (the dataset Hungarian matching and
    the concepts are redone per resample), so the boundary metrics' bootstrap is paired with the
    mIoU's. An image's counts are computed once per distinct labelling of its masks.

    Returns:
        ``(totals, info, boundary)``: the first two as :func:`protocol_totals`;
        ``boundary[protocol][method]`` is ``(B, S, C)`` summed counts
        (:meth:`~emerdiff.evaluation.boundary.BoundaryMetrics.counts`), scored by
        :meth:`~emerdiff.evaluation.boundary.BoundaryMetrics.scores`.
    """
    metrics = metrics or BoundaryMetrics(ignore_index=ignore_index)
    if metrics.ignore_index != ignore_index:
        raise ValueError(f"metrics.ignore_index={metrics.ignore_index} != ignore_index={ignore_index}; "
                         "give the dataset's void value to both")
    labelled: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    totals, info = protocol_totals(records, num_classes, weights, protocols, methods, ignore_index, seed, criterion,
                                   num_clusters, normalize, n_init,
                                   on_labels=lambda p, m, classes, owner: labelled.__setitem__((p, m), (classes, owner)))
    weights = np.asarray(weights, dtype=np.float64)
    c, s = num_classes, metrics.num_rows
    boundary = {p: {m: np.zeros((len(weights), s, c)) for m in totals[p]} for p in totals}
    starts = {key: np.searchsorted(owner, np.arange(len(records) + 1)) for key, (_, owner) in labelled.items()}
    seen = 0
    for i, image_maps in enumerate(maps):
        seen += 1
        if "gt" not in image_maps:
            raise ValueError(f"label maps of image {i} ({records[i].image_id!r}) lack 'gt'; re-run evaluate so that "
                             "the per-image files hold their maps")
        gt = metrics.gt_geometry(np.asarray(image_maps["gt"]))
        for (p, m), (classes, _) in labelled.items():
            if m not in image_maps:
                raise ValueError(f"label maps of image {i} ({records[i].image_id!r}) lack method {m!r} "
                                 f"(they hold {sorted(image_maps)}); re-run evaluate so that every image has them")
            ids = np.asarray(image_maps[m])
            if ids.shape != gt[0].shape:
                ids = resize_labels(ids, gt[0].shape)
            lo, hi = starts[(p, m)][i], starts[(p, m)][i + 1]
            if ids.size and (ids.min() < 0 or ids.max() >= hi - lo):
                raise ValueError(f"image {records[i].image_id!r}, method {m!r}: mask ids {int(ids.min())}.."
                                 f"{int(ids.max())} outside its {hi - lo} masks; its label map and record disagree, "
                                 "re-run evaluate into a fresh --out")
            drawn = np.flatnonzero(weights[:, i] > 0)  # rows where this image counts
            if len(classes) == 1:  # one labelling for every row
                distinct, which = classes[:, lo:hi], np.zeros(len(drawn), np.int64)
            else:
                distinct, which = np.unique(classes[drawn, lo:hi], axis=0, return_inverse=True)
            for j, mapping in enumerate(distinct):
                class_map = np.where(mapping < 0, c, mapping)[ids]  # -1 (no class) -> C
                rows = drawn[np.reshape(which, -1) == j]
                boundary[p][m][rows] += weights[rows, i][:, None, None] * metrics.counts(class_map, gt, c)
    if seen != len(records):
        raise ValueError(f"{seen} images of label maps for {len(records)} records; give one per record, in order")
    return totals, info, boundary


def boundary_draws(boundary: Mapping[str, Mapping[str, np.ndarray]], metrics: BoundaryMetrics,
                   ) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """Scores of :func:`protocol_boundary_totals`'s counts per row: ``{protocol: {metric: {method: (B,)}}}``."""
    out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for p, per in boundary.items():
        scored = {m: metrics.scores(t) for m, t in per.items()}
        out[p] = {name: {m: np.asarray(v[name]) for m, v in scored.items()} for name in metrics.names}
    return out


def protocol_draws(records: Sequence[ImageRecord], num_classes: int, weights: np.ndarray,
                   protocols: Sequence[str] = PROTOCOLS, methods: Sequence[str] | None = None,
                   ignore_index: int = 255, seed: int = 0, criterion: str = "iou",
                   num_clusters: int | None = None, normalize: bool = True,
                   n_init: int = 10) -> dict[str, dict[str, np.ndarray]]:
    """mIoU of every method under every protocol, once per row of ``weights``
    (:func:`protocol_totals`); returns ``{protocol: {method: (B,) mIoU}}``."""
    totals, _ = protocol_totals(records, num_classes, weights, protocols, methods, ignore_index, seed, criterion,
                                num_clusters, normalize, n_init)
    return {p: {m: miou_rows(t) for m, t in per.items()} for p, per in totals.items()}


def mean_locality(records: Iterable[ImageRecord]) -> float | None:
    """Mean share of difference energy inside each mask over every record that has one (None: none has)."""
    values = [r.locality for r in records if r.locality is not None and np.size(r.locality)]
    return float(np.mean(np.concatenate(values))) if values else None


def protocol_result(protocol: str, totals: Mapping[str, np.ndarray], info: Mapping[str, Any],
                    class_names: Sequence[str] | None = None, locality: float | None = None,
                    criterion: str = "iou", boundary: Mapping[str, np.ndarray] | None = None,
                    metrics: BoundaryMetrics | None = None) -> dict[str, Any]:
    """The result of one protocol (as results.json stores it) from row 0 of :func:`protocol_totals`:
    ``{"protocol", "methods": {method: scores + details}, "num_images", ...}``; ``locality``
    goes on EmerDiff's row (a property of its difference maps). With ``boundary`` (this protocol's
    counts from :func:`protocol_boundary_totals`) and its ``metrics``, each method gets
    ``"boundary": {metric: value}``."""
    methods = {m: {**scores_from_totals(t[0], class_names), **info["methods"][m]} for m, t in totals.items()}
    if boundary is not None:
        if metrics is None:
            raise ValueError("protocol_result: boundary counts need the BoundaryMetrics that made them (metrics=)")
        for m, counts in boundary.items():
            methods[m]["boundary"] = {k: float(v) for k, v in metrics.scores(counts[0]).items()}
    if locality is not None and "emerdiff" in methods:
        methods["emerdiff"]["locality"] = locality
    out: dict[str, Any] = {"protocol": protocol}
    if protocol == "per_image_hungarian":
        out.update(num_images=info["num_images"], criterion=criterion, methods=methods)
        return out
    if protocol in CONCEPT_VARIANTS.values():
        out["concept_variant"] = next(v for v, p in CONCEPT_VARIANTS.items() if p == protocol)
    out["methods"] = methods
    out.update({k: v for k, v in info.items() if k not in ("methods", "num_images")})
    out["num_images"] = info["num_images"]
    return out


def evaluate_records(records: Sequence[ImageRecord], protocol: str, num_classes: int,
                     class_names: Sequence[str] | None = None, ignore_index: int = 255,
                     methods: Sequence[str] | None = None, seed: int = 0, criterion: str = "iou",
                     num_clusters: int | None = None, normalize: bool = True, n_init: int = 10) -> dict[str, Any]:
    """Run one protocol of :data:`KNOWN_PROTOCOLS` on per-image records (every image weight 1;
    ``seed``: dataset k-means)."""
    if protocol not in KNOWN_PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {list(KNOWN_PROTOCOLS)}")
    records = list(records) if not isinstance(records, Sequence) else records
    totals, info = protocol_totals(records, num_classes, np.ones((1, len(records))), [protocol], methods,
                                   ignore_index, seed, criterion, num_clusters, normalize, n_init)
    return protocol_result(protocol, totals[protocol], info[protocol], class_names, mean_locality(records), criterion)


def per_image_hungarian_protocol(records: Sequence[ImageRecord], num_classes: int,
                                 class_names: Sequence[str] | None = None,
                                 methods: Sequence[str] | None = None, criterion: str = "iou") -> dict[str, Any]:
    """``evaluate_records(..., "per_image_hungarian")``: each image's masks matched one-to-one to its own
    classes, the matched confusions pooled over the dataset before the mIoU."""
    return evaluate_records(records, "per_image_hungarian", num_classes, class_names, methods=methods,
                            criterion=criterion)


def dataset_hungarian_protocol(records: Sequence[ImageRecord], num_classes: int,
                               class_names: Sequence[str] | None = None,
                               methods: Sequence[str] | None = None, num_clusters: int | None = None,
                               seed: int = 0, normalize: bool = True, criterion: str = "iou",
                               n_init: int = 10) -> dict[str, Any]:
    """``evaluate_records(..., "dataset_hungarian")``: k-means of all mask embeddings (methods with masks of
    their own get their own clustering) + one Hungarian matching per method."""
    return evaluate_records(records, "dataset_hungarian", num_classes, class_names, methods=methods, seed=seed,
                            criterion=criterion, num_clusters=num_clusters, normalize=normalize, n_init=n_init)


def concept_protocol(records: Sequence[ImageRecord], num_classes: int,
                     class_names: Sequence[str] | None = None,
                     methods: Sequence[str] | None = None, ignore_index: int = 255,
                     variant: str = "mask_mean") -> dict[str, Any]:
    """The paper's modified protocol: nearest concept (cosine) per mask, mIoU, no Hungarian.

    ``variant``: ``"mask_mean"`` (the paper's, protocol ``concept``) or ``"token_mean"``
    (protocol ``concept_token_mean``); see the module docstring.
    """
    if variant not in CONCEPT_VARIANTS:
        raise ValueError(f"unknown concept variant {variant!r}; choose from {list(CONCEPT_VARIANTS)}")
    return evaluate_records(records, CONCEPT_VARIANTS[variant], num_classes, class_names, ignore_index, methods)


def majority_protocol(records: Sequence[ImageRecord], num_classes: int, class_names: Sequence[str] | None = None,
                      methods: Sequence[str] | None = None) -> dict[str, Any]:
    """``evaluate_records(..., "majority")``: each method's masks labelled with their own majority GT class."""
    return evaluate_records(records, "majority", num_classes, class_names, methods=methods)


def summary_rows(result: Mapping[str, Any],
                 intervals: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
                 boundary_intervals: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]] | None = None,
                 ) -> list[dict[str, Any]]:
    """Flat rows (protocol, method, miou, miou_lo, miou_hi, pixel_accuracy, ..., locality) of a
    protocol result; ``miou_lo``/``miou_hi`` from ``intervals`` (bootstrap), None without. A method
    with boundary metrics gets, after those, ``<metric>``, ``<metric>_lo``, ``<metric>_hi`` for each
    (``boundary_intervals``: ``{protocol: {metric: {method: interval}}}``)."""
    rows = []
    per = (intervals or {}).get(result["protocol"], {})
    per_boundary = (boundary_intervals or {}).get(result["protocol"], {})
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
        for name, value in res.get("boundary", {}).items():
            ci = per_boundary.get(name, {}).get(method) or {}
            rows[-1].update({name: value, f"{name}_lo": ci.get("lo"), f"{name}_hi": ci.get("hi")})
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
