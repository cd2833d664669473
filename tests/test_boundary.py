"""Known-answer tests of the boundary metrics (Boundary IoU, trimap IoU, boundary F) and of their
integration with the protocols and the paired bootstrap."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from emerdiff.evaluation.boundary import (
    BoundaryMetrics,
    _distance_by_shifts,
    _distance_by_transform,
    boundary_f,
    boundary_iou,
    default_band,
    default_tolerance,
    distance_to_other_label,
    trimap_iou,
)
from emerdiff.evaluation.metrics import confusion_matrix, miou


def _halves(edge: int, size: int = 64, void_rows: int = 0) -> np.ndarray:
    """Class 0 left of column ``edge``, class 1 from it on; the first ``void_rows`` rows void (255)."""
    labels = np.zeros((size, size), dtype=np.int64)
    labels[:, edge:] = 1
    labels[:void_rows] = 255
    return labels


def _blobs(seed: int, size: int = 48, classes: int = 4) -> np.ndarray:
    """Random rectangles of ``classes`` classes on class 0 (always at least two classes)."""
    rng = np.random.RandomState(seed)
    labels = np.zeros((size, size), dtype=np.int64)
    for c in [*range(1, classes), *rng.randint(1, classes, size=4)]:
        y, x = rng.randint(0, size - 8, size=2)
        h, w = rng.randint(6, size // 2, size=2)
        labels[y:y + h, x:x + w] = c
    return labels


# --------------------------------------------------------------------------- hand-made answers
def test_a_perfect_prediction_scores_100_on_every_metric():
    for gt in (_halves(30), _blobs(0), _blobs(1)):
        metrics = BoundaryMetrics()
        res = metrics.scores(metrics.counts(gt, gt, 4))
        assert set(res) == set(metrics.names)
        for name, value in res.items():
            assert value == pytest.approx(100.0), name


@pytest.mark.parametrize("shift", [1, 2, 3, 5])
def test_a_shifted_edge_scores_what_the_hand_count_gives(shift):
    """Edge at column 32 in the GT, at 32 + s in the prediction (64 x 64, d = 4, tolerance 2)."""
    gt, pred = _halves(32), _halves(32 + shift)
    d, tol = 4, 2
    # Boundary IoU: each class's band is d columns wide; they overlap on d - s columns
    expected = max(d - shift, 0) / (d + shift) if shift < d else 0.0
    assert boundary_iou(pred, gt, 2, band=d) == pytest.approx(100 * expected)
    # trimap at w: 2w columns; class 0 has w GT columns and w + s predicted, class 1 loses s of its w
    for w, value in trimap_iou(pred, gt, 2, widths=(1, 2, 4, 8)).items():
        s = min(shift, w)
        assert value == pytest.approx(100 * (w / (w + s) + (w - s) / w) / 2), w
    # boundary F: each contour pixel is matched exactly when the edge moved by at most the tolerance
    assert boundary_f(pred, gt, 2, tolerance=tol) == pytest.approx(100.0 if shift <= tol else 0.0)


def test_defaults_follow_the_papers_ratios_of_the_diagonal():
    assert default_band((128, 128)) == 4 and default_tolerance((128, 128)) == 2  # 3.62 -> 4; 1.45 -> 2
    assert default_band((512, 512)) == 14 and default_tolerance((512, 512)) == 6
    assert default_band((8, 8)) == 1 and default_tolerance((8, 8)) == 1
    gt, pred = _halves(64, 128), _halves(65, 128)
    assert boundary_iou(pred, gt, 2) == pytest.approx(100 * 3 / 5)  # d = 4 at 128 px
    assert boundary_f(pred, gt, 2) == pytest.approx(100.0)  # within 2 px
    assert boundary_f(_halves(67, 128), gt, 2) == pytest.approx(0.0)


def test_trimap_iou_at_a_width_covering_every_pixel_is_the_plain_miou():
    images = [(np.roll(_blobs(s), 3 * (s % 3) - 2, axis=s % 2), _blobs(s)) for s in range(4)]
    metrics = BoundaryMetrics(widths=(2, 1000))
    total = sum(metrics.counts(p, g, 4) for p, g in images)
    plain = miou(sum(confusion_matrix(p, g, 4) for p, g in images))
    res = metrics.scores(total)
    assert res["trimap_iou_1000"] == pytest.approx(plain, abs=1e-9)
    assert res["trimap_iou_2"] != pytest.approx(plain)  # the narrow band is another number


def test_boundary_f_is_symmetric_under_swapping_prediction_and_ground_truth():
    for seed in range(4):
        a, b = _blobs(seed), np.roll(_blobs(seed + 10), 2, axis=1)
        for tol in (1, 2, 3):
            assert boundary_f(a, b, 4, tolerance=tol) == pytest.approx(boundary_f(b, a, 4, tolerance=tol))
        assert boundary_iou(a, b, 4, band=3) == pytest.approx(boundary_iou(b, a, 4, band=3))


def test_counts_sum_over_images_as_the_miou_does():
    """Dataset level: counts are summed over images before each class's score, not scores averaged."""
    metrics = BoundaryMetrics(band=4, widths=(2,))
    big = (_halves(32 + 1), _halves(32))  # 3/5 on both classes
    small = (_halves(8 + 3, 16), _halves(8, 16))  # 1/7
    one = [metrics.scores(metrics.counts(p, g, 2))["boundary_iou"] for p, g in (big, small)]
    both = metrics.scores(metrics.counts(*big, 2) + metrics.counts(*small, 2))["boundary_iou"]
    # big: 3 of 5 band columns x 64 rows per class; small: 1 of 7 columns x 16 rows
    assert both == pytest.approx(100 * (3 * 64 + 1 * 16) / (5 * 64 + 7 * 16))
    assert both != pytest.approx(np.mean(one))


def test_the_image_frame_is_not_a_contour():
    """A region that runs off the image has no boundary there: an object touching the frame keeps a
    band only along its inner edges, and a single-class image has no boundary at all."""
    gt = np.zeros((40, 40), dtype=np.int64)
    gt[:, 30:] = 1  # class 1 touches the top, bottom and right frame
    band = distance_to_other_label(gt, 4) <= 4
    assert band[:, 26:34].all() and not band[:, :26].any() and not band[:, 34:].any()
    flat = np.zeros((20, 20), dtype=np.int64)
    metrics = BoundaryMetrics()
    res = metrics.scores(metrics.counts(flat, flat, 2))
    assert all(math.isnan(v) for v in res.values())  # nothing to score, not 0 and not 100


def test_void_is_neither_scored_nor_a_contour():
    """GT void (255) next to a class leaves no contour there, and a prediction that runs across
    the void region is judged on the labelled pixels only."""
    gt = _halves(32, void_rows=10)
    gt[30:40, 5:15] = 255  # a void hole inside class 0
    pred = _halves(32)  # no void: it labels every pixel
    metrics = BoundaryMetrics(band=4)
    for name, value in metrics.scores(metrics.counts(pred, gt, 2)).items():
        assert value == pytest.approx(100.0), name
    # and void pixels are not counted: the band of class 0 holds its 4 columns on the 54 labelled rows
    counts = metrics.counts(pred, gt, 2)
    assert counts[1, 0] == 4 * 54 and counts[2, 0] == 4 * 54


def test_no_class_pixels_have_contours_but_are_not_scored():
    """Label C (a mask no protocol gave a class) bounds its neighbours, but no class scores it."""
    gt = _halves(32)
    pred = gt.copy()
    pred[:, 40:] = 2  # C = 2: the right part of class 1 is predicted as no class
    metrics = BoundaryMetrics(band=4, widths=(4,))
    counts = metrics.counts(pred, gt, 2)
    assert counts.shape == (metrics.num_rows, 2)
    # class 1's predicted band: 4 columns at the GT edge and 4 more before the no-class region
    assert counts[2, 1] == 8 * 64
    per = metrics.per_class(counts)
    assert per["boundary_iou"][0] == pytest.approx(100.0) and per["boundary_iou"][1] < 100.0
    with pytest.raises(ValueError, match="outside 0..2"):
        metrics.counts(np.full_like(gt, 3), gt, 2)


def test_both_distance_computations_agree():
    """The shifted-map comparison and the per-label distance transform give the same distances."""
    rng = np.random.RandomState(0)
    for seed in range(5):
        labels = _blobs(seed, size=40)
        labels[rng.rand(*labels.shape) < 0.05] = 255
        for radius in (1, 2.5, 4, 7):
            for void in (None, 255):
                a = _distance_by_shifts(labels, radius, void)
                b = _distance_by_transform(labels, radius, void)
                np.testing.assert_array_equal(a[labels != 255], b[labels != 255], err_msg=f"{seed} {radius} {void}")


def test_bad_inputs_name_the_value_and_the_fix():
    gt = _halves(10, 20)
    with pytest.raises(ValueError, match="shape"):
        BoundaryMetrics().counts(gt[:10], gt, 2)
    with pytest.raises(ValueError, match=r"ground-truth values \[7\]"):
        BoundaryMetrics().counts(gt, np.full_like(gt, 7), 2)
    with pytest.raises(ValueError, match="band=0.5"):
        BoundaryMetrics(band=0.5)
    with pytest.raises(ValueError, match="widths"):
        BoundaryMetrics(widths=())


# --------------------------------------------------------------------------- protocols and bootstrap
def _segmentation(seed: int, size: int = 32, grid: int = 4):
    """A GT of blobs and three label maps of the same grid masks: the GT-aligned one, nearest
    upsampling and a shifted one; embeddings are noisy class indicators (so that the concepts,
    and with them the labelling, move from one resample to the next)."""
    rng = np.random.RandomState(seed)
    gt = _blobs(seed, size=size)
    cell = size // grid
    low = np.arange(grid * grid).reshape(grid, grid)
    nearest = np.kron(low, np.ones((cell, cell), dtype=np.int64))
    major = np.array([np.bincount(gt[nearest == m], minlength=4).argmax() for m in range(grid * grid)])
    emb = np.eye(4)[major] + rng.randn(grid * grid, 4) * 0.6
    aligned = np.where(gt[..., None] == major[None, None, :], 1, 0).argmax(-1)  # a mask of the pixel's class
    aligned = np.where(major[aligned] == gt, aligned, nearest)
    seg = SimpleNamespace(labels=aligned, nearest_labels=nearest, bilinear_labels=np.roll(nearest, 2, axis=1),
                          lowres_labels=low, mask_embeddings=emb, query_features=emb[low.reshape(-1)])
    return seg, gt


def _dataset(n: int = 6):
    from emerdiff.evaluation.records import build_record

    records, maps = [], []
    for i in range(n):
        seg, gt = _segmentation(i)
        records.append(build_record(f"im{i}", seg, gt, 4))
        maps.append({"emerdiff": seg.labels, "nearest": seg.nearest_labels, "bilinear": seg.bilinear_labels,
                     "gt": gt})
    return records, maps


def test_every_row_scores_the_maps_as_that_rows_protocol_labels_them():
    """Row 0 equals the counts of each image's maps labelled by the protocol (the row's mask classes);
    a resample row equals the data with the images repeated (integer weights = repetition), so the
    labelling is redone per resample, as the mIoU's."""
    from emerdiff.evaluation.bootstrap import bootstrap_weights
    from emerdiff.evaluation.protocols import KNOWN_PROTOCOLS, protocol_boundary_totals, protocol_totals

    records, maps = _dataset()
    metrics = BoundaryMetrics(widths=(2, 8))
    weights = bootstrap_weights(len(records), 6, seed=1)
    totals, _, boundary = protocol_boundary_totals(records, maps, 4, weights, KNOWN_PROTOCOLS, metrics=metrics)
    plain, _ = protocol_totals(records, 4, weights, KNOWN_PROTOCOLS)
    for p in KNOWN_PROTOCOLS:  # the mIoU totals are untouched
        for m in plain[p]:
            np.testing.assert_array_equal(totals[p][m], plain[p][m])
    # row 0, majority: each mask takes its own majority class, by hand
    for m in ("emerdiff", "bilinear"):
        by_hand = 0
        for rec, image in zip(records, maps):
            classes = rec.counts[m].argmax(axis=1)
            by_hand = by_hand + metrics.counts(classes[image[m]], image["gt"], 4)
        np.testing.assert_allclose(boundary["majority"][m][0], by_hand)
    # a resample row is the protocol run on the images repeated (concept: the concepts move with it)
    for b in (1, 4):
        picked = [i for i, k in enumerate(weights[b]) for _ in range(k)]
        again = protocol_boundary_totals([records[i] for i in picked], [maps[i] for i in picked], 4,
                                         np.ones((1, len(picked))), ["concept", "per_image_hungarian"],
                                         metrics=metrics)[2]
        for p in ("concept", "per_image_hungarian"):
            for m in boundary[p]:
                np.testing.assert_allclose(boundary[p][m][b], again[p][m][0], err_msg=f"{p} {m} row {b}")
    # the resamples do not all agree: the intervals have width
    scores = metrics.scores(boundary["concept"]["bilinear"])["boundary_iou"]
    assert np.ptp(scores[1:]) > 0


def test_bootstrap_with_boundaries_gives_the_mious_intervals_and_paired_boundary_intervals():
    from emerdiff.evaluation.bootstrap import bootstrap_protocols, bootstrap_with_boundaries
    from emerdiff.evaluation.protocols import KNOWN_PROTOCOLS

    records, maps = _dataset()
    miou_ci, edges = bootstrap_with_boundaries(records, maps, 4, n_boot=50, protocols=KNOWN_PROTOCOLS)
    assert miou_ci == bootstrap_protocols(records, 4, n_boot=50, protocols=KNOWN_PROTOCOLS)
    metrics = BoundaryMetrics()
    assert set(edges) == set(KNOWN_PROTOCOLS)
    for p, per in edges.items():
        assert set(per) == set(metrics.names)
        for name, by_method in per.items():
            assert {"emerdiff", "nearest", "bilinear", "emerdiff-nearest", "emerdiff-bilinear"} <= set(by_method)
            for m in ("nearest", "bilinear", "emerdiff-bilinear"):
                v = by_method[m]
                assert v["lo"] <= v["value"] <= v["hi"] or "note" in v, (p, name, m)
    # the GT-aligned map wins on boundaries over the shifted one under the oracle labelling
    assert edges["majority"]["boundary_iou"]["emerdiff-bilinear"]["lo"] > 0


def test_label_maps_that_disagree_with_the_records_are_refused():
    from emerdiff.evaluation.protocols import protocol_boundary_totals

    records, maps = _dataset(2)
    bad = [maps[0], {**maps[1], "nearest": maps[1]["nearest"] + 100}]
    with pytest.raises(ValueError, match="mask ids .* outside"):
        protocol_boundary_totals(records, bad, 4, np.ones((1, 2)), ["majority"])
    with pytest.raises(ValueError, match="lack method 'bilinear'"):
        protocol_boundary_totals(records, [maps[0], {"gt": maps[1]["gt"], "emerdiff": maps[1]["emerdiff"],
                                                     "nearest": maps[1]["nearest"]}], 4, np.ones((1, 2)), ["majority"])
    with pytest.raises(ValueError, match="1 images of label maps for 2 records"):
        protocol_boundary_totals(records, maps[:1], 4, np.ones((1, 2)), ["majority"])
