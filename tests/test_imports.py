"""The import graph of every package, read from the source with `ast` (nothing is imported):
no cycles, function-level imports included; the pipeline's core never reaches into operations;
a function-level import in harness/ says why it is not at the top of its file."""
import ast
import functools
from pathlib import Path

import pytest

from helpers import REPO

PACKAGES = ("harness", "analysis", "experiments", "benchmarks")


def _modules() -> dict[str, Path]:
    """Module name -> file, for every .py file of PACKAGES (a package is its __init__.py)."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).rglob("*.py")):
            parts = f.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


@functools.cache
def _parsed(path: Path) -> tuple[list[str], ast.Module]:
    """A file's lines and syntax tree (parsed once: several tests walk them)."""
    text = path.read_text()
    return text.splitlines(), ast.parse(text, str(path))


def _imports(name: str, path: Path, known) -> list[tuple[str, ast.stmt]]:
    """(imported module, statement) for every import in the file, at any depth. `from a import b`
    is an import of module a.b when that is a module, else of a; a relative import is resolved
    against the file's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(_parsed(path)[1]):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:      # `import a.b.c` of a name inside a module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.append((t, node))
    return out


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """Module -> the modules it imports (read once: several tests ask, none changes it)."""
    mods = _modules()
    return {name: {t for t, _ in _imports(name, path, mods)} for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """Per strongly connected component of more than one module (Tarjan's algorithm,
    iterative): one cycle through it (a -> b -> ... -> a) and all its modules."""
    index, low, on, stack, comps, n = {}, {}, set(), [], [], 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = n
        n += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = n
                    n += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.add(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        comps.append(comp)
    return [(_cycle_in(graph, c), sorted(c)) for c in comps]


def _cycle_in(graph, comp: set) -> list[str]:
    """A shortest cycle through the alphabetically first module of a strongly connected set."""
    start = min(comp)
    paths, seen = [[start]], {start}
    while paths:
        nxt = []
        for p in paths:
            for w in sorted(graph[p[-1]] & comp):
                if w == start:
                    return p + [start]
                if w not in seen:
                    seen.add(w)
                    nxt.append(p + [w])
        paths = nxt
    return [start]


def test_the_cycle_finder_finds_and_names_a_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e", "d"}}
    assert cycles(g) == [(["a", "b", "c", "a"], ["a", "b", "c"])]


def test_the_graph_sees_function_level_and_relative_imports():
    g = import_graph()
    assert "harness.schedule.ir" in g["harness.schedule.simulate"]         # from .ir import
    assert "harness.core.world" in g["harness.run"]                        # inside main()
    assert "harness.schedule" in g["harness.core.executor"]                # from .. import schedule


@pytest.mark.parametrize("package", ["harness", "analysis", "experiments", "benchmarks"])
def test_no_import_cycle(package):
    found = [(c, comp) for c, comp in cycles(import_graph())
             if any(m.split(".")[0] == package for m in comp)]
    assert not found, "import cycles: " + "; ".join(
        f"{' -> '.join(c)} (all in one cycle: {', '.join(comp)})" for c, comp in found)


def test_the_core_never_imports_operations_or_the_run():
    """harness.schedule (pure Python), harness.models and harness.core are the pipeline; the
    operations (harness.ops) and the run's assembly (config, run, train, worker) use them,
    never the other way."""
    above = ("harness.ops", "harness.config", "harness.run", "harness.train", "harness.worker")
    bad = [f"{m} imports {t}" for m, ts in import_graph().items()
           if m.startswith(("harness.core", "harness.schedule", "harness.models"))
           for t in ts if any(t == a or t.startswith(a + ".") for a in above)]
    assert not bad, bad


def test_function_level_imports_say_why():
    """An import inside a function is there on purpose (an optional or heavy dependency, MPI
    started only after --help): a comment on its line, or above it or its block of imports,
    says so."""
    mods = _modules()
    bad = []
    for name, path in mods.items():
        if not name.startswith(("harness.", "analysis.")):
            continue
        lines, tree = _parsed(path)
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    k = node.lineno - 1
                    while k > 0 and lines[k - 1].lstrip().startswith(("import ", "from ")):
                        k -= 1                          # up to the first of a block of imports
                    said = "#" in lines[node.lineno - 1] or lines[k - 1].lstrip().startswith("#")
                    if not said:
                        bad.append(f"{path.relative_to(REPO)}:{node.lineno}: "
                                   f"{lines[node.lineno - 1].strip()}")
    assert not bad, "function-level imports without a comment saying why:\n" + "\n".join(bad)


def test_the_analysis_layers_go_one_way():
    """analysis.read (files to frames) uses nothing above it; analysis.measure (numbers from
    frames) never a figure, the command lines or the what-if; analysis.predict never a figure or
    a command line. So a number never depends on a figure module (or on matplotlib)."""
    def layer_of(m):
        parts = m.split(".")
        return parts[1] if len(parts) > 1 and parts[0] == "analysis" else None
    forbidden = {"read": ("measure", "predict", "plots", "stream", "pebble", "whatif",
                          "compare", "figures"),
                 "measure": ("predict", "plots", "stream", "pebble", "whatif", "compare",
                             "figures"),
                 "predict": ("plots", "stream", "pebble", "whatif", "compare", "figures")}
    bad = [f"{m} imports {t}" for m, ts in import_graph().items() if layer_of(m) in forbidden
           for t in ts if layer_of(t) in forbidden[layer_of(m)] or t.startswith("matplotlib")]
    assert not bad, bad
