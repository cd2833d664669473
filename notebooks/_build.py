"""Regenerate the study notebooks NN_name.ipynb from their sources NN_name.py (jupytext percent format).

    .venv/bin/python notebooks/_build.py            # every notebook (what `make notebooks` runs)
    .venv/bin/python notebooks/_build.py 01_layer_probe.py
    .venv/bin/python notebooks/_build.py --check    # exit 1 if an .ipynb disagrees with its .py

The .ipynb is written without outputs, with stable cell ids (NN-ii: regenerating does not churn
the diff) and the kernel named in the .py header, and only when its text changes. It refuses to
overwrite an .ipynb that is newer than its .py and holds other cells (edited in JupyterLab
without jupytext): bring those edits into the .py first with
``.venv/bin/jupytext --sync notebooks/NN_name.ipynb``, or pass ``--force`` to drop them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jupytext
import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def sources(folder: Path = HERE) -> list[Path]:
    """The notebook sources: NN_name.py of ``folder``."""
    return sorted(folder.glob("[0-9][0-9]_*.py"))


def cells(nb: nbformat.NotebookNode) -> list[tuple[str, str, list[str]]]:
    """What must agree between a source and its notebook: each cell's type, source and tags."""
    return [(c.cell_type, c.source, list(c.metadata.get("tags", []))) for c in nb.cells]


def build(source: Path) -> nbformat.NotebookNode:
    """The notebook of a percent-format source: its cells, no outputs, stable ids."""
    text_nb = jupytext.read(source)
    nb = new_notebook()
    nb.metadata["kernelspec"] = dict(text_nb.metadata.get("kernelspec") or
                                     {"name": "emerdiff", "display_name": "Python (emerdiff)", "language": "python"})
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(text_nb.cells):
        if cell.cell_type == "markdown":
            new = new_markdown_cell(cell.source)
        elif cell.cell_type == "code":
            new = new_code_cell(cell.source)
        else:
            raise ValueError(f"{source.name}: cell {i} is a {cell.cell_type} cell; use code or markdown")
        if cell.metadata.get("tags"):
            new.metadata["tags"] = list(cell.metadata["tags"])
        new.id = f"{source.name[:2]}-{i:02d}"
        nb.cells.append(new)
    nbformat.validate(nb)
    return nb


def write(source: Path, force: bool = False) -> bool:
    """Write ``source``'s .ipynb if its text changed; True if written."""
    target = source.with_suffix(".ipynb")
    nb = build(source)
    text = nbformat.writes(nb) + "\n"
    written = False
    if target.exists():
        old = nbformat.read(target, as_version=4)
        if (not force and cells(old) != cells(nb) and target.stat().st_mtime > source.stat().st_mtime):
            raise SystemExit(f"{target.name} is newer than {source.name} and holds other cells (edited in "
                             f"JupyterLab without jupytext?). Bring them into the source with "
                             f"`.venv/bin/jupytext --sync {target}`, or rerun with --force to drop them.")
    if not target.exists() or target.read_text() != text:
        target.write_text(text)
        written = True
    # the pair shares one time: make sees the .ipynb up to date, and jupytext in JupyterLab does not
    # take the .ipynb for an edit newer than its source
    st = source.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    return written


def mismatches(folder: Path = HERE) -> list[str]:
    """One line per notebook whose .ipynb is missing or disagrees with its .py (cells and tags)."""
    problems = []
    for source in sources(folder):
        target = source.with_suffix(".ipynb")
        if not target.exists():
            problems.append(f"{target.name} is missing")
        elif cells(nbformat.read(target, as_version=4)) != cells(build(source)):
            problems.append(f"{target.name} disagrees with {source.name}")
    for target in sorted(folder.glob("[0-9][0-9]_*.ipynb")):
        if not target.with_suffix(".py").exists():
            problems.append(f"{target.name} has no source {target.with_suffix('.py').name}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="sources to build (default: every NN_name.py here)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a notebook is out of date")
    parser.add_argument("--force", action="store_true", help="overwrite notebooks edited after their source")
    args = parser.parse_args(argv)
    if args.check:
        problems = mismatches()
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            print("run `make notebooks` (or .venv/bin/python notebooks/_build.py)", file=sys.stderr)
        return 1 if problems else 0
    chosen = [HERE / Path(n).name for n in args.names] or sources()
    for source in chosen:
        if source.suffix != ".py" or not source.exists():
            print(f"error: {source} is not a notebook source here (NN_name.py in {HERE})", file=sys.stderr)
            return 2
        if write(source, force=args.force):
            print("wrote", source.with_suffix(".ipynb").relative_to(HERE.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
