"""Deprecated import paths of the flat package (before the move into floors): old name -> new module.

``import emerdiff.assign`` still works: a ``sys.meta_path`` finder imports ``emerdiff.method.readout``
under the old name (the same module object, not a copy) and warns with a DeprecationWarning that names
the new path. A package alias carries its submodules (``emerdiff.reference.scenes`` ->
``emerdiff.assets.scenes``). Installed by ``emerdiff/__init__.py``; nothing here imports the package.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from collections.abc import Sequence

# old module -> the module that replaced it (data only; one line per old module)
MOVED: dict[str, str] = {
    "emerdiff.assign": "emerdiff.method.readout",
    "emerdiff.attention": "emerdiff.method.attention",
    "emerdiff.diffseg": "emerdiff.method.diffseg",
    "emerdiff.faithfulness": "emerdiff.method.measures",
    "emerdiff.inversion": "emerdiff.method.inversion",
    "emerdiff.lowres": "emerdiff.method.features",
    "emerdiff.modulation": "emerdiff.method.modulation",
    "emerdiff.openvocab": "emerdiff.method.vocabulary",
    "emerdiff.pipeline": "emerdiff.method.pipeline",
    "emerdiff.images": "emerdiff.sd.images",
    "emerdiff.models": "emerdiff.sd.loading",
    "emerdiff.sdconfig": "emerdiff.sd.components",
    "emerdiff.datasets": "emerdiff.evaluation.datasets",
    "emerdiff.evaluate": "emerdiff.cli.evaluate",
    "emerdiff.metrics": "emerdiff.evaluation.metrics",
    "emerdiff.options": "emerdiff.cli.options",
    "emerdiff.diagnosis": "emerdiff.studies.diagnosis",
    "emerdiff.probes": "emerdiff.studies.probes",
    "emerdiff.sweep": "emerdiff.studies.sweep",  # the facade's `emerdiff.sweep` stays the function
    "emerdiff.inspector": "emerdiff.notebook.inspector",
    "emerdiff.lab": "emerdiff.notebook.lab",
    "emerdiff.reference": "emerdiff.assets",
}

# old modules that left the wheel: importing one says where it went instead of "No module named"
MOVED_OUT: dict[str, str] = {
    "emerdiff.reference.train": "training.train (`python -m training.train` from the repository root)",
    "emerdiff.reference.model": "training.model (in the repository, outside the wheel)",
    "emerdiff.reference.heldout": "training.heldout (`python -m training.heldout` from the repository root)",
    "emerdiff.reference.readout_sweep": "training.readout_sweep (`python -m training.readout_sweep` from the "
                                        "repository root)",
    "emerdiff.reference.figures": "training.figures (in the repository, outside the wheel)",
    "emerdiff.testing": "tests/builders.py (test-only: `from builders import ...` inside tests/)",
}


def target_of(name: str) -> str | None:
    """The new module for an old ``name`` (exact, or under an aliased package), else None."""
    for old, new in MOVED.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return None


class _AliasLoader(importlib.abc.Loader):
    """Hands out the already-imported new module; the import system then files it under the old name."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = importlib.import_module(self.target)
        self._spec = module.__spec__  # the import system overwrites __spec__; exec_module restores it
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__ = self._spec

    def get_code(self, fullname: str) -> types.CodeType | None:
        """The new module's code, so that ``python -m OLD`` runs it as ``python -m NEW`` would."""
        spec = importlib.util.find_spec(self.target)
        return spec.loader.get_code(self.target) if spec and hasattr(spec.loader, "get_code") else None


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname in MOVED_OUT:
            raise ModuleNotFoundError(f"{fullname} is no longer part of the emerdiff package: it moved to "
                                      f"{MOVED_OUT[fullname]}", name=fullname)
        new = target_of(fullname)
        if new is None or (fullname not in MOVED and importlib.util.find_spec(new) is None):
            return None
        warnings.warn(f"{fullname} is deprecated: import {new} instead", DeprecationWarning,
                      stacklevel=_caller_level())
        is_package = importlib.util.find_spec(new).submodule_search_locations is not None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new), is_package=is_package)


def _caller_level() -> int:
    """The stack level of the code that wrote the import (past importlib's frames and this file's)."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename == __file__
                                 or frame.f_code.co_filename.startswith("<frozen importlib")):
        level, frame = level + 1, frame.f_back
    return level


class _Facade(types.ModuleType):
    """The package module: an alias submodule never replaces a facade name (``emerdiff.sweep`` stays the
    function when ``emerdiff.sweep`` the old module is imported)."""

    def __setattr__(self, name: str, value: object) -> None:
        current = self.__dict__.get(name)
        if isinstance(value, types.ModuleType) and current is not None and not isinstance(current, types.ModuleType):
            return
        super().__setattr__(name, value)


def install(package: types.ModuleType) -> None:
    """Serve the old import paths (once per process) and protect ``package``'s names from them."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
    package.__class__ = _Facade
