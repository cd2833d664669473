"""`emerdiff evaluate`: segment a labelled dataset and score it with the paper's protocols.

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
   ``OUT/results.csv`` and ``OUT/per_class.csv``.

``emerdiff compare RUN_A RUN_B`` (:func:`compare_command`) puts two output
folders side by side: every protocol x method mIoU, recomputed on the images
both runs share, and the paired interval of the difference.

The cache verifies itself: each per-image record carries its image id and
SHA-256 hashes of the image file, of its label map and of the run settings.
A record that is unreadable, belongs to another image, or was computed from
other pixels, labels or settings is recomputed (one line says which and why),
never trusted. File names are an injective encoding of the image id, so two
ids never share a file. ``OUT/run.json`` pins the settings (dataset, model,
method config); it is written once they are validated, and a rerun with other
settings into the same OUT is refused with the keys that differ.

From Python, :func:`run_config` runs the same command on an ``EmerDiffConfig`` (or a dict of
its fields) and returns ``results.json``.

Run standalone as ``python -m emerdiff.evaluation.runner ...`` (same arguments
as ``emerdiff evaluate``). Several processes:
``accelerate launch --num_processes 4 -m emerdiff.evaluation.runner --data D --out O``
(one GPU each). On a CPU-only machine add ``--multi_gpu``: accelerate's
``--cpu`` flag starts one process unless an MPI hostfile is given, while the
torchrun-based launcher starts N processes, which then use CPU + gloo here.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import sys
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emerdiff.evaluation.datasets import LAYOUTS, SegmentationDataset, open_dataset
from emerdiff.evaluation.metrics import (
    KNOWN_PROTOCOLS,
    METHOD_FIELDS,
    METHODS,
    PROTOCOLS,
    ImageRecord,
    bootstrap_protocols,
    build_record,
    compare_records,
    confusion_matrix,
    evaluate_records,
    extra_method_items,
    per_class_rows,
    scores,
    segmentation_field,
    summary_rows,
)
from emerdiff.files import check_output_dir, clean_stale_temps, write_atomic_bytes

RECORD_VERSION = 2  # 2: image id + image/labels/settings hashes, verified on every run
SegmentFn = Callable[[Any], Any]


# --------------------------------------------------------------------------- arguments
def _add_arguments(p: argparse.ArgumentParser) -> None:
    from emerdiff.cli.options import add_config_args, add_labeller_args

    p.add_argument("--data", required=True, help="dataset root folder (required)")
    p.add_argument("--layout", default="folder", choices=sorted(LAYOUTS),
                   help="folder: images/ + labels/ + classes.txt; or a benchmark layout (default: folder)")
    p.add_argument("--split", default=None,
                   help="benchmark split (default: its validation split); folder layout: a sub-folder")
    p.add_argument("--ignore-index", type=int, default=None,
                   help="void label value of the folder layout (default: 255)")
    p.add_argument("--protocol", default="all", choices=[*KNOWN_PROTOCOLS, "all", "openvocab"],
                   help="per_image_hungarian: each image's masks matched to its own classes (as DiffSeg/"
                        "DiffCut report); dataset_hungarian: dataset k-means + one Hungarian matching (as "
                        "EmerDiff reports); concept: nearest GT concept embedding (the paper's: mean mask "
                        "embedding over the class's pixels), no matching; concept_token_mean: the same with "
                        "token-mean concepts; all: these four, from the same cached records; openvocab: "
                        "class names from the dataset's class list by an open-vocabulary labeller, alone "
                        "and pooled in EmerDiff masks, no matching; majority (an oracle, not in all): each mask "
                        "takes its own majority GT class, the label map's quality apart from any labelling "
                        "step (default: all)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="resamples of the images for the 95 %% interval of every mIoU and of every "
                        "difference between methods; 0 disables (default: 1000)")
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the resampling (default: 0)")
    add_labeller_args(p, "with --protocol openvocab: ")
    p.add_argument("--model", default="reference",
                   help="'reference', a diffusers folder, a hub id or 'tiny' (default: reference)")
    p.add_argument("--out", required=True, help="output folder (per_image/, results.json, results.csv) (required)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only (default: all)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, ... (default: the process's accelerate device)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="weights dtype (default: float16 on CUDA, float32 on CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: off)")
    add_config_args(p)  # the method settings of `segment`, --set FIELD=VALUE for any field; --seed also seeds
    # the protocols' dataset k-means


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``evaluate`` sub-command on an argparse subparsers object."""
    p = subparsers.add_parser(
        "evaluate", help="score a labelled dataset (mIoU under per-image/dataset Hungarian and concept protocols)",
        description="Segment every image of a labelled dataset, cache per-image results in "
                    "OUT/per_image (resumable), and write OUT/results.json and OUT/results.csv "
                    "with one row per protocol and method (emerdiff, nearest, bilinear, any other "
                    "the records hold) with a 95 % bootstrap interval, and OUT/per_class.csv. "
                    "Runs under `accelerate launch` to share the images between processes/GPUs.")
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def build_parser() -> argparse.ArgumentParser:
    """Stand-alone parser (``python -m emerdiff.evaluation.runner``)."""
    p = argparse.ArgumentParser(prog="emerdiff evaluate", description=__doc__.split("\n")[0])
    _add_arguments(p)
    return p


def _default_segmenter(args: argparse.Namespace, device: str | None) -> tuple[SegmentFn, dict, Any]:
    """Load the model once and return its ``segment``, the config dict and the model."""
    from emerdiff.cli.options import config_from_args
    from emerdiff.method.pipeline import EmerDiff
    from emerdiff.sd.loading import load_pipeline

    config = config_from_args(args)
    model = load_pipeline(args.model, device=device, dtype=args.dtype)
    segmenter = EmerDiff(model, config)
    return (lambda image: segmenter.segment(image, progress=False)), config.to_dict(), model


def _labeller(args: argparse.Namespace, model: Any, device: str | None) -> Any:
    """The open-vocabulary labeller of ``--labeller`` (the unet one reuses the diffusion model)."""
    from emerdiff.cli.options import config_from_args
    from emerdiff.method.vocabulary import CLIPMaskLabeller, CrossAttentionLabeller

    if args.labeller == "clip":
        return CLIPMaskLabeller(args.clip_model, device=device)
    if model is None:
        from emerdiff.sd.loading import load_pipeline

        model = load_pipeline(args.model, device=device, dtype=args.dtype)
    cfg = config_from_args(args)
    return CrossAttentionLabeller(model, resolution=cfg.resolution, seed=cfg.seed)


def openvocab_path(out: Path, labeller: str, image_id: str) -> Path:
    """Per-image open-vocabulary result: mask classes and the labeller-alone confusion."""
    return out / f"openvocab_{labeller}" / f"{_safe_id(image_id)}.npz"


def openvocab_result(out: Path, dataset: SegmentationDataset, indices: Sequence[int], labeller: str,
                     ) -> dict[str, Any]:
    """Dataset-level scores of the labeller alone and of the labeller pooled in EmerDiff masks
    (a protocol result, as :func:`emerdiff.evaluation.metrics.evaluate_records` returns)."""
    c = dataset.num_classes
    alone = np.zeros((c, c), np.int64)
    masked = np.zeros((c, c), np.int64)
    for i in indices:
        image_id = dataset.image_ids[i]
        counts = load_record(record_path(out, image_id), image_id).counts["emerdiff"]  # (K, C)
        with np.load(openvocab_path(out, labeller, image_id), allow_pickle=False) as z:
            alone += z["dense_confusion"]
            classes = z["mask_classes"]
        for m, cls in enumerate(classes):  # every pixel of mask m takes class cls
            masked[:, cls] += counts[m]
    return {"protocol": "openvocab", "num_images": len(indices), "labeller": labeller,
            "methods": {method: scores(conf, dataset.class_names)
                        for method, conf in ((labeller, alone), (f"{labeller}+emerdiff", masked))}}


# --------------------------------------------------------------------------- per-image cache
_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.=")
_MAX_NAME = 200  # bytes; file systems allow 255


def _safe_id(image_id: str) -> str:
    """File name for an image id: ASCII letters, digits and ``-_.=`` kept, every other byte
    %-escaped (``%`` included, and a leading dot, so no hidden files). The map is injective:
    ``x y`` -> ``x%20y``, ``x_y`` -> ``x_y``. Over-long names end in a hash of the id instead."""
    out = []
    for i, ch in enumerate(image_id):
        if ch in _SAFE and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
    name = "".join(out)
    if len(name) > _MAX_NAME:
        name = f"{name[:_MAX_NAME - 41]}%{hashlib.sha256(image_id.encode()).hexdigest()[:40]}"
    return name


class RecordError(ValueError):
    """A per-image record cannot be read; the message names the file and the fix."""


def content_key(sample: Any, settings: str) -> dict[str, str]:
    """What a per-image record was computed from: image id and SHA-256 of image, labels, settings."""
    h = hashlib.sha256()
    if isinstance(sample.image, (str, os.PathLike)):
        with open(sample.image, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    else:  # in-memory sample: its pixels, shape and dtype
        arr = np.ascontiguousarray(np.asarray(sample.image))
        h.update(f"{arr.shape}{arr.dtype}".encode())
        h.update(arr.tobytes())
    label = np.ascontiguousarray(np.asarray(sample.label))
    lh = hashlib.sha256(f"{label.shape}{label.dtype}".encode())
    lh.update(label.tobytes())
    return {"image_id": sample.image_id, "image_sha256": h.hexdigest(), "labels_sha256": lh.hexdigest(),
            "settings_sha256": settings}


def settings_hash(signature: dict[str, Any]) -> str:
    """SHA-256 of the run settings a record depends on (the dataset's location is not one:
    the image and label hashes pin its contents)."""
    relevant = {k: v for k, v in signature.items() if k != "data"}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()


def _stored_key(path: Path) -> dict[str, str]:
    """Read and CRC-check a whole cached .npz; return its stored key fields."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}  # reading every member checks every CRC
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise RecordError(f"{path} is unreadable ({type(err).__name__}: {err})") from err
    version = int(arrays["version"]) if "version" in arrays else 0
    if version != RECORD_VERSION:
        raise RecordError(f"{path} was written by another emerdiff version (record version {version})")
    return {k: str(arrays[k]) for k in ("image_id", "image_sha256", "labels_sha256", "settings_sha256")
            if k in arrays}


def record_problem(path: Path, key: dict[str, str]) -> str | None:
    """Why the cached file at ``path`` cannot be trusted for ``key`` (None: it can; "missing": none)."""
    if not path.exists():
        return "missing"
    try:
        stored = _stored_key(path)
    except RecordError as err:
        return str(err)
    what = {"image_id": "holds the record of another image ({old!r})",
            "image_sha256": "was computed from other image pixels (the image file changed)",
            "labels_sha256": "was computed from other labels (the label file changed)",
            "settings_sha256": "was computed with other settings"}
    for field, message in what.items():
        if stored.get(field) != key[field]:
            return f"{path} {message.format(old=stored.get(field))}"
    return None


def record_path(out: Path, image_id: str) -> Path:
    """Where the per-image record of ``image_id`` lives."""
    return out / "per_image" / f"{_safe_id(image_id)}.npz"


def save_record(path: Path, record: ImageRecord, maps: dict[str, np.ndarray] | None = None,
                key: dict[str, str] | None = None) -> None:
    """Store a record (+ optional full-size label maps and GT for inspection) as one .npz.

    ``key`` (:func:`content_key`) is stored with it so a later run can verify it.
    """
    arrays: dict[str, np.ndarray] = {
        **{k: np.array(v) for k, v in (key or {}).items()},
        "version": np.array(RECORD_VERSION),
        "image_id": np.array(record.image_id),
        "mask_embeddings": record.mask_embeddings.astype(np.float32),
        "query_features": record.query_features.astype(np.float32),
        "lowres_labels": record.lowres_labels.astype(np.int32),
        "lowres_gt": record.lowres_gt.astype(np.int32),
        "meta": np.array(json.dumps(record.meta, default=str)),
    }
    for m, c in record.counts.items():
        arrays[f"counts_{m}"] = c.astype(np.int64)
    for m, e in record.method_embeddings.items():  # methods with masks of their own
        arrays[f"embeddings_{m}"] = np.asarray(e, dtype=np.float32)
    if record.locality is not None:
        arrays["locality"] = np.asarray(record.locality, dtype=np.float64)
    for name, value in (maps or {}).items():
        # mask ids and class ids are small: int32 keeps any ignore index exact
        arrays[f"map_{name}"] = np.asarray(value).astype(np.int32)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_atomic_bytes(path, buf.getvalue())


def load_record(path: Path, image_id: str | None = None) -> ImageRecord:
    """Inverse of :func:`save_record` (label maps are not loaded: the protocols do not need them).

    Raises RecordError naming the file if it is unreadable or (with ``image_id``) another image's.
    """
    try:
        record = _load_record(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise RecordError(f"per-image record {path} is unreadable ({type(err).__name__}: {err}); "
                          "run evaluate again to recompute it") from err
    if image_id is not None and record.image_id != image_id:
        raise RecordError(f"per-image record {path} holds image {record.image_id!r}, not {image_id!r}; "
                          "run evaluate again to recompute it")
    return record


def _load_record(path: Path) -> ImageRecord:
    with np.load(path, allow_pickle=False) as z:
        counts = {k[len("counts_"):]: z[k] for k in z.files if k.startswith("counts_")}
        own = {k[len("embeddings_"):]: z[k] for k in z.files if k.startswith("embeddings_")}
        return ImageRecord(
            image_id=str(z["image_id"]),
            counts=counts,
            mask_embeddings=z["mask_embeddings"],
            query_features=z["query_features"],
            lowres_labels=z["lowres_labels"],
            lowres_gt=z["lowres_gt"],
            locality=z["locality"] if "locality" in z.files else None,
            meta=json.loads(str(z["meta"])),
            method_embeddings=own,
        )


class RecordFiles(Sequence[ImageRecord]):
    """Lazy sequence of records on disk: the protocols read it twice without holding it all."""

    def __init__(self, paths: Sequence[Path], image_ids: Sequence[str] | None = None):
        self.paths = list(paths)
        self.image_ids = list(image_ids) if image_ids is not None else [None] * len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> ImageRecord:  # type: ignore[override]
        return load_record(self.paths[i], self.image_ids[i])

    def __iter__(self) -> Iterator[ImageRecord]:
        for i in range(len(self.paths)):
            yield self[i]


# --------------------------------------------------------------------------- run
def _run_signature(args: argparse.Namespace, dataset: SegmentationDataset,
                   config: dict[str, Any] | None) -> dict[str, Any]:
    """What the per-image files depend on (not --limit, --protocol, --device, --quiet)."""
    cfg = dict(config or {})
    for key in ("device", "max_batch", "decode_batch"):  # execution only, results unchanged
        cfg.pop(key, None)
    return {
        "data": str(Path(args.data).resolve()),
        "layout": args.layout,
        "split": dataset.split if args.split is None else args.split,
        "ignore_index": dataset.ignore_index,
        "num_classes": dataset.num_classes,
        "model": args.model,
        "method_config": cfg,
    }


def signature_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """One ``key: old -> new`` line per differing setting; nested dicts (method_config) key by key."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            lines += signature_diff(a, b, f"{prefix}{key}.")
        else:
            lines.append(f"{prefix}{key}: {json.dumps(a)} in run.json, {json.dumps(b)} now")
    return lines


def _compare_signature(out: Path, signature: dict[str, Any]) -> None:
    """Refuse to mix runs: an existing ``run.json`` must match these settings (writes nothing)."""
    path = out / "run.json"
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is unreadable ({err}); delete it (the per-image records verify "
                         "themselves) or use another --out") from err
    diff = signature_diff(old, json.loads(json.dumps(signature)))
    if diff:
        raise ValueError(
            f"{out} holds per-image results of a different run; these settings differ:\n  "
            + "\n  ".join(diff) + "\nrerun with the same settings, use another --out, or delete it"
        )


def _write_signature(out: Path, signature: dict[str, Any]) -> None:
    """Write ``run.json`` (only once the settings have been validated)."""
    path = out / "run.json"
    if not path.exists():
        write_atomic_bytes(path, (json.dumps(signature, indent=2) + "\n").encode())


def _open_dataset(args: argparse.Namespace) -> SegmentationDataset:
    """The dataset of ``--data``/``--layout``; a missing folder or file is a ValueError saying which."""
    root = Path(args.data)
    if not root.is_dir():
        raise ValueError(f"--data {root}: dataset folder does not exist{' (it is a file)' if root.exists() else ''}; "
                         "pass the dataset root (folder layout: images/, labels/ and classes.txt)")
    try:
        return open_dataset(args.layout, args.data, split=args.split, ignore_index=args.ignore_index)
    except FileNotFoundError as err:
        raise ValueError(f"--data {root} (--layout {args.layout}): {err}") from err


def _pending(dataset: SegmentationDataset, share: Sequence[int], out: Path, settings: str,
             labeller: str | None) -> tuple[list[int], list[str]]:
    """Images of ``share`` whose cached files are missing or cannot be trusted, and one line per
    image whose existing cache is recomputed (unreadable, another image's, stale)."""
    todo, notes = [], []
    for i in share:
        sample = dataset[i]
        key = content_key(sample, settings)
        paths = [record_path(out, sample.image_id)]
        if labeller is not None:
            paths.append(openvocab_path(out, labeller, sample.image_id))
        problems = [pr for pr in (record_problem(p, key) for p in paths) if pr is not None]
        if problems:
            todo.append(i)
            stale = [pr for pr in problems if pr != "missing"]
            if stale:
                notes.append(f"recomputing {sample.image_id}: {stale[0]}")
    return todo, notes


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
                   openvocab: tuple[str, Any] | None = None) -> int:
    """Segment the images ``todo`` (this process's share that has no trusted cache) and cache each.

    ``openvocab`` = (labeller name, labeller): also label the masks with the
    dataset's class names and cache the result per image.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=share_size, initial=share_size - len(todo), desc=f"evaluate[{state.process_index}]",
               unit="img", disable=quiet, position=state.process_index, leave=True)
    try:
        for i in todo:
            sample = dataset[i]
            key = content_key(sample, settings)
            seg = segment_fn(sample.image)
            record = build_record(sample.image_id, seg, sample.label, dataset.num_classes,
                                  dataset.ignore_index, METHODS)
            maps = {m: np.asarray(segmentation_field(seg, METHOD_FIELDS[m])) for m in METHODS}
            for name, item in extra_method_items(seg).items():
                maps[name] = np.asarray(item["labels"])
            maps["gt"] = sample.label
            if openvocab is not None:
                name, labeller = openvocab
                res = labeller.label(sample.image, seg, list(dataset.class_names))
                dense = confusion_matrix(res.dense_class_map, np.asarray(sample.label), dataset.num_classes,
                                         dataset.ignore_index)
                buf = io.BytesIO()
                np.savez_compressed(buf, mask_classes=res.mask_classes.astype(np.int64), dense_confusion=dense,
                                    version=np.array(RECORD_VERSION), **{k: np.array(v) for k, v in key.items()})
                write_atomic_bytes(openvocab_path(out, name, sample.image_id), buf.getvalue())
            # the record last: its presence marks the image done for the mask protocols
            save_record(record_path(out, sample.image_id), record, maps, key)
            bar.update(1)
    finally:
        bar.close()
    return len(todo)


def merge_results(out: Path, dataset: SegmentationDataset, indices: Sequence[int],
                  protocols: Sequence[str], seed: int, run_info: dict[str, Any],
                  labeller: str | None = None, n_boot: int = 0, bootstrap_seed: int = 0,
                  level: float = 0.95) -> dict[str, Any]:
    """Run the protocols on the cached per-image records and write results.json, results.csv
    and per_class.csv.

    Every method the records hold is scored under every protocol in ``protocols``; with
    ``n_boot`` > 0 each mask protocol's mIoU and every difference between two methods get a
    paired percentile bootstrap interval over the images (``payload["intervals"]``, and
    ``miou_lo`` / ``miou_hi`` in the rows).
    """
    paths = [record_path(out, dataset.image_ids[i]) for i in indices]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} per-image result(s) missing, e.g. {missing[:3]}")
    records = RecordFiles(paths, [dataset.image_ids[i] for i in indices])
    first = records[0]
    results = []
    for protocol in protocols:
        if protocol == "openvocab":
            assert labeller is not None
            results.append(openvocab_result(out, dataset, indices, labeller))
        else:
            results.append(evaluate_records(records, protocol, dataset.num_classes, dataset.class_names,
                                            dataset.ignore_index, seed=seed))
    mask_protocols = [p for p in protocols if p in KNOWN_PROTOCOLS]
    intervals: dict[str, Any] = {}
    if n_boot > 0 and mask_protocols:
        intervals = bootstrap_protocols(records, dataset.num_classes, n_boot=n_boot, level=level,
                                        seed=bootstrap_seed, ignore_index=dataset.ignore_index,
                                        protocols=mask_protocols, cluster_seed=seed)
    rows = [row for res in results for row in summary_rows(res, intervals)]
    class_rows = [row for res in results for row in per_class_rows(res)]
    payload = {
        "rows": rows,
        "protocols": results,
        "intervals": intervals,
        "config": {
            **run_info,
            "class_names": list(dataset.class_names),
            "num_images": len(indices),
            "image_ids": [dataset.image_ids[i] for i in indices],
            "methods": list(first.methods),
            "segmentation_config": first.meta.get("config"),
            "segmentation_model": first.meta.get("model"),
            "protocol_seed": seed,
            "bootstrap": {"resamples": n_boot, "seed": bootstrap_seed, "level": level, "unit": "image",
                          "paired": True},
        },
    }
    text = json.dumps(_json_safe(payload), indent=2) + "\n"
    write_atomic_bytes(out / "results.json", text.encode())
    cfg = payload["config"]["segmentation_config"] or {}
    run_columns = {"model": run_info["model"], "dataset": run_info["data"], "layout": run_info["layout"],
                   "num_clusters": cfg.get("num_clusters", ""), "resolution": cfg.get("resolution", "")}
    fields = ["protocol", "method", "miou", "miou_lo", "miou_hi", "pixel_accuracy", "num_classes_present",
              "num_images", "locality", *run_columns]
    write_atomic_bytes(out / "results.csv", _csv_text(fields, rows, run_columns))
    write_atomic_bytes(out / "per_class.csv",
                       _csv_text(["protocol", "method", "class_id", "class", "iou"], class_rows, {}))
    return payload


def _csv_text(fields: Sequence[str], rows: Sequence[dict[str, Any]], extra: dict[str, Any]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**{k: _csv_value(v) for k, v in row.items()}, **extra})
    return buf.getvalue().encode()


def _csv_value(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.4f}" if isinstance(v, float) else v


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    return obj


def run(args: argparse.Namespace, segment_fn: SegmentFn | None = None) -> int:
    """Run ``emerdiff evaluate``; returns the exit code.

    Every setting that can be checked without the model (values, resolution
    against the model's config files, --out, the dataset) is checked before the
    model is loaded or any file is written; ``run.json`` is written only once the
    model has accepted the settings.

    Args:
        args: parsed arguments (see :func:`add_parser`).
        segment_fn: ``image -> segmentation`` used instead of loading
            ``args.model`` (tests inject a fake; its settings are not checked).
    """
    from emerdiff.cli.options import config_from_args
    from emerdiff.sd.loading import model_geometry

    out = Path(args.out)
    check_output_dir(out)
    state = _partial_state(args.device)
    device = args.device or _default_device(state)
    config = None
    if segment_fn is None:
        cfg = config_from_args(args)
        cfg.check_for_segmentation()
        geometry = model_geometry(args.model)
        if geometry is not None:
            cfg.check_resolution(*geometry)
        config = cfg.to_dict()
    dataset = _open_dataset(args)
    n = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    indices = list(range(n))
    protocols = list(PROTOCOLS) if args.protocol == "all" else [args.protocol]
    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap {args.bootstrap}: give a number of resamples >= 0 (0 disables)")
    labeller_name = getattr(args, "labeller", "unet") if "openvocab" in protocols else None

    signature = _run_signature(args, dataset, config)
    _compare_signature(out, signature)
    settings = settings_hash(signature)
    if state.is_main_process:  # before any process writes: the others' temp files are not there yet
        folders = [out, out / "per_image", *(out.glob("openvocab_*") if out.is_dir() else [])]
        for leftover in clean_stale_temps(folders):
            print(f"removed {leftover}, a temp file left by an interrupted run", file=sys.stderr)
    state.wait_for_everyone()

    share = indices[state.process_index::state.num_processes]
    todo, notes = _pending(dataset, share, out, settings, labeller_name)
    for note in notes:
        print(note, file=sys.stderr)
    model = None
    if todo and segment_fn is None:  # load the model only when there is work left
        segment_fn, _, model = _default_segmenter(args, device)  # validates the config against it
    openvocab = (labeller_name, _labeller(args, model, device)) if todo and labeller_name else None
    if state.is_main_process:
        _write_signature(out, signature)
    done = 0
    if todo and segment_fn is not None:
        done = _segment_share(state, dataset, todo, len(share), out, segment_fn, args.quiet, settings, openvocab)
    state.wait_for_everyone()

    if state.is_main_process:
        run_info = {**signature, "protocol": args.protocol, "limit": args.limit,
                    "num_processes": state.num_processes}
        payload = merge_results(out, dataset, indices, protocols, args.seed, run_info, labeller_name,
                                n_boot=args.bootstrap, bootstrap_seed=args.bootstrap_seed)
        if not args.quiet:
            print(f"segmented {done} new image(s) here; {n} evaluated -> {out / 'results.json'}",
                  file=sys.stderr)
            for row in payload["rows"]:
                span = "" if row["miou_lo"] is None else f" [{row['miou_lo']:6.2f}, {row['miou_hi']:6.2f}]"
                print(f"  {row['protocol']:<19} {row['method']:<17} mIoU {row['miou']:6.2f}{span}  "
                      f"pixel acc {row['pixel_accuracy']:6.2f}", file=sys.stderr)
    state.wait_for_everyone()
    return 0


# --------------------------------------------------------------------------- from Python
# Arguments of run_config given by name (not through **options); the parser's own --help aside.
_RUN_CONFIG_NAMED = frozenset({"data", "out", "model", "protocol", "bootstrap", "device", "dtype", "limit",
                               "quiet", "help"})


def _json_value(field: str, value: Any) -> str:
    """One ``--set`` value: JSON (numpy scalars and arrays as Python numbers and lists)."""
    def plain(obj: Any) -> Any:
        if isinstance(obj, (np.generic, np.ndarray)):
            return obj.tolist()
        raise TypeError(f"{type(obj).__name__} is not JSON")

    try:
        return json.dumps(value, default=plain)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config field {field}={value!r} cannot be passed to `emerdiff evaluate` ({err}); "
                         "give numbers, strings, booleans, None, lists or dicts") from err


def config_argv(config: Any) -> list[str]:
    """``--set FIELD=JSON`` for every field of ``config`` (and ``--seed`` when it names the seed).

    ``config``: an :class:`~emerdiff.config.EmerDiffConfig` (every field given outright, so the run
    evaluates exactly that config) or a mapping of some of its fields (the rest: the model's sizes
    and the paper's values, as on the command line). A field name that is not an EmerDiffConfig
    field is a ValueError listing the valid ones. ``seed`` is also given as ``--seed``, which seeds
    the protocols' dataset k-means as well, as ``emerdiff evaluate --seed N`` does.
    """
    from emerdiff.config import EmerDiffConfig

    if isinstance(config, EmerDiffConfig):
        fields = config.to_dict()
    elif isinstance(config, Mapping):
        fields = dict(config)
        EmerDiffConfig().replace(**fields)  # unknown names: a ValueError listing the valid fields
    else:
        raise TypeError(f"config must be an EmerDiffConfig or a dict of its fields, got {type(config).__name__}")
    argv = [arg for field, value in fields.items() for arg in ("--set", f"{field}={_json_value(field, value)}")]
    if "seed" in fields:
        argv += ["--seed", str(fields["seed"])]
    return argv


def run_config(data: str | os.PathLike, out: str | os.PathLike, model: str | os.PathLike, config: Any, *,
               protocol: str = "all", bootstrap: int = 1000, device: str | None = None, dtype: str | None = None,
               limit: int | None = None, quiet: bool = False, **options: Any) -> dict[str, Any]:
    """Run ``emerdiff evaluate`` on ``config`` from Python; returns the run's ``results.json``.

    The arguments become the command's own argv (``--set FIELD=JSON`` for every config field,
    :func:`config_argv`), parsed by :func:`build_parser` and run by :func:`run`, so this is
    exactly the command line ``emerdiff evaluate --data DATA --out OUT --model MODEL ...``: the
    same cache (a rerun with the same settings segments nothing), the same checks, the same files.

    Args:
        data: dataset root (``--data``).
        out: output folder (``--out``).
        model: ``'reference'``, ``'tiny'``, a diffusers folder or hub id (``--model``).
        config: an :class:`~emerdiff.config.EmerDiffConfig` (the run evaluates exactly it) or a
            dict of some of its fields (the rest sized for the model, as on the command line).
        protocol, bootstrap, device, dtype, limit, quiet: the options of the same names.
        **options: any other option of the command by its Python name, e.g. ``layout="voc"``,
            ``split="val"``, ``bootstrap_seed=1``, ``labeller="clip"``; ``True`` gives a bare flag.
            Method settings (``k``, ``resolution``, ...) belong in ``config``.

    Returns:
        The ``results.json`` payload: ``rows`` (protocol x method mIoU with intervals),
        ``protocols``, ``intervals`` and ``config`` (the run's settings).

    Raises:
        ValueError: an unknown config field or option, or a value the command refuses (the
            message names it).
    """
    from emerdiff.cli.options import add_config_args

    parser = build_parser()

    def refuse(message: str) -> None:  # argparse would print and exit; a library call raises
        raise ValueError(f"run_config: {message}")

    parser.error = refuse  # type: ignore[method-assign]
    method_flags = argparse.ArgumentParser(add_help=False)
    add_config_args(method_flags)
    method_dests = {a.dest for a in method_flags._actions}
    flags = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in _RUN_CONFIG_NAMED}
    argv = ["--data", str(data), "--out", str(out), "--model", str(model), "--protocol", protocol,
            "--bootstrap", str(bootstrap)]
    argv += ["--device", device] if device else []
    argv += ["--dtype", dtype] if dtype else []
    argv += ["--limit", str(limit)] if limit is not None else []
    argv += ["--quiet"] if quiet else []
    for name, value in options.items():
        if name in method_dests:
            raise ValueError(f"run_config: {name}={value!r} is a method setting; give the EmerDiffConfig field in "
                             "config instead (e.g. config={'num_clusters': 8})")
        if name not in flags:
            valid = sorted(set(flags) - method_dests)
            raise ValueError(f"run_config: unknown option {name!r}; the options of `emerdiff evaluate` besides the "
                             f"named arguments: {valid}")
        flag = flags[name].option_strings[-1]
        if flags[name].nargs == 0:  # a switch
            argv += [flag] if value else []
        elif value is not None:
            argv += [flag, str(value)]
    argv += config_argv(config)
    run(parser.parse_args(argv))
    return json.loads((Path(out) / "results.json").read_text())


# --------------------------------------------------------------------------- compare
def add_compare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``compare`` sub-command (two ``evaluate`` output folders side by side)."""
    p = subparsers.add_parser(
        "compare", help="two evaluate output folders side by side: mIoU, difference, paired interval",
        description="Recompute every protocol x method mIoU of two `emerdiff evaluate` output folders "
                    "on the images both hold (from their cached per-image records, no segmentation) "
                    "and print A, B and A - B, each with a 95 % bootstrap interval over those images "
                    "(paired: both runs resampled alike). The runs must score the same dataset (same "
                    "class list and, image by image, the same labels).")
    p.add_argument("run_a", metavar="RUN_A", help="output folder of one `emerdiff evaluate` run")
    p.add_argument("run_b", metavar="RUN_B", help="output folder of another run")
    p.add_argument("--protocol", default="all", choices=[*KNOWN_PROTOCOLS, "all"],
                   help="protocol(s) to compare (default: all = every protocol but the majority oracle)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="resamples of the shared images; 0: values only (default: 1000)")
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the resampling (default: 0)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the comparison as JSON (default: no)")
    p.set_defaults(func=compare_command)
    return p


def _run_summary(folder: Path) -> dict[str, Any]:
    """``config`` of a finished run's results.json; a ValueError saying what is missing otherwise."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder; pass the --out folder of an `emerdiff evaluate` run")
    path = folder / "results.json"
    if not path.exists():
        raise ValueError(f"{folder} has no results.json: not an `emerdiff evaluate` output folder, or its run "
                         f"did not finish; run `emerdiff evaluate ... --out {folder}` to completion first")
    try:
        return json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path} is unreadable ({err}); rerun `emerdiff evaluate` into {folder}") from err


def _run_images(folder: Path, config: dict[str, Any]) -> dict[str, tuple[Path, str]]:
    """image id -> (record path, labels hash) of the images a run evaluated."""
    ids = config.get("image_ids")
    if ids is None:  # results.json of an older version: every record in the cache
        paths = sorted((folder / "per_image").glob("*.npz"))
    else:
        paths = [record_path(folder, i) for i in ids]
    out = {}
    for path in paths:
        if not path.exists():
            raise ValueError(f"{path} is missing; rerun `emerdiff evaluate` into {folder} to restore it")
        try:
            key = _stored_key(path)
        except RecordError as err:
            raise ValueError(f"{err}; rerun `emerdiff evaluate` into {folder} to recompute it") from err
        out[key.get("image_id") or load_record(path).image_id] = (path, key.get("labels_sha256", ""))
    return out


def compare_runs(run_a: str | Path, run_b: str | Path, protocols: Sequence[str] = PROTOCOLS,
                 n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Compare two ``evaluate`` output folders on the images both evaluated.

    Checks that both score the same classes (names, ignore value) and that every shared image
    has the same labels in both; then :func:`emerdiff.evaluation.metrics.compare_records`. Each run's
    dataset k-means uses its own protocol seed. Returns ``{"a", "b", "shared_images",
    "only_a", "only_b", "rows", "bootstrap"}``.
    """
    a, b = Path(run_a), Path(run_b)
    cfg_a, cfg_b = _run_summary(a), _run_summary(b)
    for key in ("class_names", "ignore_index"):
        if cfg_a.get(key) != cfg_b.get(key):
            raise ValueError(f"{a} and {b} score different datasets: {key} {cfg_a.get(key)} vs {cfg_b.get(key)}; "
                             "compare runs of the same dataset and class list")
    img_a, img_b = _run_images(a, cfg_a), _run_images(b, cfg_b)
    shared = [i for i in img_a if i in img_b]
    if not shared:
        raise ValueError(f"{a} ({len(img_a)} images, e.g. {list(img_a)[:2]}) and {b} ({len(img_b)} images, e.g. "
                         f"{list(img_b)[:2]}) share no images; compare runs over the same dataset")
    relabelled = [i for i in shared if img_a[i][1] != img_b[i][1]]
    if relabelled:
        raise ValueError(f"{len(relabelled)} shared image(s) have different labels in {a} and {b}, e.g. "
                         f"{relabelled[:3]}; the runs used different ground truth (rerun one on the other's data)")
    recs_a = [load_record(img_a[i][0], i) for i in shared]
    recs_b = [load_record(img_b[i][0], i) for i in shared]
    rows = compare_records(recs_a, recs_b, len(cfg_a["class_names"]), protocols, n_boot, level, seed,
                           int(cfg_a.get("ignore_index", 255)),
                           (int(cfg_a.get("protocol_seed", 0)), int(cfg_b.get("protocol_seed", 0))))
    describe = {k: {"folder": str(p), "model": c.get("model"), "num_images": len(imgs)}
                for k, p, c, imgs in (("a", a, cfg_a, img_a), ("b", b, cfg_b, img_b))}
    return {**describe, "shared_images": len(shared),
            "only_a": [i for i in img_a if i not in img_b], "only_b": [i for i in img_b if i not in img_a],
            "rows": rows, "bootstrap": {"resamples": n_boot, "seed": seed, "level": level, "paired": True}}


def comparison_table(result: dict[str, Any]) -> str:
    """Plain-text table of :func:`compare_runs`: A, B and A - B per protocol x method; ``*`` marks a
    difference whose interval excludes 0."""
    def cell(v: dict[str, float] | None, sign: str = "") -> str:
        if v is None or v["value"] is None or not math.isfinite(v["value"]):
            return "-"
        text = f"{v['value']:{sign}.1f}"
        if math.isfinite(v["lo"]):
            text += f" [{v['lo']:{sign}.1f}, {v['hi']:{sign}.1f}]"
        return text

    level = round(result["bootstrap"]["level"] * 100)
    lines = [f"A: {result['a']['folder']} (model {result['a']['model']}, {result['a']['num_images']} images)",
             f"B: {result['b']['folder']} (model {result['b']['model']}, {result['b']['num_images']} images)",
             f"{result['shared_images']} shared images; mIoU recomputed on them; [{level} % paired bootstrap "
             f"interval, {result['bootstrap']['resamples']} resamples, seed {result['bootstrap']['seed']}]"]
    for side in ("a", "b"):
        if result[f"only_{side}"]:
            lines.append(f"left out: {len(result[f'only_{side}'])} image(s) only in {side.upper()}")
    header = ("protocol", "method", "A mIoU", "B mIoU", "A - B")
    table = [header]
    for row in result["rows"]:
        diff = cell(row["a-b"], "+")
        d = row["a-b"]
        if d is not None and math.isfinite(d["lo"]) and (d["lo"] > 0 or d["hi"] < 0):
            diff += " *"
        table.append((row["protocol"], row["method"], cell(row["a"]), cell(row["b"]), diff))
    widths = [max(len(r[j]) for r in table) for j in range(len(header))]
    lines.append("")
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.append("* the interval of A - B excludes 0")
    return "\n".join(lines) + "\n"


def compare_command(args: argparse.Namespace) -> int:
    """Run ``emerdiff compare RUN_A RUN_B``: print the table (and write ``--json``)."""
    if args.bootstrap < 0:
        raise ValueError(f"--bootstrap {args.bootstrap}: give a number of resamples >= 0 (0: values only)")
    protocols = list(PROTOCOLS) if args.protocol == "all" else [args.protocol]
    result = compare_runs(args.run_a, args.run_b, protocols, args.bootstrap, args.bootstrap_seed)
    print(comparison_table(result), end="")
    if args.json:
        write_atomic_bytes(Path(args.json), (json.dumps(_json_safe(result), indent=2) + "\n").encode())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m emerdiff.evaluation.runner``."""
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
