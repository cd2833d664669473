"""Notebook support: the study notebooks' setup, where hand-run notebooks write, and a save hook
that keeps tracked notebooks clean.

Every study notebook (``notebooks/NN_*.py``, paired with ``NN_*.ipynb``) starts with one call,
:func:`setup`: it loads the model, builds the :class:`~emerdiff.EmerDiff` pipeline from the
notebook's parameters (settings left ``None`` take the model's preset, ``EmerDiffConfig.for_model``),
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
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import nbformat

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



# Default probe images: validation scenes (100+) and a VOC photo, never a test scene (0-99, the held-out
# tables' scenes; training/heldout.py VALIDATION_START): settings explored in notebooks must not see the test set.
DEFAULT_IMAGES = ("scene:100", "scene:101", "voc_sample")


class Study(NamedTuple):
    """What a study notebook works with; unpack it: ``sd, config, ed, items, writer, MODEL_LABEL = setup(...)``."""

    sd: SDPipeline  # the loaded model
    config: EmerDiffConfig  # the model's preset, then the notebook's settings
    ed: EmerDiff
    items: list[ProbeImage]  # the probe images, in the order given
    writer: FigureWriter  # figures (PNG + PDF) and the JSON sidecar
    label: str  # the model's name on every figure ("tiny (random weights)" for the tiny model)


def study_config(model: Any, **settings: Any) -> EmerDiffConfig:
    """The notebook's config: ``EmerDiffConfig.for_model(model, **settings)`` with every setting
    left ``None`` dropped, so it takes the model's preset. ``settings`` are EmerDiffConfig field
    names (``K`` is a deprecated alias of ``num_clusters``); an unknown name is a ValueError listing
    the fields. ``model``: a name, folder or hub id (read without loading weights), or a loaded model."""
    from emerdiff.config import EmerDiffConfig

    if "K" in settings:
        warnings.warn("the notebook parameter K is deprecated, use num_clusters (the EmerDiffConfig field name)",
                      FutureWarning, stacklevel=3)
        k = settings.pop("K")
        if settings.get("num_clusters") is None:
            settings["num_clusters"] = k
    return EmerDiffConfig.for_model(model, **{k: v for k, v in settings.items() if v is not None})


def setup(
    model: str | os.PathLike = "reference",
    *,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    images: Sequence[str] = DEFAULT_IMAGES,
    resolution: int | None = None,
    num_clusters: int | None = None,
    num_inference_steps: int | None = None,
    modulation_timestep: int | None = None,
    modulation_strength: float | None = None,
    blur_sigma: float | None = None,
    kmeans_n_init: int | None = None,
    max_batch: int | None = None,
    diffseg_kl_threshold: float | None = None,
    seeds: Sequence[int] = (0,),
    output_dir: str | os.PathLike | None = None,
    torch_threads: int | None = None,
    **settings: Any,
) -> Study:
    """The setup cell of every study notebook, from its parameters cell.

    Loads ``model`` (``load_pipeline``), builds the pipeline with
    ``EmerDiffConfig.for_model(model, ...)`` (:func:`study_config`: every setting left ``None`` takes
    the model's preset, as in ``emerdiff segment``; ``**settings``: any other EmerDiffConfig field)
    and the first of ``seeds``, loads ``images`` (``datasets.load_probe_images`` names), opens a
    figure writer on ``output_dir`` (``None``: :func:`default_figure_dir`) and prints one line (model,
    settings, schedule, query grid, threads) so an executed notebook records what it ran. ``torch_threads``:
    torch's thread count; None takes the command line's policy (:func:`emerdiff.threads.choose_threads`:
    ``EMERDIFF_THREADS``, else 1 below 4 cores, else the cores free by load average), 0 torch's own
    default (one per core).
    """
    if isinstance(images, str):
        raise TypeError(f"images must be a list of names, got the string {images!r}: write images = [{images!r}]")
    if not images:
        raise ValueError("images is empty: name at least one, e.g. images = ['scene:100']")
    if isinstance(seeds, int) or not seeds:
        raise ValueError(f"seeds must be a non-empty list, got {seeds!r}: e.g. seeds = [0]")
    if torch_threads is not None and int(torch_threads) < 0:
        raise ValueError(f"torch_threads must be None (automatic), 0 (torch's default, one per core) or a number "
                         f"of threads, got {torch_threads}")
    from emerdiff.threads import choose_threads

    threads = choose_threads(torch_threads)
    # before the (slow) load: a bad setting name fails here
    config = study_config(model, resolution=resolution, num_clusters=num_clusters,
                          num_inference_steps=num_inference_steps, modulation_timestep=modulation_timestep,
                          modulation_strength=modulation_strength, blur_sigma=blur_sigma,
                          kmeans_n_init=kmeans_n_init, max_batch=max_batch,
                          diffseg_kl_threshold=diffseg_kl_threshold, seed=seeds[0], **settings)

    import torch

    from emerdiff import viz
    from emerdiff.config import preset
    from emerdiff.evaluation.datasets import load_probe_images
    from emerdiff.method.pipeline import EmerDiff
    from emerdiff.sd.loading import load_pipeline

    torch.set_num_threads(threads.threads)
    viz.set_style()
    sd = load_pipeline(model, device=device, dtype=dtype)
    label = sd.source + (" (random weights)" if sd.source == "tiny" else "")
    ed = EmerDiff(sd, config)
    items = load_probe_images(images)
    writer = viz.FigureWriter(output_dir or default_figure_dir(), label)
    shown = [name for name in preset(model) if "layer" not in name]  # the preset's numbers (layers: too long)
    print(label, "|", ", ".join(f"{name} {getattr(config, name)}" for name in shown), "| schedule:",
          ed.schedule.timesteps, "| query grid:", ed.query_grid(), "|", threads.describe())
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
