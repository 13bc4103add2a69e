"""The package's layers, written once here, and the import graph held to them: every import in
src/horizon (module level or inside a function) goes to the same layer or one below, and the
graph of modules has no circle. Layers, bottom first:"""

from __future__ import annotations

import ast
import pathlib

import pytest

LAYERS = [
    {"errors", "_native", "native", "options", "assets"},  # foundation: no torch-facing logic
    {"store", "optim", "distributed", "kernels"},  # host store, CPU AdamW, process group, ops
    {"models"},  # templates, specs, presets
    {"io", "data"},  # model directories, HF files, checkpoints; datasets and tokenizers
    {"engine"},  # the layer-major schedule
    {"trainer"},  # the user-facing training object
    {"plan", "doctor"},  # questions about a run and the machine
    {"run"},  # the training run as a product: options, loop, records, resume, export
    {"cli", "__main__", "moe", "__init__"},  # entry points and the public surface
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
SRC = pathlib.Path(__file__).resolve().parent.parent / "src" / "horizon"


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom | ast.Import, known: set) -> list[str]:
    """The horizon modules an import statement loads (a `from pkg import sub` names the
    submodule when it is one, else the package)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "horizon"]
    if node.level:
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "horizon":
        return []
    out = []
    for a in node.names:
        sub = f"{target}.{a.name}"
        out.append(sub if sub in known else target)
    return out


def import_graph() -> dict:
    mods = _modules()
    known = set(mods)
    graph = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps.update(d for d in _resolve(mod, path.name == "__init__.py", node, known) if d != mod)
        graph[mod] = deps
    return graph


def component(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_violations(graph: dict) -> list[str]:
    bad = []
    for mod, deps in graph.items():
        for dep in deps:
            if dep == "horizon":  # the package itself: `from horizon import __version__`
                continue
            a, b = component(mod), component(dep)
            if RANK[b] > RANK[a]:
                bad.append(f"{mod} (layer {RANK[a]}) imports {dep} (layer {RANK[b]})")
    return bad


def cycles(graph: dict) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w == "horizon":
                continue
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

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_every_component_has_a_layer():
    missing = sorted({component(m) for m in _modules()} - set(RANK))
    assert not missing, f"components without a layer in LAYERS: {missing}"


def test_imports_go_down_the_layers():
    assert layer_violations(import_graph()) == []


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_the_checks_can_fail():
    g = import_graph()
    g["horizon.models.spec"] = set(g["horizon.models.spec"]) | {"horizon.run.loop"}
    assert any("horizon.models.spec" in v for v in layer_violations(g))
    g = {"horizon.a": {"horizon.b"}, "horizon.b": {"horizon.c"}, "horizon.c": {"horizon.a"}}
    assert cycles(g) == [["horizon.a", "horizon.b", "horizon.c"]]


@pytest.mark.parametrize("mod", ["horizon.kernels.moe.fused", "horizon.engine.schedule"])
def test_graph_sees_relative_and_function_level_imports(mod):
    assert import_graph()[mod], mod
