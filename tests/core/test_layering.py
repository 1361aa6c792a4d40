"""The core's import graph: pure (torch/numpy/stdlib, plus numba for the CPU kernels), and acyclic even
counting the imports written inside functions, which hide a cycle from Python's import-time check."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "locdiff_core"
ALLOWED_THIRD_PARTY = {"torch", "numpy", "numba"}


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(core modules imported, top-level third-party packages imported), at any depth of the file."""
    core, other = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1:
                core.update([mod.split(".")[0]] if mod else [a.name for a in node.names])
            elif mod.split(".")[0] == "locdiff_core":
                core.add(mod.split(".")[1] if "." in mod else "__init__")
            elif node.level == 0:
                other.add(mod.split(".")[0])
        elif isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                (core if top == "locdiff_core" else other).add(
                    a.name.split(".")[1] if top == "locdiff_core" else top
                )
    return core, other


def test_core_imports_only_torch_numpy_and_the_stdlib():
    for path in sorted(CORE.glob("*.py")):
        _, other = _imports(path)
        bad = {m for m in other if m not in ALLOWED_THIRD_PARTY and m not in sys.stdlib_module_names}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_core_has_no_import_cycle():
    graph = {p.stem: _imports(p)[0] - {p.stem} for p in CORE.glob("*.py")}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            assert state.get(n) != 1, "import cycle: " + " -> ".join([*path[path.index(n) :], n])
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
