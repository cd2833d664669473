"""Step D: difference maps -> pixel labels; the upsampling baselines; locality."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from emerdiff.sd.images import resize_labels


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalised 1-D Gaussian with scipy's radius convention (int(truncate*sigma + 0.5))."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian filter of (K, H, W) maps, mirror padding (scipy mode='mirror').

    Suppresses the VAE's 8x8 pixelation before the argmax. sigma = 0 is identity.
    """
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma).to(maps.device, maps.dtype)
    r = k.numel() // 2
    x = maps[:, None]
    h, w = x.shape[-2:]
    if r >= min(h, w):  # reflect padding needs pad < size
        x = F.pad(x, (r, r, r, r), mode="replicate")
    else:
        x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x[:, 0]


# Largest difference below half an 8-bit grey level (pixels span [-1, 1]): nothing visible
# changed, and lambda = 0 leaves ~1e-5 of batched-kernel noise that an argmax would still rank.
NEGLIGIBLE = 1 / 255


class DegenerateResult(ValueError):
    """The difference maps cannot give labels (NaN/inf, or no perturbation had any effect)."""


def check_difference_maps(difference_maps: torch.Tensor, settings: str = "") -> None:
    """Refuse maps that would give a silently wrong labelling.

    An argmax over NaN maps or over all-zero maps labels every pixel 0 while
    looking like a result, so both raise :class:`DegenerateResult`, naming the
    settings to change.
    """
    maps = difference_maps.detach()
    where = f" ({settings})" if settings else ""
    bad = ~torch.isfinite(maps)
    if bad.any():
        per_map = bad.flatten(1).any(1).nonzero().flatten().tolist()
        raise DegenerateResult(
            f"difference maps of segment(s) {per_map[:10]} contain NaN or infinite values{where}: the "
            "perturbation overflowed. Lower the modulation strength (lambda) or use dtype float32."
        )
    if float(maps.abs().max()) < NEGLIGIBLE:
        raise DegenerateResult(
            f"every difference map is (nearly) zero{where}: the perturbation changed no pixel by half "
            "an 8-bit grey level, so the labels would be float noise. "
            "Use a non-zero modulation strength (the paper's is 10) or a later "
            "modulation timestep / another modulation layer."
        )


def nearby_masks(lowres_labels: np.ndarray | torch.Tensor, num_masks: int, radius: int,
                 size: tuple[int, int]) -> torch.Tensor:
    """``(K, H, W)`` bool: mask k is found within ``radius`` tokens (a square window) of the token
    that pixel (y, x) falls in; the token grid is stretched to ``size`` as nearest upsampling does."""
    low = torch.as_tensor(np.asarray(lowres_labels), dtype=torch.long)
    onehot = F.one_hot(low, num_masks).permute(2, 0, 1).float()[None]
    near = F.max_pool2d(onehot, 2 * radius + 1, stride=1, padding=radius) if radius > 0 else onehot
    return F.interpolate(near, size=size, mode="nearest")[0] > 0


def assign_labels(difference_maps: torch.Tensor, sigma: float, lowres_labels: np.ndarray | None = None,
                  radius: int | None = None) -> torch.Tensor:
    """Label(p) = argmax_i blur(d_i)(p); (K, H, W) -> (H, W) long.

    ``radius`` (with the token grid's ``lowres_labels``): the argmax runs only over the masks within
    ``radius`` tokens of p's token (:func:`nearby_masks`), so a response that leaked far from its
    mask cannot claim p. None: every mask competes (the paper).
    """
    maps = gaussian_blur(difference_maps.float(), sigma)
    if radius is None:
        return maps.argmax(0)
    if lowres_labels is None:
        raise ValueError("assign_labels with a radius needs the token grid's lowres_labels")
    allowed = nearby_masks(lowres_labels, maps.shape[0], radius, tuple(maps.shape[-2:])).to(maps.device)
    return maps.masked_fill(~allowed, -torch.inf).argmax(0)


def nearest_upsample(lowres_labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Baseline: nearest-neighbour upsampling of the low-res k-means labels."""
    return resize_labels(lowres_labels, size)


def bilinear_upsample(features: np.ndarray, centroids: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Baseline: bilinear upsampling of the per-cluster score maps, then argmax.

    The score of cluster k at a token is minus the squared distance of its
    query vector to centroid k; the K score maps are upsampled bilinearly to
    ``size`` and each pixel takes the best cluster. (Cheaper than upsampling
    the C-dimensional features and close to it.)
    """
    f = torch.as_tensor(features, dtype=torch.float32)
    c = torch.as_tensor(centroids, dtype=torch.float32)
    scores = -torch.cdist(f, c).pow(2).T.reshape(1, c.shape[0], *grid)
    up = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
    return up[0].argmax(0).numpy()


def locality(difference_maps: torch.Tensor, masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Share of each difference map's energy (sum of d^2) inside its perturbed mask.

    masks: (K, h*w) on the token grid, upsampled (nearest) to the maps' size.
    A readout that localises scores near 1; one that ignores the mask scores
    about the mask's area fraction.
    """
    k, h, w = difference_maps.shape
    up = F.interpolate(masks.reshape(k, 1, *grid).float(), size=(h, w), mode="nearest")[:, 0]
    energy = difference_maps.float().pow(2)
    total = energy.flatten(1).sum(1).clamp_min(1e-12)
    return (energy * up.to(energy.device)).flatten(1).sum(1) / total
