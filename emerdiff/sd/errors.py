"""The loader's error type, on its own so every model-side module can raise it without an import cycle."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""
