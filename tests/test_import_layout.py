"""The layout holds: imports point one way (cli -> experiment -> training, evaluation -> method -> weights
-> data -> the base modules), and no module imports another that imports it back. Read from the import
statements of every module, the ones inside functions included."""

import ast
from pathlib import Path

from conftest import REPO_ROOT

SRC = REPO_ROOT / "src"
RANK = {"errors": 0, "io": 0, "paths": 0, "precision": 0, "progress": 0, "registry": 0, "data": 1,
        "weights": 2, "method": 3, "evaluation": 4, "training": 4, "experiment": 5, "cli": 6}


def modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "nlsr").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, known: dict) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nlsr"):
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("nlsr")}
    return {m for m in found if m in known}


def layer(module: str) -> str:
    return module.split(".")[1] if "." in module else "nlsr"


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(p, known) - {m} for m, p in known.items()}


def test_every_module_has_a_layer():
    assert {layer(m) for m in graph()} - {"nlsr"} <= set(RANK)


def test_imports_point_down_and_never_sideways_between_training_and_evaluation():
    wrong = [(a, b) for a, targets in graph().items() for b in targets
             if "nlsr" not in (layer(a), layer(b))
             and (RANK[layer(b)] > RANK[layer(a)] or {layer(a), layer(b)} == {"evaluation", "training"})]
    assert wrong == []


def test_the_method_imports_no_training_evaluation_experiment_or_cli_code():
    wrong = [(a, b) for a, targets in graph().items() if layer(a) == "method" for b in targets
             if layer(b) in ("training", "evaluation", "experiment", "cli")]
    assert wrong == []


def test_no_import_cycles():
    edges, cycles, index, low, stack, on = graph(), [], {}, {}, [], set()

    def visit(v):                       # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))
    for v in edges:
        if v not in index:
            visit(v)
    assert cycles == []


def test_no_two_modules_differ_only_by_a_granularity_prefix():
    names = {m.rsplit(".", 1)[-1] for m in modules()}
    prefixes = ("neuron_", "entry_", "row_", "rows_")
    assert [n for n in names if n.startswith(prefixes) and n.split("_", 1)[1] in names] == []
