"""Known-answer tests of the metrics and the two evaluation protocols."""

from __future__ import annotations

import math

import numpy as np
import pytest

from emerdiff.evaluate import (
    ImageRecord,
    assign_to_concepts,
    bootstrap_protocols,
    build_record,
    concept_embeddings,
    concept_protocol,
    confusion_matrix,
    hungarian_match,
    hungarian_protocol,
    mask_class_counts,
    miou,
    per_class_iou,
    pixel_accuracy,
    remap_confusion,
    resize_nearest,
    scores,
    summary_rows,
)


def _gt(seed: int = 0, shape=(12, 16), classes: int = 4) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, classes, size=shape)


# --------------------------------------------------------------------------- metrics
def test_perfect_prediction_is_100():
    gt = _gt()
    conf = confusion_matrix(gt, gt, 4)
    assert miou(conf) == 100.0
    assert pixel_accuracy(conf) == 100.0
    assert np.all(per_class_iou(conf) == 100.0)


def test_relabelled_prediction_hungarian_vs_identity():
    gt = _gt(1)
    perm = np.array([2, 0, 3, 1])
    pred = perm[gt]
    conf = confusion_matrix(pred, gt, 4)
    assert miou(conf) == 0.0  # identity matching: every pixel wrong
    mapping = hungarian_match(conf)
    np.testing.assert_array_equal(mapping[perm], np.arange(4))
    assert miou(remap_confusion(conf, mapping, 4)) == 100.0
    assert miou(remap_confusion(conf, hungarian_match(conf, "overlap"), 4)) == 100.0


def test_hand_computed_three_class_case():
    gt = np.array([[0, 0, 1, 1],
                   [0, 0, 1, 2],
                   [2, 2, 2, 2]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 0, 2, 2],
                     [2, 2, 2, 0]])
    conf = confusion_matrix(pred, gt, 3)
    np.testing.assert_array_equal(conf, [[3, 1, 0], [0, 2, 1], [1, 0, 4]])
    # IoU_0 = 3/(4+4-3) = 3/5, IoU_1 = 2/(3+3-2) = 1/2, IoU_2 = 4/(5+5-4) = 2/3
    np.testing.assert_allclose(per_class_iou(conf), [60.0, 50.0, 200 / 3])
    assert miou(conf) == pytest.approx((60 + 50 + 200 / 3) / 3)
    assert pixel_accuracy(conf) == pytest.approx(9 / 12 * 100)


def test_ignore_pixels_do_not_count():
    gt = np.array([[0, 0, 1, 255], [1, 1, 255, 255]])
    pred = np.array([[0, 0, 1, 1], [1, 1, 0, 0]])  # wrong only where gt is ignored
    conf = confusion_matrix(pred, gt, 2, ignore_index=255)
    assert conf.sum() == 5
    assert miou(conf) == 100.0
    # a different ignore value works too
    gt2 = np.where(gt == 255, -1, gt)
    assert miou(confusion_matrix(pred, gt2, 2, ignore_index=-1)) == 100.0


def test_empty_classes_do_not_count():
    gt = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 0, 1, 1]])
    conf = confusion_matrix(pred, gt, 5)  # classes 2..4 absent from both sides
    iou = per_class_iou(conf)
    assert np.isnan(iou[2:]).all()
    assert miou(conf) == 100.0
    s = scores(conf, ["a", "b", "c", "d", "e"])
    assert s["num_classes_present"] == 2 and s["per_class_iou"]["c"] is None
    # a class predicted but absent from GT does count (IoU 0)
    conf = confusion_matrix(np.array([[0, 0, 1, 2]]), gt, 3)
    assert per_class_iou(conf)[2] == 0.0


def test_bad_labels_raise():
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 1]), np.array([0, 7]), 3)
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 5]), np.array([0, 1]), 3)


def test_hungarian_with_more_or_fewer_clusters_than_classes():
    # 3 classes, 5 clusters: clusters 3 and 4 are small noise and stay unmatched
    conf = np.array([[10, 0, 0, 2, 0],
                     [0, 8, 0, 0, 1],
                     [0, 0, 9, 0, 0]])
    mapping = hungarian_match(conf)
    np.testing.assert_array_equal(mapping, [0, 1, 2, -1, -1])
    cls = remap_confusion(conf, mapping, 3)
    assert cls.shape == (3, 4) and cls[:, 3].sum() == 3
    np.testing.assert_allclose(per_class_iou(cls), [10 / 12 * 100, 8 / 9 * 100, 100.0])
    # 3 classes, 2 clusters: one class is never predicted
    two = np.array([[10, 0], [0, 8], [3, 1]])
    mapping = hungarian_match(two)
    np.testing.assert_array_equal(mapping, [0, 1])
    iou = per_class_iou(remap_confusion(two, mapping, 3))
    np.testing.assert_allclose(iou, [10 / 13 * 100, 8 / 9 * 100, 0.0])


def test_resize_nearest_and_counts():
    low = np.array([[0, 1], [2, 3]])
    up = resize_nearest(low, (4, 6))
    assert up.shape == (4, 6) and up[0, 0] == 0 and up[0, 5] == 1 and up[3, 0] == 2
    gt = np.array([[0, 0, 255], [1, 1, 1]])
    counts = mask_class_counts(np.array([[0, 1, 1], [1, 1, 0]]), gt, 2, 2)
    np.testing.assert_array_equal(counts, [[1, 1], [1, 2]])


# --------------------------------------------------------------------------- protocols
def _scene_records(n_images: int = 4, num_classes: int = 3, dim: int = 8, permute: bool = True,
                   seed: int = 0) -> tuple[list[ImageRecord], np.ndarray]:
    """Images whose masks are exactly the GT regions, with per-class features.

    Each image has a 4x4 feature grid, a GT upsampled 4x (16x16), masks in a
    per-image random order; features = class prototype + small noise.
    """
    rng = np.random.RandomState(seed)
    protos = np.eye(dim)[:num_classes] * 5 + rng.rand(num_classes, dim) * 0.1
    recs = []
    for i in range(n_images):
        low_gt = rng.randint(0, num_classes, size=(4, 4))
        low_gt.flat[:num_classes] = np.arange(num_classes)  # every class present
        perm = rng.permutation(num_classes) if permute else np.arange(num_classes)
        low_masks = perm[low_gt]
        feats = protos[low_gt.reshape(-1)] + rng.randn(16, dim) * 0.05
        emb = np.stack([feats[low_masks.reshape(-1) == m].mean(0) for m in range(num_classes)])
        gt = np.kron(low_gt, np.ones((4, 4), dtype=int))
        gt[0, 0] = 255  # an ignored pixel
        labels = np.kron(low_masks, np.ones((4, 4), dtype=int))
        seg = dict(labels=labels, nearest_labels=labels, bilinear_labels=labels,
                   lowres_labels=low_masks, mask_embeddings=emb, query_features=feats,
                   locality=np.full(num_classes, 0.5))
        recs.append(build_record(f"img{i}", seg, gt, num_classes))
    return recs, protos


def test_hungarian_protocol_perfect_masks_is_100():
    recs, _ = _scene_records()
    res = hungarian_protocol(recs, 3, ["a", "b", "c"])
    for m in ("emerdiff", "nearest", "bilinear"):
        assert res["methods"][m]["miou"] == pytest.approx(100.0)
    assert res["num_masks"] == 12 and res["num_clusters"] == 3
    assert res["methods"]["emerdiff"]["locality"] == pytest.approx(0.5)
    rows = summary_rows(res)
    assert [r["method"] for r in rows] == ["emerdiff", "nearest", "bilinear"]


def test_hungarian_protocol_is_seeded():
    recs, _ = _scene_records(seed=3)
    # corrupt the embeddings so that k-means has a real choice to make
    for r in recs:
        r.mask_embeddings = r.mask_embeddings + np.random.RandomState(7).randn(*r.mask_embeddings.shape) * 3
    a = hungarian_protocol(recs, 3, seed=0)["methods"]["emerdiff"]["miou"]
    b = hungarian_protocol(recs, 3, seed=0)["methods"]["emerdiff"]["miou"]
    assert a == b


def test_concept_protocol_picks_the_right_class():
    recs, protos = _scene_records()
    concepts, counts = concept_embeddings(recs, 3)
    assert (counts > 0).all()
    # each concept is closest to its own class prototype
    np.testing.assert_array_equal(assign_to_concepts(protos, concepts), [0, 1, 2])
    res = concept_protocol(recs, 3)
    for m in ("emerdiff", "nearest", "bilinear"):
        assert res["methods"][m]["miou"] == pytest.approx(100.0)


def test_concept_protocol_constructed_features():
    # two classes with orthogonal features; a mask whose embedding points to class 1
    # takes class 1 even though its pixels are class 0 -> known IoU
    concepts = np.array([[1.0, 0.0], [0.0, 1.0], [np.nan, np.nan]])
    emb = np.array([[0.9, 0.1], [0.2, 3.0], [5.0, 4.0]])
    np.testing.assert_array_equal(assign_to_concepts(emb, concepts), [0, 1, 0])
    feats = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=float)
    low_gt = np.array([[0, 0], [1, 1]])
    rec = build_record(
        "x",
        dict(labels=np.array([[0, 1], [1, 1]]), nearest_labels=np.array([[0, 0], [1, 1]]),
             bilinear_labels=np.array([[0, 0], [1, 1]]), lowres_labels=np.array([[0, 0], [1, 1]]),
             mask_embeddings=np.array([[1.0, 0.0], [0.0, 1.0]]), query_features=feats),
        low_gt, 3)
    res = concept_protocol([rec], 3)
    assert res["num_concepts"] == 2
    assert res["methods"]["nearest"]["miou"] == pytest.approx(100.0)
    # emerdiff map: class0 IoU 1/2, class1 IoU 2/3
    assert res["methods"]["emerdiff"]["miou"] == pytest.approx((50 + 200 / 3) / 2)


def test_concept_uses_dataset_level_concepts():
    # class 1 appears only in the second image: its concept still reaches the first
    feats_a = np.array([[1, 0], [1, 0], [1, 0], [0.9, 0.1]], dtype=float)
    feats_b = np.array([[0, 1], [0, 1], [1, 0], [1, 0]], dtype=float)
    seg_a = dict(labels=np.array([[0, 0], [0, 1]]), nearest_labels=np.array([[0, 0], [0, 1]]),
                 bilinear_labels=np.array([[0, 0], [0, 1]]), lowres_labels=np.array([[0, 0], [0, 1]]),
                 mask_embeddings=np.array([[1.0, 0.0], [0.1, 1.0]]), query_features=feats_a)
    seg_b = dict(labels=np.array([[0, 0], [1, 1]]), nearest_labels=np.array([[0, 0], [1, 1]]),
                 bilinear_labels=np.array([[0, 0], [1, 1]]), lowres_labels=np.array([[0, 0], [1, 1]]),
                 mask_embeddings=np.array([[0.0, 1.0], [1.0, 0.0]]), query_features=feats_b)
    ra = build_record("a", seg_a, np.array([[0, 0], [0, 0]]), 2)
    rb = build_record("b", seg_b, np.array([[1, 1], [0, 0]]), 2)
    res = concept_protocol([ra, rb], 2)
    # image a's second mask looks like class 1 but is class 0 -> 1 wrong pixel of 8
    assert res["methods"]["emerdiff"]["pixel_accuracy"] == pytest.approx(7 / 8 * 100)


def test_build_record_resizes_and_downsamples():
    gt = np.zeros((8, 8), dtype=int)
    gt[:, 4:] = 1
    seg = dict(labels=np.array([[0, 1]]).repeat(2, 0), nearest_labels=np.zeros((8, 8), int),
               bilinear_labels=np.zeros((8, 8), int), lowres_labels=np.array([[0, 1], [0, 1]]),
               mask_embeddings=np.eye(2), query_features=np.eye(2)[[0, 1, 0, 1]])
    rec = build_record("r", seg, gt, 2)
    np.testing.assert_array_equal(rec.counts["emerdiff"], [[32, 0], [0, 32]])
    np.testing.assert_array_equal(rec.lowres_gt, [[0, 1], [0, 1]])
    assert not math.isnan(concept_protocol([rec], 2)["methods"]["emerdiff"]["miou"])


def test_bootstrap_protocols_agree_with_the_protocols_and_order_methods():
    """Perfect EmerDiff labels, noisy nearest labels, bilinear identical to EmerDiff: the full-data
    values are the protocols' own mIoU, intervals hold them, an identical pair differs by exactly 0
    and a better method's advantage has an interval above 0."""
    recs, _ = _scene_records(n_images=12, seed=5)
    rng = np.random.RandomState(1)
    noisy = []
    for r in recs:
        labels = np.kron(r.lowres_labels, np.ones((4, 4), dtype=int))
        gt = np.kron(r.lowres_gt, np.ones((4, 4), dtype=int))
        gt[0, 0] = 255
        near = np.where(rng.rand(*labels.shape) < 0.25, rng.randint(0, 3, labels.shape), labels)
        seg = dict(labels=labels, nearest_labels=near, bilinear_labels=labels, lowres_labels=r.lowres_labels,
                   mask_embeddings=r.mask_embeddings, query_features=r.query_features)
        noisy.append(build_record(r.image_id, seg, gt, 3))
    out = bootstrap_protocols(noisy, 3, n_boot=200)
    for protocol, fn in (("hungarian", hungarian_protocol), ("concept", concept_protocol)):
        full = fn(noisy, 3)["methods"]
        for m in ("emerdiff", "nearest", "bilinear"):
            row = out[protocol][m]
            assert row["value"] == pytest.approx(full[m]["miou"])
            assert row["lo"] <= row["value"] <= row["hi"]
        assert out[protocol]["emerdiff-bilinear"] == {"value": 0.0, "lo": 0.0, "hi": 0.0}
        assert out[protocol]["emerdiff-nearest"]["lo"] > 0
    assert bootstrap_protocols(noisy, 3, n_boot=50, seed=3) == bootstrap_protocols(noisy, 3, n_boot=50, seed=3)
