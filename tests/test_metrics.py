"""Known-answer tests of the metrics, the evaluation protocols and their bootstrap intervals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from emerdiff.evaluation.bootstrap import bootstrap_protocols, bootstrap_weights, compare_records
from emerdiff.evaluation.metrics import (
    best,
    boundary_alignment,
    confusion_matrix,
    hungarian_match,
    hungarian_miou,
    miou,
    per_class_iou,
    pixel_accuracy,
    remap_confusion,
    score_labels,
    scores,
    silhouette,
    summarize,
)
from emerdiff.evaluation.protocols import (
    PROTOCOLS,
    assign_to_concepts,
    concept_embeddings,
    concept_protocol,
    dataset_hungarian_protocol,
    evaluate_records,
    mask_concept_embeddings,
    per_class_rows,
    per_image_hungarian_protocol,
    per_image_match,
    protocol_draws,
    summary_rows,
)
from emerdiff.evaluation.records import ImageRecord, build_record, mask_class_counts


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


def test_resize_and_counts():
    from emerdiff.sd.images import resize_labels

    low = np.array([[0, 1], [2, 3]])
    up = resize_labels(low, (4, 6))
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
    res = dataset_hungarian_protocol(recs, 3, ["a", "b", "c"])
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
    a = dataset_hungarian_protocol(recs, 3, seed=0)["methods"]["emerdiff"]["miou"]
    b = dataset_hungarian_protocol(recs, 3, seed=0)["methods"]["emerdiff"]["miou"]
    assert a == b


def test_concept_protocol_picks_the_right_class():
    recs, protos = _scene_records()
    concepts, counts = concept_embeddings(recs, 3)
    assert (counts > 0).all()
    # each concept is closest to its own class prototype
    np.testing.assert_array_equal(assign_to_concepts(protos, concepts), [0, 1, 2])
    for variant in ("mask_mean", "token_mean"):
        res = concept_protocol(recs, 3, variant=variant)
        for m in ("emerdiff", "nearest", "bilinear"):
            assert res["methods"][m]["miou"] == pytest.approx(100.0)
    res = per_image_hungarian_protocol(recs, 3)
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
    res = concept_protocol([rec], 3, variant="token_mean")
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
    res = concept_protocol([ra, rb], 2, variant="token_mean")
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


def _noisy_records(n_images: int = 12, seed: int = 5) -> list[ImageRecord]:
    """Perfect EmerDiff labels, nearest labels with 25 % random pixels, bilinear = EmerDiff."""
    recs, _ = _scene_records(n_images=n_images, seed=seed)
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
    return noisy


def test_bootstrap_protocols_agree_with_the_protocols_and_order_methods():
    """Every protocol: the full-data values are the protocols' own mIoU, intervals hold them, an
    identical pair differs by exactly 0 and a better method's advantage has an interval above 0."""
    noisy = _noisy_records()
    out = bootstrap_protocols(noisy, 3, n_boot=200)
    assert list(out) == list(PROTOCOLS)
    for protocol in PROTOCOLS:
        full = evaluate_records(noisy, protocol, 3)["methods"]
        for m in ("emerdiff", "nearest", "bilinear"):
            row = out[protocol][m]
            assert row["value"] == pytest.approx(full[m]["miou"], abs=1e-9), (protocol, m)
            if "note" in row:  # a perfect method is 100 on every resample: zero spread, no interval
                assert row["value"] == 100.0 and np.isnan(row["lo"]), (protocol, m)
            else:
                assert row["lo"] <= row["value"] <= row["hi"]
        same = out[protocol]["emerdiff-bilinear"]  # identical labels: zero spread, no interval, a reason
        assert same["value"] == 0.0 and np.isnan(same["lo"]) and np.isnan(same["hi"])
        assert "zero spread" in same["note"]
        assert out[protocol]["emerdiff-nearest"]["lo"] > 0, protocol
        # every pair of methods, in the records' order
        assert out[protocol]["nearest-bilinear"]["hi"] < 0, protocol
    # NaN != NaN: compare the JSON text (NaN written alike) for determinism
    assert (json.dumps(bootstrap_protocols(noisy, 3, n_boot=50, seed=3))
            == json.dumps(bootstrap_protocols(noisy, 3, n_boot=50, seed=3)))
    assert bootstrap_protocols(noisy, 3, n_boot=50, seed=3) != bootstrap_protocols(noisy, 3, n_boot=50, seed=4)


def test_unit_weights_are_the_plain_scores_and_integer_weights_repeat_images():
    """The one weighted implementation: weights 1 give the protocols' scores on the records as they are;
    integer weights w give exactly the scores of the records repeated w times (every protocol, k-means
    fitted on the same masks), so a bootstrap resample is the protocol on the resampled images."""
    from emerdiff.evaluation.protocols import KNOWN_PROTOCOLS, protocol_totals

    noisy = _noisy_records(n_images=5)
    ones, _ = protocol_totals(noisy, 3, np.ones((1, 5)), KNOWN_PROTOCOLS)
    for protocol in KNOWN_PROTOCOLS:
        plain = evaluate_records(noisy, protocol, 3)["methods"]
        for m, totals in ones[protocol].items():
            conf_scores = plain[m]
            assert totals.shape == (1, 3, 3)
            # the pooled confusion's true positives and GT pixels: every non-ignored pixel counted once
            assert totals[0, 1].sum() == sum(r.counts[m].sum() for r in noisy)
            assert conf_scores["pixel_accuracy"] == pytest.approx(totals[0, 0].sum() / totals[0, 1].sum() * 100)
    w = np.array([[2, 0, 1, 0, 3], [1, 1, 1, 1, 1]])
    repeated = [r for r, k in zip(noisy, w[0]) for _ in range(k)]
    draws = protocol_draws(noisy, 3, w, protocols=["per_image_hungarian", "concept", "concept_token_mean", "majority"])
    for protocol, per in draws.items():
        full = evaluate_records(repeated, protocol, 3)["methods"]
        plain = evaluate_records(noisy, protocol, 3)["methods"]
        for m, v in per.items():
            assert v[0] == full[m]["miou"], (protocol, m)
            assert v[1] == plain[m]["miou"], (protocol, m)
    # dataset Hungarian: the clusters are fitted once, so a repeat changes only the matching's counts
    twice = protocol_draws(noisy, 3, np.full((1, 5), 2.0), protocols=["dataset_hungarian"])
    once = evaluate_records(noisy, "dataset_hungarian", 3)["methods"]
    for m, v in twice["dataset_hungarian"].items():
        assert v[0] == once[m]["miou"]  # doubling every image leaves every IoU as it is
    weights = bootstrap_weights(5, 30, seed=0)
    assert weights.shape == (31, 5) and (weights[0] == 1).all() and (weights.sum(axis=1) == 5).all()
    no_ci = bootstrap_protocols(noisy, 3, n_boot=0)["concept"]["emerdiff"]
    assert math.isnan(no_ci["lo"]) and math.isnan(no_ci["hi"]) and np.isfinite(no_ci["value"])


# --------------------------------------------------------------------------- per-image Hungarian
def test_per_image_match_uses_only_present_classes():
    # 3 masks, 4 classes; class 3 absent, class 2 absent too: mask 2 must stay unmatched
    counts = np.array([[0, 5, 0, 0],
                       [4, 1, 0, 0],
                       [0, 0, 0, 0]])
    np.testing.assert_array_equal(per_image_match(counts), [1, 0, -1])
    assert (per_image_match(np.zeros((2, 3), dtype=int)) == -1).all()  # an all-ignored image


def test_per_image_hungarian_differs_from_dataset_matching_by_hand():
    """Two images whose masks swap roles: the per-image matching recovers both, one dataset
    matching of the clustered masks cannot. Pooled, not averaged: hand-computed IoUs."""
    # image a: mask 0 = class 0 (6 px) + 2 px of class 1; mask 1 = class 1 (8 px)
    # image b: mask 0 = class 1 (8 px); mask 1 = class 0 (8 px); embeddings stay with the mask id
    gt_a = np.array([[0, 0, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]])
    lab_a = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    gt_b = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    lab_b = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    recs = []
    for name, gt, lab in (("a", gt_a, lab_a), ("b", gt_b, lab_b)):
        seg = dict(labels=lab, nearest_labels=lab, bilinear_labels=lab, lowres_labels=np.array([[0], [1]]),
                   mask_embeddings=np.eye(2), query_features=np.eye(2))
        recs.append(build_record(name, seg, gt, 2))
    per_image = per_image_hungarian_protocol(recs, 2, ["x", "y"])["methods"]["emerdiff"]
    # pooled class confusion: class 0 -> [6 + 8, 0], class 1 -> [2, 8 + 8]
    # IoU_0 = 14 / (14 + 16 - 14) = 14/16, IoU_1 = 16 / (18 + 16 - 16) = 16/18
    assert per_image["miou"] == pytest.approx((14 / 16 + 16 / 18) / 2 * 100)
    assert per_image["per_class_iou"] == pytest.approx({"x": 14 / 16 * 100, "y": 16 / 18 * 100})
    # the dataset matching puts both mask-0s in one cluster, so one image is labelled backwards
    dataset = dataset_hungarian_protocol(recs, 2)["methods"]["emerdiff"]
    assert dataset["miou"] < 60 < per_image["miou"]


# --------------------------------------------------------------------------- concept variants
def test_mask_mean_concepts_by_hand():
    """The paper's concept: mean over a class's pixels of the embedding of each pixel's mask."""
    gt = np.array([[0, 0], [0, 1]])
    labels = np.array([[0, 0], [1, 1]])  # mask 0 holds two class-0 pixels; mask 1 one class-0 and one class-1
    seg = dict(labels=labels, nearest_labels=np.array([[0, 0], [0, 1]]), bilinear_labels=labels,
               lowres_labels=np.array([[0, 0], [1, 1]]), mask_embeddings=np.array([[1.0, 0.0], [0.0, 1.0]]),
               query_features=np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))
    rec = build_record("toy", seg, gt, 2)
    concepts, pixels = mask_concept_embeddings([rec], 2, "emerdiff")
    # class 0: (2 * e0 + 1 * e1) / 3; class 1: e1
    np.testing.assert_allclose(concepts, [[2 / 3, 1 / 3], [0.0, 1.0]])
    np.testing.assert_array_equal(pixels, [3, 1])
    # nearest's label map puts the class-0 pixel (1, 0) in mask 0: class 0 is then e0 exactly
    np.testing.assert_allclose(mask_concept_embeddings([rec], 2, "nearest")[0], [[1.0, 0.0], [0.0, 1.0]])
    res = concept_protocol([rec], 2, ["a", "b"])
    assert res["protocol"] == "concept" and res["concept_variant"] == "mask_mean"
    # emerdiff: mask 0 -> class 0 (cos 0.89 vs 0), mask 1 -> class 1 (cos 1 vs 0.45)
    # class 0 row [2, 1], class 1 row [0, 1]: IoU_0 = 2/3, IoU_1 = 1/2
    assert res["methods"]["emerdiff"]["per_class_iou"] == pytest.approx({"a": 200 / 3, "b": 50.0})
    assert res["methods"]["emerdiff"]["miou"] == pytest.approx((200 / 3 + 50) / 2)
    assert res["methods"]["nearest"]["miou"] == pytest.approx(100.0)


def _random_segs(n_images: int = 10, num_classes: int = 5, k: int = 6, dim: int = 7, seed: int = 0):
    """A fixed synthetic dataset: random GT and masks on a 4x4 grid, features biased to the class."""
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n_images):
        low_gt = rng.randint(0, num_classes, size=(4, 4))
        low_masks = rng.randint(0, k, size=(4, 4))
        low_masks.flat[:k] = np.arange(k)
        feats = rng.randn(16, dim) + np.eye(dim)[low_gt.reshape(-1) % dim] * 2
        emb = np.stack([feats[low_masks.reshape(-1) == m].mean(0) for m in range(k)])
        gt = np.kron(low_gt, np.ones((4, 4), int))
        gt[rng.rand(16, 16) < 0.1] = 255
        nearest = np.kron(low_masks, np.ones((4, 4), int))
        noisy = np.where(rng.rand(16, 16) < 0.3, rng.randint(0, k, (16, 16)), nearest)
        seg = dict(labels=noisy, nearest_labels=nearest, bilinear_labels=np.roll(nearest, 1, 1),
                   lowres_labels=low_masks, mask_embeddings=emb, query_features=feats)
        out.append(build_record(f"img{i}", seg, gt, num_classes))
    return out


def test_token_mean_variant_reproduces_the_previous_concept_protocol_exactly():
    """Numbers of the concept protocol before the paper's concepts became the default (commit
    c4b81a9, then `concept_protocol(records, 5)`), on a fixed synthetic dataset: unchanged to the bit."""
    recs = _random_segs()
    res = concept_protocol(recs, 5, variant="token_mean")
    assert res["protocol"] == "concept_token_mean"
    assert {m: v["miou"] for m, v in res["methods"].items()} == {
        "emerdiff": 25.733034641609095, "nearest": 31.764349115054415, "bilinear": 27.72618437135269}
    assert {m: v["pixel_accuracy"] for m, v in res["methods"].items()} == {
        "emerdiff": 41.670310450371666, "nearest": 49.016178399650194, "bilinear": 44.16265850459117}
    # the default (the paper's concepts) is a different number on the same records
    default = concept_protocol(recs, 5)["methods"]
    assert default["emerdiff"]["miou"] != res["methods"]["emerdiff"]["miou"]
    assert evaluate_records(recs, "concept_token_mean", 5)["methods"] == res["methods"]
    with pytest.raises(ValueError, match="token_mean"):
        concept_protocol(recs, 5, variant="paper")


# --------------------------------------------------------------------------- methods
def test_methods_come_from_the_records_including_own_masks():
    """An extra method with masks of its own (as DiffSeg) is scored under every protocol with its
    own embeddings; a record missing a method the others have is refused by name."""
    recs = []
    base, _ = _scene_records(n_images=4)
    for r in base:
        gt = np.kron(r.lowres_gt, np.ones((4, 4), dtype=int))
        labels = np.kron(r.lowres_labels, np.ones((4, 4), dtype=int))
        # "own": two masks, left and right half, embedded as the mean token feature inside each
        own_ids = np.zeros_like(gt)
        own_ids[:, 8:] = 1
        tokens = r.query_features.reshape(4, 4, -1)
        own_emb = np.stack([tokens[:, :2].mean((0, 1)), tokens[:, 2:].mean((0, 1))])
        seg = dict(labels=labels, nearest_labels=labels, bilinear_labels=labels, lowres_labels=r.lowres_labels,
                   mask_embeddings=r.mask_embeddings, query_features=r.query_features,
                   extra_labels={"refined": labels},  # as Segmentation.extra_labels: shared mask ids
                   extra_methods={"own": {"labels": own_ids, "mask_embeddings": own_emb}})
        recs.append(build_record(r.image_id, seg, gt, 3))
    assert recs[0].methods == ("emerdiff", "nearest", "bilinear", "refined", "own")
    assert recs[0].embeddings("own").shape == (2, 8)
    for protocol in PROTOCOLS:
        res = evaluate_records(recs, protocol, 3)
        assert list(res["methods"]) == list(recs[0].methods)
        assert res["methods"]["refined"]["miou"] == pytest.approx(res["methods"]["emerdiff"]["miou"])
        assert res["methods"]["own"]["miou"] < 100
    clustered = dataset_hungarian_protocol(recs, 3)
    assert clustered["num_masks"] == 12 and "num_clusters" not in clustered["methods"]["emerdiff"]
    assert clustered["methods"]["own"]["num_clusters"] == 3  # its own k-means of its 8 masks
    rows = per_class_rows(per_image_hungarian_protocol(recs, 3, ["a", "b", "c"]))
    assert len(rows) == 5 * 3 and rows[0] == {"protocol": "per_image_hungarian", "method": "emerdiff",
                                              "class_id": 0, "class": "a", "iou": pytest.approx(100.0)}
    del recs[1].counts["own"]
    with pytest.raises(ValueError, match=r"img1.*'own'"):
        concept_protocol(recs, 3)
    recs[1].counts["own"] = recs[0].counts["own"]
    recs[1].method_embeddings["own"] = np.eye(3)[:2]  # not in the token-feature space
    with pytest.raises(ValueError, match="'own'.*3 dims"):
        concept_protocol(recs, 3, variant="token_mean")
    with pytest.raises(ValueError, match="outside"):
        build_record("x", dict(seg, extra_methods={"bad": {"labels": np.full((16, 16), 5)}}), gt, 3)
    with pytest.raises(ValueError, match="both in extra_labels and extra_methods"):
        build_record("x", dict(seg, extra_methods={"refined": {"labels": labels}}), gt, 3)


def test_compare_records_pairs_the_same_resamples():
    a = _noisy_records()
    rows = compare_records(a, a, 3, n_boot=100)
    assert {(r["protocol"], r["method"]) for r in rows} == {(p, m) for p in PROTOCOLS
                                                             for m in ("emerdiff", "nearest", "bilinear")}
    for r in rows:  # a run against itself: the paired difference is exactly 0
        d = r["a-b"]
        assert d["value"] == 0.0 and np.isnan(d["lo"]) and np.isnan(d["hi"]) and "zero spread" in d["note"]
        assert json.dumps(r["a"]) == json.dumps(r["b"])
    worse = []
    for r in a:  # B: EmerDiff replaced by the noisy nearest labels
        counts = dict(r.counts, emerdiff=r.counts["nearest"])
        worse.append(ImageRecord(r.image_id, counts, r.mask_embeddings, r.query_features, r.lowres_labels,
                                 r.lowres_gt))
    rows = {(r["protocol"], r["method"]): r for r in compare_records(a, worse, 3, n_boot=100)}
    for p in PROTOCOLS:
        assert rows[(p, "emerdiff")]["a-b"]["lo"] > 0
        assert rows[(p, "emerdiff")]["b"]["value"] == pytest.approx(rows[(p, "nearest")]["a"]["value"])
    with pytest.raises(ValueError, match="same images"):
        compare_records(a, a[::-1], 3, n_boot=10)


# --------------------------------------------------------------------------- scores of one label map, tables
def test_hungarian_miou_is_permutation_invariant():
    gt = np.repeat(np.arange(3), 4)[None].repeat(4, 0)  # three vertical bands
    assert hungarian_miou((gt + 1) % 3, gt, num_classes=3) == pytest.approx(100.0)
    assert hungarian_miou(np.zeros_like(gt), gt, num_classes=3) < 50
    ignore = gt.copy()
    ignore[:, :4] = 255  # ignored pixels never count
    assert hungarian_miou(np.zeros_like(gt), ignore, num_classes=3) < 100


def test_boundary_alignment_rewards_edges():
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, 16:] = 255  # one vertical edge
    on_edge = (np.arange(32)[None] >= 16).repeat(32, 0).astype(int)
    off_edge = (np.arange(32)[:, None] >= 8).repeat(32, 1).astype(int)
    assert boundary_alignment(on_edge, img) > 5
    assert boundary_alignment(off_edge, img) < 1.5
    assert math.isnan(boundary_alignment(np.zeros((32, 32), int), img))
    assert boundary_alignment(on_edge[::4, ::4], img) > 5  # coarse maps are resized


def test_score_labels_with_and_without_ground_truth():
    from emerdiff.evaluation.datasets import ProbeImage

    img = np.zeros((32, 32, 3), np.uint8)
    img[:, 16:] = 255
    gt = (np.arange(32)[None] >= 16).repeat(32, 0)
    labels = 1 - gt.astype(int)  # the right split under other ids
    with_gt = score_labels(labels, ProbeImage("x", img, gt.astype(np.int32), 2))
    assert with_gt["miou"] == pytest.approx(100.0) and with_gt["boundary"] > 5
    without = score_labels(labels[::4, ::4], ProbeImage("x", img))  # any size; no ground truth: NaN
    assert math.isnan(without["miou"]) and without["boundary"] == pytest.approx(with_gt["boundary"])


def test_silhouette_range_and_single_cluster():
    rng = np.random.default_rng(0)
    f = np.concatenate([rng.normal(size=(20, 4)) + [5, 0, 0, 0], rng.normal(size=(20, 4)) + [0, 5, 0, 0]])
    s = silhouette(f, np.repeat([0, 1], 20))
    assert 0.3 < s <= 1
    assert math.isnan(silhouette(f, np.zeros(40, int)))


def test_summarize_and_best():
    rows = [dict(x=1, m=1.0), dict(x=1, m=3.0), dict(x=2, m=float("nan")), dict(x=3, m=0.5)]
    table = summarize(rows, "x", ["m"])
    assert [r["x"] for r in table] == [1, 2, 3]
    assert table[0]["m"] == 2.0 and table[0]["m_sd"] == 1.0 and table[0]["n"] == 2
    assert math.isnan(table[1]["m"])
    assert best(rows, "m", "x") == 1


def test_majority_protocol_is_the_pixel_accuracy_ceiling_of_every_mask_labelling():
    """Each mask takes its majority GT class: no protocol's labelling of the same masks gets more pixels right,
    and a label map equal to the GT scores 100."""
    from emerdiff.evaluation.protocols import KNOWN_PROTOCOLS

    recs = _noisy_records(n_images=8, seed=3)
    num_classes = recs[0].counts["emerdiff"].shape[1]
    major = evaluate_records(recs, "majority", num_classes)
    assert major["protocol"] == "majority" and set(major["methods"]) == set(recs[0].counts)
    for protocol in ("dataset_hungarian", "concept", "per_image_hungarian"):
        other = evaluate_records(recs, protocol, num_classes)
        for m, res in other["methods"].items():
            assert major["methods"][m]["pixel_accuracy"] >= res["pixel_accuracy"] - 1e-9, (protocol, m)
    # the bootstrap's full-data value equals the protocol's mIoU
    boot = bootstrap_protocols(recs, num_classes, n_boot=20, protocols=KNOWN_PROTOCOLS)
    for m, res in major["methods"].items():
        assert boot["majority"][m]["value"] == pytest.approx(res["miou"])
    assert "majority" not in PROTOCOLS  # an oracle: never part of the default protocols


def test_majority_protocol_of_a_perfect_label_map_is_100():
    from emerdiff.evaluation.protocols import evaluate_records

    counts = np.array([[50, 0, 0], [0, 30, 0], [0, 0, 20], [0, 10, 0]])  # mask 3 also lies in class 1
    rec = ImageRecord("a", {"emerdiff": counts}, np.eye(4), np.zeros((4, 4)), np.zeros((2, 2), dtype=int),
                      np.zeros((2, 2), dtype=int))
    assert evaluate_records([rec], "majority", 3)["methods"]["emerdiff"]["miou"] == pytest.approx(100.0)
