"""Hygiene of the house (issue 24): no machine paths in committed files, a core install without the
notebooks extra, a wheel without training/ and tests/, and the old flat import paths as aliases."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "emerdiff"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# ------------------------------------------------------------------ machine paths
# Roots under which a path names one machine's files (its runs folder, a home, a scratch disk).
# The operating system's own paths (/usr/bin/env, /dev/null, /proc/self/statm, /usr/bin/chromium) are
# the same on every machine and are not machine paths; a documented example writes /path/to/...
MACHINE_ROOTS = ["work", "tmp", "root", "home", "Users", "mnt", "scratch", "data", "srv", "opt", "var",
                 "gpfs", "lustre", "nfs", "private", "Volumes", "media"]
# an absolute path starts a word: after a quote, a space, '=', '(', ':', ',', '[' or a backquote, so that
# URLs (https://host/home/...) and relative paths (runs/tmp/...) are not taken for one
MACHINE_PATH = re.compile(r"(?:^|[\s\"'=(:,\[`])(/(?:" + "|".join(MACHINE_ROOTS) + r")/[^\s\"'`)\],]*)"
                          r"|\b([A-Za-z]:\\+(?:Users|home)\\[^\s\"']*)")
# (file, path) pairs that must stay absolute; keep this small and say why for each
ALLOWED: set[tuple[str, str]] = set()


def machine_paths(text: str) -> list[tuple[int, str]]:
    """(line number, path) of every absolute machine path in ``text``."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for m in MACHINE_PATH.finditer(line):
            found.append((number, m.group(1) or m.group(2)))
    return found


def test_machine_path_detector():
    # written with @ for / and % for \\ so that this file holds no machine path itself
    for bad in ['"model": "@work@runs@gpu@b2_step_004500"', "R=@tmp@runs", "out @home@ann@x.png",
                "--target @tmp@site .gpu/*.whl", '"C:%%Users%%ann%%runs"', "(@mnt@disk@a)"]:
        bad = bad.replace("@", "/").replace("%", "\\")
        assert machine_paths(bad), bad
    for good in ["#!/usr/bin/env bash", "ls x >/dev/null 2>&1", 'open("/proc/self/statm")',
                 "https://download.pytorch.org/whl/cpu", "https://example.org/home/a", "runs/gpu/b2_step_004500",
                 "R=${RUNS:-runs}", "emerdiff/assets/data/README.md", "/path/to/your/model"]:
        assert not machine_paths(good), good


def _tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    out = []
    for name in names.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():  # listed but deleted in this working tree
            continue
        head = path.open("rb").read(8192)
        if b"\0" not in head:  # binary files (weights, PNG) hold no text paths
            out.append(path)
    return out


def test_no_machine_paths_in_committed_files():
    files = _tracked_text_files()
    assert len(files) > 50 and ROOT / "pyproject.toml" in files  # the listing itself works
    problems = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text(encoding="utf-8", errors="replace")
        problems += [f"{rel}:{n}: {p}" for n, p in machine_paths(text) if (rel, p) not in ALLOWED]
    assert not problems, ("absolute paths of a machine in committed files; write them repo-relative "
                          "(runs/...) or as a setting with a default:\n" + "\n".join(problems))


# ------------------------------------------------------------------ the core install and the extra
def _requirement_names(reqs: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in reqs}


NOTEBOOK_EXTRA = _requirement_names(PYPROJECT["project"]["optional-dependencies"]["notebooks"])
# import names of the extra's packages and of what they bring that the core does not
EXTRA_ONLY_IMPORTS = {name.replace("-", "_") for name in NOTEBOOK_EXTRA} | {
    "IPython", "pandas", "jupyter_client", "nbclient", "jupyter_server", "notebook"}
# what `pip install emerdiff` gives: segment, evaluate, the API (and every figure function's module)
CORE_MODULES = ["__init__.py", "_aliases.py", "files.py", "config.py", "assets", "sd", "method", "evaluation",
                "studies", "cli", "viz"]


def test_core_dependencies_leave_out_the_notebook_stack():
    core = _requirement_names(PYPROJECT["project"]["dependencies"])
    assert {"torch", "diffusers", "transformers", "numpy", "matplotlib"} <= core
    assert NOTEBOOK_EXTRA >= {"jupyterlab", "papermill", "ipywidgets", "ipympl", "seaborn", "jupytext",
                              "nbformat", "ipykernel"}
    assert not core & NOTEBOOK_EXTRA, f"in the core install: {sorted(core & NOTEBOOK_EXTRA)}"


def _core_files() -> list[Path]:
    out = []
    for entry in CORE_MODULES:
        path = PACKAGE / entry
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return out


def _imports_with_parents(tree: ast.AST):
    """Every import node with the chain of nodes that encloses it (``if TYPE_CHECKING:`` skipped)."""
    def visit(node, parents):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, parents
        for child in ast.iter_child_nodes(node):
            yield from visit(child, parents + [node])

    yield from visit(tree, [])


def _top_names(node: ast.Import | ast.ImportFrom) -> set[str]:
    if isinstance(node, ast.ImportFrom):
        return {node.module.split(".")[0]} if node.module and not node.level else set()
    return {alias.name.split(".")[0] for alias in node.names}


def test_core_modules_import_no_extra_at_module_level():
    files = _core_files()
    assert PACKAGE / "viz" / "__init__.py" in files and PACKAGE / "cli" / "app.py" in files
    problems = []
    for path in files:
        for node, parents in _imports_with_parents(ast.parse(path.read_text())):
            lazy = any(isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)) for p in parents)
            extra = _top_names(node) & EXTRA_ONLY_IMPORTS
            notebook = isinstance(node, ast.ImportFrom) and (node.module or "").startswith("emerdiff.notebook")
            if not lazy and (extra or notebook):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not problems, ("a core module imports a package of the notebooks extra at module level; import it "
                          "inside the function that needs it:\n" + "\n".join(problems))


def _guarded_with_hint(node: ast.AST, parents: list[ast.AST]) -> bool:
    """Inside a try whose ImportError handler tells the user to install the notebooks extra."""
    for parent in parents:
        if isinstance(parent, ast.Try) and any(node is n or node in ast.walk(n) for n in parent.body):
            for handler in parent.handlers:
                caught = ast.unparse(handler.type) if handler.type else ""
                if "ImportError" in caught and "emerdiff[notebooks]" in ast.unparse(handler):
                    return True
    return False


def test_cli_and_figures_ask_for_the_extra_by_name():
    checked, problems = 0, []
    for path in sorted((PACKAGE / "cli").rglob("*.py")) + sorted((PACKAGE / "viz").rglob("*.py")):
        for node, parents in _imports_with_parents(ast.parse(path.read_text())):
            if _top_names(node) & EXTRA_ONLY_IMPORTS:
                checked += 1
                if not _guarded_with_hint(node, parents):
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert checked >= 3  # papermill, jupyter_client, seaborn/pandas: the scan sees them
    assert not problems, ("an import of the notebooks extra without a clear error; wrap it in try/except "
                          "ImportError that says pip install 'emerdiff[notebooks]':\n" + "\n".join(problems))


def test_core_runs_without_the_extra(tmp_path):
    """A process where the extra's packages cannot be imported: the core modules import, `emerdiff figures`
    and the seaborn plots fail with the install hint, and segment's parser still builds."""
    script = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        BLOCKED = {sorted(EXTRA_ONLY_IMPORTS)!r}

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)

        for name in list(sys.modules):
            if name.split(".")[0] in BLOCKED:
                del sys.modules[name]
        sys.meta_path.insert(0, Block())
        import emerdiff
        for info in pkgutil.walk_packages(emerdiff.__path__, "emerdiff."):
            if not info.name.startswith("emerdiff.notebook"):
                importlib.import_module(info.name)
        from emerdiff import viz
        from emerdiff.cli.app import main
        try:
            viz.probe_bars([{{"x": 1, "y": 2.0}}], "x", "y", "m", "t")
        except ImportError as e:
            assert "pip install 'emerdiff[notebooks]'" in str(e), e
        else:
            raise AssertionError("probe_bars ran without seaborn")
        rc = main(["figures", "--out", {str(tmp_path / "figs")!r}])
        assert rc == 2, rc
        print("CORE-OK")
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "CORE-OK" in run.stdout, run.stderr[-3000:]
    assert "pip install 'emerdiff[notebooks]'" in run.stderr


def test_wheel_holds_the_package_only():
    """The packages setuptools puts in the wheel, from pyproject's own find settings."""
    from setuptools import find_namespace_packages, find_packages

    find = PYPROJECT["tool"]["setuptools"]["packages"]["find"]
    finder = find_namespace_packages if find.get("namespaces", True) else find_packages
    packages = finder(where=str(ROOT / find.get("where", ["."])[0]), include=find.get("include", ["*"]),
                      exclude=find.get("exclude", []))
    assert packages and all(p == "emerdiff" or p.startswith("emerdiff.") for p in packages), packages
    assert not [p for p in packages if p.split(".")[0] in {"training", "tests", "benchmarks", "notebooks"}]
    # every folder of the package that holds code ships (a missing __init__.py or include pattern would drop it)
    code_dirs = {".".join(f.parent.relative_to(ROOT).parts) for f in PACKAGE.rglob("*.py")}
    assert code_dirs <= set(packages), sorted(code_dirs - set(packages))
    # the shipped weights and class tables are package data
    data = PYPROJECT["tool"]["setuptools"]["package-data"]["emerdiff"]
    for needed in ["assets/weights/unet/config.json", "assets/weights/reference.json", "assets/data/ade20k150.json"]:
        assert any(_glob_match(needed, glob) for glob in data), needed


def _glob_match(path: str, glob: str) -> bool:
    """setuptools' package-data glob ('**' spans folders) matched against a package-relative path."""
    pattern = re.escape(glob).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*")
    return re.fullmatch(pattern, path) is not None


# ------------------------------------------------------------------ deprecated import paths
def _fresh_import(name: str):
    sys.modules.pop(name, None)
    return importlib.import_module(name)


def test_old_module_path_warns_and_is_the_new_module():
    import emerdiff.method.readout as readout

    with pytest.warns(DeprecationWarning, match=r"emerdiff\.assign .*emerdiff\.method\.readout"):
        old = _fresh_import("emerdiff.assign")
    assert old is readout
    assert readout.__spec__.name == "emerdiff.method.readout"  # the alias leaves the module's own spec alone
    from emerdiff.assign import assign_labels
    assert assign_labels is readout.assign_labels


def test_every_alias_names_an_existing_module():
    from emerdiff._aliases import MOVED

    missing = [f"{old} -> {new}" for old, new in MOVED.items() if importlib.util.find_spec(new) is None]
    assert not missing, "aliases to modules that do not exist (update emerdiff/_aliases.py):\n" + "\n".join(missing)
    assert "emerdiff.testing" not in MOVED  # test-only builders are not part of the package


def test_sweep_alias_keeps_the_facade_function():
    import emerdiff
    import emerdiff.studies.sweep as sweep_module

    function = emerdiff.sweep
    assert callable(function) and not isinstance(function, type(sweep_module))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = _fresh_import("emerdiff.sweep")
        from emerdiff.sweep import load_map
    assert old is sweep_module and load_map is sweep_module.load_map
    assert emerdiff.sweep is function


def test_package_alias_carries_submodules_and_moved_out_modules_say_where():
    import emerdiff.assets.scenes as scenes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert _fresh_import("emerdiff.reference.scenes") is scenes
    with pytest.raises(ModuleNotFoundError, match=r"training\.train"):
        _fresh_import("emerdiff.reference.train")
    with pytest.raises(ModuleNotFoundError, match="builders"):
        _fresh_import("emerdiff.testing")
