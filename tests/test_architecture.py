"""The package layout is the architecture: folders are pipeline stages and imports point one way.

    errors, paths, utils  <-  core.quant  <-  config  <-  data  <-  models  <-  evaluate  <-  core  (and kernels)
        <-  analysis, transforms  <-  method  <-  methods, deploy  <-  loading  <-  experiments  <-  report
        <-  testbed, reproduce  <-  cli

A module may import modules of a lower stage, or of its own stage inside its own package. Imports sit at the top of
a file (none inside a function: an import that dodges a cycle is a module in the wrong folder), and the module
graph has no cycle. This test fails on a new violation and names it.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = [                                   # (module prefix, stage); the longest matching prefix wins
    ("qvlm.errors", 0), ("qvlm.paths", 0), ("qvlm.utils", 1), ("qvlm.core.quant", 2), ("qvlm.config", 3),
    ("qvlm.data", 4), ("qvlm.models", 5), ("qvlm.evaluate", 6), ("qvlm.core", 7), ("kernels", 7),
    ("qvlm.analysis", 8), ("qvlm.transforms", 8), ("qvlm.method", 9), ("qvlm.methods", 10), ("qvlm.deploy", 10),
    ("qvlm.loading", 11), ("qvlm.experiments", 12), ("qvlm.report", 13), ("qvlm.testbed", 14),
    ("qvlm.reproduce", 14), ("qvlm.cli", 15), ("qvlm.__main__", 16), ("qvlm", 3.5),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def stage(mod: str) -> int:
    best = max((p for p, _ in STAGES if mod == p or mod.startswith(p + ".")), key=len)
    return dict(STAGES)[best]


def package(mod: str) -> str:
    """The stage folder a module belongs to ('qvlm.core', 'qvlm.methods', 'kernels', or the module itself)."""
    best = max((p for p, _ in STAGES if mod == p or mod.startswith(p + ".")), key=len)
    return best


SOURCES = sorted([*ROOT.glob("qvlm/**/*.py"), *ROOT.glob("kernels/**/*.py")])
MODULES = {module_name(p): p for p in SOURCES}


def resolve(mod: str, node: ast.ImportFrom | ast.Import, is_pkg: bool) -> list[str]:
    """The project modules an import statement names (absolute), e.g. `from ..core import quant` -> qvlm.core.quant."""
    out = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = mod.split(".") if is_pkg else mod.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
    for n in names:
        while n and n not in MODULES:
            n = n.rpartition(".")[0] if "." in n else ""
        if n:
            out.append(n)
    return sorted(set(out))


def imports():
    """{module: [(imported module, line, inside_function)]} for every project module."""
    graph = {}
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text())
        is_pkg = path.name == "__init__.py"
        found = []

        def visit(node, in_func, in_main):
            for child in ast.iter_child_nodes(node):
                f = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                m = in_main or (isinstance(child, ast.If) and "__main__" in ast.unparse(child.test))
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in resolve(mod, child, is_pkg):
                        found.append((target, child.lineno, f and not m))
                    if f and not m:
                        found.append(("<any>", child.lineno, True))
                visit(child, f, m)

        visit(tree, False, False)
        graph[mod] = found
    return graph


GRAPH = imports()


def test_no_imports_inside_functions():
    bad = sorted({f"{MODULES[m].relative_to(ROOT)}:{line}" for m, edges in GRAPH.items()
                  for t, line, in_func in edges if in_func})
    assert not bad, f"imports inside functions (move them to the top, or the module to the right folder): {bad}"


def test_imports_point_down_the_stages():
    bad = []
    for mod, edges in GRAPH.items():
        for target, line, in_func in edges:
            if target == "<any>" or target == mod or mod.startswith(target + "."):
                continue                                   # a package's own __init__ above it is not an edge
            s_mod, s_t = stage(mod), stage(target)
            if s_t > s_mod or (s_t == s_mod and package(mod) != package(target)):
                bad.append(f"{mod} (stage {s_mod}) imports {target} (stage {s_t}) at line {line}")
    assert not bad, "imports against the stage order:\n" + "\n".join(bad)


def test_no_import_cycles():
    edges = {m: {t for t, _, f in es if t in MODULES and t != m and not m.startswith(t + ".")}
             for m, es in GRAPH.items()}
    state, stack, cycles = {}, [], []

    def dfs(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                dfs(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            dfs(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("mod", sorted(MODULES), ids=str)
def test_every_module_has_a_stage_and_a_docstring(mod):
    stage(mod)
    tree = ast.parse(MODULES[mod].read_text())
    assert ast.get_docstring(tree), f"{mod} has no module docstring"
