"""No synth module imports one that imports it back, directly or through others, lazy imports included."""

import ast
import graphlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """synth module -> the synth modules it imports anywhere (top level or inside functions), plus those named
    in "module:Class" strings (the families' pipeline classes), which are imported when used."""
    modules = {module_name(path): path for path in (ROOT / "synth").rglob("*.py")}

    def owner(name: str) -> str | None:  # synth.families.sd3.SD3 -> synth.families.sd3
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(owner(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.update(owner(f"{node.module}.{alias.name}") for alias in node.names)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                if re.fullmatch(r"synth[\w.]*:\w+", node.value):
                    targets.add(owner(node.value.partition(":")[0]))
        graph[name] = {target for target in targets if target and target != name}
    return graph


def test_graph_sees_lazy_imports():
    graph = import_graph()
    assert "synth.families" in graph["synth.checks"], "the graph misses synth.checks' imports"
    assert len(graph) > 30


def test_no_import_cycles():
    try:
        graphlib.TopologicalSorter(import_graph()).prepare()
    except graphlib.CycleError as error:
        pytest.fail("import cycle: " + " -> ".join(error.args[1]))
