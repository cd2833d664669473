"""Probes behind the study notebooks: which layers, timesteps and magnitudes make EmerDiff work.

Every probe takes an :class:`~emerdiff.EmerDiff` (model + base config) and a list
of :class:`~emerdiff.evaluation.datasets.ProbeImage` (:func:`emerdiff.evaluation.datasets.load_probe_images`)
and returns plain rows (a list of dicts, one per image x seed x setting) that
pandas/seaborn can plot directly and JSON can store; :func:`emerdiff.evaluation.metrics.summarize`
and :func:`emerdiff.evaluation.metrics.best` tabulate them.

Scores
------
- ``miou``: per-image Hungarian mIoU (0-100) of a label map against the image's
  ground truth (:func:`emerdiff.evaluation.metrics.hungarian_miou`): clusters are matched
  one-to-one to GT classes (:func:`emerdiff.evaluation.metrics.hungarian_match`, IoU
  criterion), unmatched clusters count as "no class". NaN when the image has no
  ground truth.
- ``silhouette`` (label-free, feature space; :func:`emerdiff.evaluation.metrics.silhouette`):
  mean silhouette coefficient of the k-means clustering of a layer's query vectors,
  cosine distance, in [-1, 1]. High = the layer's tokens form well separated groups.
  It says nothing about whether the groups are semantic, so it is reported beside,
  not instead of, the next one.
- ``boundary`` (label-free, image space; :func:`emerdiff.evaluation.metrics.boundary_alignment`):
  mean image gradient magnitude (Sobel on grey levels) on the segment boundaries
  divided by the mean gradient over the whole image. 1 = boundaries placed at
  chance, > 1 = boundaries follow image edges. NaN if a map has a single segment.
- ``locality``: share of a difference map's energy (sum of d^2) inside the
  perturbed mask (:func:`emerdiff.method.readout.locality`), averaged over masks. A
  readout that localises scores near 1, one that ignores the mask about the
  mask's area. Maps with (numerically) no energy at all, e.g. lambda = 0,
  score 0 and are flagged ``degenerate``.
- ``vanished``: share of the low-res segments that win no pixel in the final
  argmax (a failure mode: the segment's perturbation is drowned by others).

``score`` / ``score_name`` on the layer-probe rows name the headline score:
``miou`` when ground truth exists, ``boundary`` otherwise.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from emerdiff.evaluation.datasets import ProbeImage
from emerdiff.evaluation.metrics import score_labels, silhouette
from emerdiff.method.features import cluster_features
from emerdiff.method.modulation import decode
from emerdiff.method.pipeline import EmerDiff, PreparedImage
from emerdiff.method.readout import locality, nearest_upsample
from emerdiff.sd.images import resize_labels
from emerdiff.sd.loading import feature_resolution, layer_table

# Energy per pixel below which a set of difference maps counts as "nothing changed".
DEGENERATE_ENERGY = 1e-10


# --------------------------------------------------------------------------- helpers
def probe_grid(
    ed: EmerDiff,
    items: Sequence[ProbeImage],
    seeds: Sequence[int],
    values: Sequence[Any],
    run: Callable[[EmerDiff, Any, ProbeImage, Any], dict[str, Any] | list[dict[str, Any]]],
    prepare: Callable[[EmerDiff, ProbeImage], Any] | None = None,
) -> list[dict[str, Any]]:
    """The one grid runner behind every probe: for each image and seed, prepare once (inversion and
    Step A, ``prepare(ed_with_seed, item)``, default :func:`_prep`), then ``run(ed_with_seed, state,
    item, value)`` for each swept value. ``run`` returns a row or a list of rows; each row gets the
    image name and the seed first."""
    prepare = prepare or _prep
    rows = []
    for item in items:
        for seed in seeds:
            eds = with_config(ed, seed=seed)
            state = prepare(eds, item)
            for value in values:
                out = run(eds, state, item, value)
                rows.extend(dict(image=item.name, seed=seed, **row) for row in (out if isinstance(out, list) else [out]))
    return rows


def scores(ed: EmerDiff, prepared: PreparedImage, maps: torch.Tensor, item: ProbeImage) -> dict[str, Any]:
    """:func:`readout` without the label map: the JSON-friendly scores of one set of difference maps."""
    out = readout(ed, prepared, maps, item)
    out.pop("labels")
    return out


def _cluster(ed: EmerDiff, queries: torch.Tensor, grid: tuple[int, int], k: int) -> Any:
    cfg = ed.config
    return cluster_features(queries, grid, k, cfg.seed, cfg.kmeans_n_init, cfg.feature_normalization)


def _lowres_scores(segs: Any, prepared: PreparedImage, item: ProbeImage, seed: int) -> dict[str, Any]:
    """Scores of the low-res segments themselves, nearest-upsampled to the image."""
    return dict(clusters=segs.num_segments, silhouette=silhouette(segs.features, segs.labels, seed),
                **score_labels(nearest_upsample(segs.labels, prepared.image_size), item))


def with_config(ed: EmerDiff, **changes: Any) -> EmerDiff:
    """A new EmerDiff on the same model with some config fields changed (validated)."""
    return EmerDiff(ed.model, ed.config.replace(**changes))


def recluster(ed: EmerDiff, prepared: PreparedImage, num_clusters: int) -> PreparedImage:
    """The same prepared image (inversion reused) with the low-res features clustered into K segments."""
    segs = cluster_features(prepared.segments.features, prepared.grid, num_clusters, ed.config.seed,
                            ed.config.kmeans_n_init)
    return dataclasses.replace(prepared, segments=segs)


def readout(ed: EmerDiff, prepared: PreparedImage, maps: torch.Tensor, item: ProbeImage) -> dict[str, Any]:
    """Scores of one set of difference maps (K', R, R): locality, energy, vanished, mIoU, boundary.

    Also returns the full-size ``labels`` (not JSON: pop it before storing rows).
    """
    maps = maps.float()
    masks = prepared.masks(maps.device)
    energy = float(maps.pow(2).mean())
    degenerate = energy < DEGENERATE_ENERGY
    loc = locality(maps, masks, prepared.grid).cpu().numpy()
    if degenerate:  # the ratio 0/0 is meaningless: nothing moved, nothing localised
        loc = np.zeros_like(loc)
    labels_r = ed.readout(maps, prepared)  # Step D as segment runs it (every READOUT_FIELDS setting)
    labels = resize_labels(labels_r, prepared.image_size)
    k = maps.shape[0]
    vanished = 1.0 - len(np.unique(labels_r)) / k
    out: dict[str, Any] = dict(locality=float(loc.mean()), locality_min=float(loc.min()),
                               energy=energy, degenerate=bool(degenerate), vanished=float(vanished),
                               segments=int(k))
    out.update(score_labels(labels, item))
    out["labels"] = labels
    return out


def _prep(ed: EmerDiff, item: ProbeImage, t_stop: int | None = None, invert: bool = False) -> PreparedImage:
    """Prepare one probe image; ``invert`` forces the inversion (full-schedule readouts) even when the
    config's ``readout_steps`` would skip it (the x_t and the Step A features are the same either way)."""
    if invert and ed.config.readout_steps is not None:
        ed = with_config(ed, readout_steps=None)
    return ed.prepare(item.image, t_stop=t_stop)


def _layer_info(ed: EmerDiff) -> dict[str, dict[str, Any]]:
    return {r["layer"]: r for r in layer_table(ed.model.unet, ed.latent_size())}


MMDIT_KINDS = {"cross": ("joint", "single"), "self": ("image",)}  # where image tokens meet text / only each other


def candidate_layers(ed: EmerDiff, kind: str = "cross") -> list[str]:
    """Attention layers of the denoiser: ``kind`` 'cross', 'self' or 'all'.

    SD3/FLUX (issue 28) sweep blocks instead of UNet layers: 'cross' is every attention where image tokens
    attend to text (SD3's and FLUX's double-stream joint attention, FLUX's single-stream blocks), 'self' SD3.5's
    image-only ``attn2``; the MMDiT kinds 'joint', 'single' and 'image' select one kind."""
    rows = layer_table(ed.model.unet, ed.latent_size())
    mmdit = getattr(ed.model, "family", "sd") in ("sd3", "flux")
    allowed = ("cross", "self", "all") + (("joint", "single", "image") if mmdit else ())
    if kind not in allowed:
        raise ValueError(f"kind must be one of {list(allowed)}, got {kind!r}")
    kinds = MMDIT_KINDS.get(kind, (kind,)) if mmdit else (kind,)
    return [r["layer"] for r in rows if kind == "all" or r["kind"] in kinds]


def short_layer(name: str) -> str:
    """Compact layer label for plots: up_blocks.1.attentions.0.transformer_blocks.0.attn2 -> up1.a0.attn2."""
    s = re.sub(r"(down|up)_blocks\.(\d+)", r"\1\2", name).replace("mid_block", "mid")
    s = re.sub(r"^single_transformer_blocks\.(\d+)", r"s\1", s)  # FLUX single-stream: s3.attn
    s = re.sub(r"attentions\.(\d+)", r"a\1", s)
    s = s.replace(".transformer_blocks.0.", ".")  # SD has one transformer block per attention
    return re.sub(r"transformer_blocks\.(\d+)", r"t\1", s)


# --------------------------------------------------------------------------- layer probes
def layer_probe(
    ed: EmerDiff,
    items: Sequence[ProbeImage],
    layers: Sequence[str] | None = None,
    timestep: int | None = None,
    num_clusters: int | None = None,
    seeds: Sequence[int] = (0,),
) -> list[dict[str, Any]]:
    """(a) Query features of every attention layer, k-means clustered and scored.

    One UNet call per image and seed captures the queries of all ``layers``
    (default: every attention layer) at ``timestep`` (default the config's
    feature timestep). K is capped at a layer's token count.
    Rows: image, seed, layer, short, kind, block, resolution, tokens, clusters,
    miou, silhouette, boundary, score, score_name.
    """
    cfg = ed.config
    info = _layer_info(ed)
    layers = list(layers) if layers is not None else list(info)
    unknown = [name for name in layers if name not in info]
    if unknown:
        raise ValueError(f"unknown layers {unknown}; valid: {list(info)}")
    t = cfg.feature_timestep if timestep is None else timestep
    k = cfg.num_clusters if num_clusters is None else num_clusters

    def prepare(eds: EmerDiff, item: ProbeImage) -> tuple[PreparedImage, dict[str, torch.Tensor]]:
        prepared = _prep(eds, item, t_stop=eds.schedule.timesteps[-1])  # one UNet call: x_t only
        gen = torch.Generator("cpu").manual_seed(eds.config.seed + 1)
        return prepared, eds.extract_queries(prepared.inversion, layers, t, cfg.feature_noise_draws, gen)

    def run(eds: EmerDiff, state: tuple[PreparedImage, dict[str, torch.Tensor]], item: ProbeImage,
            name: str) -> dict[str, Any]:
        prepared, queries = state
        q = queries[name]
        segs = _cluster(eds, q, feature_resolution(ed.model.unet, name, ed.latent_size()), min(k, q.shape[0] - 1))
        row = dict(layer=name, short=short_layer(name), kind=info[name]["kind"], block=info[name]["block"],
                   resolution=info[name]["resolution"], tokens=int(q.shape[0]),
                   **_lowres_scores(segs, prepared, item, eds.config.seed))
        row["score_name"] = "miou" if item.has_gt else "boundary"
        row["score"] = row[row["score_name"]]
        return row

    return probe_grid(ed, items, seeds, layers, run, prepare)


def modulation_layer_probe(
    ed: EmerDiff,
    items: Sequence[ProbeImage],
    layers: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
) -> list[dict[str, Any]]:
    """(b) Every candidate modulation layer (default: every cross-attention layer).

    The inversion and the low-res segments are computed once per image and
    seed; each layer costs one batched modulated denoising. Rows: image, seed,
    layer, short, kind, block, resolution, locality, locality_min, energy,
    degenerate, vanished, segments, miou, boundary, seconds.
    """
    info = _layer_info(ed)
    layers = list(layers) if layers is not None else candidate_layers(ed, "cross")

    def run(eds: EmerDiff, prepared: PreparedImage, item: ProbeImage, name: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        maps, _ = eds.perturb(prepared, modulation_layer=name)
        return dict(layer=name, short=short_layer(name), kind=info[name]["kind"], block=info[name]["block"],
                    resolution=info[name]["resolution"], **scores(eds, prepared, maps, item),
                    seconds=time.perf_counter() - t0)

    return probe_grid(ed, items, seeds, layers, run)


# --------------------------------------------------------------------------- timestep probes
def schedule_points(schedule: Sequence[int], timesteps: Sequence[int] | int | None) -> list[int]:
    """The swept timesteps: ``None`` the whole schedule, a list as given (each checked to lie on the
    schedule), an int ``n`` that many points evenly spread over the schedule, both ends included (the
    notebooks' quick profile, emerdiff.notebook.profiles: the same curve with fewer points, on any
    model's schedule)."""
    schedule = [int(t) for t in schedule]
    if timesteps is None:
        return schedule
    if isinstance(timesteps, (int, np.integer)) and not isinstance(timesteps, bool):
        n = int(timesteps)
        if n < 1:
            raise ValueError(f"a number of timesteps must be >= 1, got {n}")
        if n >= len(schedule):
            return schedule
        picks = np.unique(np.round(np.linspace(0, len(schedule) - 1, n)).astype(int))
        return [schedule[i] for i in picks]
    timesteps = [int(t) for t in timesteps]
    bad = [t for t in timesteps if t not in schedule]
    if bad:
        raise ValueError(f"timesteps {bad} are not on the schedule {schedule}")
    return timesteps

def feature_timestep_sweep(
    ed: EmerDiff,
    items: Sequence[ProbeImage],
    timesteps: Sequence[int] | int | None = None,
    seeds: Sequence[int] = (0,),
    layer: str | None = None,
) -> list[dict[str, Any]]:
    """Step A's feature timestep t_f swept (default: the whole schedule; an int n: n points spread over
    it, :func:`schedule_points`) for the query layer.

    Rows: image, seed, feature_timestep, miou, boundary, silhouette (low-res
    k-means, nearest-upsampled to the image).
    """
    cfg = ed.config
    layer = layer or cfg.query_layer
    timesteps = schedule_points(ed.schedule.timesteps, timesteps)
    grid = feature_resolution(ed.model.unet, layer, ed.latent_size())

    def run(eds: EmerDiff, prepared: PreparedImage, item: ProbeImage, t: int) -> dict[str, Any]:
        gen = torch.Generator("cpu").manual_seed(eds.config.seed + 1)
        q = eds.extract_queries(prepared.inversion, [layer], t, cfg.feature_noise_draws, gen)[layer]
        row = _lowres_scores(_cluster(eds, q, grid, cfg.num_clusters), prepared, item, eds.config.seed)
        row.pop("clusters")
        return dict(feature_timestep=int(t), **row)

    return probe_grid(ed, items, seeds, timesteps, run,
                      lambda eds, item: _prep(eds, item, t_stop=eds.schedule.timesteps[-1]))


def modulation_timestep_sweep(
    ed: EmerDiff,
    items: Sequence[ProbeImage],
    timesteps: Sequence[int] | int | None = None,
    seeds: Sequence[int] = (0,),
) -> list[dict[str, Any]]:
    """The modulation timestep t_m swept (default: the whole schedule; an int n: n points spread over it,
    :func:`schedule_points`); one inversion per image and seed up to max(t_m).

    Rows: image, seed, modulation_timestep, steps_after (UNet steps from t_m to
    x_0), locality, ..., miou, boundary.
    """
    timesteps = schedule_points(ed.schedule.timesteps, timesteps)

    def run(eds: EmerDiff, prepared: PreparedImage, item: ProbeImage, t: int) -> dict[str, Any]:
        maps, _ = eds.perturb(prepared, modulation_timestep=t)
        steps = len([s for s in eds.schedule.timesteps if s <= t])
        return dict(modulation_timestep=int(t), steps_after=steps, **scores(eds, prepared, maps, item))

    return probe_grid(ed, items, seeds, timesteps, run, lambda eds, item: _prep(eds, item, t_stop=max(timesteps)))


def readout_steps_sweep(
    ed: EmerDiff,
    items: Sequence[ProbeImage],
    steps: Sequence[int | None] = (1, 2, None),
    seeds: Sequence[int] = (0,),
) -> list[dict[str, Any]]:
    """Number of denoising steps after the modulation (config ``readout_steps``; None = full schedule
    with the stored inversion noise, n = n deterministic DDIM steps to x_0).

    Rows: image, seed, readout_steps (int; the full count for None), mode, locality, ..., miou.
    """
    full = len([t for t in ed.schedule.timesteps if t <= ed.config.modulation_timestep])

    def run(eds: EmerDiff, prepared: PreparedImage, item: ProbeImage, n: int | None) -> dict[str, Any]:
        maps, _ = eds.perturb(prepared, readout_steps=n)
        return dict(readout_steps=full if n is None else min(int(n), full),
                    mode="stored noise (full)" if n is None else "DDIM", **scores(eds, prepared, maps, item))

    # the full-schedule readout replays the inversion's noise maps, so invert when it is swept
    return probe_grid(ed, items, seeds, steps, run, lambda eds, item: _prep(eds, item, invert=None in steps))


# --------------------------------------------------------------------------- magnitude probes
@dataclass
class Perturbation:
    """Decoded images of one modulated batch, (.., 3, R, R) on the CPU, mapped to [0, 1] but *not*
    clipped: the difference maps must match the pipeline's, which are taken before any clipping.
    Clip (``viz.to_uint8`` does) for display."""

    plus: torch.Tensor  # (K, 3, R, R): +lambda on mask i
    minus: torch.Tensor  # (K, 3, R, R): -lambda on mask i
    unmodulated: torch.Tensor  # (3, R, R): unmodulated reconstruction, same batch

    def difference(self, mode: str = "pair") -> torch.Tensor:
        """(K, R, R) maps: 'pair' ||I- - I+||, 'plus' ||I+ - I0||, 'minus' ||I- - I0||."""
        if mode == "pair":
            a, b = self.minus, self.plus
        elif mode == "plus":
            a, b = self.plus, self.unmodulated[None]
        elif mode == "minus":
            a, b = self.minus, self.unmodulated[None]
        else:
            raise ValueError(f"mode must be 'pair', 'plus' or 'minus', got {mode!r}")
        # images are in [0, 1]; the pipeline's maps use [-1, 1], hence the factor 2
        return 2 * (a - b).pow(2).sum(1).sqrt()


def perturb_images(
    ed: EmerDiff,
    prepared: PreparedImage,
    mask_ids: Sequence[int] | None = None,
    **overrides: Any,
) -> Perturbation:
    """Like :meth:`EmerDiff.perturb` but keeps I+, I- and the unmodulated run of the same batch.

    ``overrides``: :meth:`EmerDiff.modulate`'s (``modulation_strength=...``, ``readout_steps=...``).
    """
    lat, ref = ed.modulate(prepared, mask_ids, **overrides)
    imgs = []
    step = max(1, ed.modulation_config(**overrides).decode_batch)
    allx = torch.cat([ref, lat])
    for s in range(0, allx.shape[0], step):
        imgs.append(((decode(ed.model, allx[s:s + step]).float() + 1) / 2).cpu())
    imgs_t = torch.cat(imgs)
    return Perturbation(plus=imgs_t[1::2], minus=imgs_t[2::2], unmodulated=imgs_t[0])


def lambda_sweep(
    ed: EmerDiff,
    items: Sequence[ProbeImage],
    strengths: Sequence[float] = (-100, -10, -1, 0, 1, 10, 100),
    seeds: Sequence[int] = (0,),
) -> list[dict[str, Any]]:
    """lambda swept over both signs, one inversion per image and seed.

    For each magnitude |lambda| one batch gives I+, I- and the unmodulated I0.
    Each signed lambda gets a one-sided row (mode 'one-sided': d = ||I(lambda) -
    I0||; lambda = 0 compares I0 with itself, degenerate by construction) and
    each magnitude a paired row (mode 'pair': d = ||I- - I+||, EmerDiff's map,
    lambda reported as |lambda|). Rows: image, seed, lambda, mode, locality, ...,
    miou, boundary, saturated (share of pixel values outside [0, 1], clipped on display).
    """
    mags = sorted({abs(float(s)) for s in strengths})

    def run(eds: EmerDiff, prepared: PreparedImage, item: ProbeImage, mag: float) -> list[dict[str, Any]]:
        pert = perturb_images(eds, prepared, modulation_strength=mag)
        rows = []
        for lam in [float(s) for s in strengths if abs(float(s)) == mag]:
            side = pert.plus if lam >= 0 else pert.minus
            sat = float(((side < 0) | (side > 1)).float().mean())
            rows.append(dict(**{"lambda": lam}, mode="one-sided", saturated=sat,
                             **scores(eds, prepared, pert.difference("plus" if lam >= 0 else "minus"), item)))
        sat = float(((pert.plus < 0) | (pert.plus > 1) | (pert.minus < 0) | (pert.minus > 1)).float().mean())
        rows.append(dict(**{"lambda": mag}, mode="pair", saturated=sat,
                         **scores(eds, prepared, pert.difference("pair"), item)))
        return rows

    return probe_grid(ed, items, seeds, mags, run)


def k_sweep(
    ed: EmerDiff,
    items: Sequence[ProbeImage],
    ks: Sequence[int] = (2, 4, 8),
    seeds: Sequence[int] = (0,),
) -> list[dict[str, Any]]:
    """Number of clusters K swept; the inversion is reused, only k-means and the modulation rerun.

    Rows: image, seed, K, segments (K' after dropping empty clusters), locality,
    vanished, ..., miou / boundary of EmerDiff and miou_nearest / miou_bilinear of the baselines.
    """
    from emerdiff.method.readout import bilinear_upsample

    tokens = ed.query_grid()[0] * ed.query_grid()[1]
    too_big = [k for k in ks if k > tokens]
    if too_big:
        raise ValueError(f"K {too_big} exceed the {tokens} tokens of the query layer")

    def run(eds: EmerDiff, base: PreparedImage, item: ProbeImage, k: int) -> dict[str, Any]:
        prepared = recluster(eds, base, k)
        maps, _ = eds.perturb(prepared)
        segs = prepared.segments
        near = score_labels(nearest_upsample(segs.labels, prepared.image_size), item)
        bil = score_labels(bilinear_upsample(segs.features, segs.centroids, prepared.grid, prepared.image_size), item)
        return dict(K=int(k), **scores(eds, prepared, maps, item), miou_nearest=near["miou"],
                    miou_bilinear=bil["miou"], boundary_nearest=near["boundary"], boundary_bilinear=bil["boundary"])

    return probe_grid(ed, items, seeds, ks, run)


# --------------------------------------------------------------------------- figure helpers
def difference_map_grid(
    ed: EmerDiff,
    prepared: PreparedImage,
    mask_id: int,
    layers: Sequence[str],
    timesteps: Sequence[int],
    strengths: Sequence[float],
) -> dict[tuple[str, int, float], np.ndarray]:
    """Difference maps of one mask for every (layer, t_m, lambda): {(layer, t, lambda): (R, R)}.

    ``prepared`` must be inverted up to max(timesteps).
    """
    out = {}
    for layer in layers:
        for t in timesteps:
            for lam in strengths:
                maps, _ = ed.perturb(prepared, [mask_id], modulation_strength=lam, modulation_layer=layer,
                                     modulation_timestep=t)
                out[(layer, int(t), float(lam))] = maps[0].float().cpu().numpy()
    return out


def failure_entries(seg: Any, image: np.ndarray, n: int = 2) -> list[dict[str, Any]]:
    """Failure cases of one :class:`Segmentation` (made with ``return_difference_maps=True``):
    the least local masks and the smallest mask, each with a caption saying why it was picked."""
    if seg.difference_maps is None:
        raise ValueError("segment with return_difference_maps=True to get failure cases")
    areas = np.bincount(seg.lowres_labels.reshape(-1), minlength=seg.num_segments)
    picks: list[tuple[int, str]] = []
    for i in np.argsort(seg.locality)[:n]:
        picks.append((int(i), f"low locality {seg.locality[i]:.2f}"))
    small = int(np.argmin(areas))
    if small not in [p[0] for p in picks]:
        picks.append((small, f"smallest mask ({areas[small]} tokens)"))
    return [dict(image=image, mask=seg.lowres_labels == i, difference=seg.difference_maps[i],
                 labels=seg.labels, caption=caption, mask_id=i) for i, caption in picks]
