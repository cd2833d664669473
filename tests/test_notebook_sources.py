"""The study notebooks' source is notebooks/NN_name.py (jupytext percent format); the committed
NN_name.ipynb must hold the same cells (sources and tags; outputs and metadata are noise), the
parameters cell stays tagged for papermill, ruff lints the sources, and the notebooks' setup is
one library call (emerdiff.notebook.lab.setup) whose settings left None are the model's preset
(EmerDiffConfig.for_model), and no notebook or figure default names a test scene."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

jupytext = pytest.importorskip("jupytext")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
PARAMETERS_MARKER = '# %% tags=["parameters"]'


def cell_view(nb: nbformat.NotebookNode) -> list[tuple[str, str, tuple[str, ...]]]:
    """What a notebook and its source must agree on: each cell's type, source and tags, in order."""
    return [(c.cell_type, c.source, tuple(c.metadata.get("tags", ()))) for c in nb.cells]


def first_difference(a: list, b: list) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"cell {i}: {x[0]} {x[2]} {x[1][:60]!r}... vs {y[0]} {y[2]} {y[1][:60]!r}..."
    return f"{len(a)} vs {len(b)} cells"


def load_build():
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_notebook_has_its_source():
    assert len(SOURCES) == 8
    assert [p.stem for p in SOURCES] == sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_committed_notebook_matches_its_source(source):
    ipynb = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    py = jupytext.read(source)
    assert cell_view(ipynb) == cell_view(py), (
        f"{source.with_suffix('.ipynb').name} disagrees with {source.name} ({first_difference(cell_view(ipynb), cell_view(py))}): "
        "edit the .py and run `make notebooks`")


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_parameters_cell_is_tagged_in_the_source(source):
    """Exactly one cell tagged `parameters`: the first code cell, before the setup that reads it."""
    text = source.read_text()
    assert text.count(PARAMETERS_MARKER) == 1, f"{source.name}: mark the parameters cell with {PARAMETERS_MARKER}"
    code = [c for c in jupytext.read(source).cells if c.cell_type == "code"]
    assert list(code[0].metadata.get("tags", [])) == ["parameters"]
    assert not any("parameters" in c.metadata.get("tags", []) for c in code[1:])
    assert "lab.setup(" in code[1].source  # the setup is one library call, right after the parameters
    for key in ("model", "device", "images", "resolution", "num_clusters", "seeds", "output_dir"):
        assert f"\n{key} = " in "\n" + code[0].source, (source.name, key)


def test_a_changed_source_or_tag_is_caught_and_rebuilt(tmp_path):
    """The comparison above can fail: edit a copy's source (a line, then the tag) and it disagrees;
    notebooks/_build.py finds the same and regenerates an output-free notebook that agrees again."""
    build = load_build()
    source = tmp_path / SOURCES[0].name
    shutil.copy(SOURCES[0], source)
    shutil.copy(SOURCES[0].with_suffix(".ipynb"), source.with_suffix(".ipynb"))
    assert build.mismatches(tmp_path) == []

    def agree() -> bool:
        return cell_view(nbformat.read(source.with_suffix(".ipynb"), as_version=4)) == cell_view(jupytext.read(source))

    text = source.read_text()
    for edited in (text.replace("item = items[0]\n", "item = items[-1]\n"),
                   text.replace(PARAMETERS_MARKER, "# %%")):
        assert edited != text
        source.write_text(edited)
        assert not agree()
        assert build.mismatches(tmp_path) == [f"{source.stem}.ipynb disagrees with {source.name}"]
        assert build.write(source)
        assert agree() and build.mismatches(tmp_path) == []
        nb = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
        nbformat.validate(nb)
        assert all(c.get("outputs", []) == [] and c.get("execution_count") is None for c in nb.cells)
        assert [c.id for c in nb.cells] == [f"00-{i:02d}" for i in range(len(nb.cells))]  # stable ids
        assert not build.write(source)  # unchanged: not rewritten
        source.write_text(text)
        build.write(source)


def test_build_keeps_notebook_edits_newer_than_the_source(tmp_path):
    """An .ipynb edited after its .py (JupyterLab without jupytext) is not overwritten silently."""
    build = load_build()
    source = tmp_path / SOURCES[0].name
    shutil.copy(SOURCES[0], source)
    target = source.with_suffix(".ipynb")
    nb = build.build(source)
    nb.cells[-1].source += "\nprint('edited in the notebook')"
    nbformat.write(nb, target)
    st = source.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(SystemExit, match="jupytext --sync"):
        build.write(source)
    assert "edited in the notebook" in target.read_text()
    assert build.write(source, force=True)
    assert "edited in the notebook" not in target.read_text()


def test_saving_in_jupyterlab_keeps_the_pair_in_step(tmp_path):
    """JupyterLab's save path (jupytext's contents manager, which `make lab` loads, with our pre-save
    hook): a cell added in the .ipynb lands in the .py and nothing else there changes; the saved
    .ipynb has no outputs, its copy with outputs goes to executed/lab/."""
    import asyncio

    pytest.importorskip("jupyter_server")
    from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
    from jupytext.async_contentsmanager import build_async_jupytext_contents_manager_class

    from emerdiff.notebook.lab import LAB_COPIES

    for name in ("jupytext.toml", SOURCES[0].name, SOURCES[0].with_suffix(".ipynb").name):
        shutil.copy(NOTEBOOKS / name, tmp_path / name)
    manager = build_async_jupytext_contents_manager_class(AsyncLargeFileManager)(
        root_dir=str(tmp_path), pre_save_hook="emerdiff.notebook.lab.pre_save")
    ipynb_name = SOURCES[0].with_suffix(".ipynb").name

    async def edit_and_save():
        nb = (await manager.get(ipynb_name))["content"]
        nb.cells.append(nbformat.v4.new_code_cell("print('a new cell')"))
        nb.cells[-1].outputs = [nbformat.v4.new_output("stream", text="a new cell\n")]
        nb.cells[-1].execution_count = 1
        await manager.save({"type": "notebook", "content": nb}, ipynb_name)

    asyncio.run(edit_and_save())
    assert (tmp_path / SOURCES[0].name).read_text() == SOURCES[0].read_text() + "\n# %%\nprint('a new cell')\n"
    saved = nbformat.read(tmp_path / ipynb_name, as_version=4)
    assert cell_view(saved) == cell_view(jupytext.read(tmp_path / SOURCES[0].name))
    assert all(c.outputs == [] for c in saved.cells if c.cell_type == "code")
    kept = nbformat.read(tmp_path / LAB_COPIES / ipynb_name, as_version=4)
    assert kept.cells[-1].outputs[0]["text"] == "a new cell\n"


def test_build_check_command_reports_the_committed_notebooks_in_sync():
    run = subprocess.run([sys.executable, str(NOTEBOOKS / "_build.py"), "--check"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_ruff_lints_the_notebook_sources():
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        pytest.skip("ruff is not installed in this environment (pip install -e '.[dev]')")
    files = subprocess.run([str(ruff), "check", "--show-files", "notebooks"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout
    listed = {Path(line.strip()).name for line in files.splitlines()}
    assert {p.name for p in SOURCES} <= listed
    lint = subprocess.run([str(ruff), "check", *map(str, SOURCES)], cwd=ROOT, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


PRESET_PARAMETERS = ("resolution", "num_clusters", "num_inference_steps", "modulation_timestep", "blur_sigma",
                     "max_batch")


def test_makefile_leaves_settings_to_the_presets():
    """Settings are not repeated in the Makefile: the notebooks take the preset (lab.setup -> for_model),
    and every notebook names its settings as the config fields (num_clusters, not K)."""
    make = "\n".join(line for line in (ROOT / "Makefile").read_text().splitlines() if not line.startswith("#"))
    assert not re.findall(rf"-p ({'|'.join(PRESET_PARAMETERS)}|K) ", make)
    assert "-p K " not in (ROOT / "Makefile").read_text()
    for source in SOURCES:
        params = jupytext.read(source).cells[1].source
        for key in PRESET_PARAMETERS:
            assert re.search(rf"^{key} = None\b", params, re.M), (source.name, key)
        assert not re.search(r"^K = ", params, re.M) and "K=K" not in source.read_text(), source.name


def test_study_config_is_the_preset_unless_given():
    from emerdiff.config import PRESETS, EmerDiffConfig
    from emerdiff.notebook.lab import study_config

    for model in ("reference", "tiny"):
        assert study_config(model) == EmerDiffConfig.for_model(model) == EmerDiffConfig(**PRESETS[model])
        assert study_config(model, **dict.fromkeys(PRESET_PARAMETERS)) == EmerDiffConfig.for_model(model)
    assert study_config("tiny", num_clusters=6, resolution=None) == EmerDiffConfig(**{**PRESETS["tiny"], "num_clusters": 6})
    given = dict(resolution=64, num_clusters=3, num_inference_steps=5, modulation_timestep=1, blur_sigma=0.0,
                 max_batch=2)
    config = study_config("tiny", **given)
    assert {k: getattr(config, k) for k in given} == given


# ------------------------------------------------------------ no default looks at the test scenes
def _scene_numbers(text: str) -> list[int]:
    """Every held-out scene a text names: scene:N literals and first_scene / start defaults."""
    return [int(n) for n in re.findall(r"scene:(\d+)", text)] + \
        [int(n) for n in re.findall(r"^first_scene\s*=\s*(\d+)", text, re.M)]


def test_no_notebook_or_figure_default_names_a_test_scene():
    """Held-out scenes 0-99 are the test set (training/heldout.py, VALIDATION_START): settings explored in
    notebooks and figures must never look at them. Scans every notebook source (its parameters cell and
    its code), the lab setup's defaults, the figure functions, the probe-image loader and the Makefile."""
    import inspect

    from emerdiff.notebook import lab
    from training.heldout import VALIDATION_START

    texts = {source.name: source.read_text() for source in SOURCES}
    for rel in ("emerdiff/notebook/lab.py", "emerdiff/notebook/inspector.py", "emerdiff/viz/__init__.py",
                "emerdiff/evaluation/datasets.py", "emerdiff/cli/app.py", "Makefile"):
        texts[rel] = (ROOT / rel).read_text()
    for name, text in texts.items():
        low = [n for n in _scene_numbers(text) if n < VALIDATION_START]
        assert not low, f"{name} names test scene(s) {low}; use validation scenes ({VALIDATION_START}+)"
    for source in SOURCES:  # the parameters cell names scenes at all: the probe notebooks do
        params = jupytext.read(source).cells[1].source
        assert _scene_numbers(params), source.name
    defaults = inspect.signature(lab.setup).parameters["images"].default
    assert [n for n in _scene_numbers(" ".join(defaults))] and min(_scene_numbers(" ".join(defaults))) >= VALIDATION_START


def test_the_scene_scan_catches_a_test_scene():
    """The scan above is not vacuous: a parameters cell naming scene:0 or first_scene = 3 is caught."""
    assert _scene_numbers('images = ["scene:0", "voc_sample"]\nfirst_scene = 3\n') == [0, 3]
    assert _scene_numbers('images = ["scene:100:flat"]\nfirst_scene = 100\n') == [100, 100]


def test_setup_refuses_bad_parameters_before_loading():
    from emerdiff.notebook.lab import setup

    with pytest.raises(TypeError, match=r"images = \['voc_sample'\]"):
        setup("tiny", images="voc_sample")
    with pytest.raises(ValueError, match="images is empty"):
        setup("tiny", images=[])
    with pytest.raises(ValueError, match="seeds"):
        setup("tiny", images=["voc_sample"], seeds=[])
    with pytest.raises(ValueError, match="torch_threads"):
        setup("tiny", images=["voc_sample"], torch_threads=-1)


def test_setup_builds_what_the_notebooks_use(tmp_path, capsys):
    import torch

    from emerdiff.config import PRESETS
    from emerdiff.notebook.lab import setup

    threads = torch.get_num_threads()
    try:
        sd, config, ed, items, writer, label = setup("tiny", images=["voc_sample"], num_clusters=3, seeds=[5],
                                                     output_dir=tmp_path / "figs", torch_threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    sizes = PRESETS["tiny"]
    assert (config.num_clusters, config.resolution, config.num_inference_steps) == (
        3, sizes["resolution"], sizes["num_inference_steps"])
    assert (config.modulation_timestep, config.blur_sigma, config.max_batch) == (
        sizes["modulation_timestep"], sizes["blur_sigma"], sizes["max_batch"])
    assert config.seed == 5 and ed.config is config and ed.model is sd
    assert [i.name for i in items] == ["voc_sample"] and items[0].has_gt
    assert label == "tiny (random weights)" and writer.model == label
    assert writer.out_dir == tmp_path / "figs" and writer.out_dir.is_dir()
    printed = capsys.readouterr().out
    assert printed.startswith("tiny (random weights) | resolution 128, num_clusters 3, num_inference_steps 10,")
    assert "query grid" in printed


def test_outputs_saved_into_a_tracked_notebook_never_reach_git():
    """A plain `jupyter lab` (without the project's save hook) may save outputs into notebooks/NN.ipynb;
    the clean filter that `make setup` configures strips them when git reads the file, and leaves a clean
    notebook byte-identical (so `git status` stays quiet)."""
    import subprocess

    import nbformat

    from emerdiff.notebook.lab import has_outputs

    configured = subprocess.run(["git", "config", "--get", "filter.nbstripout.clean"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()
    assert configured, "the nbstripout clean filter is not configured: run `make setup`"
    attr = subprocess.run(["git", "check-attr", "filter", "notebooks/00_quickstart.ipynb"], cwd=ROOT,
                          capture_output=True, text=True).stdout
    assert attr.strip().endswith("nbstripout"), attr
    path = ROOT / "notebooks" / "00_quickstart.ipynb"
    nb = nbformat.read(path, as_version=4)
    code = next(c for c in nb.cells if c.cell_type == "code")
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="leaked output\n")]
    code.execution_count = 7
    dirty = nbformat.writes(nb)
    assert has_outputs(nbformat.reads(dirty, as_version=4))

    def as_git_stores(text: str) -> str:
        """The blob id `git add` would store for this path (filters applied; nothing is written)."""
        return subprocess.run(["git", "hash-object", "--path", "notebooks/00_quickstart.ipynb", "--stdin"], cwd=ROOT,
                              input=text, capture_output=True, text=True, check=True).stdout.strip()

    def raw_hash(text: str) -> str:
        return subprocess.run(["git", "hash-object", "--no-filters", "--stdin"], cwd=ROOT, input=text,
                              capture_output=True, text=True, check=True).stdout.strip()

    clean = path.read_text()
    assert as_git_stores(dirty) == raw_hash(clean), "outputs would be committed"
    assert as_git_stores(clean) == raw_hash(clean), "the filter changes a clean notebook"


def test_make_lab_runs_as_root():
    """JupyterLab refuses root without --allow-root; `make lab` passes it when run as root, and LAB_ARGS through."""
    import os
    import subprocess

    out = subprocess.run(["make", "-n", "lab", "LAB_ARGS=--no-browser", f"VENV={ROOT / '.venv'}"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if "jupyter lab" in x)
    assert "--no-browser" in line
    assert ("--allow-root" in line) == (os.geteuid() == 0), line
