"""The package's layers: core stages <- analysis <- interfaces, no import cycles (lazy imports count)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "emerdiff"

# The floors of the house (docs/ARCHITECTURE.md), lowest first. A module may import its own floor and
# the floors below; a package's modules sit on the package's floor unless named on their own.
FLOORS: list[tuple[str, list[str]]] = [
    # what everything stands on: output files, the shipped assets, SD component configs and images
    ("foundation", ["files", "threads", "assets", "assets.scenes", "sd.components", "sd.images"]),
    # loading a Stable Diffusion pipeline and reading its layers and schedule
    ("sd", ["sd", "sd.layers", "sd.loading"]),
    # every knob and the one preset table
    ("config", ["config"]),
    # the paper's steps A-D and the EmerDiff pipeline
    ("method", ["method"]),
    # figures (drawing only: they take arrays and results)
    ("viz", ["viz"]),
    # metrics, protocols, datasets and the evaluation runner
    ("evaluation", ["evaluation"]),
    # probes, sweeps and diagnosis: studies that call the method's entry points
    ("studies", ["studies"]),
    # what users touch: the command line, notebook support and the inspector, the package facade
    ("interfaces", ["cli", "notebook", "", "_aliases"]),
]


def layer_of(module: str) -> int:
    """The floor of a module: its own entry, else its package's (longest prefix)."""
    best, best_len = None, -1
    for level, (_, names) in enumerate(FLOORS):
        for name in names:
            if (module == name or (name and module.startswith(name + "."))) and len(name) > best_len:
                best, best_len = level, len(name)
    if best is None:
        raise KeyError(f"{module!r} is on no floor: add it to FLOORS in tests/test_architecture.py")
    return best


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(p for p in parts if p != "__init__")
        out[name] = f
    return out


def _runtime_imports(tree: ast.AST) -> list[ast.ImportFrom | ast.Import]:
    """Import statements, including those inside functions, except ``if TYPE_CHECKING:`` blocks."""
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
                names = [f"{target}.{a.name}".lstrip(".") for a in node.names]
                deps.update(n if n in mods else target for n in names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("emerdiff"):
                target = node.module.removeprefix("emerdiff").lstrip(".")
                deps.update(f"{target}.{a.name}".lstrip(".") if f"{target}.{a.name}".lstrip(".") in mods else target
                            for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name.removeprefix("emerdiff").lstrip(".") for a in node.names
                            if a.name.split(".")[0] == "emerdiff")
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def test_every_module_has_a_floor():
    for module in _modules():
        layer_of(module)


def test_no_module_imports_a_higher_layer():
    graph = import_graph()
    upward = sorted(f"{m} ({FLOORS[layer_of(m)][0]}) imports {d} ({FLOORS[layer_of(d)][0]})"
                    for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m))
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    cycles = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*path[path.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_lazy_imports():
    graph = import_graph()
    assert "sd.loading" in graph["cli.app"]  # the CLI imports the loader only inside functions
    assert "method.pipeline" not in graph["method.measures"]  # a TYPE_CHECKING import is not a runtime one


def test_the_checker_catches_an_upward_import():
    """The floors are real: the floor function puts a known pair the right way round."""
    assert layer_of("method.readout") < layer_of("studies.probes") < layer_of("cli.options")
    assert layer_of("sd.images") < layer_of("config") < layer_of("method.pipeline")
    assert layer_of("evaluation.metrics") > layer_of("viz")


def test_training_and_test_builders_stay_outside_the_wheel():
    """Training code and the test-only model builders live beside the package, not in it; nothing
    in the package imports them."""
    root = PACKAGE.parent
    assert (root / "training" / "train.py").exists() and (root / "tests" / "builders.py").exists()
    assert not (PACKAGE / "testing.py").exists() and not (PACKAGE / "reference").exists()
    for name, path in _modules().items():
        for node in _runtime_imports(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            bad = [m for m in mods if m.split(".")[0] in ("training", "builders", "tests")]
            assert not bad, f"emerdiff.{name} imports {bad}: runtime code must not need training or test code"


def test_importing_the_package_does_not_import_torch():
    """The facade resolves its names on first use, so `import emerdiff` (and every CLI refusal built on it)
    starts in milliseconds; the first use of a name imports what it needs."""
    import subprocess
    import sys

    code = ("import sys, emerdiff; assert 'torch' not in sys.modules, 'import emerdiff imported torch'; "
            "assert emerdiff.EmerDiffConfig().num_clusters == 25; assert 'torch' not in sys.modules; "
            "from emerdiff import EmerDiff; assert 'torch' in sys.modules and EmerDiff.__name__ == 'EmerDiff'; "
            "assert sorted(emerdiff.__all__) == sorted(n for n in dir(emerdiff) if n in emerdiff.__all__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
