"""Notebook support: the study notebooks' setup, where hand-run notebooks write, and a save hook
that keeps tracked notebooks clean.

Every study notebook (``notebooks/NN_*.py``, paired with ``NN_*.ipynb``) starts with one call,
:func:`setup`: it loads the model, builds the :class:`~emerdiff.EmerDiff` pipeline from the
notebook's parameters (sizes left ``None`` follow the model, by ``emerdiff.config.figure_sizes``),
loads the probe images and opens the figure writer.

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
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import nbformat

from emerdiff.config import SIZE_FIELDS  # notebook size parameter -> config field (no torch import)
from emerdiff.files import write_atomic

if TYPE_CHECKING:  # the save hook below must stay importable without loading torch
    import torch

    from emerdiff.config import EmerDiffConfig
    from emerdiff.evaluation.datasets import ProbeImage
    from emerdiff.method.pipeline import EmerDiff
    from emerdiff.sd.loading import SDPipeline
    from emerdiff.viz import FigureWriter

LAB_COPIES = Path("executed") / "lab"  # relative to the notebook's folder


def default_figure_dir() -> Path:
    """``figures/lab/`` of the source checkout (ignored by git; `make figures` owns ``figures/``),
    else ``figures-lab`` in the working folder (an installed package has no checkout)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").exists() and (root / "figures").is_dir():
        return root / "figures" / "lab"
    return Path.cwd() / "figures-lab"



class Study(NamedTuple):
    """What a study notebook works with; unpack it: ``sd, config, ed, items, writer, MODEL_LABEL = setup(...)``."""

    sd: SDPipeline  # the loaded model
    config: EmerDiffConfig  # sizes left None resolved by the model's size rule
    ed: EmerDiff
    items: list[ProbeImage]  # the probe images, in the order given
    writer: FigureWriter  # figures (PNG + PDF) and the JSON sidecar
    label: str  # the model's name on every figure ("tiny (random weights)" for the tiny model)


def config_fields(model: str | os.PathLike, **given: float | int | None) -> dict[str, Any]:
    """EmerDiffConfig fields sized for ``model`` by the one size rule (``emerdiff.config.config_sizes``:
    resolution, K, schedule, t_m, blur, batch, and a model family's own layers), each notebook size
    parameter given (``resolution``, ``K``, ``num_inference_steps``, ``modulation_timestep``,
    ``blur_sigma``, ``max_batch``; ``None``: the rule's) replacing its field."""
    unknown = set(given) - set(SIZE_FIELDS)
    if unknown:
        raise TypeError(f"unknown size parameter(s) {sorted(unknown)}; the sizes are {list(SIZE_FIELDS)}")
    from emerdiff.config import config_sizes

    fields = config_sizes(str(model))
    fields.update({SIZE_FIELDS[k]: v for k, v in given.items() if v is not None})
    return fields


def setup(
    model: str | os.PathLike = "reference",
    *,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    images: Sequence[str] = ("scene:0",),
    resolution: int | None = None,
    K: int | None = None,
    num_inference_steps: int | None = None,
    modulation_timestep: int | None = None,
    modulation_strength: float = 10.0,
    blur_sigma: float | None = None,
    kmeans_n_init: int = 2,
    max_batch: int | None = None,
    seeds: Sequence[int] = (0,),
    output_dir: str | os.PathLike | None = None,
    torch_threads: int = 0,
) -> Study:
    """The setup cell of every study notebook, from its parameters cell.

    Loads ``model`` (``load_pipeline``), builds the pipeline with the given sizes (``None``:
    the model's size rule, see :func:`config_fields`) and the first of ``seeds``, loads
    ``images`` (``datasets.load_probe_images`` names), opens a figure writer on ``output_dir``
    (``None``: :func:`default_figure_dir`) and prints one line (model, sizes, schedule, query
    grid) so an executed notebook records what it ran. ``torch_threads`` > 0 sets torch's thread count
    (1 is much faster on a busy shared CPU); 0 leaves torch's default.
    """
    if isinstance(images, str):
        raise TypeError(f"images must be a list of names, got the string {images!r}: write images = [{images!r}]")
    if not images:
        raise ValueError("images is empty: name at least one, e.g. images = ['scene:0']")
    if isinstance(seeds, int) or not seeds:
        raise ValueError(f"seeds must be a non-empty list, got {seeds!r}: e.g. seeds = [0]")
    if int(torch_threads) < 0:
        raise ValueError(f"torch_threads must be >= 0 (0: torch's default), got {torch_threads}")

    import torch

    from emerdiff import viz
    from emerdiff.config import EmerDiffConfig
    from emerdiff.evaluation.datasets import load_probe_images
    from emerdiff.method.pipeline import EmerDiff
    from emerdiff.sd.loading import load_pipeline

    if torch_threads:
        torch.set_num_threads(int(torch_threads))
    viz.set_style()
    fields = config_fields(model, resolution=resolution, K=K, num_inference_steps=num_inference_steps,
                           modulation_timestep=modulation_timestep, blur_sigma=blur_sigma, max_batch=max_batch)
    sd = load_pipeline(model, device=device, dtype=dtype)
    label = sd.source + (" (random weights)" if sd.source == "tiny" else "")
    config = EmerDiffConfig(**fields, modulation_strength=modulation_strength, kmeans_n_init=kmeans_n_init,
                            seed=seeds[0])
    ed = EmerDiff(sd, config)
    items = load_probe_images(images)
    writer = viz.FigureWriter(output_dir or default_figure_dir(), label)
    sizes = {k: getattr(config, field) for k, field in SIZE_FIELDS.items()}
    print(label, "|", ", ".join(f"{k} {v}" for k, v in sizes.items()), "| schedule:", ed.schedule.timesteps,
          "| query grid:", ed.query_grid())
    return Study(sd, config, ed, items, writer, label)


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
        write_atomic(folder / os.path.basename(path), lambda tmp: nbformat.write(node, tmp))
    strip_outputs(nb)
