"""Response maps as data: a tidy table of difference maps and scores over any grid of Step C settings.

    from emerdiff import sweep
    records = sweep("photo.png", layers=[...], timesteps=[201, 401], strengths=[1, 10, 100], model="reference")
    pd.DataFrame(records)      # one row per (layer, modulation_timestep, modulation_strength, mask)

The image is prepared once (inverted up to the largest timestep; with ``readout_steps`` set no
inversion is needed) and every setting is one call of :func:`emerdiff.studies.probes.perturb_images`
(:meth:`EmerDiff.modulate` + decoding, which keeps I+, I- and the unmodulated I0 of the same
batch). ``out=DIR`` streams: each setting's maps go to ``DIR/<setting>.npz`` and its rows are
appended to ``DIR/records.jsonl`` as it finishes; a rerun into the same folder skips the
settings already written, so a big grid survives interruptions and can be extended.

Also here: the files of ``emerdiff segment --save-maps`` (:func:`save_maps_npz`,
:func:`contact_sheet`, :func:`stage_segmentation_maps`).

Note: ``emerdiff.studies.sweep`` is the function (the package re-exports it); import this module's
other names with ``from emerdiff.studies.sweep import load_map``.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from emerdiff.config import without_later_defaults
from emerdiff.files import FileSet, check_output_dir, clean_stale_temps, write_atomic, write_atomic_bytes
from emerdiff.method.measures import locality_scores, symmetry, token_labels
from emerdiff.method.readout import readout_labels
from emerdiff.sd.images import ImageInput, load_image

if TYPE_CHECKING:
    from emerdiff.method.pipeline import EmerDiff, PreparedImage
    from emerdiff.sd.loading import SDPipeline

RECORDS = "records.jsonl"
META = "sweep.json"
SWEPT = ("modulation_layer", "modulation_timestep", "modulation_strength")
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- map files
def save_maps_npz(path: str | os.PathLike, maps: Any, mask_ids: Sequence[int], lowres_labels: np.ndarray,
                  config: dict[str, Any], **extra: Any) -> None:
    """Write difference maps as float16: ``maps`` (K, R, R), ``mask_ids`` (K,), ``lowres_masks``
    (K, h, w) bool, ``lowres_labels`` (h, w), ``config`` (JSON string) and any ``extra`` arrays
    or JSON-able values (not atomic; callers go through :mod:`emerdiff.files`)."""
    m = maps.detach().float().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps, np.float32)
    if not np.isfinite(m).all() or np.abs(m).max(initial=0) > np.finfo(np.float16).max:
        raise ValueError("difference maps are not finite or too large for float16; lower the modulation strength")
    ids = np.asarray(list(mask_ids), np.int64)
    low = np.asarray(lowres_labels).astype(np.int64)
    arrays = {k: (v if isinstance(v, np.ndarray) else np.array(json.dumps(v))) for k, v in extra.items()}
    with open(path, "wb") as f:
        np.savez_compressed(f, maps=m.astype(np.float16), mask_ids=ids, lowres_masks=low[None] == ids[:, None, None],
                            lowres_labels=low, config=np.array(json.dumps(config)), **arrays)


def load_map(record: dict[str, Any]) -> np.ndarray:
    """The (R, R) float32 map of one :func:`sweep` record: in memory (``map``) or streamed (``map_file``)."""
    if "map" in record:
        return np.asarray(record["map"], np.float32)
    with np.load(record["map_file"]) as z:
        return z["maps"][int(record["map_index"])].astype(np.float32)


def contact_sheet(image: Any, maps: Any, lowres_labels: np.ndarray, mask_ids: Sequence[int] | None = None,
                  scores: Sequence[float] | None = None, model: str = "", title: str | None = None,
                  per_row: int = 4) -> Any:
    """The ``--save-maps`` contact sheet: :func:`emerdiff.viz.contact_sheet` (each map scaled to its
    own maximum), one drawing for the CLI, the notebooks and the sweep."""
    from emerdiff.viz import contact_sheet as draw

    return draw(image, maps, lowres_labels, mask_ids, scores, model=model, title=title, per_row=per_row)


def stage_segmentation_maps(files: FileSet, out_dir: Path, stem: str, seg: Any, image: Any, model: str) -> list[Path]:
    """``--save-maps``: stage ``STEM_maps.npz`` (every mask's map, float16, with the mask ids, the
    low-res masks and the config) and ``STEM_maps.png`` (contact sheet) into an output set."""
    import matplotlib.pyplot as plt

    if seg.difference_maps is None:
        raise ValueError("the segmentation has no difference maps; segment with return_difference_maps=True")
    ids = list(range(seg.num_segments))
    paths = [files.add(out_dir / f"{stem}_maps.npz", lambda p: save_maps_npz(
        p, seg.difference_maps, ids, seg.lowres_labels, seg.config, locality=seg.locality.astype(np.float32),
        model=model, image_size=list(seg.image_size)))]
    fig = contact_sheet(image, seg.difference_maps, seg.lowres_labels, ids, seg.locality, model,
                        title=f"{stem}: difference map of each mask")
    try:
        paths.append(files.add(out_dir / f"{stem}_maps.png", lambda p: fig.savefig(p, format="png", dpi=100)))
    finally:
        plt.close(fig)
    return paths


# --------------------------------------------------------------------------- the sweep
def _as_list(values: Any, default: Any, name: str = "values") -> list[Any]:
    if values is None:
        return [default]
    if isinstance(values, (str, bytes, numbers.Number, np.generic)):
        return [values]
    if isinstance(values, (dict, set, frozenset)) or not isinstance(values, Iterable):
        raise ValueError(f"{name}={values!r}: give one value or a list of values")
    out = list(values)
    if not out:
        raise ValueError(f"{name}=[]: an empty list of settings sweeps nothing; give at least one value "
                         "(or None: the config's)")
    return out


def _checked(name: str, values: list[Any], kind: str) -> list[Any]:
    """``values`` of a swept setting, each of its field's type, or a ValueError naming it.

    ``kind``: ``"layer"`` (a module name), ``"int"`` (an integer: no bool, no float, not even 201.0,
    as the config's integer fields), ``"number"`` (a finite real number, no bool). Nothing is rounded.
    """
    out = []
    for v in values:
        if kind == "layer":
            ok = isinstance(v, str) and bool(v.strip())
            want = "a layer name (a string such as 'up_blocks.1.attentions.2.transformer_blocks.0.attn2')"
        elif kind == "int":
            ok = isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))
            want = "an integer timestep on the schedule (e.g. 201); floats and booleans are not rounded"
        else:
            ok = (isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v))
            want = "a finite number"
        if not ok:
            raise ValueError(f"{name}: {v!r} ({type(v).__name__}) is not {want}; fix that value")
        out.append(int(v) if kind == "int" else float(v) if kind == "number" else v)
    return out


def _setting_name(layer: str, t: int, strength: float) -> str:
    return f"{layer}__t{int(t)}__lambda{float(strength)!r}"


def _stored_config(cfg: Any) -> dict[str, Any]:
    """The config as a sweep folder records it: later fields at their defaults left out (config.LATER_FIELDS)."""
    return without_later_defaults(cfg.to_dict())


def _fingerprint(array: Any) -> str:
    a = np.ascontiguousarray(array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array))
    return hashlib.sha256(str((a.shape, str(a.dtype))).encode() + a.tobytes()).hexdigest()


def _resolve(ed: EmerDiff | None, model: Any, config: Any) -> EmerDiff:
    from emerdiff.method.pipeline import EmerDiff

    if ed is not None:
        if model is not None or config is not None:
            raise ValueError("give ed=EmerDiff(...) or model= (and config=), not both")
        return ed
    if model is None:
        raise ValueError("sweep needs a model: model='reference' (a name, folder or loaded SDPipeline) or ed=EmerDiff(...)")
    if isinstance(model, (str, os.PathLike)):
        from emerdiff.sd.loading import load_pipeline

        model = load_pipeline(model)
    if config is None:
        from emerdiff.config import EmerDiffConfig

        config = EmerDiffConfig.for_model(model)  # the model's preset, as the CLI
    return EmerDiff(model, config)


def _read_meta(folder: Path) -> dict[str, Any]:
    """``sweep.json`` of a streamed sweep: ``{"request", "mask_ids", "lowres_labels"}``; a file that is
    truncated, empty, not JSON or not of this shape is a ValueError naming it and the fix."""
    path = folder / META
    fix = (f"delete {folder} (or pass another out= folder) and rerun the sweep; the maps already there "
           "cannot be matched to their settings without it")
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path} is unreadable ({type(err).__name__}: {err}); {fix}") from err
    problem = None
    if not isinstance(stored, dict):
        problem = f"it holds a JSON {type(stored).__name__}, not the object a sweep writes"
    elif not isinstance(stored.get("request"), dict):
        problem = "its 'request' (what was swept) is missing or not an object"
    elif not (isinstance(stored.get("mask_ids"), list) and stored["mask_ids"]
              and all(isinstance(i, int) and not isinstance(i, bool) for i in stored["mask_ids"])):
        problem = f"its 'mask_ids' is {str(stored.get('mask_ids'))[:60]}, not a list of segment ids"
    elif not isinstance(stored.get("lowres_labels"), list):
        problem = "its 'lowres_labels' is missing or not a list"
    if problem:
        raise ValueError(f"{path} is not a sweep's sweep.json: {problem}; {fix}")
    return stored


def _read_records(out: Path) -> list[dict[str, Any]]:
    """The complete rows of records.jsonl (a line cut by a kill, or any line that is not a row
    object naming its setting and mask, is dropped; the file is rewritten without it, so the next
    append starts on a line of its own, and that setting is computed again)."""
    path = out / RECORDS
    if not path.exists():
        return []
    good, bad = [], 0
    text = path.read_text(encoding="utf-8", errors="replace")
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("setting"), str) and isinstance(row.get("mask"), int):
            good.append(row)
        else:
            bad += 1
    if bad or (text and not text.endswith("\n")):
        write_atomic_bytes(path, "".join(json.dumps(r) + "\n" for r in good).encode())
    return good


def _append_records(out: Path, rows: list[dict[str, Any]]) -> None:
    with open(out / RECORDS, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def _scores(pert: Any, maps: torch.Tensor, labels: np.ndarray, ids: list[int], config: Any,
            guide: torch.Tensor) -> dict[str, Any]:
    """Per-mask scores of one setting: locality, energy, symmetry, agreement (the mask's token recall)
    and, repeated on each row, the setting's token agreement and its chance level. ``guide``: the image
    (Step D's guide when ``readout_filter`` is set)."""
    loc = locality_scores(maps, labels, ids)
    energy = maps.float().pow(2).flatten(1).mean(1).cpu().numpy()
    sym = symmetry(pert.plus, pert.minus, pert.unmodulated)
    ids_arr = np.asarray(ids)
    pixel = readout_labels(maps, labels, config, mask_ids=ids, guide=guide)  # Step D among the swept masks, as ids
    tok = token_labels(pixel, labels.shape, int(labels.max()) + 1)
    covered = np.isin(labels, ids_arr)
    recall = np.array([float((tok[labels == i] == i).mean()) for i in ids])
    counts = np.array([(labels == i).sum() for i in ids])
    return dict(locality=loc, energy=energy, symmetry=sym, agreement=recall,
                setting_agreement=float((tok[covered] == labels[covered]).mean()),
                agreement_chance=float(counts.max() / counts.sum()))


def sweep(
    image: ImageInput | PreparedImage,
    layers: str | Sequence[str] | None = None,
    timesteps: int | Sequence[int] | None = None,
    strengths: float | Sequence[float] | None = None,
    masks: Sequence[int] | None = None,
    *,
    ed: EmerDiff | None = None,
    model: SDPipeline | str | os.PathLike | None = None,
    config: Any = None,
    lowres_labels: np.ndarray | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Difference maps and scores for every (layer, t_m, lambda) of a grid: a tidy table.

    Args:
        image: any image :func:`emerdiff.load_image` takes, or a :class:`PreparedImage` (used as is).
        layers, timesteps, strengths: modulation layers, modulation timesteps (on the schedule)
            and strengths lambda to sweep; each a value or a list; None: the config's one value.
        masks: which low-resolution segments to perturb (ids; default all).
        ed: the :class:`EmerDiff` to run; or ``model`` (an SDPipeline, 'reference', 'tiny', a folder or
            hub id) and optionally ``config`` (default: the model's size rule, as ``segment``).
        lowres_labels: segments from any source instead of k-means (as :meth:`EmerDiff.refine`).
        out: a folder to stream into (``DIR/<layer>__t<t>__lambda<lambda>.npz`` per setting and
            ``DIR/records.jsonl``); a rerun with the same image and settings skips what is there.
        overrides: other fields of :data:`emerdiff.method.pipeline.MODULATION_FIELDS` fixed for the whole
            sweep (``readout_steps=1``, ``attention_injection=False``, ``max_batch``, ...).
    Returns:
        One dict per (layer, modulation_timestep, modulation_strength, mask), in grid order, with
        ``layer``, ``modulation_timestep``, ``modulation_strength``, ``readout_steps``,
        ``attention_injection``, ``mask``, ``mask_area`` (the locality's chance level), ``locality``,
        ``energy`` (mean d^2), ``symmetry`` (1 antisymmetric, 0 chance), ``agreement`` (share of
        the mask's tokens that keep its label in the argmax over the swept masks),
        ``setting_agreement`` and ``agreement_chance`` (the setting's token agreement and its chance
        level), and the map: ``map`` ((R, R) float32) in memory, or ``map_file`` + ``map_index``
        when streaming (:func:`load_map` reads either). ``pandas.DataFrame(records)`` is the table.
    """
    from emerdiff.method.pipeline import MODULATION_FIELDS, EmerDiff, PreparedImage
    from emerdiff.studies.probes import perturb_images, short_layer

    for name, values, kind in (("layers", layers, "layer"), ("timesteps", timesteps, "int"),
                               ("strengths", strengths, "number"), ("masks", masks, "int")):
        if values is not None:  # a value of the wrong type is refused before a named model is loaded
            _checked(name, _as_list(values, None, name), kind)
    ed = _resolve(ed, model, config)
    cfg = ed.config
    swept = sorted(set(overrides) & set(SWEPT))
    if swept:
        raise ValueError(f"{swept} are swept: give them as layers= / timesteps= / strengths=")
    bad = sorted(set(overrides) - set(MODULATION_FIELDS))
    if bad:
        raise ValueError(f"cannot fix {bad} for a sweep; allowed: {[f for f in MODULATION_FIELDS if f not in SWEPT]}")
    grid = [(layer, t, s) for layer in _checked("layers", _as_list(layers, cfg.modulation_layer, "layers"), "layer")
            for t in _checked("timesteps", _as_list(timesteps, cfg.modulation_timestep, "timesteps"), "int")
            for s in _checked("strengths", _as_list(strengths, cfg.modulation_strength, "strengths"), "number")]
    if masks is not None:
        masks = _checked("masks", _as_list(masks, None, "masks"), "int")
    if len(set(grid)) != len(grid):
        raise ValueError("a setting is repeated in the grid; give each layer, timestep and strength once")
    settings = {}
    for layer, t, s in grid:  # every setting checked against the model before any work
        settings[(layer, t, s)] = ed.modulation_config(modulation_layer=layer, modulation_timestep=t,
                                                       modulation_strength=s, **overrides)
    readout_steps = overrides.get("readout_steps", cfg.readout_steps)
    injection = overrides.get("attention_injection", cfg.attention_injection)
    prepared = image if isinstance(image, PreparedImage) else None
    img = prepared.image if prepared is not None else load_image(image)
    request = dict(format=FORMAT_VERSION, image=_fingerprint(img), model=ed.model.source, config=_stored_config(cfg),
                   masks=None if masks is None else [int(i) for i in masks],
                   lowres_labels=None if lowres_labels is None else _fingerprint(lowres_labels),
                   prepared_segments=None if prepared is None else _fingerprint(prepared.segments.labels),
                   overrides={k: overrides[k] for k in sorted(overrides)})
    request = json.loads(json.dumps(request))  # compare in the form the file holds

    folder = None if out is None else Path(out)
    stored: dict[str, Any] | None = None
    done: dict[str, list[dict[str, Any]]] = {}
    if folder is not None:
        check_output_dir(folder, "out")
        folder.mkdir(parents=True, exist_ok=True)
        clean_stale_temps([folder])
        if (folder / META).exists():
            stored = _read_meta(folder)
            diff = sorted(k for k in set(request) | set(stored["request"]) if request.get(k) != stored["request"].get(k))
            if diff:
                raise ValueError(f"{folder} holds a sweep of another image or other settings (differs in {diff}); "
                                 "pass another out= folder or delete this one")
            by_setting: dict[str, dict[int, dict[str, Any]]] = {}
            for row in _read_records(folder):
                by_setting.setdefault(row["setting"], {})[row["mask"]] = row  # a repeated row: the last wins
            for name, rows in by_setting.items():
                if set(rows) == set(stored["mask_ids"]) and (folder / f"{name}.npz").exists():
                    done[name] = [rows[i] for i in stored["mask_ids"]]
    pending = [key for key in grid if _setting_name(*key) not in done]

    ids: list[int] = [] if stored is None else list(stored["mask_ids"])
    if pending:
        if prepared is None:
            # the full-schedule readout replays the inversion up to the largest t_m; a reduced one needs none
            prep_ed = ed if cfg.readout_steps == readout_steps else EmerDiff(ed.model, cfg.replace(
                readout_steps=readout_steps))
            prepared = prep_ed.prepare(img, t_stop=max(t for _, t, _ in pending), progress=progress,
                                       lowres_labels=lowres_labels)
        elif lowres_labels is not None:
            raise ValueError("lowres_labels cannot change a PreparedImage; prepare(image, lowres_labels=...) instead")
        for _, t, _ in pending:
            prepared.check_start(t, readout_steps)
        k = prepared.segments.num_segments
        resolved = list(range(k)) if masks is None else [int(i) for i in masks]
        out_of_range = [i for i in resolved if not 0 <= i < k]
        if out_of_range or len(set(resolved)) != len(resolved) or not resolved:
            raise ValueError(f"masks must be distinct ids of the {k} segments (0..{k - 1}), got {masks}")
        if stored is not None and resolved != ids:
            raise ValueError(f"{folder}: the segments differ from the stored sweep's; pass another out= folder")
        ids = resolved
        if folder is not None and stored is None:
            stored = dict(request=request, mask_ids=ids, lowres_labels=prepared.segments.labels.tolist())
            write_atomic_bytes(folder / META, json.dumps(stored, indent=1).encode())
    labels = None if prepared is None else prepared.segments.labels

    results: dict[str, list[dict[str, Any]]] = dict(done)
    bar = tqdm(total=len(grid), initial=len(grid) - len(pending), desc="sweep (settings)", disable=not progress)
    for layer, t, s in pending:
        name = _setting_name(layer, t, s)
        run = settings[(layer, t, s)]
        pert = perturb_images(ed, prepared, ids, modulation_layer=layer, modulation_timestep=t,
                              modulation_strength=s, **overrides)
        maps = pert.difference("pair")
        sc = _scores(pert, maps, labels, ids, run, prepared.image)
        area = [float((labels == i).mean()) for i in ids]
        rows = []
        for n, i in enumerate(ids):
            rows.append(dict(setting=name, layer=layer, short=short_layer(layer), modulation_timestep=t,
                             modulation_strength=s, readout_steps=readout_steps, attention_injection=injection,
                             mask=i, mask_area=area[n], **{key: float(v[n]) for key, v in sc.items()
                                                           if isinstance(v, np.ndarray)},
                             setting_agreement=sc["setting_agreement"], agreement_chance=sc["agreement_chance"]))
        if folder is not None:
            write_atomic(folder / f"{name}.npz", lambda p: save_maps_npz(
                p, maps, ids, labels, run.to_dict(), setting=dict(layer=layer, modulation_timestep=t,
                                                                   modulation_strength=s)))
            for n, row in enumerate(rows):
                row.update(map_file=f"{name}.npz", map_index=n)
            _append_records(folder, rows)  # after the maps: a row always has its file
        else:
            maps_np = maps.float().cpu().numpy()
            for n, row in enumerate(rows):
                row["map"] = maps_np[n]
        results[name] = rows
        bar.update(1)
    bar.close()
    records = []
    for key in grid:
        for row in results[_setting_name(*key)]:
            row = dict(row)
            if folder is not None:
                row["map_file"] = str(folder / Path(row["map_file"]).name)
            records.append(row)
    return records
