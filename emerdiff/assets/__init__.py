"""The project's own small SD-architecture reference model (see its issue)."""

from __future__ import annotations

import json
import os
from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"


def weights_dir() -> Path:
    """Folder of the shipped reference weights (diffusers layout)."""
    if not (WEIGHTS / "model_index.json").exists():
        # FileNotFoundError, not models.ModelLoadError: this asset package sits below models.py,
        # which turns the error into a ModelLoadError
        raise FileNotFoundError(
            f"the reference model weights are not in this installation ({WEIGHTS}). "
            "Train them with `python -m training.train` or use model='tiny'."
        )
    return WEIGHTS


def model_world(model: str | os.PathLike) -> str:
    """The scene world a reference-model folder was trained on, from its ``reference.json``
    ("flat" for v2; "textured" for v0/v1 and for folders without the record)."""
    from emerdiff.assets.scenes import check_world

    folder = WEIGHTS if str(model) == "reference" else Path(model)
    info = folder / "reference.json"
    if not info.exists():
        return "textured"
    meta = json.loads(info.read_text())
    return check_world(meta.get("world") or meta.get("train_args", {}).get("world") or "textured")
