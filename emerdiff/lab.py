"""JupyterLab helpers: where hand-run notebooks write, and a save hook that keeps tracked notebooks clean.

``make lab`` starts JupyterLab with ``notebooks/jupyter_server_config.py``, which installs
:func:`pre_save` as the contents manager's pre-save hook: every save (autosave included)
first writes the notebook *with* its outputs to ``executed/lab/NAME.ipynb`` beside it
(``notebooks/executed/`` is ignored by git) and then strips outputs and execution counts
from what is written to ``NAME.ipynb``, so the committed notebooks stay output-free.
Figures of hand-run notebooks go to :func:`default_figure_dir` (``figures/lab/``, ignored).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import nbformat

LAB_COPIES = Path("executed") / "lab"  # relative to the notebook's folder


def default_figure_dir() -> Path:
    """``figures/lab/`` of the source checkout (ignored by git; `make figures` owns ``figures/``),
    else ``figures-lab`` in the working folder (an installed package has no checkout)."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").exists() and (root / "figures").is_dir():
        return root / "figures" / "lab"
    return Path.cwd() / "figures-lab"


def has_outputs(nb: Any) -> bool:
    """True if any code cell of a notebook (nbformat node or dict) holds outputs or an execution count."""
    return any(c.get("cell_type") == "code" and (c.get("outputs") or c.get("execution_count") is not None)
               for c in nb.get("cells", []))


def strip_outputs(nb: Any) -> Any:
    """Clear outputs and execution counts of every code cell, in place; returns ``nb``."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    return nb


def pre_save(model: dict, path: str, contents_manager: Any, **kwargs: Any) -> None:
    """Jupyter pre-save hook: keep the outputs in ``executed/lab/``, save the notebook without them."""
    if model.get("type") != "notebook" or not isinstance(model.get("content"), dict):
        return
    nb = model["content"]
    if has_outputs(nb):
        folder = Path(contents_manager.root_dir) / os.path.dirname(path) / LAB_COPIES
        folder.mkdir(parents=True, exist_ok=True)
        node = nbformat.from_dict(copy.deepcopy(nb))
        tmp = folder / f".{os.path.basename(path)}.tmp"
        nbformat.write(node, str(tmp))
        tmp.replace(folder / os.path.basename(path))
    strip_outputs(nb)
