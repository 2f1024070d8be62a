"""The import graph of fastdash/ and kernels/fastdash_kernels/ (docs/architecture.md): no circle, nothing
imports upward, the maths imports only torch and the standard library.

Built from the source with `ast`, module-level and function-level imports alike (a lazy import that
only dodges a circle is still a circle)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fastdash": ROOT / "fastdash", "fastdash_kernels": ROOT / "kernels" / "fastdash_kernels"}

# bottom to top: a module imports from its own layer and those below (docs/architecture.md)
LAYERS = (
    ("maths", ("fastdash.algo", "fastdash.correction", "fastdash.batch", "fastdash.state", "fastdash_kernels")),
    ("mechanisms", ()),  # every module not named in another layer: engines, data, rewards, memory, ranks...
    ("config", ("fastdash.config",)),
    ("layout", ("fastdash.layout",)),
    ("run", ("fastdash.runtime", "fastdash.trainer", "fastdash.checkpoint", "fastdash.evaluate")),
    ("entry", ("fastdash.train",)),
)


def modules() -> dict[str, Path]:
    out = {}
    for pkg, base in PACKAGES.items():
        for path in base.rglob("*.py"):
            parts = [pkg, *path.relative_to(base).with_suffix("").parts]
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported_names(path: Path, module: str) -> list[str]:
    """Every name an import statement anywhere in the file brings in, as absolute dotted names
    (`from a.b import c` gives a.b.c: a submodule, or a name of a.b)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            names += [f"{base}.{a.name}" for a in node.names]
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the fastdash / fastdash_kernels modules it imports."""
    mods = modules()

    def owner(name: str) -> str | None:  # the module itself, or the module a name was taken from
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        graph[mod] = {t for t in map(owner, imported_names(path, mod)) if t and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> int:
    best, level = "", 1  # mechanisms unless named
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > len(best):
                best, level = p, i
    return level


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "fastdash.rollout.vllm_dp" in graph["fastdash.rollout"]  # imported inside make_engine
    assert "fastdash.rollout.decode" in graph["fastdash.rollout.hf"]  # `from fastdash.rollout import decode`
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_nothing_imports_upward():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in import_graph().items() for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert upward == []


def test_the_maths_imports_only_torch_and_the_standard_library():
    for mod in ("fastdash.algo",):
        path = modules()[mod]
        roots = {n.split(".")[0] for n in imported_names(path, mod) if n}
        assert roots <= {"torch", "__future__"} | set(sys.stdlib_module_names), (mod, sorted(roots))
