"""Step A: low-resolution segments from k-means on cross-attention query features."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans

from emerdiff.config import FEATURE_NORMALIZATIONS


@dataclass
class LowResSegments:
    """k-means result on a token grid.

    labels: (h, w) int labels 0..K'-1 (empty clusters dropped, renumbered).
    features: (h*w, C) float32 query vectors the clustering ran on (unit length with
        ``normalization="l2"``), so centroids, mask embeddings and the bilinear baseline all
        live in one space.
    centroids: (K', C) cluster centres in that space.
    """

    labels: np.ndarray
    features: np.ndarray
    centroids: np.ndarray

    @property
    def num_segments(self) -> int:
        return int(self.centroids.shape[0])

    def masks(self) -> np.ndarray:
        """(K', h*w) float one-hot masks M_i on the token grid."""
        flat = self.labels.reshape(-1)
        return (flat[None, :] == np.arange(self.num_segments)[:, None]).astype(np.float32)

    def mask_embeddings(self) -> np.ndarray:
        """(K', C) mean query vector inside each mask (used by the evaluation protocols)."""
        m = self.masks()
        return (m @ self.features) / m.sum(1, keepdims=True)


def normalize_features(features: np.ndarray | torch.Tensor, normalization: str = "none") -> np.ndarray:
    """(N, C) features as float32 numpy, each row scaled to unit L2 norm when ``normalization="l2"``
    (all-zero rows stay zero); ``"none"`` returns them unchanged.

    Raises ValueError naming the allowed values for any other ``normalization``.
    """
    if normalization not in FEATURE_NORMALIZATIONS:
        raise ValueError(f"feature_normalization must be one of {list(FEATURE_NORMALIZATIONS)}, got {normalization!r}")
    f = features.detach().float().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float32)
    if normalization == "l2":
        norms = np.linalg.norm(f.astype(np.float64), axis=-1, keepdims=True)
        f = f / np.maximum(norms, 1e-12)  # 1e-12: a zero vector has no direction; keep it at the origin
    return f.astype(np.float32)


def cluster_features(
    features: np.ndarray | torch.Tensor,
    grid: tuple[int, int],
    num_clusters: int,
    seed: int = 0,
    n_init: int = 10,
    normalization: str = "none",
    backend: str = "sklearn",
    device: torch.device | str | None = None,
) -> LowResSegments:
    """k-means (k-means++, fixed seed) on (h*w, C) features -> a label map on the grid.

    ``backend`` (EmerDiffConfig.kmeans_backend): "sklearn" (scikit-learn on the CPU), "torch"
    (:func:`emerdiff.method.kmeans.torch_kmeans` on ``device``), "auto" (torch on a CUDA device).

    ``normalization`` (:func:`normalize_features`): "l2" clusters the unit-length vectors
    (EmerDiffConfig.feature_normalization); the result's features and centroids are then the
    normalised ones. Raises ValueError when K exceeds the number of tokens.
    """
    f = normalize_features(features, normalization)
    h, w = grid
    if f.shape[0] != h * w:
        raise ValueError(f"{f.shape[0]} feature vectors do not fill a {h}x{w} grid")
    if num_clusters > f.shape[0]:
        raise ValueError(
            f"K={num_clusters} clusters requested but the query layer has only {f.shape[0]} tokens "
            f"({h}x{w}); lower K or raise the resolution"
        )
    from emerdiff.method.kmeans import resolve_backend, torch_kmeans

    if resolve_backend(backend, device) == "torch":
        raw, centers, _ = torch_kmeans(f, num_clusters, n_init=n_init, seed=seed, device=device)
    else:
        km = KMeans(n_clusters=num_clusters, init="k-means++", n_init=n_init, random_state=seed)
        raw = km.fit_predict(f.astype(np.float64))
        centers = km.cluster_centers_
    # Drop empty clusters and renumber 0..K'-1 in order of first appearance in the cluster ids.
    used, labels = np.unique(raw, return_inverse=True)
    centroids = centers[used].astype(np.float32)
    return LowResSegments(labels.reshape(h, w).astype(np.int64), f.astype(np.float32), centroids)


def project_labels(labels: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """A label map of any size -> labels 0..K'-1 on the token grid (h, w).

    Each token takes the most frequent label among the pixels whose nearest token
    it is (ties: the smaller label); a map coarser than the grid is first upsampled
    with nearest neighbour. Label values are arbitrary integers (e.g. a SAM or
    hand-drawn PNG); they are renumbered in increasing order, and labels that win
    no token are dropped.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.size == 0:
        raise ValueError(f"a low-resolution label map must be a non-empty 2-D array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise ValueError("label map values must be integers (segment ids)")
        labels = labels.astype(np.int64)
    h, w = grid
    H, W = labels.shape
    if H < h or W < w:  # coarser than the grid: nearest upsampling first
        rows = (np.arange(max(H, h)) * H // max(H, h))
        cols = (np.arange(max(W, w)) * W // max(W, w))
        labels = labels[rows[:, None], cols[None, :]]
        H, W = labels.shape
    values, ids = np.unique(labels, return_inverse=True)
    ids = ids.reshape(H, W)
    token = (np.arange(H) * h // H)[:, None] * w + (np.arange(W) * w // W)[None, :]
    votes = np.zeros((h * w, len(values)), dtype=np.int64)
    np.add.at(votes, (token.ravel(), ids.ravel()), 1)
    winner = votes.argmax(1)
    _, renumbered = np.unique(winner, return_inverse=True)
    return renumbered.reshape(h, w).astype(np.int64)


def segments_from_labels(labels: np.ndarray, features: np.ndarray | torch.Tensor,
                         grid: tuple[int, int], normalization: str = "none") -> LowResSegments:
    """Low-res segments from a given label map (any size, any source) instead of k-means:
    labels projected onto the grid (:func:`project_labels`), centroids = mean feature per segment
    (features normalised first as :func:`cluster_features` does, so both paths share one space)."""
    f = normalize_features(features, normalization)
    h, w = grid
    if f.shape[0] != h * w:
        raise ValueError(f"{f.shape[0]} feature vectors do not fill a {h}x{w} grid")
    projected = project_labels(labels, grid)
    k = int(projected.max()) + 1
    onehot = (projected.reshape(-1)[None, :] == np.arange(k)[:, None]).astype(np.float32)
    centroids = (onehot @ f) / onehot.sum(1, keepdims=True)
    return LowResSegments(projected, f.astype(np.float32), centroids.astype(np.float32))
