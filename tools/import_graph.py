"""The import graph of phanes_cli and kernels: cycles, upward imports against the layers, and sizes.

    python tools/import_graph.py            # from the repository root; exit 1 when a cycle or upward import exists
    python tools/import_graph.py --sizes    # also module and function sizes (lines)

Layers, lowest first (a module may import its own layer and the ones below): the leaves (errors, config,
infra, the package's lazy public API), then models and kernels, the inference core, inputs, runtimes and
synthesis, training and evaluation, calibration and screening, the cohort report, and the command line.
Imports inside functions ("lazy") and under TYPE_CHECKING count like the others: a cycle hidden in a function
is still a cycle. The exceptions are listed in LAZY_OK with the reason each one is deferred.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGES = {"phanes_cli": "phanes_cli", "phanes_kernels": "kernels"}
LAYERS: list[tuple[str, ...]] = [
    ("phanes_cli", "phanes_cli.errors", "phanes_cli.config", "phanes_cli.config_show", "phanes_cli.infra"),
    ("phanes_cli.models", "phanes_kernels"),
    ("phanes_cli.core",),
    ("phanes_cli.inputs",),
    ("phanes_cli.runtimes", "phanes_cli.synth", "phanes_cli.run_folder"),
    ("phanes_cli.training", "phanes_cli.evaluation"),
    ("phanes_cli.calibrate", "phanes_cli.screening"),
    ("phanes_cli.cohort_report",),
    ("phanes_cli.cli", "phanes_cli.demo"),
]
# Deferred imports that are deliberate: what they defer and why.
LAZY_OK = {
    ("phanes_cli.core.ops", "phanes_kernels.clahe_triton"): "Triton is imported only where CUDA runs it",
    ("phanes_cli.core.ops", "phanes_kernels.maps_triton"): "Triton is imported only where CUDA runs it",
    ("phanes_cli.core.ops", "phanes_kernels"): "Triton is imported only where CUDA runs it",
    ("phanes_cli.screening.actors", "phanes_cli.runtimes.select"): "only the actors load the networks (~2 s)",
    ("phanes_cli.screening.tasks", "phanes_cli.runtimes.select"): "the plan's speed is timed in a task",
    ("phanes_cli.runtimes.select", "phanes_cli.runtimes.onnx"): "onnxruntime is the optional [onnx] extra",
    ("phanes_cli.runtimes.select", "phanes_cli.runtimes.openvino"): "openvino is the optional [openvino] extra",
    ("phanes_cli.runtimes.gated", "phanes_cli.runtimes.openvino"): "openvino is the optional [openvino] extra",
    ("phanes_cli.runtimes.doctor", "phanes_cli.runtimes.openvino"): "openvino is the optional [openvino] extra",
    ("phanes_cli.runtimes.first_use", "phanes_cli.runtimes.export"): "onnx is the optional [onnx] extra",
}


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = [package, *path.relative_to(root / folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer(module: str) -> int:
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    return rank


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported module of the project, imported inside a function) for every import statement."""
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [f"{child.module}.{a.name}" for a in child.names] + [child.module]
            for name in names:
                while name and name not in known:
                    name = name.rpartition(".")[0]
                if name:
                    out.append((name, lazy))
            visit(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(path.read_text()), False)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def sizes(known: dict[str, Path]) -> None:
    lines = {m: len(p.read_text().splitlines()) for m, p in known.items()}
    functions = []
    for m, p in known.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{m}.{node.name}"))  # type: ignore[operator]
    top = sorted(((n, m) for m, n in lines.items()), reverse=True)[:10]
    top_level = [m for m in known if m.count(".") == 1 and m.startswith("phanes_cli.")]
    packages = sum(1 for m in top_level if known[m].name == "__init__.py")
    print(f"modules: {len(lines)}; in phanes_cli/: {len(top_level) - packages} modules, {packages} packages; "
          f"lines: median {sorted(lines.values())[len(lines) // 2]}, max {top[0][0]}")
    print("largest modules: " + ", ".join(f"{m} {n}" for n, m in top))
    long = sorted(functions, reverse=True)
    print(f"functions: {len(functions)}, over 60 lines: {sum(1 for n, _ in functions if n > 60)}; longest: "
          + ", ".join(f"{name} {n}" for n, name in long[:5]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--sizes", action="store_true", help="also print module and function sizes")
    args = parser.parse_args()
    known = modules(args.root)
    graph: dict[str, set[str]] = defaultdict(set)
    upward, lazy = [], []
    for module, path in known.items():
        graph[module]
        for target, deferred in imports(path, known):
            if target == module or target.startswith(module + "."):
                continue
            graph[module].add(target)
            if layer(target) > layer(module):
                upward.append((module, target))
            if deferred and layer(target) <= layer(module) and (module, target) not in LAZY_OK and \
                    not module.startswith(("phanes_cli.cli", "phanes_cli.demo")):
                lazy.append((module, target))
    found = cycles(graph)
    print(f"{len(known)} modules, {sum(len(v) for v in graph.values())} import edges")
    print(f"cycles: {len(found)}" + "".join(f"\n  {' <-> '.join(c)}" for c in found))
    print(f"upward imports: {len(upward)}" + "".join(f"\n  {a} -> {b}" for a, b in sorted(set(upward))))
    print(f"deferred imports without a listed reason: {len(lazy)}" + "".join(f"\n  {a} -> {b}" for a, b in lazy))
    if args.sizes:
        sizes(known)
    return 1 if found or upward or lazy else 0


if __name__ == "__main__":
    sys.exit(main())
