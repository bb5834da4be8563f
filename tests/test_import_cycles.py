"""Dependencies between the library's subpackages point one way: no import cycle, not even one
kept alive by an import inside a function or under TYPE_CHECKING."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "libs" / "cloudmatrix"


def _unit(module: str) -> str:
    """cloudmatrix.kvcache.reads -> kvcache; cloudmatrix.errors -> errors (a top-level module)."""
    return module.split(".")[1]


def import_graph(lib: Path = LIB) -> dict[str, dict[str, str]]:
    """unit -> {imported unit: "file:line" of one such import}, for every import in every file."""
    graph: dict[str, dict[str, str]] = defaultdict(dict)
    for path in sorted(lib.rglob("*.py")):
        parts = path.relative_to(lib.parent).with_suffix("").parts
        if len(parts) == 2 and parts[1] == "__init__":
            continue
        source = _unit(".".join(parts))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                if name.startswith("cloudmatrix.") and _unit(name) != source:
                    graph[source].setdefault(_unit(name), f"{path.relative_to(lib)}:{node.lineno}")
    return graph


def find_cycle(graph: dict[str, dict[str, str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, {}):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_subpackages_import_each_other_without_a_cycle():
    graph = import_graph()
    cycle = find_cycle(graph)
    where = [f"{a} -> {b} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:])] if cycle else []
    assert cycle is None, "import cycle: " + "; ".join(where)
    assert {"model", "quant", "kvcache", "rpc", "instance"} <= set(graph)  # the walk saw the library


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "cloudmatrix"
    for sub, text in (("a", "from cloudmatrix.b.y import f\n"),
                      ("b", "def f():\n    from cloudmatrix.c import g\n"),
                      ("c", "import cloudmatrix.a.x\n")):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
        (pkg / sub / ("x.py" if sub == "a" else "y.py" if sub == "b" else "z.py")).write_text(text)
    graph = import_graph(pkg)
    assert graph["b"] == {"c": "b/y.py:2"}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    del graph["c"]
    assert find_cycle(graph) is None
