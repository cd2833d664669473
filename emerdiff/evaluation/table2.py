"""The paper's Table 2 on any model and dataset, by one command (``emerdiff table2``; issue 26).

EmerDiff's Table 2 compares its pixel-level labels with bilinear upsampling of the same
low-resolution Stable Diffusion segments under the paper's *modified* protocol (our ``concept``:
one concept embedding per ground-truth class, each mask takes the nearest one, no Hungarian
matching): ADE20K-150 29.1 -> 33.1 mIoU, COCO-Stuff-171 27.6 -> 30.5. This module lays a run of
ours out the same way:

- the paper's two rows (SD bilinear upsampling, EmerDiff) and ours beside them (nearest
  upsampling, the guided filter, joint bilateral upsampling of the same segments), all under
  ``concept``;
- the ``majority`` oracle (each mask its own majority GT class: the label map apart from any
  labelling step) for every method, marked as ours;
- for every number its 95 % paired bootstrap interval over images (the run's own resamples), each
  method's difference to bilinear with its paired interval, and Boundary IoU with its interval;
- the test set named (layout, split, folder, number of images scored) and, for ADE20K-150 and
  COCO-Stuff-171, the paper's numbers in a column of their own.

Nothing is scored here. :func:`run_table2` runs :func:`emerdiff.evaluation.runner.run_evaluation`
(protocols ``concept`` and ``majority``) and reads its payload; :func:`table2_from_run` reads an
existing ``evaluate`` output folder's ``results.json``; the ``majority`` rows, if that run did not
score them, come from its cached records and label maps
(:func:`emerdiff.evaluation.bootstrap.bootstrap_with_boundaries`, the run's resamples and seed).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from emerdiff.files import check_output_dir, write_atomic_bytes

PROTOCOL = "concept"  # the paper's modified protocol (Table 2), no Hungarian matching
ORACLE = "majority"
BASELINE = "bilinear"

# The paper's Table 2 (mIoU, modified protocol), keyed by our dataset layout names.
PAPER_TABLE2: dict[str, dict[str, Any]] = {
    "ade20k": {"dataset": "ADE20K-150", "test_set": "ADEChallengeData2016 validation split", "images": 2000,
               "split": "validation", "miou": {"bilinear": 29.1, "emerdiff": 33.1}},
    "cocostuff171": {"dataset": "COCO-Stuff-171", "test_set": "COCO-Stuff 164k val2017", "images": 5000,
                     "split": "val2017", "miou": {"bilinear": 27.6, "emerdiff": 30.5}},
}

# (method, row label, whose row): the paper's rows first, then ours, in this order when present.
METHOD_ROWS: tuple[tuple[str, str, str], ...] = (
    ("bilinear", "SD features, bilinear upsampling (the paper's baseline)", "paper"),
    ("emerdiff", "EmerDiff", "paper"),
    ("nearest", "nearest upsampling", "ours"),
    ("guided_filter", "guided filter upsampling", "ours"),
    ("joint_bilateral", "joint bilateral upsampling", "ours"),
)

ORACLE_LABELS: dict[str, str] = {"bilinear": "bilinear upsampling", "emerdiff": "EmerDiff", "nearest": "nearest upsampling",
                                 "guided_filter": "guided filter", "joint_bilateral": "joint bilateral"}

CSV_FIELDS = ("section", "protocol", "method", "label", "source", "miou", "miou_lo", "miou_hi",
              "minus_bilinear", "minus_bilinear_lo", "minus_bilinear_hi", "boundary_iou", "boundary_iou_lo",
              "boundary_iou_hi", "boundary_iou_minus_bilinear", "boundary_iou_minus_bilinear_lo",
              "boundary_iou_minus_bilinear_hi", "paper_miou", "dataset", "num_images", "model")


# --------------------------------------------------------------------------- reading a run
def load_results(run: str | os.PathLike) -> dict[str, Any]:
    """``results.json`` of an ``emerdiff evaluate`` output folder, checked for what Table 2 reads; a
    ValueError naming the folder, what is missing and the fix otherwise."""
    folder = Path(run)
    if not folder.is_dir():
        raise ValueError(f"--from-run {folder}: no such folder; pass the --out folder of an `emerdiff evaluate` run")
    path = folder / "results.json"
    if not path.is_file():
        raise ValueError(f"--from-run {folder} has no results.json: not an `emerdiff evaluate` output folder, or "
                         f"its run did not finish; run `emerdiff evaluate --data DATA --out {folder}` to the end")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path} is unreadable ({type(err).__name__}: {err}); rerun `emerdiff evaluate` into "
                         f"{folder} (its per-image records are reused) to write it again") from err
    if not isinstance(payload, dict) or not isinstance(payload.get("rows"), list) \
            or not isinstance(payload.get("config"), dict):
        raise ValueError(f"{path} is not the results.json of an `emerdiff evaluate` run (no 'rows' and 'config')")
    check_concept_rows(payload, f"--from-run {folder}")
    return payload


def check_concept_rows(payload: Mapping[str, Any], what: str) -> None:
    """Refuse a payload without the concept protocol's rows for EmerDiff and bilinear (the paper's columns)."""
    rows = [r for r in payload["rows"] if r.get("protocol") == PROTOCOL]
    if not rows:
        scored = sorted({str(r.get("protocol")) for r in payload["rows"]})
        raise ValueError(f"{what} scored the protocol(s) {', '.join(scored) or 'none'}, not '{PROTOCOL}' (the "
                         f"paper's Table 2 protocol); rerun `emerdiff evaluate ... --protocol {PROTOCOL}` (or all) "
                         "into the same --out: its cached records are reused, nothing is segmented again")
    methods = {r.get("method") for r in rows}
    lacking = [m for m in ("emerdiff", BASELINE) if m not in methods]
    if lacking:
        raise ValueError(f"{what}: the {PROTOCOL} rows hold no {' or '.join(lacking)} (methods: "
                         f"{', '.join(sorted(map(str, methods)))}); Table 2 compares EmerDiff with bilinear "
                         "upsampling of the same segments, so the records must hold both (an EmerDiff run does)")


def oracle_from_records(run: str | os.PathLike, payload: Mapping[str, Any]) -> dict[str, Any]:
    """The ``majority`` oracle's mIoU and boundary intervals from a run's cached records and label maps, on
    the run's own bootstrap resamples (count and seed): ``{"intervals": {method or "a-b": interval},
    "boundary": {metric: {method or "a-b": interval}}}``."""
    from emerdiff.evaluation.bootstrap import bootstrap_with_boundaries
    from emerdiff.evaluation.boundary import BoundaryMetrics
    from emerdiff.evaluation.records import RecordError, load_maps, load_record, record_path

    cfg = payload["config"]
    ids = cfg.get("image_ids")
    if not ids:
        raise ValueError(f"{run}/results.json lists no image_ids (an older evaluate version); rerun `emerdiff "
                         f"evaluate` into {run} (records reused) so that Table 2 can add the majority oracle")
    boot = cfg.get("bootstrap") or {}
    ignore = int(cfg.get("ignore_index", 255))
    try:
        paths = [record_path(Path(run), i) for i in ids]
        records = [load_record(p, i) for p, i in zip(paths, ids)]
        maps = [load_maps(p, i) for p, i in zip(paths, ids)]
    except (RecordError, OSError) as err:
        raise ValueError(f"{err}; rerun `emerdiff evaluate` into {run} to restore its per-image records") from err
    miou, boundary = bootstrap_with_boundaries(
        records, maps, len(cfg["class_names"]), n_boot=int(boot.get("resamples", 1000)),
        level=float(boot.get("level", 0.95)), seed=int(boot.get("seed", 0)), ignore_index=ignore,
        protocols=(ORACLE,), cluster_seed=int(cfg.get("protocol_seed", 0)),
        metrics=BoundaryMetrics(ignore_index=ignore))
    return {"intervals": miou[ORACLE], "boundary": boundary.get(ORACLE, {})}


# --------------------------------------------------------------------------- the table
def _interval(per: Mapping[str, Any] | None, a: str, b: str | None = None) -> dict[str, Any] | None:
    """Interval of method ``a`` (or of ``a`` minus ``b``, whichever order the run stored the pair in)."""
    per = per or {}
    if b is None:
        return per.get(a)
    if f"{a}-{b}" in per:
        return per[f"{a}-{b}"]
    v = per.get(f"{b}-{a}")
    if v is None:
        return None
    neg = lambda x: None if x is None else -x  # noqa: E731
    out = {"value": neg(v.get("value")), "lo": neg(v.get("hi")), "hi": neg(v.get("lo"))}
    if v.get("note"):
        out["note"] = v["note"]
    return out


def _value(v: Mapping[str, Any] | None, key: str = "value") -> float | None:
    x = None if v is None else v.get(key)
    return None if x is None or not math.isfinite(float(x)) else float(x)


def describe_test_set(config: Mapping[str, Any]) -> dict[str, Any]:
    """How the run's test set is named: ``dataset`` (e.g. ADE20K-150), ``test_set`` (one line: layout,
    split, folder, images scored, against the paper's count) and ``paper`` (its Table 2 numbers or None)."""
    layout = config.get("layout") or "folder"
    n = int(config.get("num_images") or len(config.get("image_ids") or []))
    folder = config.get("data")
    failed = len(config.get("failed_images") or {})
    paper = PAPER_TABLE2.get(layout)
    if paper is not None:
        split = config.get("split") or paper["split"]
        line = f"{paper['dataset']}: {paper['test_set'] if split == paper['split'] else f'split {split}'} at {folder}"
        line += f", {n} images scored"
        if split != paper["split"] or n < paper["images"]:
            line += (f" (the paper's test set is the full {paper['test_set']}, {paper['images']} images: a subset "
                     "or another split is not the paper's number)")
        dataset = paper["dataset"]
    else:
        classes = len(config.get("class_names") or [])
        dataset = f"{layout} dataset" if layout != "folder" else f"folder dataset {Path(str(folder)).name}"
        line = (f"{dataset} at {folder}{'' if not config.get('split') else ', split ' + str(config['split'])}, "
                f"{n} images, {classes} classes (not a dataset of the paper's Table 2: no paper numbers)")
    if failed:
        line += f"; {failed} image(s) failed and are left out"
    return {"dataset": dataset, "test_set": line, "paper": paper, "num_images": n}


def build_table2(payload: Mapping[str, Any], oracle: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Table 2's rows from an ``evaluate`` payload (``results.json``): concept rows for every method the run
    holds (the paper's two first), then the ``majority`` oracle rows, from the payload if it scored them,
    else from ``oracle`` (:func:`oracle_from_records`). Returns ``{"rows", "dataset", "test_set", "paper",
    "model", "num_images", "bootstrap", "headline"}``; every number as the payload holds it."""
    check_concept_rows(payload, "the run")
    cfg = payload["config"]
    info = describe_test_set(cfg)
    paper = info["paper"]
    by_row = {(r["protocol"], r["method"]): r for r in payload["rows"]}
    intervals = payload.get("intervals") or {}
    edges = payload.get("boundary_intervals") or {}
    rows: list[dict[str, Any]] = []
    known = [m for m, _, _ in METHOD_ROWS]
    extra = [r["method"] for r in payload["rows"] if r["protocol"] == PROTOCOL and r["method"] not in known]
    labels = {m: (label, source) for m, label, source in METHOD_ROWS}
    for section, protocol in (("Table 2 (concept protocol, no Hungarian)", PROTOCOL),
                              ("oracle (ours): each mask its majority GT class", ORACLE)):
        if protocol == ORACLE and (protocol, "emerdiff") not in by_row and oracle is None:
            continue
        per = intervals.get(protocol) if protocol in intervals else (oracle or {}).get("intervals", {})
        per_edge = (edges.get(protocol) if protocol in edges else (oracle or {}).get("boundary", {})) or {}
        for method in [*known, *extra]:
            row = by_row.get((protocol, method))
            mine = _interval(per, method)
            if row is None and mine is None:
                continue
            label, source = labels.get(method, (method, "ours"))
            if protocol == ORACLE:
                label, source = f"{ORACLE_LABELS.get(method, method)}, majority oracle", "ours (oracle)"
            miou = row["miou"] if row is not None else _value(mine)
            lo, hi = ((row.get("miou_lo"), row.get("miou_hi")) if row is not None
                      else (_value(mine, "lo"), _value(mine, "hi")))
            diff = None if method == BASELINE else _interval(per, method, BASELINE)
            biou = _interval(per_edge.get("boundary_iou"), method)
            bdiff = None if method == BASELINE else _interval(per_edge.get("boundary_iou"), method, BASELINE)
            b_value = row.get("boundary_iou") if row is not None and "boundary_iou" in row else _value(biou)
            b_lo = row.get("boundary_iou_lo") if row is not None and "boundary_iou" in row else _value(biou, "lo")
            b_hi = row.get("boundary_iou_hi") if row is not None and "boundary_iou" in row else _value(biou, "hi")
            paper_miou = (paper or {}).get("miou", {}).get(method) if protocol == PROTOCOL else None
            rows.append({
                "section": section, "protocol": protocol, "method": method, "label": label, "source": source,
                "miou": miou, "miou_lo": lo, "miou_hi": hi,
                "minus_bilinear": _value(diff), "minus_bilinear_lo": _value(diff, "lo"),
                "minus_bilinear_hi": _value(diff, "hi"),
                "boundary_iou": b_value, "boundary_iou_lo": b_lo, "boundary_iou_hi": b_hi,
                "boundary_iou_minus_bilinear": _value(bdiff), "boundary_iou_minus_bilinear_lo": _value(bdiff, "lo"),
                "boundary_iou_minus_bilinear_hi": _value(bdiff, "hi"),
                "paper_miou": paper_miou,
            })
    head = _interval(intervals.get(PROTOCOL), "emerdiff", BASELINE)
    boot = cfg.get("bootstrap") or {}
    scored = {r["method"] for r in rows if r["protocol"] == PROTOCOL}
    absent = [m for m in known if m not in scored]
    return {"rows": rows, "dataset": info["dataset"], "test_set": info["test_set"], "paper": paper,
            "model": cfg.get("model") or "(an injected segmenter)", "num_images": info["num_images"],
            "bootstrap": dict(boot), "headline": head, "absent_methods": absent,
            "failed_images": len(cfg.get("failed_images") or {}),
            "paper_headline": None if paper is None else paper["miou"]["emerdiff"] - paper["miou"]["bilinear"]}


def _num(x: float | None, sign: str = "") -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:{sign}.1f}"


def _span(lo: float | None, hi: float | None, sign: str = "") -> str:
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "(no interval)"
    return f"[{lo:{sign}.1f}, {hi:{sign}.1f}]"


def table2_markdown(table: Mapping[str, Any]) -> str:
    """The table as markdown: what was scored, then one row per method (mIoU, minus bilinear, Boundary IoU,
    each with its interval; the paper's mIoU where it has one), then the headline in words."""
    boot = table["bootstrap"]
    level = round(float(boot.get("level", 0.95)) * 100)
    paper = table["paper"]
    lines = [f"# Table 2 of EmerDiff (ICLR 2024) on {table['model']}: {table['dataset']}", "",
             f"Test set: {table['test_set']}.", "",
             "Protocol: the paper's modified protocol (`concept`): one concept embedding per ground-truth class "
             "(the mean embedding of the masks over the class's pixels), each mask takes the nearest concept "
             "(cosine), mIoU with no Hungarian matching. Every method labels the same low-resolution k-means "
             "segments; only the readout to pixels differs. The oracle rows label each mask with its own "
             "majority ground-truth class (ours, not a paper protocol): the label map apart from any labelling.",
             "",
             f"Intervals: {level} % percentile bootstrap over the images ({boot.get('resamples', '?')} resamples, "
             f"seed {boot.get('seed', '?')}), paired: a difference to bilinear is computed on each resample.", ""]
    paper_col = f" paper ({paper['dataset']}) |" if paper else ""
    lines.append(f"| method | row of | mIoU | {level} % interval | minus bilinear | paired {level} % interval | "
                 f"Boundary IoU | {level} % interval | bIoU minus bilinear | paired {level} % interval |{paper_col}")
    lines.append("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if paper else ""))
    for r in table["rows"]:
        base = r["method"] == BASELINE
        cells = [r["label"], r["source"], _num(r["miou"]), _span(r["miou_lo"], r["miou_hi"]),
                 "-" if base else _num(r["minus_bilinear"], "+"),
                 "-" if base else _span(r["minus_bilinear_lo"], r["minus_bilinear_hi"], "+"),
                 _num(r["boundary_iou"]), _span(r["boundary_iou_lo"], r["boundary_iou_hi"]),
                 "-" if base else _num(r["boundary_iou_minus_bilinear"], "+"),
                 "-" if base else _span(r["boundary_iou_minus_bilinear_lo"], r["boundary_iou_minus_bilinear_hi"], "+")]
        if paper:
            cells.append("-" if r["paper_miou"] is None else f"{r['paper_miou']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    head = table["headline"]
    lines.append("")
    if table.get("absent_methods"):
        lines += [f"Not in this run's records (made before those readouts existed, or by a segmenter without them): "
                  f"{', '.join(table['absent_methods'])}; evaluate into a fresh --out to score them.", ""]
    if head is not None and _value(head) is not None:
        lo, hi = _value(head, "lo"), _value(head, "hi")
        if lo is None or hi is None:
            verdict = "no interval (too few images or zero spread)"
        elif lo > 0:
            verdict = "the interval excludes 0: EmerDiff leads bilinear upsampling on this test set"
        elif hi < 0:
            verdict = "the interval excludes 0: EmerDiff trails bilinear upsampling on this test set"
        else:
            verdict = "the interval includes 0: no lead either way is shown on this test set"
        text = f"EmerDiff minus bilinear (concept): {_num(_value(head), '+')} {_span(lo, hi, '+')}; {verdict}."
        if table["paper_headline"] is not None:
            text += f" The paper: {table['paper_headline']:+.1f} (no interval given)."
        lines.append(text)
    return "\n".join(lines) + "\n"


def table2_csv(table: Mapping[str, Any]) -> str:
    """The rows as CSV (:data:`CSV_FIELDS`; empty cells for absent values)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS), lineterminator="\n")
    writer.writeheader()
    for r in table["rows"]:
        out = {k: r.get(k) for k in CSV_FIELDS}
        out.update(dataset=table["dataset"], num_images=table["num_images"], model=table["model"])
        writer.writerow({k: ("" if v is None else f"{v:.4f}" if isinstance(v, float) else v) for k, v in out.items()})
    return buf.getvalue()


def write_table2(table: Mapping[str, Any], out: str | os.PathLike) -> list[Path]:
    """Write ``OUT/table2.md``, ``OUT/table2.csv`` and ``OUT/table2.json``; returns their paths."""
    from emerdiff.evaluation.results import json_safe

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "table2.md", out / "table2.csv", out / "table2.json"]
    texts = [table2_markdown(table), table2_csv(table), json.dumps(json_safe(dict(table)), indent=2) + "\n"]
    for path, text in zip(paths, texts):
        write_atomic_bytes(path, text.encode())
    return paths


# --------------------------------------------------------------------------- the two entry points
def table2_from_run(run: str | os.PathLike, out: str | os.PathLike) -> tuple[dict[str, Any], list[Path]]:
    """Table 2 of an existing ``evaluate`` output folder ``run`` (no segmentation), written into ``out``."""
    check_output_dir(Path(out))
    payload = load_results(run)
    oracle = None
    if not any(r.get("protocol") == ORACLE for r in payload["rows"]):
        oracle = oracle_from_records(run, payload)
    table = build_table2(payload, oracle)
    table["run"] = str(Path(run))
    return table, write_table2(table, out)


def run_table2(dataset: Any, segmenter: Any, config: Any, out: str | os.PathLike, *,
               protocols: Sequence[str] = (PROTOCOL, ORACLE), **evaluate: Any) -> tuple[dict[str, Any], list[Path]]:
    """Evaluate ``dataset`` with ``segmenter`` (:func:`~emerdiff.evaluation.runner.run_evaluation`, its
    arguments as there; outputs in ``OUT/evaluate``, resumable) under the concept protocol and the majority
    oracle, and write Table 2 into ``out``."""
    from emerdiff.evaluation.runner import run_evaluation

    out = Path(out)
    check_output_dir(out)
    payload = run_evaluation(dataset, segmenter, config, out / "evaluate", protocols=list(protocols), **evaluate)
    table = build_table2(payload)
    table["run"] = str(out / "evaluate")
    return table, write_table2(table, out)
