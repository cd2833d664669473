"""Why a readout does (or does not) beat upsampling: where locality is lost, where labels move.

The probes (``emerdiff.studies.probes``) score a whole readout; these two functions take it apart.

* :func:`locality_by_stage` follows one perturbation through the pipeline and
  measures, at each stage, the share of the change that stays inside the
  perturbed mask: right after the modulated UNet call (its x_0 prediction),
  after the remaining denoising steps (final latent), after decoding (the
  difference maps EmerDiff uses), and for the VAE decoder alone, fed the final
  latent change cut to the mask. A stage that drops the share is where the
  readout goes global.
* :func:`label_moves` compares EmerDiff's labels with nearest upsampling of the
  same low-res segments, pixel by pixel against the ground truth, separately in
  a band around the low-res segment boundaries (where upsampling has to guess
  and EmerDiff is meant to help) and in the interior of the segments.

:func:`diagnose` runs both over probe images (``notebooks/06_diagnosis``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from emerdiff.evaluation.datasets import ProbeImage
from emerdiff.evaluation.metrics import hungarian_miou
from emerdiff.method.modulation import difference_maps
from emerdiff.method.pipeline import EmerDiff, PreparedImage
from emerdiff.method.readout import locality, nearest_upsample, readout_labels

STAGES = ("modulated_call", "denoised_latent", "decoded", "decoder_alone")


def _latent_maps(latents: torch.Tensor) -> torch.Tensor:
    """(2K, C, h, w) ordered +M_0, -M_0, ... -> (K, h, w) ||z- - z+|| over channels."""
    return (latents[1::2] - latents[0::2]).float().pow(2).sum(1).sqrt()


def locality_by_stage(ed: EmerDiff, prepared: PreparedImage, timestep: int | None = None) -> dict[str, Any]:
    """Mean share of the change inside its mask at each stage (see module docstring).

    Returns a dict with one float per name in :data:`STAGES`, ``chance`` (the mean
    mask area: what a readout blind to the mask scores), ``per_mask`` (stage ->
    list of K shares) and ``maps`` (stage -> (K, H, W) tensor, for plots).
    """
    cfg = ed.config
    t_m = cfg.modulation_timestep if timestep is None else timestep
    masks = prepared.masks()
    grid = prepared.grid
    # readout_steps=1: the x_0 prediction of the modulated call itself, before any later step
    first, _ = ed.modulate(prepared, modulation_timestep=t_m, readout_steps=1)
    final, ref = ed.modulate(prepared, modulation_timestep=t_m)
    decoded, _ = difference_maps(ed.model, final, cfg.decode_batch)
    # the decoder alone: the same latent change, but cut to the mask, around the unmodulated latent
    k = masks.shape[0]
    inside = F.interpolate(masks.reshape(k, 1, *grid).float(), size=tuple(final.shape[-2:]), mode="nearest")
    half = (final[1::2] - final[0::2]) * inside.to(final) / 2
    confined = torch.stack([ref - half, ref + half], dim=1).flatten(0, 1)
    decoder_alone, _ = difference_maps(ed.model, confined, cfg.decode_batch)

    maps = {"modulated_call": _latent_maps(first), "denoised_latent": _latent_maps(final),
            "decoded": decoded, "decoder_alone": decoder_alone}
    per_mask = {s: locality(m, masks.to(m.device), grid).cpu().numpy().tolist() for s, m in maps.items()}
    out: dict[str, Any] = {s: float(np.mean(v)) for s, v in per_mask.items()}
    out["chance"] = float(masks.float().mean(1).mean())
    out["per_mask"] = per_mask
    out["maps"] = {s: m.cpu() for s, m in maps.items()}
    return out


def boundary_band(lowres_labels: np.ndarray, size: tuple[int, int], width: int | None = None) -> np.ndarray:
    """Boolean (H, W): pixels within ``width`` px of a boundary of the nearest-upsampled segments.

    Default width: half a token cell, i.e. the pixels whose nearest token is not
    the only plausible one.
    """
    up = nearest_upsample(lowres_labels, size)
    if width is None:
        width = math.ceil(max(size[0] / lowres_labels.shape[0], size[1] / lowres_labels.shape[1]) / 2)
    window = 2 * int(width) + 1
    return ndimage.maximum_filter(up, size=window) != ndimage.minimum_filter(up, size=window)


def majority_mapping(labels: np.ndarray, gt: np.ndarray, ignore_index: int = 255) -> dict[int, int]:
    """Each predicted id -> the ground-truth class most of its (valid) pixels carry."""
    valid = gt != ignore_index
    out = {}
    for i in np.unique(labels[valid]):
        classes, counts = np.unique(gt[valid & (labels == i)], return_counts=True)
        out[int(i)] = int(classes[counts.argmax()])
    return out


def majority_correct(labels: np.ndarray, gt: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Boolean map: pixels whose segment's majority class (:func:`majority_mapping`) is their class."""
    mapping = majority_mapping(labels, gt, ignore_index)
    lut = np.full(int(labels.max()) + 1, -1, dtype=np.int64)
    for i, c in mapping.items():
        lut[i] = c
    return lut[labels] == gt


def label_moves(
    ed: EmerDiff, prepared: PreparedImage, maps: torch.Tensor, item: ProbeImage, band_width: int | None = None,
) -> dict[str, float]:
    """Where EmerDiff's labels differ from nearest upsampling, and which is right there.

    Pixel accuracy uses each method's own many-to-one mapping (segment -> majority
    ground-truth class). ``fixed``: share of a region's pixels EmerDiff gets right
    and nearest wrong; ``broken``: the reverse; ``moved``: share where they differ.
    ``*_scale_normalised``: the same with every map divided by its maximum before
    the argmax -- a diagnostic of map scale imbalance, not the paper's readout.
    """
    if not item.has_gt:
        raise ValueError(f"{item.name} has no ground truth; label_moves needs scene:N or voc_sample images")
    size = prepared.image_size
    gt = item.label
    lowres = prepared.segments.labels
    nearest = nearest_upsample(lowres, size)
    emerdiff = readout_labels(maps, lowres, ed.config, size, guide=prepared.image)
    # the same Step D on other maps: each divided by its peak
    peak = maps.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    normalised = readout_labels(maps / peak, lowres, ed.config, size, guide=prepared.image)
    band = boundary_band(lowres, size, band_width)
    valid = gt != item.ignore_index
    ok_near = majority_correct(nearest, gt, item.ignore_index)
    ok_emer = majority_correct(emerdiff, gt, item.ignore_index)
    ok_norm = majority_correct(normalised, gt, item.ignore_index)
    out: dict[str, float] = {"band_share": float(band[valid].mean())}
    for region, sel in (("band", band & valid), ("interior", ~band & valid), ("all", valid)):
        n = max(1, int(sel.sum()))
        out[f"acc_nearest_{region}"] = float(ok_near[sel].sum() / n)
        out[f"acc_emerdiff_{region}"] = float(ok_emer[sel].sum() / n)
        out[f"acc_emerdiff_scale_normalised_{region}"] = float(ok_norm[sel].sum() / n)
        out[f"moved_{region}"] = float((emerdiff != nearest)[sel].sum() / n)
        out[f"fixed_{region}"] = float((ok_emer & ~ok_near)[sel].sum() / n)
        out[f"broken_{region}"] = float((~ok_emer & ok_near)[sel].sum() / n)
    k = item.num_classes or int(gt[valid].max()) + 1
    out["miou_nearest"] = hungarian_miou(nearest, gt, k, item.ignore_index)
    out["miou_emerdiff"] = hungarian_miou(emerdiff, gt, k, item.ignore_index)
    out["miou_emerdiff_scale_normalised"] = hungarian_miou(normalised, gt, k, item.ignore_index)
    return out


def diagnose(ed: EmerDiff, items: Sequence[ProbeImage]) -> list[dict[str, Any]]:
    """One row per image: :func:`locality_by_stage` shares and, with ground truth, :func:`label_moves`.

    Rows keep the decoded maps out (JSON-ready); use :func:`locality_by_stage` for plots.
    """
    rows = []
    for item in items:
        prepared = ed.prepare(item.image)
        stages = locality_by_stage(ed, prepared)
        row: dict[str, Any] = {"image": item.name, "chance": stages["chance"],
                               **{s: stages[s] for s in STAGES}}
        if item.has_gt:
            row.update(label_moves(ed, prepared, stages["maps"]["decoded"], item))
        rows.append(row)
    return rows


def setting_name(changes: dict[str, Any]) -> str:
    """'configured' for no change (the config's own readout: the paper's on SD, t_m 81 on the
    reference model), else 'key=value, ...' with short keys."""
    short = {"modulation_timestep": "t_m", "modulation_strength": "lambda", "readout_steps": "readout_steps",
             "modulation_layer": "layer"}
    return ", ".join(f"{short.get(k, k)}={v}" for k, v in changes.items()) or "configured"


def default_settings(ed: EmerDiff) -> list[dict[str, Any]]:
    """The configured readout and one change at a time: readout_steps 1 and 2, t_m at about 0.3x and
    1.7x the configured one (snapped to the schedule), lambda / 10 and x 10."""
    cfg = ed.config
    sched = list(ed.schedule.timesteps)

    def snap(t: float) -> int:
        return int(min(sched, key=lambda s: abs(s - t)))

    out: list[dict[str, Any]] = [{}, {"readout_steps": 1}, {"readout_steps": 2}]
    for t in dict.fromkeys((snap(0.3 * cfg.modulation_timestep), snap(1.7 * cfg.modulation_timestep))):
        if t != cfg.modulation_timestep:
            out.append({"modulation_timestep": t})
    out += [{"modulation_strength": cfg.modulation_strength / 10}, {"modulation_strength": cfg.modulation_strength * 10}]
    return out


def settings_sweep(ed: EmerDiff, items: Sequence[ProbeImage], settings: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Readout settings (config changes: t_m, lambda, readout_steps, modulation layer, ...) compared
    on the same low-res segments: one preparation per image, inverted down to the largest t_m.

    Rows: image, setting, changes, locality (decoded maps) and every :func:`label_moves` number,
    so a setting is judged by where its labels move and whether they are right there -- not by
    per-image one-to-one mIoU alone, which rewards segments that vanish from the argmax.
    """
    from emerdiff.studies.probes import with_config

    variants = [(setting_name(c), with_config(ed, **c)) for c in settings]
    t_stop = max(v.config.modulation_timestep for _, v in variants)
    rows = []
    for item in items:
        prepared = ed.prepare(item.image, t_stop=max(t_stop, ed.config.modulation_timestep))
        for name, variant in variants:
            maps, _ = variant.perturb(prepared)
            loc = locality(maps, prepared.masks(maps.device), prepared.grid)
            row: dict[str, Any] = {"image": item.name, "setting": name, "locality": float(loc.mean())}
            if item.has_gt:
                row.update(label_moves(variant, prepared, maps, item))
            rows.append(row)
    return rows
