"""Faithfulness measures: does a difference map say what the perturbed segment controls?

Each measure comes with its chance level, the score of a readout that ignores
what it is asked (docs/METHOD.md, "Faithfulness measures"):

- **locality** (:func:`locality_scores`, from :func:`emerdiff.method.readout.locality`): share of a
  map's energy (sum of d^2) inside its own mask. 1 = the perturbation changed only its own
  segment; chance = the mask's area fraction (a map that ignores the mask spreads its energy
  evenly).
- **symmetry** (:func:`symmetry`): does -lambda mirror +lambda around the unmodulated
  unmodulated reconstruction I0? 1 = exactly antisymmetric (I- - I0 = -(I+ - I0), a linear response),
  0 = chance (the two responses are unrelated), -1 = even (both signs make the same change).
- **token agreement** (:func:`token_agreement`): share of tokens whose pixel-level label,
  downsampled to the token grid by majority, is the token's own low-resolution segment.
  1 = the readout keeps every segment where Step A put it; chance = the largest segment's share
  of the tokens (what a readout that gives every pixel one label scores; a random relabelling
  scores 1/K, never more).
- **deletion test** (:func:`deletion_test`, expensive: two more preparations and runs): the
  segment's pixels are replaced (mean colour of the rest of the image, a blur, the model's own
  reconstruction or any fill image), the image re-prepared with the same low-resolution
  segments, and the segment's response inside its own area compared with the original
  (``ratio``). 0 = the response vanished with the content; 1 = no content dependence (the
  perturbation acts on the place, not the thing), which is also what the unrelated
  ``control`` segment should score.

The cheap ones (:func:`cheap_measures`: locality, token agreement and +/- symmetry, each with
its chance level) are computed by :meth:`emerdiff.EmerDiff.segment` into
``Segmentation.faithfulness`` (per mask: ``Segmentation.locality`` and ``Segmentation.symmetry``).
Symmetry needs I+, I- and the unmodulated I0 of the same batch: ``segment`` decodes I0 once and
scores each decoded chunk of I+ / I- before dropping it (one image and K numbers kept, not 2K
images); :func:`emerdiff.studies.sweep` gives it per mask and setting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from emerdiff.method.readout import locality as _locality
from emerdiff.sd.images import ImageInput, load_image, resize_labels

if TYPE_CHECKING:  # the pipeline imports this module; no import cycle at run time
    from emerdiff.method.pipeline import EmerDiff, Segmentation

FILLS = ("mean", "blur", "reference")


def _np(x: Any) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# --------------------------------------------------------------------------- locality
def mask_area(lowres_labels: np.ndarray, mask_ids: Sequence[int] | None = None) -> np.ndarray:
    """(K,) share of the tokens in each mask: the chance level of its locality."""
    labels = np.asarray(lowres_labels).reshape(-1)
    ids = np.arange(int(labels.max()) + 1) if mask_ids is None else np.asarray(list(mask_ids))
    return (labels[None, :] == ids[:, None]).mean(1)


def locality_scores(maps: Any, lowres_labels: np.ndarray, mask_ids: Sequence[int] | None = None) -> np.ndarray:
    """(K,) share of each map's energy inside its own mask (:func:`emerdiff.method.readout.locality`).

    ``maps`` (K, R, R) belong to ``mask_ids`` (default 0..K-1) of the (h, w) ``lowres_labels``.
    1 = perfectly local; chance = :func:`mask_area` (a map blind to its mask).
    """
    labels = np.asarray(lowres_labels)
    ids = range(len(maps)) if mask_ids is None else list(mask_ids)
    masks = torch.from_numpy((labels.reshape(1, -1) == np.asarray(ids)[:, None]).astype(np.float32))
    m = torch.as_tensor(_np(maps), dtype=torch.float32)
    return _locality(m, masks, tuple(labels.shape)).numpy()


# --------------------------------------------------------------------------- symmetry
def symmetry(plus: Any, minus: Any, unmodulated: Any) -> np.ndarray:
    """(K,) antisymmetry of the +lambda and -lambda responses around the unmodulated run.

    With a = I+ - I0 and b = I- - I0 over all pixels and channels,
    ``S = 1 - ||a + b||^2 / (||a||^2 + ||b||^2) = -2 <a, b> / (||a||^2 + ||b||^2)``:
    1 when b = -a (the response is linear in lambda, so the pair difference is twice
    either side), 0 when a and b are unrelated (chance), -1 when b = a (both signs
    make the same change). NaN when neither side changed anything.

    plus, minus: (K, 3, R, R); unmodulated: (3, R, R) or (1, 3, R, R), any common scale.
    """
    p, m = _np(plus).astype(np.float64), _np(minus).astype(np.float64)
    r = _np(unmodulated).astype(np.float64).reshape((1, *p.shape[1:]))
    a, b = (p - r).reshape(len(p), -1), (m - r).reshape(len(m), -1)
    denominator = (a * a).sum(1) + (b * b).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = -2 * (a * b).sum(1) / denominator
    return np.where(denominator > 0, s, np.nan)


# --------------------------------------------------------------------------- token agreement
def token_labels(pixel_labels: np.ndarray, grid: tuple[int, int], num_labels: int | None = None) -> np.ndarray:
    """(H, W) labels -> (h, w): each token takes the most frequent label of the pixels whose
    nearest token it is (ties: the smaller label). Ids are kept (unlike
    :func:`emerdiff.method.features.project_labels`, which renumbers); the pixel-to-token rule is the one
    the masks are upsampled with, so a map that repeats the tokens comes back unchanged."""
    labels = np.asarray(pixel_labels).astype(np.int64)
    H, W = labels.shape
    h, w = grid
    if H < h or W < w:
        raise ValueError(f"pixel labels {H}x{W} are coarser than the {h}x{w} token grid")
    n = int(labels.max()) + 1 if num_labels is None else int(num_labels)
    token = (np.arange(H) * h // H)[:, None] * w + (np.arange(W) * w // W)[None, :]
    votes = np.zeros((h * w, max(n, 1)), dtype=np.int64)
    np.add.at(votes, (token.ravel(), labels.ravel()), 1)
    return votes.argmax(1).reshape(h, w)


def token_agreement(pixel_labels: np.ndarray, lowres_labels: np.ndarray, per_mask: bool = False) -> Any:
    """Share of tokens whose majority pixel label is their own low-resolution segment.

    ``pixel_labels`` (H, W) at any size with the segments' ids (the argmax of the maps);
    ``lowres_labels`` (h, w). 1 = the readout keeps every segment where Step A put it;
    chance = :func:`agreement_chance` (the largest segment's share). ``per_mask``: (K,) the
    share of each segment's tokens that keep its label (its recall) instead of the overall share.
    """
    low = np.asarray(lowres_labels).astype(np.int64)
    k = int(max(low.max(), np.asarray(pixel_labels).max())) + 1
    tok = token_labels(pixel_labels, low.shape, k)
    if not per_mask:
        return float((tok == low).mean())
    return np.array([float((tok[low == i] == i).mean()) if (low == i).any() else np.nan
                     for i in range(int(low.max()) + 1)])


def agreement_chance(lowres_labels: np.ndarray) -> float:
    """Chance level of :func:`token_agreement`: the largest segment's share of the tokens, which is
    what labelling every pixel alike scores (a random permutation of the ids scores 1/K, lower)."""
    counts = np.bincount(np.asarray(lowres_labels).astype(np.int64).reshape(-1))
    return float(counts.max() / counts.sum())


SYMMETRY_CHANCE = 0.0  # unrelated +lambda / -lambda responses: <a, b> averages to 0


def cheap_measures(locality: np.ndarray, lowres_labels: np.ndarray, pixel_labels: np.ndarray,
                   symmetry: np.ndarray | None = None) -> dict[str, float]:
    """The measures a segmentation gets for free, averaged over masks, each with its chance level:
    ``locality`` / ``locality_chance`` (mean mask area), ``agreement`` / ``agreement_chance`` and,
    when the (K,) per-mask ``symmetry`` is given, ``symmetry`` (mean over the masks whose runs
    changed anything; NaN if none did) / ``symmetry_chance`` (0)."""
    loc = np.asarray(locality, np.float64)
    out = dict(locality=float(loc.mean()), locality_chance=float(mask_area(lowres_labels, range(len(loc))).mean()),
               agreement=token_agreement(pixel_labels, lowres_labels),
               agreement_chance=agreement_chance(lowres_labels))
    if symmetry is not None:
        sym = np.asarray(symmetry, np.float64)
        out.update(symmetry=float(sym[np.isfinite(sym)].mean()) if np.isfinite(sym).any() else float("nan"),
                   symmetry_chance=SYMMETRY_CHANCE)
    return out


# --------------------------------------------------------------------------- deletion test
def delete_segment(image: torch.Tensor, lowres_labels: np.ndarray, mask_id: int, fill: Any = "mean",
                   unmodulated: torch.Tensor | None = None) -> torch.Tensor:
    """``image`` (3, H, W) in [0, 1] with segment ``mask_id``'s pixels replaced.

    The (h, w) segment is upsampled nearest to the image. ``fill``: 'mean' (mean colour of the
    rest of the image: the content, its edges and its colour go), 'blur' (a Gaussian of a
    token's width: edges and texture go, colours stay), 'reference' (``unmodulated``, the
    model's own reconstruction: deletes nothing but the VAE round trip, a null control) or a
    (3, H, W) / (H, W, 3) image of the same size (e.g. a clean background plate).
    """
    img = image.float()
    H, W = img.shape[-2:]
    inside = torch.from_numpy(resize_labels((np.asarray(lowres_labels) == mask_id).astype(np.int64), (H, W)) > 0)
    if not inside.any():
        raise ValueError(f"segment {mask_id} covers no pixel; pick one of {np.unique(lowres_labels).tolist()}")
    if isinstance(fill, str):
        if fill == "mean":
            rest = img[:, ~inside] if (~inside).any() else img.reshape(3, -1)
            filler = rest.mean(1)[:, None, None].expand_as(img)
        elif fill == "blur":
            from emerdiff.method.readout import gaussian_blur

            filler = gaussian_blur(img, max(H, W) / np.asarray(lowres_labels).shape[0])
        elif fill == "reference":
            if unmodulated is None:
                raise ValueError("fill='reference' needs the unmodulated reconstruction (unmodulated=...)")
            filler = torch.nn.functional.interpolate(unmodulated.float()[None], size=(H, W), mode="bilinear",
                                                     align_corners=False)[0]
        else:
            raise ValueError(f"fill must be one of {FILLS} or an image, got {fill!r}")
    else:
        filler = load_image(fill, min_size=1)
        if tuple(filler.shape[-2:]) != (H, W):
            raise ValueError(f"the fill image is {filler.shape[2]}x{filler.shape[1]}, the image {W}x{H}; "
                             "give one of the same size")
    return torch.where(inside[None], filler, img).clamp(0, 1)


def _response(maps: torch.Tensor, lowres_labels: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """Mean difference (||I- - I+||) inside each segment's own area at the maps' size."""
    R = maps.shape[-1]
    out = []
    for row, i in enumerate(ids):
        inside = torch.from_numpy(resize_labels((np.asarray(lowres_labels) == i).astype(np.int64), (R, R)) > 0)
        out.append(float(maps[row].float()[inside].mean()))
    return np.array(out)


def deletion_test(
    ed: EmerDiff,
    image: ImageInput,
    seg: Segmentation,
    mask_id: int,
    *,
    fill: Any = "mean",
    control_id: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Delete segment ``mask_id``'s pixels, re-prepare and check that its response vanishes there.

    The image and the edited image are prepared with the same low-resolution segments
    (``seg.lowres_labels``, as :meth:`EmerDiff.refine` does), and the segment and a control
    segment (default: the largest other one) are perturbed in each, with the config's
    settings (``overrides``: :meth:`EmerDiff.modulate`'s). Returns a dict:

    - ``response_before`` / ``response_after``: mean difference ||I- - I+|| inside the segment's
      own area; ``ratio`` = after / before: 0 = the response vanished with the content,
      1 = the perturbation does not depend on what is there (chance).
    - ``control_before`` / ``control_after`` / ``control_ratio``: the same for the control
      segment, whose content stayed: how much the deletion changed the response elsewhere
      (expected near 1; a ``ratio`` far below it is the content dependence).
    - ``locality_before`` / ``locality_after`` of the deleted segment's map, ``fill``, ``mask``,
      ``control``, and ``maps_before`` / ``maps_after`` ((2, R, R): segment, control).

    Costs two preparations and two modulated runs of two masks.
    """
    labels = np.asarray(seg.lowres_labels)
    ids = np.unique(labels).tolist()
    if mask_id not in ids:
        raise ValueError(f"mask_id {mask_id} is not a segment of this segmentation; valid: {ids}")
    if control_id is None:
        others = [i for i in ids if i != mask_id]
        control_id = max(others, key=lambda i: int((labels == i).sum())) if others else None
    elif control_id == mask_id or control_id not in ids:
        raise ValueError(f"control_id must be another segment of {ids}, got {control_id}")
    run_ids = [mask_id] + ([] if control_id is None else [control_id])
    img = load_image(image)
    t_stop = ed.modulation_config(**overrides).modulation_timestep
    before = ed.prepare(img, t_stop=t_stop, lowres_labels=labels)
    if not np.array_equal(before.segments.labels, labels):
        raise ValueError("seg.lowres_labels do not survive the projection onto this EmerDiff's query grid; "
                         "use the EmerDiff (config) the segmentation was made with")
    maps_before, _ = ed.perturb(before, run_ids, **overrides)
    unmodulated = ed.reconstruct(before) if isinstance(fill, str) and fill == "reference" else None
    edited = delete_segment(img, labels, mask_id, fill, unmodulated)
    after = ed.prepare(edited, t_stop=t_stop, lowres_labels=labels)
    maps_after, _ = ed.perturb(after, run_ids, **overrides)
    rb, ra = _response(maps_before, labels, run_ids), _response(maps_after, labels, run_ids)
    loc_b = locality_scores(maps_before[:1], labels, [mask_id])
    loc_a = locality_scores(maps_after[:1], labels, [mask_id])
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = ra / rb
    out: dict[str, Any] = dict(mask=int(mask_id), fill=fill if isinstance(fill, str) else "image",
                               response_before=float(rb[0]), response_after=float(ra[0]), ratio=float(ratios[0]),
                               locality_before=float(loc_b[0]), locality_after=float(loc_a[0]),
                               control=None if control_id is None else int(control_id),
                               control_before=float("nan"), control_after=float("nan"), control_ratio=float("nan"),
                               maps_before=maps_before.float().cpu().numpy(),
                               maps_after=maps_after.float().cpu().numpy())
    if control_id is not None:
        out.update(control_before=float(rb[1]), control_after=float(ra[1]), control_ratio=float(ratios[1]))
    return out
