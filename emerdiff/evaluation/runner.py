"""The evaluation engine: segment a labelled dataset and score it with the paper's protocols.

:func:`run_evaluation` takes objects: a dataset, a segmenter (a model name, a loaded model, an
``EmerDiff`` or any ``image -> segmentation`` callable), an :class:`~emerdiff.config.EmerDiffConfig`
and an output folder. ``emerdiff evaluate`` (:mod:`emerdiff.cli.evaluate`) parses its flags into
these; ``training.heldout`` and ``training.readout_sweep`` call it directly.

Flow (single process, or any number of processes under ``accelerate launch``):

1. every process takes its share of the images (index striding by
   ``accelerate.PartialState``), segments each image not yet done and writes
   ``OUT/per_image/<id>.npz`` atomically (temp file + ``os.replace``), so a
   killed run resumes where it stopped;
2. ``wait_for_everyone``; the main process loads all per-image files, runs the
   protocols (per-image Hungarian, dataset-level k-means + Hungarian, concept
   embeddings; all from the same records) for every method the records hold
   (EmerDiff and the nearest / bilinear baselines of the same low-res masks,
   plus any other), bootstraps a 95 % interval over images for every mIoU and
   every difference between methods, and writes ``OUT/results.json``,
   ``OUT/results.csv`` and ``OUT/per_class.csv`` (:mod:`emerdiff.evaluation.results`).

The cache verifies itself (:mod:`emerdiff.evaluation.records`): a record that is unreadable,
belongs to another image, or was computed from other pixels, labels or settings is recomputed
(one line says which and why), never trusted. ``OUT/run.json`` pins the settings (dataset,
model, method config: :mod:`emerdiff.evaluation.signature`); it is written once they are
validated, and a rerun with other settings into the same OUT is refused with the keys that differ.
"""

from __future__ import annotations

import io
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emerdiff.config import EmerDiffConfig
from emerdiff.evaluation.datasets import SegmentationDataset, folder_dataset
from emerdiff.evaluation.metrics import confusion_matrix
from emerdiff.evaluation.protocols import KNOWN_PROTOCOLS, PROTOCOLS
from emerdiff.evaluation.records import (
    METHOD_FIELDS,
    METHODS,
    RECORD_VERSION,
    build_record,
    content_key,
    extra_method_items,
    openvocab_path,
    record_path,
    record_problem,
    save_record,
    segmentation_field,
    settings_hash,
)
from emerdiff.evaluation.results import boundary_lines, json_safe, merge_results, openvocab_result
from emerdiff.evaluation.signature import compare_signature, run_signature, signature_diff, write_signature
from emerdiff.files import check_output_dir, clean_stale_temps, write_atomic_bytes

SegmentFn = Callable[[Any], Any]
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch16"
LABELLERS = ("unet", "clip")

# the runner's public names; the result writing and the run signature live in .results and .signature
# (issue 24) and stay importable from here
__all__ = [
    "DEFAULT_CLIP_MODEL", "LABELLERS", "ModelSource", "SegmentFn", "boundary_lines", "check_labelled", "json_safe",
    "merge_results", "openvocab_path", "openvocab_result", "run_evaluation", "run_signature", "signature_diff",
]


@dataclass(frozen=True)
class ModelSource:
    """A model named by ``model`` (``'reference'``, ``'tiny'``, a folder or hub id), loaded only
    when some image needs segmenting, and segmented with ``config``."""

    model: str
    config: EmerDiffConfig
    dtype: str | None = None


def _default_segmenter(source: ModelSource, device: str | None) -> tuple[SegmentFn, dict, Any]:
    """Load the model once and return its ``segment``, the config dict and the model."""
    from emerdiff.method.pipeline import EmerDiff
    from emerdiff.sd.loading import load_pipeline

    model = load_pipeline(source.model, device=device, dtype=source.dtype)
    segmenter = EmerDiff(model, source.config)
    return (lambda image: segmenter.segment(image, progress=False)), source.config.to_dict(), model


def _labeller(name: str, clip_model: str, model: Any, source: ModelSource | None, config: EmerDiffConfig | None,
              device: str | None) -> Any:
    """The open-vocabulary labeller ``name`` (the unet one reuses the diffusion model)."""
    from emerdiff.method.vocabulary import CLIPMaskLabeller, CrossAttentionLabeller

    if name == "clip":
        return CLIPMaskLabeller(clip_model, device=device)
    if model is None:
        if source is None:
            raise ValueError("the unet labeller needs the diffusion model; pass a model (name or loaded) as the "
                             "segmenter, or labeller='clip'")
        from emerdiff.sd.loading import load_pipeline

        model = load_pipeline(source.model, device=device, dtype=source.dtype)
    cfg = config or EmerDiffConfig()
    return CrossAttentionLabeller(model, resolution=cfg.resolution, seed=cfg.seed)


# --------------------------------------------------------------------------- run
def _undo_empty_run(out: Path, created_out: bool) -> None:
    """After a run that stopped before caching any image: remove the ``run.json`` it wrote and the
    folders it left empty, so nothing in ``out`` claims a run took place. Records of a partial run
    stay (they verify themselves and let a rerun resume), and so does run.json with them."""
    per_image = out / "per_image"
    if per_image.is_dir() and any(per_image.glob("*.npz")):
        return
    (out / "run.json").unlink(missing_ok=True)
    for folder in [per_image, *out.glob("openvocab_*")]:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    if created_out and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def check_labelled(dataset: SegmentationDataset, indices: Sequence[int]) -> None:
    """Refuse, before any image is segmented, a dataset whose label maps are all void.

    Every protocol scores pixels with a ground-truth class; if each pixel of the evaluated images is
    ``ignore_index`` there is nothing to score. Stops at the first labelled pixel (one label read
    in the usual case).
    """
    for i in indices:
        if np.any(dataset.load_label(i) != dataset.ignore_index):
            return
    where = f" under {dataset.root}" if dataset.root is not None else ""
    raise ValueError(
        f"every pixel of the {len(indices)} evaluated label map(s){where} is the ignore index "
        f"{dataset.ignore_index} (void), so no class can be scored; check that the label files hold class ids "
        f"0..{dataset.num_classes - 1} and that --ignore-index (now {dataset.ignore_index}) is their void value")



def _failure(err: BaseException) -> str:
    """One line for an image that failed: the exception's type and message."""
    return f"{type(err).__name__}: {err}"


def _pending(dataset: SegmentationDataset, share: Sequence[int], out: Path, settings: str,
             labeller: str | None) -> tuple[list[int], list[str], dict[int, str]]:
    """Images of ``share`` whose cached files are missing or cannot be trusted, one line per
    image whose existing cache is recomputed (unreadable, another image's, stale), and the images
    whose files cannot even be read (index -> error), which fail alone."""
    todo, notes, failed = [], [], {}
    for i in share:
        sample = dataset[i]
        try:
            key = content_key(sample, settings)
        except OSError as err:  # the image file cannot be read: that image fails, the run goes on
            failed[i] = _failure(err)
            continue
        paths = [record_path(out, sample.image_id)]
        if labeller is not None:
            paths.append(openvocab_path(out, labeller, sample.image_id))
        problems = [pr for pr in (record_problem(p, key) for p in paths) if pr is not None]
        if problems:
            todo.append(i)
            stale = [pr for pr in problems if pr != "missing"]
            if stale:
                notes.append(f"recomputing {sample.image_id}: {stale[0]}")
    return todo, notes, failed


def _partial_state(device: str | None) -> Any:
    """The accelerate process state; CPU (gloo) processes when no GPU is there to own.

    ``accelerate launch --cpu`` alone starts a single process (multi-CPU needs
    mpirun), so on a CPU-only machine ``accelerate launch --multi_gpu
    --num_processes N`` (torchrun underneath) is the way to get N processes:
    PartialState would then see no CUDA and fall back to one non-distributed
    process each, unless told ``cpu=True`` as done here.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1 or int(os.environ.get("WORLD_SIZE", 1)) > 1
    cpu = (device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU")
           or (launched and not torch.cuda.is_available()))
    return PartialState(cpu=cpu)


def _default_device(state: Any) -> str | None:
    # Under accelerate each process owns one device; alone, let the config pick.
    if state.num_processes > 1:
        return str(state.device)
    return None


def _segment_share(state: Any, dataset: SegmentationDataset, todo: Sequence[int], share_size: int, out: Path,
                   segment_fn: SegmentFn, quiet: bool, settings: str,
                   openvocab: tuple[str, Any] | None = None) -> dict[int, str]:
    """Segment the images ``todo`` (this process's share that has no trusted cache) and cache each.

    ``openvocab`` = (labeller name, labeller): also label the masks with the
    dataset's class names and cache the result per image.

    An error while one image is segmented, scored or labelled, of any type, fails that image
    alone: one line names the image and the error, no record is written, the loop goes on.
    Errors writing the cache (a full disk) stop the run. Returns the failed images (index -> error).
    """
    failed: dict[int, str] = {}
    from tqdm.auto import tqdm

    bar = tqdm(total=share_size, initial=share_size - len(todo), desc=f"evaluate[{state.process_index}]",
               unit="img", disable=quiet, position=state.process_index, leave=True)
    try:
        for i in todo:
            sample = dataset[i]
            key = content_key(sample, settings)
            try:
                seg = segment_fn(sample.image)
                record = build_record(sample.image_id, seg, sample.label, dataset.num_classes,
                                      dataset.ignore_index, METHODS)
                maps = {m: np.asarray(segmentation_field(seg, METHOD_FIELDS[m])) for m in METHODS}
                for name, item in extra_method_items(seg).items():
                    maps[name] = np.asarray(item["labels"])
                maps["gt"] = sample.label
                vocab = None
                if openvocab is not None:
                    res = openvocab[1].label(sample.image, seg, list(dataset.class_names))
                    dense = confusion_matrix(res.dense_class_map, np.asarray(sample.label), dataset.num_classes,
                                             dataset.ignore_index)
                    vocab = (res.mask_classes.astype(np.int64), dense)
            except Exception as err:  # noqa: BLE001  (one image's failure, of any kind, is reported, not fatal)
                failed[i] = _failure(err)
                print(f"failed {sample.image_id} ({sample.image}): {failed[i]}; going on with the other images",
                      file=sys.stderr)
                bar.update(1)
                continue
            if vocab is not None:
                buf = io.BytesIO()
                np.savez_compressed(buf, mask_classes=vocab[0], dense_confusion=vocab[1],
                                    version=np.array(RECORD_VERSION), **{k: np.array(v) for k, v in key.items()})
                write_atomic_bytes(openvocab_path(out, openvocab[0], sample.image_id), buf.getvalue())
            # the record last: its presence marks the image done for the mask protocols
            save_record(record_path(out, sample.image_id), record, maps, key)
            bar.update(1)
    finally:
        bar.close()
    return failed


def _segmenter_parts(segmenter: Any, config: EmerDiffConfig | None, dtype: str | None,
                     ) -> tuple[SegmentFn | None, ModelSource | None, Any, EmerDiffConfig | None, str | None]:
    """``(segment_fn, lazy model source, loaded model, config, model name)`` of a segmenter argument."""
    from emerdiff.method.pipeline import EmerDiff
    from emerdiff.sd.loading import SDPipeline, check_model_configs, model_geometry

    if isinstance(segmenter, (str, os.PathLike)):
        if config is None:
            raise ValueError("run_evaluation: a model name needs a config; pass EmerDiffConfig.for_model(...) or "
                             "EmerDiffConfig(...)")
        config.check_for_segmentation()
        check_model_configs(segmenter)  # mismatched components refused from their configs, before any write
        geometry = model_geometry(str(segmenter))
        if geometry is not None:
            config.check_resolution(*geometry)
        return None, ModelSource(str(segmenter), config, dtype), None, config, str(segmenter)
    if isinstance(segmenter, SDPipeline):
        segmenter = EmerDiff(segmenter, config)  # validates the config against the model
    if isinstance(segmenter, EmerDiff):
        if config is not None and config != segmenter.config:
            raise ValueError("run_evaluation: config differs from the EmerDiff's own; pass the loaded model and "
                             "the config, or the EmerDiff alone")
        seg = segmenter
        return ((lambda image: seg.segment(image, progress=False)), None, seg.model, seg.config,
                str(getattr(seg.model, "source", None)))
    if callable(segmenter):  # an injected segmenter (tests, other methods): its settings are not checked
        return segmenter, None, None, config, None
    raise TypeError(f"run_evaluation: segmenter must be a model name, an SDPipeline, an EmerDiff or a callable "
                    f"image -> segmentation, got {type(segmenter).__name__}")


def run_evaluation(dataset: SegmentationDataset | str | os.PathLike, segmenter: Any,
                   config: EmerDiffConfig | None, out: str | os.PathLike, *,
                   protocols: str | Sequence[str] = "all", labeller: str = "unet",
                   clip_model: str = DEFAULT_CLIP_MODEL, n_boot: int = 1000, bootstrap_seed: int = 0,
                   protocol_seed: int | None = None, limit: int | None = None, device: str | None = None,
                   dtype: str | None = None, quiet: bool = False, model: str | None = None,
                   data: str | os.PathLike | None = None, layout: str | None = None,
                   split: str | None = None) -> dict[str, Any]:
    """Segment every image of ``dataset`` (cached, resumable) and score it; returns ``results.json``.

    Every setting that can be checked without the model is checked before the model is loaded or
    any file is written; ``run.json`` is written only once the model has accepted the settings.

    Args:
        dataset: a :class:`~emerdiff.evaluation.datasets.SegmentationDataset` or a folder of the
            folder layout (images/, labels/, classes.txt).
        segmenter: a model name or folder (``'reference'``, ``'tiny'``, a diffusers folder or hub
            id; loaded only if some image needs segmenting), a loaded ``SDPipeline``, an ``EmerDiff``,
            or any callable ``image -> segmentation`` (tests; its settings are not checked).
        config: the method settings (e.g. ``EmerDiffConfig.for_model("reference")``); None with an
            ``EmerDiff`` (its own) or a callable.
        out: output folder (per_image/, results.json, results.csv, per_class.csv, run.json).
        protocols: ``"all"`` (:data:`~emerdiff.evaluation.protocols.PROTOCOLS`), one protocol
            name, ``"openvocab"``, or a list of names.
        labeller, clip_model: the open-vocabulary labeller (``"unet"`` or ``"clip"``) with ``openvocab``.
        n_boot, bootstrap_seed: resamples of the images for the 95 % intervals (0: none) and their seed.
        protocol_seed: seed of the dataset k-means (default: ``config.seed``, else 0).
        limit: evaluate the first ``limit`` images only.
        device, dtype: where and in which dtype a named model is loaded (default: the process's
            accelerate device when several processes run; float16 on CUDA, float32 on CPU).
        model: the model name recorded in run.json (default: the segmenter's).
        data, layout, split: how the dataset is named in run.json (default: its root, layout, split).
    Returns:
        The ``results.json`` payload: ``rows`` (protocol x method mIoU with intervals),
        ``protocols``, ``intervals`` and ``config`` (the run's settings); on processes other than
        the main one (under ``accelerate launch``), an empty dict.

    An image that fails (its file unreadable, or any error while it is segmented or labelled) is
    reported with its error and left out; the others are scored, and ``config["failed_images"]``
    (image id -> error) says which. If every image fails, or the run is refused after it started,
    no ``run.json`` is left unless some image's record was cached. Labels that are all void are
    refused before any image is segmented.
    """
    out = Path(out)
    check_output_dir(out)
    names = [protocols] if isinstance(protocols, str) else list(protocols)
    chosen = [p for name in names for p in (PROTOCOLS if name == "all" else [name])]
    unknown = [p for p in chosen if p not in (*KNOWN_PROTOCOLS, "openvocab")]
    if unknown:
        raise ValueError(f"unknown protocol(s) {unknown}; choose from {[*KNOWN_PROTOCOLS, 'all', 'openvocab']}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 0:
        raise ValueError(f"n_boot={n_boot!r}: give a whole number of resamples >= 0 (0 disables)")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r}: give a whole number of images >= 1, or None for all")
    if labeller not in LABELLERS:
        raise ValueError(f"unknown labeller {labeller!r}; choose from {list(LABELLERS)}")
    state = _partial_state(device)
    device = device or _default_device(state)
    segment_fn, source, loaded, config, name = _segmenter_parts(segmenter, config, dtype)
    if not isinstance(dataset, SegmentationDataset):
        root = Path(dataset)
        if not root.is_dir():
            raise ValueError(f"dataset {root}: folder does not exist{' (it is a file)' if root.exists() else ''}; "
                             "pass the dataset root (folder layout: images/, labels/ and classes.txt)")
        dataset = folder_dataset(root)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise ValueError(f"dataset {dataset!r} holds no images; nothing to evaluate")
    indices = list(range(n))
    check_labelled(dataset, indices)  # all-void labels: refused before any model load, write or segmentation
    labeller_name = labeller if "openvocab" in chosen else None
    method_config = config.to_dict() if config is not None else None
    if source is None and loaded is None and model is not None:  # an injected segmenter: the labeller's model
        source_for_labeller = ModelSource(model, config or EmerDiffConfig(), dtype)
    else:
        source_for_labeller = source
    signature = run_signature(dataset, model or name or "", method_config, data, layout, split)
    compare_signature(out, signature)
    settings = settings_hash(signature)
    if state.is_main_process:  # before any process writes: the others' temp files are not there yet
        folders = [out, out / "per_image", *(out.glob("openvocab_*") if out.is_dir() else [])]
        for leftover in clean_stale_temps(folders):
            print(f"removed {leftover}, a temp file left by an interrupted run", file=sys.stderr)
    state.wait_for_everyone()

    share = indices[state.process_index::state.num_processes]
    todo, notes, failed = _pending(dataset, share, out, settings, labeller_name)
    for note in notes:
        print(note, file=sys.stderr)
    for i, err in failed.items():
        print(f"failed {dataset.image_ids[i]}: {err}; going on with the other images", file=sys.stderr)
    if todo and segment_fn is None and source is not None:  # load the model only when there is work left
        segment_fn, _, loaded = _default_segmenter(source, device)  # validates the config against it
    openvocab = ((labeller_name, _labeller(labeller_name, clip_model, loaded, source_for_labeller, config, device))
                 if todo and labeller_name else None)
    created_out = not out.exists()
    wrote_signature = state.is_main_process and write_signature(out, signature)
    try:
        done = 0
        if todo and segment_fn is not None:
            new_failures = _segment_share(state, dataset, todo, len(share), out, segment_fn, quiet, settings,
                                          openvocab)
            done = len(todo) - len(new_failures)
            failed.update(new_failures)
        state.wait_for_everyone()
        payload: dict[str, Any] = {}
        if state.is_main_process:
            payload = _finish(out, dataset, indices, chosen, protocols, protocol_seed, config, signature, limit,
                              state, labeller_name, n_boot, bootstrap_seed, failed, done, quiet)
    except BaseException:
        if wrote_signature:  # a run refused or stopped before caching anything leaves no run.json behind
            _undo_empty_run(out, created_out)
        raise
    state.wait_for_everyone()
    return payload


def _finish(out: Path, dataset: SegmentationDataset, indices: Sequence[int], chosen: Sequence[str],
            protocols: str | Sequence[str], protocol_seed: int | None, config: EmerDiffConfig | None,
            signature: dict[str, Any], limit: int | None, state: Any, labeller_name: str | None, n_boot: int,
            bootstrap_seed: int, failed_here: dict[int, str], done: int, quiet: bool) -> dict[str, Any]:
    """The main process's end of a run: merge the records of the images that did not fail, print the table."""
    failed = {dataset.image_ids[i]: err for i, err in failed_here.items()}
    for i in indices:  # another process's failures: its records are missing (its output names the error)
        image_id = dataset.image_ids[i]
        if image_id not in failed and not record_path(out, image_id).exists():
            failed[image_id] = "no record: it failed in another process (see that process's output)"
    scored = [i for i in indices if dataset.image_ids[i] not in failed]
    if not scored:
        first = next(iter(failed.items()))
        raise ValueError(f"all {len(indices)} image(s) failed, nothing to score; the first, {first[0]}: {first[1]}")
    seed = protocol_seed if protocol_seed is not None else (config.seed if config is not None else 0)
    run_info = {**signature, "protocol": protocols if isinstance(protocols, str) else list(protocols),
                "limit": limit, "num_processes": state.num_processes}
    payload = merge_results(out, dataset, scored, chosen, seed, run_info, labeller_name,
                            n_boot=n_boot, bootstrap_seed=bootstrap_seed, failed=failed)
    if not quiet:
        print(f"segmented {done} new image(s) here; {len(scored)} evaluated -> "
              f"{out / 'results.json'}", file=sys.stderr)
        for row in payload["rows"]:
            lo, hi = row["miou_lo"], row["miou_hi"]
            if row.get("interval_note"):
                span = " [no interval]"
            else:
                span = "" if lo is None or not math.isfinite(lo) else f" [{lo:6.2f}, {hi:6.2f}]"
            print(f"  {row['protocol']:<19} {row['method']:<17} mIoU {row['miou']:6.2f}{span}  "
                  f"pixel acc {row['pixel_accuracy']:6.2f}", file=sys.stderr)
        for line in boundary_lines(payload["rows"]):
            print(line, file=sys.stderr)
        for note in dict.fromkeys(n.split(": ", 1)[1] for n in payload.get("notes", [])):
            print(f"  note: {note}", file=sys.stderr)
    if failed:  # always said, quiet or not: the table covers fewer images than asked for
        print(f"{len(failed)} of {len(indices)} image(s) failed and are left out of the scores "
              f"(config.failed_images in {out / 'results.json'}); the first, {next(iter(failed))}: "
              f"{next(iter(failed.values()))}", file=sys.stderr)
    return payload
