"""k-means of Step A on the torch device (issue 25): k-means++ seeding and Lloyd's iterations, all
``n_init`` restarts at once as one batch, no host sync inside the loop but a convergence check every
few iterations.

Selected by ``EmerDiffConfig.kmeans_backend``: ``"sklearn"`` (the default: scikit-learn's KMeans on the
CPU, the labels every table so far was made with), ``"torch"`` (this module, on the model's device), or
``"auto"`` (torch on a CUDA device, scikit-learn elsewhere). On the same data both reach the same
objective (sum of squared distances to the nearest centre) within a small tolerance
(tests/test_kmeans.py); the labels of a near-tie may differ, as between two scikit-learn seeds.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

KMEANS_BACKENDS = ("sklearn", "torch", "auto")


def resolve_backend(backend: str, device: Any = None) -> str:
    """``"sklearn"`` or ``"torch"``: ``"auto"`` is torch on a CUDA device, scikit-learn elsewhere."""
    if backend not in KMEANS_BACKENDS:
        raise ValueError(f"kmeans_backend must be one of {list(KMEANS_BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "torch" if device is not None and torch.device(device).type == "cuda" else "sklearn"
    return backend


def _sq_dists(x: torch.Tensor, centers: torch.Tensor, x_sq: torch.Tensor) -> torch.Tensor:
    """(R, N, k) squared distances of the N points to each restart's k centres (clamped at 0)."""
    c_sq = (centers * centers).sum(-1)  # (R, k)
    d = x_sq[None, :, None] - 2.0 * torch.matmul(x[None], centers.transpose(1, 2)) + c_sq[:, None, :]
    return d.clamp_min_(0.0)


def _kmeans_pp(x: torch.Tensor, x_sq: torch.Tensor, k: int, n_init: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ (scikit-learn's: 2 + ln k candidates per centre, the one lowering the potential
    most is kept), ``n_init`` seedings as one batch -> (R, k, C) centres."""
    n, c = x.shape
    trials = 2 + int(math.log(k))
    rows = torch.arange(n_init, device=x.device)
    first = torch.randint(n, (n_init,), generator=gen, device=x.device)
    centers = torch.empty(n_init, k, c, dtype=x.dtype, device=x.device)
    centers[:, 0] = x[first]
    closest = _sq_dists(x, centers[:, :1], x_sq)[..., 0]  # (R, N)
    for j in range(1, k):
        weights = closest.clamp_min(0) + 1e-30  # all-equal points: uniform
        cand = torch.multinomial(weights, trials, replacement=True, generator=gen)  # (R, T)
        cand_d = _sq_dists(x, x[cand], x_sq).transpose(1, 2)  # (R, T, N)
        new_closest = torch.minimum(closest[:, None, :], cand_d)
        best = new_closest.sum(-1).argmin(-1)  # (R,)
        centers[:, j] = x[cand[rows, best]]
        closest = new_closest[rows, best]
    return centers


def torch_kmeans(features: torch.Tensor | np.ndarray, k: int, n_init: int = 10, seed: int = 0,
                 max_iter: int = 300, tol: float = 1e-4, device: Any = None, dtype: torch.dtype = torch.float64,
                 check_every: int = 8) -> tuple[np.ndarray, np.ndarray, float]:
    """k-means of (N, C) ``features`` into ``k`` clusters on ``device`` (default: the features' own).

    ``n_init`` k-means++ seedings run as one batch of Lloyd's iterations; the restart with the lowest
    inertia wins. ``tol`` is scikit-learn's: relative to the mean per-feature variance, on the squared
    centre shift; converged restarts stop moving. Returns (labels (N,) int64, centres (k, C) float64,
    inertia) as numpy/float, like ``sklearn.cluster.KMeans(..., n_init, random_state=seed)``.
    """
    x = torch.as_tensor(features)
    x = x.detach().to(device=device if device is not None else x.device, dtype=dtype).reshape(x.shape[0], -1)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means: k={k} must lie in 1..{n} (the number of points)")
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    x_sq = (x * x).sum(-1)
    tol_abs = float(tol) * float(x.var(0, unbiased=False).mean()) if n > 1 else 0.0
    centers = _kmeans_pp(x, x_sq, k, max(1, int(n_init)), gen)
    active = torch.ones(centers.shape[0], dtype=torch.bool, device=x.device)
    for it in range(max_iter):
        labels = _sq_dists(x, centers, x_sq).argmin(-1)  # (R, N)
        onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype)  # (R, N, k)
        counts = onehot.sum(1)  # (R, k)
        sums = onehot.transpose(1, 2) @ x  # (R, k, C)
        new = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], centers)  # empty: stay
        shift = ((new - centers) ** 2).sum((1, 2))
        centers = torch.where(active[:, None, None], new, centers)
        active = active & (shift > tol_abs)
        if (it + 1) % check_every == 0 and not bool(active.any()):  # the only host sync of the loop
            break
    d = _sq_dists(x, centers, x_sq)
    dmin, labels = d.min(-1)
    inertia = dmin.sum(-1)
    best = int(inertia.argmin())
    return (labels[best].cpu().numpy().astype(np.int64), centers[best].cpu().numpy().astype(np.float64),
            float(inertia[best]))


def kmeans_objective(features: np.ndarray, centers: np.ndarray) -> float:
    """Sum of squared distances of each point to its nearest centre (k-means' inertia), in float64."""
    f = np.asarray(features, np.float64)
    c = np.asarray(centers, np.float64)
    d = (f * f).sum(1)[:, None] - 2 * f @ c.T + (c * c).sum(1)[None]
    return float(np.maximum(d, 0).min(1).sum())
