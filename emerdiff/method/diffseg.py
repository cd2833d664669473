"""DiffSeg as an alternative Step A: segments from merged self-attention maps.

DiffSeg (Tian et al., CVPR 2024, "Diffuse, Attend, and Segment: Unsupervised
Zero-Shot Segmentation using Stable Diffusion", arXiv 2308.12469) needs no
number of segments. From one UNet call with the empty prompt it

1. **aggregates** the self-attention probabilities of every self-attention
   layer: per resolution the maps are averaged over that resolution's layers
   and heads; each map (a distribution over key positions) is upsampled
   bilinearly in its *key* dimensions to the highest self-attention grid and
   renormalised, its *query* dimensions are repeated to the same grid, and the
   resolutions are summed with weights proportional to their side length;
2. **merges** iteratively: every anchor of an M x M grid takes the mean of all
   maps within a symmetric-KL distance below tau of its own map; then N - 1
   greedy passes each merge the current proposals whose distance to a
   not-yet-merged proposal is below tau;
3. labels every position with the proposal that attends to it most
   (the paper's "non-maximum suppression"), on the attention grid and, after
   bilinear upsampling of the proposals, at pixel level.

The constants are fields of :class:`~emerdiff.config.EmerDiffConfig`; their
sources (paper: arXiv 2308.12469; official code: github.com/google/diffseg at
commit 77ea596, TensorFlow / KerasCV, SD 1.4):

- ``diffseg_timestep`` = 300: ``model.text_to_image(None, latent=latent, timestep=300)``
  in diffseg.ipynb and benchmarks.ipynb; ``latent`` is the VAE encoding of the
  image *without* added noise and the prompt is empty (unconditional context).
  ``diffseg_add_noise=True`` noises the latent to t first (our option, off by default).
- ``diffseg_kl_threshold`` = 1.1: benchmarks.ipynb, ``KL_THRESHOLD = [1.1]*3``
  "(1.1 for CoCo-Stuff and 0.9 for Cityscapes)"; the demo notebook uses 0.9.
- ``diffseg_iterations`` = 3: the length of that threshold list (one threshold
  per merging iteration, the paper's N).
- ``diffseg_anchors`` = 16: ``NUM_POINTS = 16``, a 16 x 16 = 256-point anchor
  grid on the 64 x 64 attention grid (diffseg/segmentor.py,
  ``generate_sampling_grid``: evenly spaced, centred).
- ``diffseg_refine`` = False: benchmarks.ipynb ``REFINEMENT = False`` (the demo
  turns on the optional k-means refinement seeded with the proposals).
- resolution weights proportional to the side length and per-resolution means
  over layers: diffseg/segmentor.py ``get_weight_rato`` and
  third_party/keras_cv/diffusion_model.py (each self-attention map added / 5).

The implementation is our own (PyTorch, any grid size, any SD-shaped UNet).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from emerdiff.config import LOWRES_METHODS, EmerDiffConfig
from emerdiff.method.attention import AttentionController, controlled_attention
from emerdiff.method.modulation import encode, unet_forward
from emerdiff.sd.images import ImageInput, load_image, resize_labels
from emerdiff.sd.loading import feature_resolution, self_attention_layers

__all__ = ["LOWRES_METHODS", "DiffSegResult", "aggregate_attention", "anchor_grid", "capture_self_attention",
           "diffseg", "diffseg_labels", "merge_attention", "proposal_argmax", "refine_proposals", "run_diffseg",
           "self_attention_layers", "symmetric_kl"]
# log(0) guard: float32 softmax probabilities can underflow to exactly 0
_LOG_FLOOR = 1e-12


# ------------------------------------------------------------------ capture
def capture_self_attention(model: Any, latent: torch.Tensor, timestep: int, counter: Any = None,
                           layers: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Self-attention probabilities of one UNet call with the empty prompt.

    Args:
        model: an :class:`~emerdiff.sd.loading.SDPipeline`.
        latent: (1, C, h, w) latent the UNet sees (DiffSeg: the clean image latent).
        timestep: the timestep given to the UNet.
        counter: optional :class:`~emerdiff.method.modulation.CallCounter` (stage "diffseg").
        layers: which layers (default every self-attention layer).
    Returns:
        layer -> (tokens, tokens) probabilities averaged over heads, float32 on the model's device.
    """
    if latent.shape[0] != 1:
        raise ValueError(f"capture_self_attention takes one latent (batch 1), got batch {latent.shape[0]}")
    layers = self_attention_layers(model.unet) if layers is None else list(layers)
    if not layers:
        raise ValueError("this UNet has no self-attention layers; DiffSeg needs them")
    controller = AttentionController(probability_layers=set(layers))
    with controlled_attention(model.unet, controller):
        unet_forward(model, latent, timestep, counter, "diffseg")
    return {name: controller.probabilities[name][-1][0].float() for name in layers}


# -------------------------------------------------------------- aggregation
def aggregate_attention(maps: list[tuple[torch.Tensor, tuple[int, int]]]) -> tuple[torch.Tensor, tuple[int, int]]:
    """DiffSeg's attention aggregation onto the highest-resolution grid.

    Args:
        maps: (probabilities (tokens, tokens), grid (h, w)) per layer; rows are query
            positions, columns key positions, each row sums to 1.
    Returns:
        ((H*W, H*W) aggregated maps, each row a distribution over the H x W grid, (H, W)).
    """
    if not maps:
        raise ValueError("no attention maps to aggregate")
    by_grid: dict[tuple[int, int], list[torch.Tensor]] = {}
    for probs, grid in maps:
        n = grid[0] * grid[1]
        if tuple(probs.shape) != (n, n):
            raise ValueError(f"a self-attention map on a {grid[0]}x{grid[1]} grid must be ({n}, {n}), "
                             f"got {tuple(probs.shape)}")
        by_grid.setdefault(tuple(grid), []).append(probs.float())
    H, W = max(by_grid, key=lambda g: g[0] * g[1])
    # each resolution counts with its side length (official get_weight_rato), layers averaged within it
    sides = {g: math.sqrt(g[0] * g[1]) for g in by_grid}
    total = sum(sides.values())
    out = None
    for (h, w), group in by_grid.items():
        mean = torch.stack(group).mean(0)  # (h*w queries, h*w keys)
        keys = mean.reshape(h * w, 1, h, w)
        if (h, w) != (H, W):
            keys = F.interpolate(keys, size=(H, W), mode="bilinear", align_corners=False)
        keys = keys.reshape(h * w, H * W)
        keys = keys / keys.sum(1, keepdim=True)  # upsampling changes the mass: back to distributions
        # query side: each coarse query covers a block of fine queries (nearest / repeat)
        rows = torch.arange(H, device=keys.device) * h // H
        cols = torch.arange(W, device=keys.device) * w // W
        query_of = (rows[:, None] * w + cols[None, :]).reshape(-1)
        term = keys[query_of] * (sides[(h, w)] / total)
        out = term if out is None else out + term
    assert out is not None
    return out, (H, W)


# ------------------------------------------------------------------- merging
def _entropy_terms(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp = p.clamp_min(_LOG_FLOOR).log()
    return logp, (p * logp).sum(-1)


def symmetric_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Pairwise (KL(p_i || q_j) + KL(q_j || p_i)) / 2 between rows, (A, D) x (B, D) -> (A, B).

    The halved symmetric divergence of the official code (segmentor.py ``KL``):
    0.5 * sum (p - q)(log p - log q), expanded into two matrix products.
    """
    logp, ep = _entropy_terms(p)
    logq, eq = _entropy_terms(q)
    cross = p @ logq.T + (q @ logp.T).T  # sum p log q + sum q log p
    return (0.5 * (ep[:, None] + eq[None, :] - cross)).clamp_min(0)


def anchor_grid(grid: tuple[int, int], points: int) -> np.ndarray:
    """Flat indices of ``points`` x ``points`` anchors, evenly spaced and centred on the grid.

    On a 64 x 64 grid with 16 points this is rows/cols 1, 5, ..., 61 as in the official
    ``generate_sampling_grid``; a grid with fewer than ``points`` rows uses every row.
    """
    idx = []
    for n in grid:
        k = min(points, n)
        if k == 1:
            idx.append(np.array([(n - 1) // 2]))
            continue
        step = (n - 1) // (k - 1)
        start = ((n - 1) - step * (k - 1)) // 2
        idx.append(start + step * np.arange(k))
    rows, cols = idx
    return (rows[:, None] * grid[1] + cols[None, :]).reshape(-1)


def merge_attention(attention: torch.Tensor, grid: tuple[int, int], kl_threshold: float, iterations: int,
                    anchors: int) -> torch.Tensor:
    """DiffSeg's iterative attention merging; returns (K, H*W) proposals (rows sum to 1).

    Iteration 1: each anchor's proposal is the mean of every map within ``kl_threshold``
    of the anchor's map. Iterations 2..N: greedily, in order, each proposal not merged
    yet takes the mean of all proposals within the threshold (already merged ones
    included, as in the official code) and marks them merged.
    """
    if iterations < 1:
        raise ValueError(f"DiffSeg needs at least one merging iteration, got {iterations}")
    a = torch.as_tensor(anchor_grid(grid, anchors), device=attention.device)
    close = (symmetric_kl(attention[a], attention) < kl_threshold).to(attention.dtype)  # (anchors, H*W)
    proposals = (close @ attention) / close.sum(1, keepdim=True)  # each anchor is close to itself
    for _ in range(iterations - 1):
        close = symmetric_kl(proposals, proposals) < kl_threshold
        merged = torch.zeros(len(proposals), dtype=torch.bool, device=proposals.device)
        kept = []
        for i in range(len(proposals)):
            if merged[i]:
                continue
            members = close[i].clone()
            members[i] = True
            merged |= members
            kept.append(proposals[members].mean(0))
        proposals = torch.stack(kept)
    return proposals


def refine_proposals(attention: torch.Tensor, proposals: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Optional k-means refinement: cluster the aggregated maps with the proposals as initial
    centres (one run) and return the mean map of every non-empty cluster."""
    from sklearn.cluster import KMeans

    x = attention.double().cpu().numpy()
    init = proposals.double().cpu().numpy()
    km = KMeans(n_clusters=len(init), init=init, n_init=1, random_state=seed).fit(x)
    means = [x[km.labels_ == c].mean(0) for c in np.unique(km.labels_)]
    return torch.as_tensor(np.stack(means), dtype=attention.dtype, device=attention.device)


def proposal_argmax(proposals: torch.Tensor, grid: tuple[int, int], size: tuple[int, int] | None = None) -> torch.Tensor:
    """Each position takes the proposal with the largest value there ("non-maximum suppression").

    ``size`` given: the (K, H, W) proposals are first upsampled bilinearly to it.
    Returns (H, W) or ``size`` long indices into ``proposals``.
    """
    maps = proposals.float().reshape(-1, 1, *grid)
    if size is not None and tuple(size) != tuple(grid):
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    return maps[:, 0].argmax(0)


# -------------------------------------------------------------------- result
@dataclass
class DiffSegResult:
    """DiffSeg's segments of one image.

    Attributes:
        labels: (H, W) segment ids 0..K-1 on the highest self-attention grid.
        proposals: (K, H*W) merged attention maps, row k = segment k (CPU float32).
        grid: (H, W).
        num_anchors: anchors the merging started from.
    """

    labels: np.ndarray
    proposals: torch.Tensor
    grid: tuple[int, int]
    num_anchors: int

    @property
    def num_segments(self) -> int:
        return int(self.proposals.shape[0])

    def pixel_labels(self, size: tuple[int, int], resolution: int | None = None,
                     projected: np.ndarray | None = None) -> np.ndarray:
        """DiffSeg's own pixel-level labels: proposals upsampled bilinearly, argmax per pixel.

        Args:
            size: (height, width) of the output (the original image size).
            resolution: the model's input size R: argmax at R x R, then nearest resize to
                ``size`` (as EmerDiff's labels are mapped back); None: argmax directly at ``size``.
            projected: these segments projected onto another grid (e.g. the query grid, by
                :func:`emerdiff.method.features.project_labels`): the ids are then those of ``projected``,
                and a segment that owns no position there gives its pixels to the best
                remaining one, so the map shares mask ids with EmerDiff's outputs.
        """
        proposals = self.proposals
        if projected is not None:
            owners = projected_owners(self.labels, projected)
            proposals = proposals[torch.as_tensor(owners)]
        at = size if resolution is None else (resolution, resolution)
        labels = proposal_argmax(proposals, self.grid, at).cpu().numpy()
        return resize_labels(labels, size)


def projected_owners(labels: np.ndarray, projected: np.ndarray) -> np.ndarray:
    """For each id p of ``projected`` (a :func:`~emerdiff.method.features.project_labels` result of
    ``labels``), the id of ``labels`` it came from: the label with the most cells among the
    tokens of p (the per-token majority winner summed is the winner; ties go to the smaller
    label in both)."""
    labels = np.asarray(labels)
    projected = np.asarray(projected)
    (H, W), (h, w) = labels.shape, projected.shape
    if H < h or W < w:  # coarser than the grid: nearest upsampling, as project_labels does
        labels = labels[(np.arange(max(H, h)) * H // max(H, h))[:, None], (np.arange(max(W, w)) * W // max(W, w))]
        H, W = labels.shape
    token_id = projected[(np.arange(H) * h // H)[:, None], (np.arange(W) * w // W)[None, :]]
    counts = np.zeros((int(projected.max()) + 1, int(labels.max()) + 1), dtype=np.int64)
    np.add.at(counts, (token_id.ravel(), labels.ravel()), 1)
    return counts.argmax(1)


def _renumber(proposals: torch.Tensor, grid: tuple[int, int]) -> tuple[np.ndarray, torch.Tensor]:
    """Grid labels by argmax; proposals that win no position are dropped, ids renumbered 0..K'-1."""
    winner = proposal_argmax(proposals, grid).cpu()
    used, labels = torch.unique(winner, return_inverse=True)
    return labels.numpy().astype(np.int64), proposals[used.to(proposals.device)]


def run_diffseg(model: Any, latent: torch.Tensor, config: Any, counter: Any = None) -> DiffSegResult:
    """DiffSeg on an encoded image: capture, aggregate, merge, (refine), label the grid.

    Args:
        model: an :class:`~emerdiff.sd.loading.SDPipeline`.
        latent: (1, C, h, w) scaled VAE latent of the image (``EmerDiff.encode``).
        config: an :class:`~emerdiff.config.EmerDiffConfig` (its ``diffseg_*`` fields and ``seed``).
        counter: optional UNet call counter.
    """
    config.check_values()
    t = config.diffseg_timestep
    x = latent
    if config.diffseg_add_noise:
        a = float(model.scheduler.alphas_cumprod[t])
        gen = torch.Generator("cpu").manual_seed(config.seed)
        noise = torch.randn(latent.shape, generator=gen).to(latent.device, latent.dtype)
        x = a**0.5 * latent + (1 - a) ** 0.5 * noise
    probs = capture_self_attention(model, x, t, counter)
    latent_size = tuple(latent.shape[-2:])
    maps = [(p, feature_resolution(model.unet, name, latent_size)) for name, p in probs.items()]
    attention, grid = aggregate_attention(maps)
    # float64 on the CPU (cheap there); float32 on accelerators
    attention = attention.double() if attention.device.type == "cpu" else attention
    proposals = merge_attention(attention, grid, config.diffseg_kl_threshold, config.diffseg_iterations,
                                config.diffseg_anchors)
    if config.diffseg_refine:
        proposals = refine_proposals(attention, proposals, config.seed)
    labels, proposals = _renumber(proposals, grid)
    return DiffSegResult(labels, proposals.float().cpu(), grid, len(anchor_grid(grid, config.diffseg_anchors)))


def diffseg(model: Any, image: ImageInput, config: Any = None) -> DiffSegResult:
    """DiffSeg on one image (loaded and resized to ``config.resolution`` as EmerDiff does)."""
    config = _checked_config(model, config)
    return run_diffseg(model, encode(model, load_image(image), config.resolution), config)


def diffseg_labels(model: Any, image: ImageInput, config: Any = None) -> np.ndarray:
    """DiffSeg alone at pixel level: (H, W) segment ids at the image's original size.

    The merged proposals are upsampled bilinearly to the model resolution and each
    pixel takes the strongest (DiffSeg's upsampling + non-maximum suppression); the
    result is resized to the original size with nearest neighbour.
    """
    config = _checked_config(model, config)
    img = load_image(image)
    result = run_diffseg(model, encode(model, img, config.resolution), config)
    return result.pixel_labels((int(img.shape[1]), int(img.shape[2])), config.resolution)


def _checked_config(model: Any, config: Any) -> Any:
    """``config`` (default: the model family's) validated against ``model``, as EmerDiff does."""
    config = config or EmerDiffConfig.for_model(model)
    config.validate(model)
    return config
