"""`emerdiff evaluate`: segment a labelled dataset and score it with the paper's protocols.

Flow (single process, or any number of processes under ``accelerate launch``):

1. every process takes its share of the images (index striding by
   ``accelerate.PartialState``), segments each image not yet done and writes
   ``OUT/per_image/<id>.npz`` atomically (temp file + ``os.replace``), so a
   killed run resumes where it stopped;
2. ``wait_for_everyone``; the main process loads all per-image files, runs the
   dataset-level protocol(s) (k-means + Hungarian, or concept embeddings) for
   EmerDiff and the nearest / bilinear baselines of the same low-res masks,
   and writes ``OUT/results.json`` and ``OUT/results.csv``.

``OUT/run.json`` pins what the cached files were computed with (dataset,
model, method config); a rerun with a different setting into the same OUT is
refused instead of silently mixing results.

Run standalone as ``python -m emerdiff.evaluation_run ...`` (same arguments
as ``emerdiff evaluate``). Several processes:
``accelerate launch --num_processes 4 -m emerdiff.evaluation_run --data D --out O``
(one GPU each). On a CPU-only machine add ``--multi_gpu``: accelerate's
``--cpu`` flag starts one process unless an MPI hostfile is given, while the
torchrun-based launcher starts N processes, which then use CPU + gloo here.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .datasets import LAYOUTS, SegmentationDataset, open_dataset
from .evaluate import (METHOD_FIELDS, METHODS, PROTOCOLS, ImageRecord, build_record, confusion_matrix,
                       evaluate_records, scores, segmentation_field, summary_rows)

# Test-only hook: "path/to/file.py:factory"; factory(args) returns segment_fn.
# Lets a subprocess (e.g. under `accelerate launch`) run without a diffusion model.
TEST_SEGMENTER_ENV = "EMERDIFF_TEST_SEGMENTER"
RECORD_VERSION = 1
SegmentFn = Callable[[Any], Any]


# --------------------------------------------------------------------------- arguments
def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset root folder")
    p.add_argument("--layout", default="folder", choices=sorted(LAYOUTS),
                   help="folder: images/ + labels/ + classes.txt; or a benchmark layout (default: folder)")
    p.add_argument("--split", default=None,
                   help="benchmark split (default: its validation split); folder layout: a sub-folder")
    p.add_argument("--ignore-index", type=int, default=None,
                   help="void label value of the folder layout (default 255)")
    p.add_argument("--protocol", default="hungarian", choices=[*PROTOCOLS, "both", "openvocab"],
                   help="hungarian: dataset k-means + Hungarian matching; concept: nearest GT "
                        "concept embedding, no matching; both; openvocab: class names from the "
                        "dataset's class list by an open-vocabulary labeller, alone and pooled in "
                        "EmerDiff masks, no matching (default: hungarian)")
    p.add_argument("--labeller", choices=["clip", "unet"], default="unet",
                   help="openvocab: clip (MaskCLIP features) or unet (the diffusion model's own "
                        "cross-attention) (default: unet)")
    p.add_argument("--clip-model", default="openai/clip-vit-base-patch16",
                   help="openvocab with --labeller clip: CLIP hub id or folder")
    p.add_argument("--model", default="tiny", help="diffusers folder, hub id, 'tiny' or 'reference'")
    p.add_argument("--out", required=True, help="output folder (per_image/, results.json, results.csv)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--k", type=int, default=None, help="k-means segments per image K (default: config's, 25)")
    p.add_argument("--resolution", type=int, default=None, help="model input size (default: config's, 512)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, ... (default: the process's accelerate device)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--seed", type=int, default=0, help="method seed and protocol k-means seed")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other EmerDiffConfig field, JSON value (repeatable), e.g. --set blur_sigma=2")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``evaluate`` sub-command on an argparse subparsers object."""
    p = subparsers.add_parser(
        "evaluate", help="score a labelled dataset (mIoU, Hungarian or concept protocol)",
        description="Segment every image of a labelled dataset, cache per-image results in "
                    "OUT/per_image (resumable), and write OUT/results.json and OUT/results.csv "
                    "with one row per method (emerdiff, nearest, bilinear). Runs under "
                    "`accelerate launch` to share the images between processes/GPUs.")
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def build_parser() -> argparse.ArgumentParser:
    """Stand-alone parser (``python -m emerdiff.evaluation_run``)."""
    p = argparse.ArgumentParser(prog="emerdiff evaluate", description=__doc__.split("\n")[0])
    _add_arguments(p)
    return p


def _parse_sets(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value  # bare strings such as layer names
    return out


def method_config(args: argparse.Namespace, device: str | None) -> Any:
    """The EmerDiffConfig of this run (fields from --k, --resolution, --seed, --set)."""
    from .config import EmerDiffConfig

    fields = _parse_sets(getattr(args, "set", []) or [])
    if args.k is not None:
        fields["num_clusters"] = args.k
    if args.resolution is not None:
        fields["resolution"] = args.resolution
    fields.setdefault("seed", args.seed)
    fields["device"] = device
    fields["dtype"] = args.dtype
    return EmerDiffConfig().replace(**fields)


def _default_segmenter(args: argparse.Namespace, device: str | None) -> tuple[SegmentFn, dict, Any]:
    """Load the model once and return its ``segment``, the config dict and the model."""
    from . import EmerDiff, load_pipeline

    config = method_config(args, device)
    model = load_pipeline(args.model, device=device, dtype=args.dtype)
    segmenter = EmerDiff(model, config)
    return (lambda image: segmenter.segment(image, progress=False)), config.to_dict(), model


def _labeller(args: argparse.Namespace, model: Any, device: str | None) -> Any:
    """The open-vocabulary labeller of ``--labeller`` (the unet one reuses the diffusion model)."""
    from .openvocab import CLIPMaskLabeller, CrossAttentionLabeller

    if args.labeller == "clip":
        return CLIPMaskLabeller(args.clip_model, device=device)
    if model is None:
        from . import load_pipeline

        model = load_pipeline(args.model, device=device, dtype=args.dtype)
    cfg = method_config(args, device)
    return CrossAttentionLabeller(model, resolution=cfg.resolution, seed=cfg.seed)


def openvocab_path(out: Path, labeller: str, image_id: str) -> Path:
    """Per-image open-vocabulary result: mask classes and the labeller-alone confusion."""
    return out / f"openvocab_{labeller}" / f"{_safe_id(image_id)}.npz"


def openvocab_rows(out: Path, dataset: SegmentationDataset, indices: Sequence[int], labeller: str,
                   ) -> list[dict[str, Any]]:
    """Dataset-level mIoU of the labeller alone and of the labeller pooled in EmerDiff masks."""
    c = dataset.num_classes
    alone = np.zeros((c, c), np.int64)
    masked = np.zeros((c, c), np.int64)
    for i in indices:
        image_id = dataset.image_ids[i]
        counts = load_record(record_path(out, image_id)).counts["emerdiff"]  # (K, C)
        with np.load(openvocab_path(out, labeller, image_id)) as z:
            alone += z["dense_confusion"]
            classes = z["mask_classes"]
        for m, cls in enumerate(classes):  # every pixel of mask m takes class cls
            masked[:, cls] += counts[m]
    rows = []
    for method, conf in ((labeller, alone), (f"{labeller}+emerdiff", masked)):
        sc = scores(conf, dataset.class_names)
        rows.append({"protocol": "openvocab", "method": method, "miou": sc["miou"],
                     "pixel_accuracy": sc["pixel_accuracy"], "num_classes_present": sc["num_classes_present"],
                     "num_images": len(indices), "locality": None})
    return rows


def _test_segmenter(spec: str, args: argparse.Namespace) -> SegmentFn:
    path, _, name = spec.rpartition(":")
    module_spec = importlib.util.spec_from_file_location("_emerdiff_test_segmenter", path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"{TEST_SEGMENTER_ENV}={spec!r}: cannot import {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, name)(args)


# --------------------------------------------------------------------------- per-image cache
def _safe_id(image_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in image_id)


def record_path(out: Path, image_id: str) -> Path:
    """Where the per-image record of ``image_id`` lives."""
    return out / "per_image" / f"{_safe_id(image_id)}.npz"


def write_atomic_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then ``os.replace``: never a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_record(path: Path, record: ImageRecord, maps: dict[str, np.ndarray] | None = None) -> None:
    """Store a record (+ optional full-size label maps and GT for inspection) as one .npz."""
    arrays: dict[str, np.ndarray] = {
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
    if record.locality is not None:
        arrays["locality"] = np.asarray(record.locality, dtype=np.float64)
    for name, value in (maps or {}).items():
        # mask ids and class ids are small: int32 keeps any ignore index exact
        arrays[f"map_{name}"] = np.asarray(value).astype(np.int32)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_atomic_bytes(path, buf.getvalue())


def load_record(path: Path) -> ImageRecord:
    """Inverse of :func:`save_record` (label maps are not loaded: the protocols do not need them)."""
    with np.load(path, allow_pickle=False) as z:
        counts = {k[len("counts_"):]: z[k] for k in z.files if k.startswith("counts_")}
        return ImageRecord(
            image_id=str(z["image_id"]),
            counts=counts,
            mask_embeddings=z["mask_embeddings"],
            query_features=z["query_features"],
            lowres_labels=z["lowres_labels"],
            lowres_gt=z["lowres_gt"],
            locality=z["locality"] if "locality" in z.files else None,
            meta=json.loads(str(z["meta"])),
        )


class RecordFiles(Sequence[ImageRecord]):
    """Lazy sequence of records on disk: the protocols read it twice without holding it all."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> ImageRecord:  # type: ignore[override]
        return load_record(self.paths[i])

    def __iter__(self) -> Iterator[ImageRecord]:
        for p in self.paths:
            yield load_record(p)


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


def _check_signature(out: Path, signature: dict[str, Any], is_main: bool) -> None:
    path = out / "run.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(signature)):
            diff = sorted(k for k in set(old) | set(signature) if old.get(k) != signature.get(k))
            raise ValueError(
                f"{out} holds per-image results of a different run (differs in {diff}); "
                "use another --out or delete it"
            )
    elif is_main:
        write_atomic_bytes(path, (json.dumps(signature, indent=2) + "\n").encode())


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


def _segment_share(state: Any, dataset: SegmentationDataset, indices: Sequence[int], out: Path,
                   segment_fn: SegmentFn, quiet: bool, openvocab: tuple[str, Any] | None = None) -> int:
    """Segment this process's share of ``indices`` that has no per-image file yet.

    ``openvocab`` = (labeller name, labeller): also label the masks with the
    dataset's class names and cache the result per image.
    """
    from tqdm.auto import tqdm

    share = list(indices)[state.process_index::state.num_processes]

    def missing(i: int) -> bool:
        image_id = dataset.image_ids[i]
        return not record_path(out, image_id).exists() or (
            openvocab is not None and not openvocab_path(out, openvocab[0], image_id).exists())

    todo = [i for i in share if missing(i)]
    bar = tqdm(total=len(share), initial=len(share) - len(todo), desc=f"evaluate[{state.process_index}]",
               unit="img", disable=quiet, position=state.process_index, leave=True)
    try:
        for i in todo:
            sample = dataset[i]
            seg = segment_fn(sample.image)
            record = build_record(sample.image_id, seg, sample.label, dataset.num_classes,
                                  dataset.ignore_index, METHODS)
            maps = {m: np.asarray(segmentation_field(seg, METHOD_FIELDS[m])) for m in METHODS}
            maps["gt"] = sample.label
            if openvocab is not None:
                name, labeller = openvocab
                res = labeller.label(sample.image, seg, list(dataset.class_names))
                dense = confusion_matrix(res.dense_class_map, np.asarray(sample.label), dataset.num_classes,
                                         dataset.ignore_index)
                buf = io.BytesIO()
                np.savez_compressed(buf, mask_classes=res.mask_classes.astype(np.int64), dense_confusion=dense)
                write_atomic_bytes(openvocab_path(out, name, sample.image_id), buf.getvalue())
            # the record last: its presence marks the image done for the mask protocols
            save_record(record_path(out, sample.image_id), record, maps)
            bar.update(1)
    finally:
        bar.close()
    return len(todo)


def merge_results(out: Path, dataset: SegmentationDataset, indices: Sequence[int],
                  protocols: Sequence[str], seed: int, run_info: dict[str, Any],
                  labeller: str | None = None) -> dict[str, Any]:
    """Run the protocols on the cached per-image records and write results.json / .csv."""
    paths = [record_path(out, dataset.image_ids[i]) for i in indices]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} per-image result(s) missing, e.g. {missing[:3]}")
    records = RecordFiles(paths)
    first = records[0]
    results, rows = [], []
    for protocol in protocols:
        if protocol == "openvocab":
            assert labeller is not None
            rows.extend(openvocab_rows(out, dataset, indices, labeller))
            continue
        res = evaluate_records(records, protocol, dataset.num_classes, dataset.class_names,
                               dataset.ignore_index, METHODS, seed=seed)
        results.append(res)
        rows.extend(summary_rows(res))
    payload = {
        "rows": rows,
        "protocols": results,
        "config": {
            **run_info,
            "class_names": list(dataset.class_names),
            "num_images": len(indices),
            "segmentation_config": first.meta.get("config"),
            "segmentation_model": first.meta.get("model"),
            "protocol_seed": seed,
        },
    }
    text = json.dumps(_json_safe(payload), indent=2) + "\n"
    write_atomic_bytes(out / "results.json", text.encode())
    buf = io.StringIO()
    fields = ["protocol", "method", "miou", "pixel_accuracy", "num_classes_present", "num_images",
              "locality", "model", "dataset", "layout", "num_clusters", "resolution"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    cfg = payload["config"]["segmentation_config"] or {}
    for row in rows:
        writer.writerow({**{k: _csv_value(v) for k, v in row.items()},
                         "model": run_info["model"], "dataset": run_info["data"],
                         "layout": run_info["layout"], "num_clusters": cfg.get("num_clusters", ""),
                         "resolution": cfg.get("resolution", "")})
    write_atomic_bytes(out / "results.csv", buf.getvalue().encode())
    return payload


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

    Args:
        args: parsed arguments (see :func:`add_parser`).
        segment_fn: ``image -> segmentation`` used instead of loading
            ``args.model`` (tests inject a fake). The environment variable
            ``EMERDIFF_TEST_SEGMENTER=file.py:factory`` does the same for
            subprocesses (test-only).
    """
    state = _partial_state(args.device)
    out = Path(args.out)
    dataset = open_dataset(args.layout, args.data, split=args.split, ignore_index=args.ignore_index)
    n = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    indices = list(range(n))
    protocols = list(PROTOCOLS) if args.protocol == "both" else [args.protocol]
    labeller_name = getattr(args, "labeller", "unet") if "openvocab" in protocols else None
    device = args.device or _default_device(state)

    hook = os.environ.get(TEST_SEGMENTER_ENV)
    if segment_fn is None and hook:
        segment_fn = _test_segmenter(hook, args)
    config = None if segment_fn is not None else method_config(args, device).to_dict()
    signature = _run_signature(args, dataset, config)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        _check_signature(out, signature, True)
    state.wait_for_everyone()
    if not state.is_main_process:
        _check_signature(out, signature, False)

    share = indices[state.process_index::state.num_processes]
    pending = [i for i in share if not record_path(out, dataset.image_ids[i]).exists()
               or (labeller_name is not None and not openvocab_path(out, labeller_name, dataset.image_ids[i]).exists())]
    model = None
    if pending and segment_fn is None:  # load the model only when there is work left
        segment_fn, _, model = _default_segmenter(args, device)
    openvocab = (labeller_name, _labeller(args, model, device)) if pending and labeller_name else None
    if segment_fn is not None:
        done = _segment_share(state, dataset, indices, out, segment_fn, args.quiet, openvocab)
    else:
        done = 0
    state.wait_for_everyone()

    if state.is_main_process:
        run_info = {**signature, "protocol": args.protocol, "limit": args.limit,
                    "num_processes": state.num_processes}
        payload = merge_results(out, dataset, indices, protocols, args.seed, run_info, labeller_name)
        if not args.quiet:
            print(f"segmented {done} new image(s) here; {n} evaluated -> {out / 'results.json'}",
                  file=sys.stderr)
            for row in payload["rows"]:
                print(f"  {row['protocol']:<9} {row['method']:<9} mIoU {row['miou']:6.2f}  "
                      f"pixel acc {row['pixel_accuracy']:6.2f}", file=sys.stderr)
    state.wait_for_everyone()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m emerdiff.evaluation_run``."""
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
