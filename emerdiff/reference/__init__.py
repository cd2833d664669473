"""The project's own small SD-architecture reference model (see its issue)."""

from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"


def weights_dir() -> Path:
    """Folder of the shipped reference weights (diffusers layout)."""
    if not (WEIGHTS / "model_index.json").exists():
        from ..models import ModelLoadError

        raise ModelLoadError(
            f"the reference model weights are not in this installation ({WEIGHTS}). "
            "Train them with `python -m emerdiff.reference.train` or use model='tiny'."
        )
    return WEIGHTS
