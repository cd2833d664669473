"""EmerDiffConfig.feature_normalization: k-means on raw or L2-normalised query vectors (Step A)."""

from __future__ import annotations

import numpy as np
import pytest

from emerdiff.config import FEATURE_NORMALIZATIONS, EmerDiffConfig
from emerdiff.method.features import cluster_features, normalize_features, segments_from_labels


def _unit_rows(n: int, c: int, seed: int) -> np.ndarray:
    f = np.random.default_rng(seed).normal(size=(n, c))
    return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("seed", range(5))
def test_l2_rows_have_unit_norm_and_keep_their_direction(seed):
    rng = np.random.default_rng(seed)
    f = (rng.normal(size=(16, 8)) * rng.uniform(0.1, 50, size=(16, 1))).astype(np.float32)
    f[3] = 0.0  # a zero vector has no direction: it stays at the origin instead of becoming NaN
    out = normalize_features(f, "l2")
    norms = np.linalg.norm(out, axis=1)
    np.testing.assert_allclose(np.delete(norms, 3), 1.0, atol=1e-6)
    assert norms[3] == 0.0 and out.dtype == np.float32
    cos = (out * f).sum(1) / np.maximum(np.linalg.norm(f, axis=1), 1e-12)
    np.testing.assert_allclose(np.delete(cos, 3), 1.0, atol=1e-5)  # same direction
    np.testing.assert_array_equal(normalize_features(f, "none"), f)  # "none" changes nothing


@pytest.mark.parametrize("seed", range(4))
def test_l2_equals_none_on_features_of_unit_norm(seed):
    """Normalising vectors that already have unit length is the identity, so both options agree."""
    f = _unit_rows(36, 6, seed)
    raw = cluster_features(f, (6, 6), 4, seed=seed, n_init=3, normalization="none")
    l2 = cluster_features(f, (6, 6), 4, seed=seed, n_init=3, normalization="l2")
    np.testing.assert_array_equal(l2.labels, raw.labels)
    np.testing.assert_allclose(l2.centroids, raw.centroids, atol=1e-6)
    np.testing.assert_allclose(l2.features, raw.features, atol=1e-6)


def test_l2_clusters_by_direction_where_raw_clusters_by_length():
    """Two directions 20 degrees apart, each at lengths 1 and 10: raw k-means (K=2) splits short from
    long; on the unit sphere only the direction is left, so l2 splits the two directions."""
    rng = np.random.default_rng(0)
    angle = np.deg2rad(20)
    u, v = np.array([1.0, 0.0, 0.0]), np.array([np.cos(angle), np.sin(angle), 0.0])
    direction = np.arange(16) % 2  # 0: u, 1: v
    length = np.where(np.arange(16) // 2 % 2 == 0, 1.0, 10.0)
    f = (np.where(direction[:, None] == 0, u, v) * length[:, None] + rng.normal(0, 1e-3, (16, 3))).astype(np.float32)
    raw = cluster_features(f, (4, 4), 2, normalization="none").labels.ravel()
    l2 = cluster_features(f, (4, 4), 2, normalization="l2").labels.ravel()

    def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
        return len(set(zip(a.tolist(), b.tolist()))) == len(set(a.tolist())) == len(set(b.tolist()))

    assert same_partition(raw, (length > 5).astype(int)) and same_partition(l2, direction)
    assert not same_partition(raw, l2)


def test_l2_segments_live_in_the_normalised_space():
    """features, centroids and mask embeddings of one result share one space, for k-means and for given labels."""
    rng = np.random.default_rng(1)
    f = (rng.normal(size=(16, 5)) * rng.uniform(1, 20, size=(16, 1))).astype(np.float32)
    km = cluster_features(f, (4, 4), 3, normalization="l2")
    np.testing.assert_allclose(np.linalg.norm(km.features, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(km.centroids, km.mask_embeddings(), atol=1e-5)  # k-means: centre = mean of members
    given = segments_from_labels(km.labels, f, (4, 4), normalization="l2")
    np.testing.assert_array_equal(given.labels, km.labels)
    np.testing.assert_allclose(given.features, km.features, atol=1e-7)
    np.testing.assert_allclose(given.centroids, km.centroids, atol=1e-5)
    raw = segments_from_labels(km.labels, f, (4, 4))
    np.testing.assert_allclose(raw.features, f)  # the default keeps the raw vectors


def test_bad_normalization_fails_naming_the_allowed_values():
    assert FEATURE_NORMALIZATIONS == ("none", "l2")
    with pytest.raises(ValueError, match=r"feature_normalization must be one of \['none', 'l2'\], got 'L2'"):
        EmerDiffConfig(feature_normalization="L2").check_values()
    with pytest.raises(ValueError, match=r"one of \['none', 'l2'\], got 'cosine'"):
        cluster_features(np.zeros((4, 2), np.float32), (2, 2), 2, normalization="cosine")
    assert EmerDiffConfig().feature_normalization == "none"  # results unchanged by default


def test_set_feature_normalization_reaches_the_config():
    from emerdiff.cli.app import build_parser
    from emerdiff.cli.options import config_from_args

    parser = build_parser()
    for command in (["segment", "x.png"], ["refine", "x.png", "--masks", "m.png"]):
        args = parser.parse_args([*command, "--model", "tiny", "--set", "feature_normalization=l2"])
        assert config_from_args(args).feature_normalization == "l2"
        assert config_from_args(parser.parse_args([*command, "--model", "tiny"])).feature_normalization == "none"
    with pytest.raises(ValueError, match="feature_normalization must be one of"):
        config_from_args(parser.parse_args(["segment", "x.png", "--model", "tiny", "--set",
                                            "feature_normalization=unit"])).check_values()


# --------------------------------------------------------------------------- tiny model
def test_l2_segmentation_on_the_tiny_model(tiny_model, fast_config, photo):
    """A valid segmentation whose low-res segments, embeddings and bilinear baseline come from the
    normalised queries; on this photo its segments differ from the raw k-means ones; bad values
    stop EmerDiff before any work."""
    from emerdiff import EmerDiff
    from emerdiff.method.readout import bilinear_upsample

    raw_ed = EmerDiff(tiny_model, fast_config)
    ed = EmerDiff(tiny_model, fast_config.replace(feature_normalization="l2"))
    seg = ed.segment(photo, progress=False)
    k = seg.num_segments
    assert seg.labels.shape == photo.shape[:2] and seg.lowres_labels.shape == (4, 4)
    assert set(np.unique(seg.lowres_labels)) == set(range(k)) and set(np.unique(seg.labels)) <= set(range(k))
    assert seg.config["feature_normalization"] == "l2"
    np.testing.assert_allclose(np.linalg.norm(seg.query_features, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(seg.bilinear_labels, bilinear_upsample(seg.query_features, seg.centroids, (4, 4),
                                                                          photo.shape[:2]))
    raw = raw_ed.prepare(photo).segments
    assert not np.allclose(np.linalg.norm(raw.features, axis=1), 1.0)  # the raw queries are not unit length
    np.testing.assert_allclose(seg.query_features, normalize_features(raw.features, "l2"), atol=1e-6)
    assert not np.array_equal(seg.lowres_labels, raw.labels)  # measured: the two disagree on this photo
    # refine with the segmentation's own segments reproduces it (the given-labels path normalises too)
    again = ed.refine(photo, seg.lowres_labels, progress=False)
    np.testing.assert_array_equal(again.labels, seg.labels)
    np.testing.assert_allclose(again.centroids, seg.centroids, atol=1e-5)
    with pytest.raises(ValueError, match="feature_normalization must be one of"):
        EmerDiff(tiny_model, fast_config.replace(feature_normalization="L2"))


def test_probes_that_recluster_queries_follow_the_config(tiny_model, fast_config, monkeypatch):
    """The layer probe and the feature-timestep sweep cluster fresh queries: with "l2" they normalise too."""
    import emerdiff.studies.probes as probes
    from emerdiff import EmerDiff
    from emerdiff.evaluation.datasets import load_probe_images

    seen = []

    def recording(*args, **kwargs):
        out = cluster_features(*args, **kwargs)
        seen.append(args[5] if len(args) > 5 else kwargs.get("normalization", "none"))
        np.testing.assert_allclose(np.linalg.norm(out.features, axis=1), 1.0, atol=1e-5)
        return out

    monkeypatch.setattr(probes, "cluster_features", recording)
    ed = EmerDiff(tiny_model, fast_config.replace(feature_normalization="l2"))
    item = load_probe_images(["astronaut"])
    assert len(probes.layer_probe(ed, item, layers=[ed.config.query_layer])) == 1
    assert len(probes.feature_timestep_sweep(ed, item, timesteps=[1])) == 1
    assert seen == ["l2", "l2"]
