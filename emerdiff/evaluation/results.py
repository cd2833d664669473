"""An evaluate run's results: score the cached per-image records and write the result files.

Split from :mod:`emerdiff.evaluation.runner` (issue 24) so the runner holds the run's flow only.
:func:`merge_results` runs the protocols (and the open-vocabulary scores, :func:`openvocab_result`)
on the records of ``OUT/per_image`` with their bootstrap intervals and writes ``OUT/results.json``,
``OUT/results.csv`` and ``OUT/per_class.csv``; :func:`boundary_lines` is the printed table's
boundary block, :func:`json_safe` the strict-JSON form every results file is written in.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emerdiff.evaluation.bootstrap import bootstrap_weights, boundary_intervals, summarize_draws
from emerdiff.evaluation.boundary import BoundaryMetrics
from emerdiff.evaluation.colour_edges import colour_edge_split
from emerdiff.evaluation.datasets import SegmentationDataset
from emerdiff.evaluation.metrics import miou_rows, scores
from emerdiff.evaluation.protocols import (
    KNOWN_PROTOCOLS,
    mean_locality,
    per_class_rows,
    protocol_boundary_totals,
    protocol_result,
    summary_rows,
)
from emerdiff.evaluation.records import MapFiles, RecordFiles, load_record, openvocab_path, record_path
from emerdiff.files import write_atomic_bytes


def openvocab_result(out: Path, dataset: SegmentationDataset, indices: Sequence[int], labeller: str,
                     ) -> dict[str, Any]:
    """Dataset-level scores of the labeller alone and of the labeller pooled in EmerDiff masks
    (a protocol result, as :func:`emerdiff.evaluation.protocols.evaluate_records` returns)."""
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


def merge_results(out: Path, dataset: SegmentationDataset, indices: Sequence[int],
                  protocols: Sequence[str], seed: int, run_info: dict[str, Any],
                  labeller: str | None = None, n_boot: int = 0, bootstrap_seed: int = 0,
                  level: float = 0.95, failed: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the protocols on the cached per-image records and write results.json, results.csv
    and per_class.csv.

    Every method the records hold is scored under every protocol in ``protocols``; with
    ``n_boot`` > 0 each mask protocol's mIoU and every difference between two methods get a
    paired percentile bootstrap interval over the images (``payload["intervals"]``, and
    ``miou_lo`` / ``miou_hi`` in the rows). An interval that cannot carry meaning (fewer than 2
    images, zero spread: :func:`emerdiff.evaluation.bootstrap.interval`) is absent: its row has
    ``interval_note`` (a results.csv column then), and ``payload["notes"]`` lists each.
    ``failed``: image id -> error of the images that could not be segmented (left out of
    ``indices``; recorded as ``config["failed_images"]``).
    """
    paths = [record_path(out, dataset.image_ids[i]) for i in indices]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} per-image result(s) missing, e.g. {missing[:3]}")
    records = RecordFiles(paths, [dataset.image_ids[i] for i in indices])
    first = records[0]
    mask_protocols = [p for p in protocols if p in KNOWN_PROTOCOLS]
    scored: dict[str, dict[str, Any]] = {}
    intervals: dict[str, Any] = {}
    edges: dict[str, Any] = {}  # boundary metrics' intervals: {protocol: {metric: {method: interval}}}
    colour_split: dict[str, Any] | None = None
    metrics = BoundaryMetrics(ignore_index=dataset.ignore_index)
    if mask_protocols:
        # row 0 of the weights is every image once (the protocols' values), the rest the resamples
        weights = bootstrap_weights(len(records), max(n_boot, 0), bootstrap_seed)
        totals, info, boundary = protocol_boundary_totals(
            records, MapFiles(paths, records.image_ids), dataset.num_classes, weights, mask_protocols,
            ignore_index=dataset.ignore_index, seed=seed, metrics=metrics)
        locality = mean_locality(records)
        scored = {p: protocol_result(p, totals[p], info[p], dataset.class_names, locality, boundary=boundary[p],
                                     metrics=metrics) for p in mask_protocols}
        if n_boot > 0:
            intervals = {p: summarize_draws({m: miou_rows(t) for m, t in totals[p].items()}, level, len(records))
                         for p in mask_protocols}
            edges = boundary_intervals(boundary, metrics, level, len(records))
        # where the readout adds what colour cannot (issue 26): the metrics split by whether a GT boundary
        # pixel is a colour edge of the image, majority labelling, on the same resamples
        colour_split = colour_edge_split(records, MapFiles(paths, records.image_ids), (dataset[i] for i in indices),
                                         dataset.num_classes, weights, ignore_index=dataset.ignore_index,
                                         level=level)
    results = [openvocab_result(out, dataset, indices, labeller) if protocol == "openvocab" else scored[protocol]
               for protocol in protocols]
    rows = [row for res in results for row in summary_rows(res, intervals, edges)]
    for row in rows:
        note = intervals.get(row["protocol"], {}).get(row["method"], {}).get("note")
        if note:
            row["interval_note"] = note
    notes = [f"{p} {name}: {v['note']}" for p, per in intervals.items() for name, v in per.items() if v.get("note")]
    class_rows = [row for res in results for row in per_class_rows(res)]
    payload = {
        "rows": rows,
        "protocols": results,
        "intervals": intervals,
        "boundary_intervals": edges,
        "config": {
            **run_info,
            "class_names": list(dataset.class_names),
            "num_images": len(indices),
            "image_ids": [dataset.image_ids[i] for i in indices],
            "methods": list(first.methods),
            "segmentation_config": first.meta.get("config"),
            "segmentation_model": first.meta.get("model"),
            "protocol_seed": seed,
            "boundary": metrics.settings(),
            "bootstrap": {"resamples": n_boot, "seed": bootstrap_seed, "level": level, "unit": "image",
                          "paired": True},
        },
    }
    # only when there is something to say: a run without either writes exactly the files it always did
    if notes:
        payload["notes"] = notes
    if colour_split is not None:
        payload["colour_edge_split"] = colour_split
    if failed:
        payload["config"]["failed_images"] = dict(failed)
    payload = json_safe(payload)  # what results.json holds (NaN -> None), returned as written
    text = json.dumps(payload, indent=2) + "\n"
    write_atomic_bytes(out / "results.json", text.encode())
    cfg = payload["config"]["segmentation_config"] or {}
    run_columns = {"model": run_info["model"], "dataset": run_info["data"], "layout": run_info["layout"],
                   "num_clusters": cfg.get("num_clusters", ""), "resolution": cfg.get("resolution", "")}
    fields = ["protocol", "method", "miou", "miou_lo", "miou_hi", "pixel_accuracy", "num_classes_present",
              "num_images", "locality", *run_columns]
    if notes:
        fields.insert(fields.index("miou_hi") + 1, "interval_note")
    fields += [f"{name}{end}" for name in (metrics.names if mask_protocols else ()) for end in ("", "_lo", "_hi")]
    write_atomic_bytes(out / "results.csv", _csv_text(fields, rows, run_columns))
    write_atomic_bytes(out / "per_class.csv",
                       _csv_text(["protocol", "method", "class_id", "class", "iou"], class_rows, {}))
    return payload


def boundary_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The printed table's boundary block: per protocol x method, Boundary IoU and boundary F with their
    intervals and the trimap IoU curve (rows as :func:`~emerdiff.evaluation.protocols.summary_rows` gives)."""
    def span(row: dict[str, Any], name: str) -> str:
        lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
        return "" if lo is None or not math.isfinite(lo) else f" [{lo:6.2f}, {hi:6.2f}]"

    def num(v: Any) -> str:
        return "   n/a" if v is None or not math.isfinite(v) else f"{v:6.2f}"

    lines = []
    for row in rows:
        if "boundary_iou" not in row:
            continue
        trimap = [k for k in row if k.startswith("trimap_iou_") and not k.endswith(("_lo", "_hi"))]
        if not lines:
            widths = "/".join(k[len("trimap_iou_"):] for k in trimap)
            lines.append(f"  boundary metrics (Boundary IoU, boundary F, trimap IoU at {widths} px of a GT boundary):")
        curve = "/".join(num(row[k]).strip() for k in trimap)
        lines.append(f"  {row['protocol']:<19} {row['method']:<17} bIoU {num(row['boundary_iou'])}"
                     f"{span(row, 'boundary_iou')}  bF {num(row['boundary_f'])}{span(row, 'boundary_f')}  "
                     f"trimap {curve}")
    return lines


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


def json_safe(obj: Any) -> Any:
    """``obj`` with numpy numbers as Python ones and non-finite floats as None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    return obj
