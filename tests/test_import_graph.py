"""The house rules of the import graph: the data flow sim -> data -> augment -> models -> train -> evaluate ->
launch, every import pointing back up it, and no cycles anywhere (function-level imports count too).

Top-level modules (config, errors, survey, io_utils, ...) are the foundation: they import no package.

One exception, the public facade: the package root ``photoz_hpc`` (``__init__.py``) may reach the Python API
``photoz_hpc.launch.api`` so that ``import photoz_hpc as pz; pz.load_model(...)`` works. It does so lazily, in its
module ``__getattr__`` on first use, never at import time (checked below: at import time it reads only
``photoz_hpc.version``), so ``import photoz_hpc`` stays light and a module that imports the root forms no import
cycle through it: the facade edge is left out of the direction and cycle checks and allowed nowhere else."""

from __future__ import annotations

import ast
from pathlib import Path

import photoz_hpc

ROOT = Path(photoz_hpc.__file__).parent
FLOW = ("sim", "data", "augment", "models", "train", "evaluate", "launch")
#: the one edge against the flow: the package root's lazy import of the Python API (see the module docstring)
FACADE = ("photoz_hpc", "photoz_hpc.launch.api")


def _module_name(path: Path) -> str:
    name = ".".join(("photoz_hpc", *path.relative_to(ROOT).with_suffix("").parts))
    return name.removesuffix(".__init__")


def _is_module(dotted: str) -> bool:
    rel = Path(*dotted.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel).is_dir()


def import_graph() -> dict[str, set[str]]:
    """Module -> the photoz_hpc modules it imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("photoz_hpc"):
                subs = [f"{node.module}.{a.name}" for a in node.names]
                found = [s for s in subs if _is_module(s)]
                deps.update(found)
                if len(found) < len(subs):
                    deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("photoz_hpc."))
        graph[_module_name(path)] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return FLOW.index(parts[1]) if len(parts) > 1 and parts[1] in FLOW else None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_the_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def _without_facade(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    root, api = FACADE
    return {m: deps - {api} if m == root else deps for m, deps in graph.items()}


def test_no_import_cycles():
    assert cycles(_without_facade(import_graph())) == []


def test_the_package_root_reaches_the_api_lazily_and_nothing_else():
    """The facade edge exists only inside a function of ``__init__.py`` (not at import time), where the root imports
    nothing but ``photoz_hpc.version``."""
    tree = ast.parse((ROOT / "__init__.py").read_text())
    top_level = {n.module if isinstance(n, ast.ImportFrom) else a.name for n in tree.body
                 if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert {m for m in top_level if m and m.startswith("photoz_hpc")} == {"photoz_hpc.version"}
    assert import_graph()["photoz_hpc"] == {FACADE[1], "photoz_hpc.version"}


def test_imports_point_up_the_data_flow():
    wrong = []
    for module, deps in _without_facade(import_graph()).items():
        mine = _layer(module)
        for dep in deps:
            theirs = _layer(dep)
            if theirs is not None and (mine is None or theirs > mine):
                wrong.append(f"{module} -> {dep}")
    assert wrong == []
