"""k-means on the torch device (issue 25, emerdiff/method/kmeans.py): the same objective as scikit-learn's
KMeans on the same data, selectable by EmerDiffConfig.kmeans_backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from emerdiff import EmerDiffConfig
from emerdiff.method.features import cluster_features
from emerdiff.method.kmeans import kmeans_objective, resolve_backend, torch_kmeans


def _data(kind: str, n: int, c: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "blobs":  # separated clusters: both must find the same partition
        centers = rng.normal(size=(6, c)) * 6
        return (centers[rng.integers(0, 6, n)] + rng.normal(size=(n, c))).astype(np.float32)
    if kind == "gauss":  # no structure: many local optima, objective within a tolerance
        return rng.normal(size=(n, c)).astype(np.float32)
    # SD-query-like: a few directions with heavy-tailed loadings plus noise, one large outlier token
    basis = rng.normal(size=(8, c))
    f = rng.standard_t(3, size=(n, 8)) @ basis + 0.5 * rng.normal(size=(n, c))
    f[0] *= 20
    return f.astype(np.float32)


SEEDS = range(4)


@pytest.mark.parametrize("kind,n,c,k", [("blobs", 256, 64, 6), ("gauss", 256, 320, 25), ("queries", 256, 640, 25),
                                        ("queries", 64, 320, 8), ("gauss", 30, 5, 30)])
def test_torch_kmeans_reaches_sklearns_objective(kind, n, c, k):
    """Same data, same k-means++ and n_init = 10: per seed the two land on local optima of the same quality
    (structureless data: within a few per cent either way), on average within 2 %; separated blobs: equal."""
    x = _data(kind, n, c)
    gaps = []
    for seed in SEEDS:
        km = KMeans(n_clusters=k, init="k-means++", n_init=10, random_state=seed).fit(x.astype(np.float64))
        labels, centers, inertia = torch_kmeans(x, k, n_init=10, seed=seed)
        assert labels.shape == (n,) and centers.shape == (k, c)
        assert inertia == pytest.approx(kmeans_objective(x, centers), rel=1e-9)
        # each point sits with its nearest centre (a Lloyd fixed point)
        d = ((x[:, None, :].astype(np.float64) - centers[None]) ** 2).sum(-1)
        assert (d[np.arange(n), labels] <= d.min(1) + 1e-6 * d.max()).all()
        gaps.append((inertia - km.inertia_) / max(km.inertia_, 1e-9))
        if kind == "blobs":
            assert inertia == pytest.approx(km.inertia_, rel=1e-9)
    assert max(gaps) <= 0.05 and float(np.mean(gaps)) <= 0.02, gaps


def test_torch_kmeans_is_deterministic_per_seed_and_refuses_bad_k():
    x = _data("gauss", 100, 16)
    a, b = torch_kmeans(x, 5, seed=3), torch_kmeans(torch.from_numpy(x), 5, seed=3)
    assert (a[0] == b[0]).all() and a[2] == b[2]
    with pytest.raises(ValueError, match="k=101"):
        torch_kmeans(x, 101)


def test_backend_choice():
    assert resolve_backend("sklearn", "cuda") == "sklearn"
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("auto", "cpu") == "sklearn" and resolve_backend("auto", torch.device("cuda:1")) == "torch"
    with pytest.raises(ValueError, match="kmeans_backend"):
        resolve_backend("faiss")
    with pytest.raises(ValueError, match="kmeans_backend must be one of"):
        EmerDiffConfig(kmeans_backend="faiss").check_values()
    assert EmerDiffConfig().kmeans_backend == "sklearn"  # the default: the labels every table was made with


def test_cluster_features_with_either_backend():
    x = _data("blobs", 64, 32)
    segs = {b: cluster_features(x, (8, 8), 6, seed=0, n_init=4, backend=b, device="cpu") for b in ("sklearn", "torch")}
    for s in segs.values():
        assert s.labels.shape == (8, 8) and s.num_segments == 6 and s.centroids.shape == (6, 32)
    # separated blobs: the same partition (up to the numbering)
    a, b = segs["sklearn"].labels.ravel(), segs["torch"].labels.ravel()
    pairs = set(zip(a.tolist(), b.tolist()))
    assert len(pairs) == 6


def test_pipeline_uses_the_configured_backend(tiny_model, fast_config, photo, monkeypatch):
    import emerdiff.method.kmeans as km
    from emerdiff import EmerDiff

    calls = []
    real = km.torch_kmeans
    monkeypatch.setattr(km, "torch_kmeans", lambda *a, **k: calls.append(k.get("device")) or real(*a, **k))
    prep = EmerDiff(tiny_model, fast_config.replace(kmeans_backend="torch")).prepare(photo)
    assert calls == [tiny_model.device] and prep.segments.num_segments >= 2
