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
from emerdiff.evaluation.protocols import PROTOCOLS
from emerdiff.evaluation.records import RecordError, load_record, record_path, stored_key


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
            key = stored_key(path)
        except RecordError as err:
            raise ValueError(f"{err}; rerun `emerdiff evaluate` into {folder} to recompute it") from err
        out[key.get("image_id") or load_record(path).image_id] = (path, key.get("labels_sha256", ""))
    return out


def compare_runs(run_a: str | Path, run_b: str | Path, protocols: Sequence[str] = PROTOCOLS,
                 n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Compare two ``evaluate`` output folders on the images both evaluated.

    Checks that both score the same classes (names, ignore value) and that every shared image
    has the same labels in both; then :func:`emerdiff.evaluation.bootstrap.compare_records`. Each run's
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

