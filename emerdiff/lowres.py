"""Step A: low-resolution segments from k-means on cross-attention query features."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans


@dataclass
class LowResSegments:
    """k-means result on a token grid.

    labels: (h, w) int labels 0..K'-1 (empty clusters dropped, renumbered).
    features: (h*w, C) float32 query vectors the clustering ran on.
    centroids: (K', C) cluster centres.
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


def cluster_features(
    features: np.ndarray | torch.Tensor,
    grid: tuple[int, int],
    num_clusters: int,
    seed: int = 0,
    n_init: int = 10,
) -> LowResSegments:
    """k-means (k-means++, fixed seed) on (h*w, C) features -> a label map on the grid.

    Raises ValueError when K exceeds the number of tokens.
    """
    f = features.detach().float().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float32)
    h, w = grid
    if f.shape[0] != h * w:
        raise ValueError(f"{f.shape[0]} feature vectors do not fill a {h}x{w} grid")
    if num_clusters > f.shape[0]:
        raise ValueError(
            f"K={num_clusters} clusters requested but the query layer has only {f.shape[0]} tokens "
            f"({h}x{w}); lower K or raise the resolution"
        )
    km = KMeans(n_clusters=num_clusters, init="k-means++", n_init=n_init, random_state=seed)
    raw = km.fit_predict(f.astype(np.float64))
    # Drop empty clusters and renumber 0..K'-1 in order of first appearance in the cluster ids.
    used, labels = np.unique(raw, return_inverse=True)
    centroids = km.cluster_centers_[used].astype(np.float32)
    return LowResSegments(labels.reshape(h, w).astype(np.int64), f.astype(np.float32), centroids)
