"""Two ``emerdiff evaluate`` output folders side by side: every protocol x method mIoU, recomputed
on the images both runs share, and the paired bootstrap interval of the difference
(``emerdiff compare RUN_A RUN_B``)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emerdiff.evaluation.bootstrap import compare_records
from emerdiff.evaluation.boundary import BoundaryMetrics
from emerdiff.evaluation.protocols import PROTOCOLS
from emerdiff.evaluation.records import MapFiles, RecordError, load_record, record_path, stored_key


def _run_summary(folder: Path) -> dict[str, Any]:
    """``config`` of a finished run's results.json, checked for what :func:`compare_runs` reads;
    a ValueError naming the file, what is wrong and the fix otherwise."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder; pass the --out folder of an `emerdiff evaluate` run")
    path = folder / "results.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no results.json: not an `emerdiff evaluate` output folder, or its run "
                         f"did not finish; run `emerdiff evaluate ... --out {folder}` to completion first")
    fix = f"rerun `emerdiff evaluate` into {folder} (its per-image records are reused) to write it again"
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:  # truncated, empty, not JSON, unreadable
        raise ValueError(f"{path} is unreadable ({type(err).__name__}: {err}); {fix}") from err
    problem = _summary_problem(payload)
    if problem:
        raise ValueError(f"{path} is not the results.json of an `emerdiff evaluate` run: {problem}; {fix}")
    return payload["config"]


def _summary_problem(payload: Any) -> str | None:
    """What is wrong with a results.json payload for a comparison (None: nothing)."""
    if not isinstance(payload, dict):
        return f"it holds a JSON {type(payload).__name__}, not an object with a 'config'"
    config = payload.get("config")
    if not isinstance(config, dict):
        return "it has no 'config' object" if config is None else f"its 'config' is a {type(config).__name__}"
    names = config.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return f"config.class_names is {names!r}, not a non-empty list of class names"
    ids = config.get("image_ids")
    if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids)):
        return f"config.image_ids is {str(ids)[:80]}, not a list of image ids"
    if ids is not None and len(set(ids)) != len(ids):
        return "config.image_ids lists an image twice"
    for key in ("ignore_index", "protocol_seed"):
        value = config.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int):
            return f"config.{key} is {value!r}, not an integer"
    return None


def _run_images(folder: Path, config: dict[str, Any]) -> dict[str, tuple[Path, dict[str, str]]]:
    """image id -> (record path, stored key: image, labels and settings hashes) of the images a run evaluated."""
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
            key = stored_key(path)
            image_id = key.get("image_id") or load_record(path).image_id
        except RecordError as err:
            raise ValueError(f"{err}; rerun `emerdiff evaluate` into {folder} to recompute it") from err
        lacking = [k for k in ("image_sha256", "labels_sha256") if not key.get(k)]
        if lacking:
            raise ValueError(f"{path} holds no {' or '.join(lacking)}, so its image cannot be matched to the other "
                             f"run's; rerun `emerdiff evaluate` into {folder} to recompute it")
        out[image_id] = (path, key)
    return out


def _check_same_content(a: Path, b: Path, img_a: dict[str, tuple[Path, dict[str, str]]],
                        img_b: dict[str, tuple[Path, dict[str, str]]], shared: list[str]) -> None:
    """Paired means the same image: refuse shared ids whose pixels or labels differ between the runs."""
    for field, what, why in (("image_sha256", "image pixels", "the runs evaluated different image files "
                              "under the same ids"),
                             ("labels_sha256", "labels", "the runs used different ground truth")):
        differ = [i for i in shared if img_a[i][1][field] != img_b[i][1][field]]
        if differ:
            raise ValueError(
                f"{len(differ)} of the {len(shared)} shared image id(s) have different {what} in {a} and {b}, "
                f"first {differ[0]!r} ({img_a[differ[0]][0]} vs {img_b[differ[0]][0]}): {why}, so they cannot "
                "be compared as paired; rerun one of them on the other's dataset")


def compare_runs(run_a: str | Path, run_b: str | Path, protocols: Sequence[str] = PROTOCOLS,
                 n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Compare two ``evaluate`` output folders on the images both evaluated.

    Checks that both score the same classes (names, ignore value) and that every shared image
    has the same pixels and the same labels in both (the SHA-256 hashes the records hold); then :func:`emerdiff.evaluation.bootstrap.compare_records`. Each run's
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
    _check_same_content(a, b, img_a, img_b, shared)
    try:
        recs_a = [load_record(img_a[i][0], i) for i in shared]
        recs_b = [load_record(img_b[i][0], i) for i in shared]
    except RecordError as err:
        raise ValueError(f"{err}; rerun `emerdiff evaluate` into that run's folder to recompute it") from err
    ignore = int(cfg_a.get("ignore_index", 255))
    # both runs scored boundary metrics (evaluate stores each image's label maps with its record): their
    # A - B too, from the maps, on the same resamples as the mIoU's
    boundaries = cfg_a.get("boundary") is not None and cfg_b.get("boundary") is not None
    maps = None
    metrics = BoundaryMetrics(ignore_index=ignore)
    if boundaries:
        maps = (MapFiles([img_a[i][0] for i in shared], shared), MapFiles([img_b[i][0] for i in shared], shared))
    try:
        rows = compare_records(recs_a, recs_b, len(cfg_a["class_names"]), protocols, n_boot, level, seed, ignore,
                               (int(cfg_a.get("protocol_seed", 0)), int(cfg_b.get("protocol_seed", 0))),
                               maps=maps, metrics=metrics)
    except RecordError as err:  # a record without its label maps, though results.json has boundary metrics
        raise ValueError(f"{err}; or compare without boundary metrics by removing 'boundary' from that run's "
                         "results.json config") from err
    describe = {k: {"folder": str(p), "model": c.get("model"), "num_images": len(imgs)}
                for k, p, c, imgs in (("a", a, cfg_a, img_a), ("b", b, cfg_b, img_b))}
    return {**describe, "shared_images": len(shared),
            "only_a": [i for i in img_a if i not in img_b], "only_b": [i for i in img_b if i not in img_a],
            "rows": rows, "bootstrap": {"resamples": n_boot, "seed": seed, "level": level, "paired": True},
            "boundary": metrics.settings() if boundaries else None}


def _finite(x: Any) -> bool:
    return x is not None and math.isfinite(x)


def format_interval(v: dict[str, Any] | None, sign: str = "") -> str:
    """``"value [lo, hi]"`` of one interval dict (``"-"`` when absent, ``"(no interval)"`` appended
    when the bootstrap gave none and said why); ``sign="+"`` prints a difference's sign."""
    if v is None or not _finite(v.get("value")):
        return "-"
    text = f"{v['value']:{sign}.1f}"
    if _finite(v.get("lo")) and _finite(v.get("hi")):
        text += f" [{v['lo']:{sign}.1f}, {v['hi']:{sign}.1f}]"
    elif v.get("note"):
        text += " (no interval)"
    return text


def excludes_zero(v: dict[str, Any] | None) -> bool:
    """True when an interval exists and lies wholly on one side of 0."""
    return (v is not None and _finite(v.get("lo")) and _finite(v.get("hi"))
            and (v["lo"] > 0 or v["hi"] < 0))


def within_run_rows(results: dict[str, dict[str, Any]], protocols: Sequence[str] = PROTOCOLS,
                    prefix: str = "emerdiff-") -> list[dict[str, Any]]:
    """Each run's own paired differences (``results.json`` "intervals" whose names start with
    ``prefix``: ``emerdiff-bilinear`` = EmerDiff's mIoU minus bilinear's) as rows
    ``{"run", "protocol", "difference", "value", "lo", "hi"[, "note"]}``."""
    return [{"run": str(run), "protocol": protocol, "difference": name, **v}
            for run, payload in results.items() for protocol in protocols
            for name, v in payload.get("intervals", {}).get(protocol, {}).items() if name.startswith(prefix)]


def within_run_table(results: dict[str, dict[str, Any]], protocols: Sequence[str] = PROTOCOLS,
                     prefix: str = "emerdiff-") -> str:
    """Plain-text table of :func:`within_run_rows`; ``*`` marks an interval that excludes 0, and an
    absent interval is shown as such with its reason below the table."""
    rows = within_run_rows(results, protocols, prefix)
    table = [("run", "protocol", "difference", "value [95 % interval]")]
    table += [(r["run"], r["protocol"], r["difference"], format_interval(r, "+") + (" *" if excludes_zero(r) else ""))
              for r in rows]
    widths = [max(len(r[j]) for r in table) for j in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.append("* the interval excludes 0")
    notes = dict.fromkeys(r["note"] for r in rows if r.get("note"))
    lines += [f"(no interval): {note.removeprefix('no interval: ')}" for note in notes]
    return "\n".join(lines) + "\n"


def comparison_table(result: dict[str, Any]) -> str:
    """Plain-text table of :func:`compare_runs`: A, B and A - B per protocol x method; ``*`` marks a
    difference whose interval excludes 0."""
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
        diff = format_interval(row["a-b"], "+") + (" *" if excludes_zero(row["a-b"]) else "")
        table.append((row["protocol"], row["method"], format_interval(row["a"]), format_interval(row["b"]), diff))
    widths = [max(len(r[j]) for r in table) for j in range(len(header))]
    lines.append("")
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.append("* the interval of A - B excludes 0")
    if any("boundary" in row for row in result["rows"]):
        lines += ["", *boundary_comparison_lines(result)]
    notes = dict.fromkeys(v["note"] for row in result["rows"] for v in (row["a"], row["b"], row["a-b"])
                          if v is not None and v.get("note"))
    lines += [f"(no interval): {note.removeprefix('no interval: ')}" for note in notes]
    return "\n".join(lines) + "\n"



# The boundary metrics comparison_table prints (results JSON holds every metric of BoundaryMetrics.names).
PRINTED_BOUNDARY = (("boundary_iou", "bIoU"), ("boundary_f", "bF"))


def boundary_comparison_lines(result: dict[str, Any]) -> list[str]:
    """Lines of the boundary block of :func:`comparison_table`: per protocol x method, A, B and the paired
    A - B of Boundary IoU and boundary F (each run's labelling of its own label maps); ``*`` as there."""
    header = ("protocol", "method", *(f"{label} {side}" for _, label in PRINTED_BOUNDARY for side in ("A", "B", "A - B")))
    table = [header]
    for row in result["rows"]:
        if "boundary" not in row:
            continue
        cells = [row["protocol"], row["method"]]
        for name, _ in PRINTED_BOUNDARY:
            v = row["boundary"][name]
            cells += [format_interval(v["a"]), format_interval(v["b"]),
                      format_interval(v["a-b"], "+") + (" *" if excludes_zero(v["a-b"]) else "")]
        table.append(tuple(cells))
    widths = [max(len(r[j]) for r in table) for j in range(len(header))]
    return ["boundary metrics (Boundary IoU and boundary F of each run's labelling, paired A - B):",
            *("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)]
