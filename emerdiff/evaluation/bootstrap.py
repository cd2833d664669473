"""Paired percentile bootstrap over images of every protocol's mIoU (and of the differences between
methods, and between two runs): image weights for :func:`emerdiff.evaluation.protocols.protocol_totals`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from emerdiff.evaluation.boundary import BoundaryMetrics
from emerdiff.evaluation.metrics import miou_rows
from emerdiff.evaluation.protocols import PROTOCOLS, boundary_draws, protocol_boundary_totals, protocol_draws
from emerdiff.evaluation.records import ImageRecord, record_methods


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




# An interval needs at least this many images to carry meaning: one image resampled is always itself.
MIN_INTERVAL_IMAGES = 2
# Resampled values closer than this (mIoU points) count as one: zero spread, no interval.
ZERO_SPREAD = 1e-9


def interval(draws: np.ndarray, level: float = 0.95, num_images: int | None = None) -> dict[str, Any]:
    """``{"value": draws[0], "lo", "hi"}``: percentile interval of ``draws[1:]`` (NaN without resamples).

    An interval that cannot carry meaning is not reported as a zero-width band: with fewer than
    :data:`MIN_INTERVAL_IMAGES` images (``num_images``, when given) or when every resample gives the
    same value (zero spread), ``lo`` and ``hi`` are NaN (None in JSON, empty in CSV) and ``note``
    says why.
    """
    draws = np.asarray(draws, dtype=np.float64)
    tail = (1.0 - level) / 2 * 100
    rest = draws[1:][np.isfinite(draws[1:])]
    if rest.size == 0:
        return {"value": float(draws[0]), "lo": float("nan"), "hi": float("nan")}
    note = None
    if num_images is not None and num_images < MIN_INTERVAL_IMAGES:
        note = (f"no interval: {num_images} image(s); a bootstrap over images needs at least "
                f"{MIN_INTERVAL_IMAGES} to have any spread")
    elif float(np.ptp(rest)) <= ZERO_SPREAD:
        note = ("no interval: every resample of the images gives the same value (zero spread), so a "
                f"{level * 100:g} % interval would have zero width")
    if note is not None:
        return {"value": float(draws[0]), "lo": float("nan"), "hi": float("nan"), "note": note}
    return {"value": float(draws[0]), "lo": float(np.percentile(rest, tail)),
            "hi": float(np.percentile(rest, 100 - tail))}


def summarize_draws(draws: Mapping[str, np.ndarray], level: float = 0.95,
                    num_images: int | None = None) -> dict[str, dict[str, Any]]:
    """Intervals of each method and of the difference of every pair of methods, ``"a-b"`` for
    a before b in ``draws``' order (paired: the same resample for both); ``num_images`` as in
    :func:`interval`."""
    names = list(draws)
    out = {m: interval(draws[m], level, num_images) for m in names}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            out[f"{a}-{b}"] = interval(np.asarray(draws[a]) - np.asarray(draws[b]), level, num_images)
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
    return {p: summarize_draws(d, level, len(records)) for p, d in draws.items()}


def boundary_intervals(boundary: Mapping[str, Mapping[str, np.ndarray]], metrics: BoundaryMetrics,
                       level: float = 0.95, num_images: int | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """Intervals of the boundary metrics from :func:`protocol_boundary_totals`'s counts (row 0 the data,
    the rest resamples): ``{protocol: {metric: {method or "a-b": interval}}}``, as :func:`summarize_draws`."""
    return {p: {name: summarize_draws(d, level, num_images) for name, d in per.items()}
            for p, per in boundary_draws(boundary, metrics).items()}


def bootstrap_with_boundaries(records: Sequence[ImageRecord], maps: Sequence[Mapping[str, np.ndarray]],
                              num_classes: int, methods: Sequence[str] | None = None, n_boot: int = 1000,
                              level: float = 0.95, seed: int = 0, ignore_index: int = 255,
                              protocols: Sequence[str] = PROTOCOLS, cluster_seed: int = 0,
                              metrics: BoundaryMetrics | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`bootstrap_protocols` (equal values) and, on the same resamples, :func:`boundary_intervals`
    of the label maps ``maps`` (one per record, :func:`protocol_boundary_totals`)."""
    metrics = metrics or BoundaryMetrics(ignore_index=ignore_index)
    weights = bootstrap_weights(len(records), n_boot, seed)
    totals, _, boundary = protocol_boundary_totals(records, maps, num_classes, weights, protocols, methods,
                                                   ignore_index, seed=cluster_seed, metrics=metrics)
    miou = {p: summarize_draws({m: miou_rows(t) for m, t in per.items()}, level, len(records))
            for p, per in totals.items()}
    return miou, boundary_intervals(boundary, metrics, level, len(records))


def compare_records(records_a: Sequence[ImageRecord], records_b: Sequence[ImageRecord], num_classes: int,
                    protocols: Sequence[str] = PROTOCOLS, n_boot: int = 1000, level: float = 0.95,
                    seed: int = 0, ignore_index: int = 255,
                    cluster_seeds: tuple[int, int] = (0, 0),
                    maps: tuple[Sequence[Mapping[str, np.ndarray]], Sequence[Mapping[str, np.ndarray]]] | None = None,
                    metrics: BoundaryMetrics | None = None) -> list[dict[str, Any]]:
    """Paired comparison of two runs on the same images (``records_a[i]`` and ``records_b[i]``
    are the same image).

    Both runs' protocols are recomputed on these images with the same resamples, so the
    difference A - B of each protocol x method gets a paired interval. Methods present in one
    run only get rows with the other side None. Returns rows ``{"protocol", "method", "a",
    "b", "a-b"}``, each value an :func:`interval` dict or None.

    With ``maps`` (each run's label maps, one per record in the same order, as
    :func:`~emerdiff.evaluation.protocols.protocol_boundary_totals` takes them) every row also gets
    ``"boundary": {metric: {"a", "b", "a-b"}}``: the boundary metrics (``metrics``, default
    ``BoundaryMetrics(ignore_index=ignore_index)``) of each run's labelling on the same resamples, so
    their A - B is paired as well (the mIoU values are the same as without ``maps``).
    """
    ids_a = [r.image_id for r in records_a]
    ids_b = [r.image_id for r in records_b]
    if ids_a != ids_b:
        raise ValueError("compare_records needs the same images in the same order in both runs")
    weights = bootstrap_weights(len(records_a), n_boot, seed)
    edges: tuple[dict[str, Any], dict[str, Any]] | None = None
    if maps is None:
        draws_a = protocol_draws(records_a, num_classes, weights, protocols, None, ignore_index, seed=cluster_seeds[0])
        draws_b = protocol_draws(records_b, num_classes, weights, protocols, None, ignore_index, seed=cluster_seeds[1])
    else:
        metrics = metrics or BoundaryMetrics(ignore_index=ignore_index)
        draws, scored = [], []
        for recs, run_maps, cluster_seed in ((records_a, maps[0], cluster_seeds[0]),
                                             (records_b, maps[1], cluster_seeds[1])):
            totals, _, boundary = protocol_boundary_totals(recs, run_maps, num_classes, weights, protocols, None,
                                                           ignore_index, seed=cluster_seed, metrics=metrics)
            draws.append({p: {m: miou_rows(t) for m, t in per.items()} for p, per in totals.items()})
            scored.append(boundary_draws(boundary, metrics))
        draws_a, draws_b = draws
        edges = (scored[0], scored[1])
    methods = list(dict.fromkeys([*record_methods(records_a), *record_methods(records_b)]))
    rows = []
    n = len(records_a)

    def paired(a: np.ndarray | None, b: np.ndarray | None) -> dict[str, Any]:
        return {"a": None if a is None else interval(a, level, n),
                "b": None if b is None else interval(b, level, n),
                "a-b": None if a is None or b is None else interval(a - b, level, n)}

    for p in protocols:
        for m in methods:
            rows.append({"protocol": p, "method": m, **paired(draws_a[p].get(m), draws_b[p].get(m))})
            if edges is not None:
                rows[-1]["boundary"] = {name: paired(edges[0][p][name].get(m), edges[1][p][name].get(m))
                                        for name in metrics.names}
    return rows
