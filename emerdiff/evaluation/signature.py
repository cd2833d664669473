"""The run's signature: the settings an evaluate run's cached files depend on, kept in ``OUT/run.json``.

Split from :mod:`emerdiff.evaluation.runner` (issue 24) so the runner holds the run's flow only.
:func:`run_signature` says which settings the per-image records depend on (not the limit, the
protocols, the device or the progress output); ``run.json`` pins them once they are validated, and a
rerun with other settings into the same folder is refused with :func:`signature_diff`'s lines.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from emerdiff.config import EXECUTION_FIELDS, without_later_defaults
from emerdiff.evaluation.datasets import SegmentationDataset
from emerdiff.files import write_atomic_bytes


def run_signature(dataset: SegmentationDataset, model: str, config: dict[str, Any] | None,
                  data: str | os.PathLike | None = None, layout: str | None = None,
                  split: str | None = None) -> dict[str, Any]:
    """What the per-image files depend on (not the limit, protocols, device or progress output).

    ``data``, ``layout``, ``split``: how the dataset was named (default: its root, its layout
    name and its split); ``config``: the method config as a dict (None: an injected segmenter).
    """
    cfg = without_later_defaults(dict(config or {}))  # as the records made before those fields existed
    for key in ("device", *EXECUTION_FIELDS):  # execution only, results unchanged
        cfg.pop(key, None)
    return {
        "data": str(Path(dataset.root if data is None else data).resolve()),
        "layout": dataset.name if layout is None else layout,
        "split": dataset.split if split is None else split,
        "ignore_index": dataset.ignore_index,
        "num_classes": dataset.num_classes,
        "model": model,
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


def compare_signature(out: Path, signature: dict[str, Any]) -> None:
    """Refuse to mix runs: an existing ``run.json`` must match these settings (writes nothing)."""
    path = out / "run.json"
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
        if not isinstance(old, dict):
            raise ValueError(f"it holds a JSON {type(old).__name__}, not the settings object an evaluate run writes")
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is unreadable ({err}); delete it (the per-image records verify "
                         "themselves) or use another --out") from err
    diff = signature_diff(old, json.loads(json.dumps(signature)))
    if diff:
        raise ValueError(
            f"{out} holds per-image results of a different run; these settings differ:\n  "
            + "\n  ".join(diff) + "\nrerun with the same settings, use another --out, or delete it"
        )


def write_signature(out: Path, signature: dict[str, Any]) -> bool:
    """Write ``run.json`` (only once the settings have been validated); True if this call wrote it."""
    path = out / "run.json"
    if path.exists():
        return False
    write_atomic_bytes(path, (json.dumps(signature, indent=2) + "\n").encode())
    return True
