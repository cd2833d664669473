"""Step D: difference maps -> pixel labels; the upsampling baselines (nearest, bilinear, and the
image-guided guided filter and joint bilateral upsampling); locality.

:func:`readout_labels` is Step D, the one entry every caller uses (``EmerDiff.segment`` and
``EmerDiff.readout``, the inspector, the probes, the diagnosis, the sweep, the benchmarks): it reads
every Step D setting (:data:`READOUT_FIELDS`) from the config, so no caller can drop one. Its optional
image-guided filter (``readout_filter``, not the paper's) reuses the baselines' filters on the difference
maps and needs the image (``guide=``).
:func:`assign_labels` is its kernel, kept for the unit tests of the argmax.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from emerdiff.config import READOUT_FILTERS
from emerdiff.sd.images import resize_labels, to_model_input

# The EmerDiffConfig fields Step D reads; every one reaches every entry point through readout_labels
# (tests/test_readout_entry_points.py changes each and compares the entry points' labels). With
# readout_filter set, Step D also reads that filter's parameters (READOUT_FILTER_FIELDS), the fields of
# the image-guided baselines, from the same config.
READOUT_FIELDS = ("blur_sigma", "assign_radius", "readout_filter")
READOUT_FILTER_FIELDS = {"guided_filter": ("guided_radius", "guided_eps"),
                         "joint_bilateral": ("bilateral_sigma_space", "bilateral_sigma_color")}


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
    that pixel (y, x) falls in; the token grid is stretched to ``size`` as nearest upsampling does.
    A token labelled -1 (a segment with no map, see :func:`readout_labels`'s ``mask_ids``) offers no mask."""
    low = torch.as_tensor(np.asarray(lowres_labels), dtype=torch.long)
    onehot = (F.one_hot(low.clamp_min(0), num_masks) * (low >= 0)[..., None]).permute(2, 0, 1).float()[None]
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
    # a pixel with no map's mask nearby (only when the maps cover some of the masks, as a sweep over
    # chosen masks does) lets every map compete: with all masks its own token's mask is always allowed
    allowed |= ~allowed.any(0, keepdim=True)
    return maps.masked_fill(~allowed, -torch.inf).argmax(0)


def model_guide(image: torch.Tensor | np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """``(1, C, H, W)`` guide in [0, 1] at ``size`` (the maps' / model resolution): the image as the model
    sees it, resized as :func:`emerdiff.sd.images.to_model_input` resizes it (bicubic, antialiased), so a
    filter's pixel parameters mean the same at any input size. ``image``: as :func:`guide_image` takes it,
    at any size (``prepared.image``, the original photo, or a guide already at ``size``)."""
    x = guide_image(image)[0]
    h, w = int(size[0]), int(size[1])
    if h == w:  # the model's square input: exactly segment's guide of the baselines
        return (to_model_input(x, h) + 1) / 2
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x[None], size=(h, w), mode="bicubic", antialias=True, align_corners=False)[0]
    return x.clamp(0, 1)[None]


def guided_filter_maps(maps: torch.Tensor, guide: torch.Tensor, filter_name: str, config: Any) -> torch.Tensor:
    """``(K, H, W)`` maps each filtered guided by ``guide`` (``(1, C, H, W)`` in [0, 1], :func:`model_guide`)
    with the filter and parameters of the image-guided baselines (:func:`guided_filter_upsample`,
    :func:`joint_bilateral_upsample`): ``"guided_filter"`` (``config.guided_radius``, ``guided_eps``) or
    ``"joint_bilateral"`` (``config.bilateral_sigma_space``, ``bilateral_sigma_color``). Both are linear in
    the maps, so a common scale of the maps does not change the argmax."""
    x = maps.float()[None]
    g = guide.to(device=x.device, dtype=x.dtype)
    if filter_name == "guided_filter":
        return _guided_filter(x, g, config.guided_radius, config.guided_eps)[0]
    if filter_name == "joint_bilateral":
        return _joint_bilateral(x, g, config.bilateral_sigma_space, config.bilateral_sigma_color)[0]
    raise ValueError(f"readout_filter must be one of {list(READOUT_FILTERS)}, got {filter_name!r}")


def readout_labels(difference_maps: torch.Tensor, lowres_labels: np.ndarray | torch.Tensor, config: Any,
                   size: tuple[int, int] | None = None, mask_ids: Sequence[int] | None = None,
                   guide: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    """Step D: difference maps + the low-res segments + the config -> (H, W) int64 pixel labels.

    Blur (``blur_sigma``), then, with ``readout_filter`` set, the image-guided filter of each map
    (:func:`guided_filter_maps`), then the argmax (among the masks within ``assign_radius`` tokens).

    Args:
        difference_maps: (K, R, R) maps, map k the response to perturbing mask k (or ``mask_ids[k]``).
        lowres_labels: (h, w) the segments on the query token grid (``prepared.segments.labels``).
        config: an :class:`~emerdiff.config.EmerDiffConfig`; every field of :data:`READOUT_FIELDS` is read
            (and, with ``readout_filter`` set, that filter's :data:`READOUT_FILTER_FIELDS`).
        size: resize the labels to (H, W) (nearest, :func:`emerdiff.sd.images.resize_labels`);
            None: the maps' (model) resolution.
        mask_ids: the segment id each map belongs to when the maps cover only some segments (a sweep
            over chosen masks); the labels are then these ids. None: map k is segment k.
        guide: the image the maps were made from, at any size (``prepared.image``: (3, H, W) in [0, 1],
            or an (H, W, 3) array); resized to the maps' resolution as the model input is
            (:func:`model_guide`). Needed when ``config.readout_filter`` is not ``"none"``; unused otherwise.
    Returns:
        (H, W) numpy int64 labels in segment ids.
    """
    missing = [name for name in READOUT_FIELDS if not hasattr(config, name)]
    if missing:
        raise TypeError(f"readout_labels needs a config with the Step D fields {list(READOUT_FIELDS)}; "
                        f"{type(config).__name__} lacks {missing}: pass the EmerDiffConfig the maps were made with")
    filter_name = config.readout_filter
    if filter_name != "none":
        if filter_name not in READOUT_FILTERS:
            raise ValueError(f"readout_filter must be one of {list(READOUT_FILTERS)}, got {filter_name!r}")
        lacking = [name for name in READOUT_FILTER_FIELDS[filter_name] if not hasattr(config, name)]
        if lacking:
            raise TypeError(f"readout_filter={filter_name!r} reads {list(READOUT_FILTER_FIELDS[filter_name])}; "
                            f"{type(config).__name__} lacks {lacking}: pass the EmerDiffConfig the maps were made with")
        if guide is None:
            raise ValueError(f"readout_filter={filter_name!r} filters the difference maps guided by the image, but "
                             "readout_labels got no guide: pass guide=<the image the maps were made from> (e.g. "
                             "guide=prepared.image), or use EmerDiff.readout(maps, prepared), which passes it; "
                             "readout_filter='none' (the paper's readout) needs none")
    low = np.asarray(lowres_labels.cpu() if isinstance(lowres_labels, torch.Tensor) else lowres_labels)
    k = difference_maps.shape[0]
    if mask_ids is not None:
        ids = np.asarray(list(mask_ids), dtype=np.int64)
        if ids.shape != (k,):
            raise ValueError(f"mask_ids names {ids.size} segments for {k} difference maps; give one id per map")
        # the grid in map indices; segments without a map become -1 and offer no mask
        lut = np.full(max(int(low.max()), int(ids.max())) + 1, -1, dtype=np.int64)
        lut[ids] = np.arange(k)
        low = lut[low]
    elif low.size and int(low.max()) >= k:
        raise ValueError(f"the low-res labels name segment {int(low.max())} but there are only {k} difference "
                         "maps; pass mask_ids when the maps cover only some segments")
    if filter_name == "none":
        labels = assign_labels(difference_maps, config.blur_sigma, low, config.assign_radius)
    else:
        # After the blur, not in place of it: blur_sigma keeps its meaning under every filter (0 gives the
        # filter alone), and the Gaussian first removes the VAE's 8x8 block pattern, a texture the guided
        # filter's local linear model would otherwise fit where the guide has texture. The filter then
        # moves each map's edges onto the image's colour edges, undoing what the blur spread across them.
        maps = gaussian_blur(difference_maps.float(), config.blur_sigma)
        maps = guided_filter_maps(maps, model_guide(guide, tuple(maps.shape[-2:])), filter_name, config)
        labels = assign_labels(maps, 0.0, low, config.assign_radius)
    labels = labels.cpu().numpy()
    labels = labels.astype(np.int64)
    if mask_ids is not None:
        labels = ids[labels]
    return labels if size is None else resize_labels(labels, size)


def nearest_upsample(lowres_labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Baseline: nearest-neighbour upsampling of the low-res k-means labels."""
    return resize_labels(lowres_labels, size)


def cluster_score_maps(features: np.ndarray, centroids: np.ndarray, grid: tuple[int, int],
                       size: tuple[int, int]) -> torch.Tensor:
    """``(1, K, H, W)`` per-cluster score maps upsampled bilinearly to ``size``: the score of cluster k at
    a token is minus the squared distance of its query vector to centroid k (what every upsampling
    baseline reads; only the step after this differs)."""
    f = torch.as_tensor(features, dtype=torch.float32)
    c = torch.as_tensor(centroids, dtype=torch.float32)
    scores = -torch.cdist(f, c).pow(2).T.reshape(1, c.shape[0], *grid)
    return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)


def bilinear_upsample(features: np.ndarray, centroids: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Baseline: bilinear upsampling of the per-cluster score maps, then argmax.

    The score of cluster k at a token is minus the squared distance of its
    query vector to centroid k; the K score maps are upsampled bilinearly to
    ``size`` and each pixel takes the best cluster. (Cheaper than upsampling
    the C-dimensional features and close to it.)
    """
    return cluster_score_maps(features, centroids, grid, size)[0].argmax(0).numpy()


def guide_image(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``(1, C, H, W)`` float guide in [0, 1] from a ``(3, H, W)`` tensor in [0, 1] (the pipeline's
    image) or an ``(H, W, 3)`` / ``(H, W)`` array (uint8 in 0-255, float in [0, 1])."""
    if isinstance(image, torch.Tensor):
        x = image.detach().float().cpu()
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3:
            raise ValueError(f"guide image tensor has shape {tuple(image.shape)}; give (3, H, W) or (H, W) in [0, 1]")
        return x[None]
    arr = np.asarray(image)
    if arr.ndim not in (2, 3):
        raise ValueError(f"guide image array has shape {arr.shape}; give (H, W, 3) or (H, W)")
    x = torch.from_numpy(arr.astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 1.0))
    return (x[None] if x.ndim == 2 else x.permute(2, 0, 1))[None]


def _border(radius: int, size: tuple[int, int]) -> str:
    # reflect padding needs pad < size (as gaussian_blur); tiny images fall back to replicate
    return "reflect" if radius < min(size) else "replicate"


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def guided_filter_upsample(features: np.ndarray, centroids: np.ndarray, grid: tuple[int, int],
                           image: torch.Tensor | np.ndarray, radius: int, eps: float) -> np.ndarray:
    """Baseline: the guided filter (He et al., ECCV 2010 / TPAMI 2013) of the upsampled score maps, then argmax.

    The per-cluster score maps of :func:`bilinear_upsample`, upsampled bilinearly to the image's size,
    are each filtered guided by the RGB ``image`` (:func:`guide_image`; colour guide, a 3x3 solve per
    pixel, ``kornia.filters.guided_blur``): inside a (2 radius + 1)^2 box every output is locally an
    affine function of the image's colour, so score edges snap to colour edges. ``eps`` (in squared
    [0, 1] colour units) is the regulariser: a box whose colour variance is far below ``eps`` gets
    the box mean of the scores, one far above it follows the colour.

    Returns ``(H, W)`` int64 cluster ids at the image's size.
    """
    guide = guide_image(image)
    scores = cluster_score_maps(features, centroids, grid, tuple(guide.shape[-2:]))
    return _guided_filter(scores, guide, radius, eps)[0].argmax(0).numpy().astype(np.int64)


def joint_bilateral_upsample(features: np.ndarray, centroids: np.ndarray, grid: tuple[int, int],
                             image: torch.Tensor | np.ndarray, sigma_space: float, sigma_color: float) -> np.ndarray:
    """Baseline: joint bilateral upsampling (Kopf et al., SIGGRAPH 2007) of the score maps, then argmax.

    The per-cluster score maps of :func:`bilinear_upsample`, upsampled bilinearly to the image's size,
    are each averaged with weights exp(-d^2 / 2 sigma_space^2) exp(-||I_p - I_q||^2 / 2 sigma_color^2)
    (d in pixels, the colour distance Euclidean in RGB in [0, 1]; ``kornia.filters.joint_bilateral_blur``
    over a window of radius ceil(2 sigma_space)), so no score crosses a colour edge.

    Returns ``(H, W)`` int64 cluster ids at the image's size.
    """
    guide = guide_image(image)
    scores = cluster_score_maps(features, centroids, grid, tuple(guide.shape[-2:]))
    return _joint_bilateral(scores, guide, sigma_space, sigma_color)[0].argmax(0).numpy().astype(np.int64)


def _guided_filter(maps: torch.Tensor, guide: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """``(1, K, H, W)`` maps filtered guided by ``guide`` (``(1, C, H, W)``): the guided filter of the
    baseline and of Step D's ``readout_filter``, its parameters checked here for both."""
    from kornia.filters import guided_blur

    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 1:
        raise ValueError(f"guided filter radius (guided_radius) must be an integer >= 1 pixel, got {radius!r}")
    _positive("guided filter eps (guided_eps)", eps)
    return guided_blur(guide, maps, 2 * int(radius) + 1, float(eps),
                       border_type=_border(int(radius), tuple(maps.shape[-2:])))


def _joint_bilateral(maps: torch.Tensor, guide: torch.Tensor, sigma_space: float, sigma_color: float) -> torch.Tensor:
    """``(1, K, H, W)`` maps averaged by joint bilateral weights of ``guide`` over a window of radius
    ceil(2 sigma_space): the baseline's filter and Step D's ``readout_filter``, parameters checked here."""
    from kornia.filters import joint_bilateral_blur

    _positive("joint bilateral sigma_space (bilateral_sigma_space)", sigma_space)
    _positive("joint bilateral sigma_color (bilateral_sigma_color)", sigma_color)
    radius = math.ceil(2 * sigma_space)
    return joint_bilateral_blur(maps, guide, 2 * radius + 1, float(sigma_color),
                                (float(sigma_space), float(sigma_space)),
                                border_type=_border(radius, tuple(maps.shape[-2:])), color_distance_type="l2")


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
