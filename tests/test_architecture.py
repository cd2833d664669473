"""The package's layers: core stages <- analysis <- interfaces, no import cycles (lazy imports count)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "emerdiff"

# Every module in one layer; a module may import its own layer and the ones below (lower number).
LAYERS: dict[str, int] = {
    # 0 core: the method's stages, the model loader and the shipped reference asset (weights + scene world)
    **{m: 0 for m in ("config", "images", "files", "models", "sdconfig", "testing", "attention", "inversion", "lowres",
                      "modulation", "assign", "diffseg", "faithfulness", "pipeline", "reference",
                      "reference.scenes")},
    # 1 analysis: probes and sweeps, diagnosis, evaluation protocols and metrics, data, labellers, plots
    **{m: 1 for m in ("probes", "sweep", "diagnosis", "metrics", "datasets", "openvocab", "viz")},
    # 2 interfaces: the commands, their shared options, notebook support, the inspector
    **{m: 2 for m in ("options", "cli", "evaluate", "lab", "inspector")},
    # 3 the reference model's training and evaluation scripts (may import everything)
    **{m: 3 for m in ("reference.model", "reference.train", "reference.heldout", "reference.figures",
                      "reference.readout_sweep")},
    "": 2,  # the package facade (emerdiff/__init__.py) re-exports the public API
}


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


def test_every_module_has_a_layer():
    assert set(_modules()) == set(LAYERS), "add new modules to LAYERS in tests/test_architecture.py"


def test_no_module_imports_a_higher_layer():
    graph = import_graph()
    upward = sorted(f"{m} (layer {LAYERS[m]}) imports {d} (layer {LAYERS[d]})"
                    for m, deps in graph.items() for d in deps if LAYERS[d] > LAYERS[m])
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
    assert "models" in graph["cli"]  # cli imports models only inside functions
    assert "pipeline" not in graph["faithfulness"]  # a TYPE_CHECKING import is not a runtime one


def test_the_test_helpers_are_no_runtime_dependency():
    """emerdiff.testing builds test-only models; what the runtime needs of it lives in emerdiff.sdconfig."""
    graph = import_graph()
    assert not sorted(m for m, deps in graph.items() if "testing" in deps and m != "testing")
    assert "sdconfig" in graph["models"] and graph["sdconfig"] == set()
