"""The layering of docs/ARCHITECTURE.md, checked on the code: no module imports from a layer above its own (an AST
scan of dit_jax/, imports inside functions included). The imports against it that issue 18 removes are listed in
KNOWN: a new one fails, and so does a listed one that is gone (the list only shrinks)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dit_jax"

# docs/ARCHITECTURE.md, "Layers": the most specific prefix wins
LAYERS = {
    "dit_jax": 0, "dit_jax.constants": 0, "dit_jax.errors": 0, "dit_jax.paths": 0, "dit_jax.distributed": 0,
    "dit_jax.images": 0,
    "dit_jax.models": 1, "dit_jax.diffusion": 1, "dit_jax.perf": 1,
    "dit_jax.convert": 2, "dit_jax.data": 2, "dit_jax.weights": 2, "dit_jax.sampling": 2,
    "dit_jax.train": 3, "dit_jax.evaluate": 3, "dit_jax.perf.bench": 3, "dit_jax.sampling.load": 3,
    "dit_jax.sampling.decode": 3, "dit_jax.sampling.fid": 3,
    "dit_jax.multiprocess": 3,
    "dit_jax.cli": 4, "dit_jax.train.cli": 4, "dit_jax.sampling.cli": 4, "dit_jax.convert.cli": 4,
    "dit_jax.weights.cli": 4,
    "dit_jax.evaluate.cli": 4, "dit_jax.data.cli": 4, "dit_jax.perf.cli": 4,
    "dit_jax.train.demo": 3,
}

# (importer, imported) pairs against the layering that exist today; issue 18 removes them
KNOWN: set[tuple[str, str]] = set()


def layer(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise AssertionError(f"{module} has no layer in tests/test_layers.py (and docs/ARCHITECTURE.md): add it")


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imports(f: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dit_jax"):
            found.add(node.module)
            for alias in node.names:  # `from dit_jax import distributed` imports the module dit_jax.distributed
                if f"{node.module}.{alias.name}" in modules():
                    found.add(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dit_jax")}
    return found


def upward_imports() -> set[tuple[str, str]]:
    bad = set()
    for module, f in modules().items():
        for target in imports(f):
            if layer(target) > layer(module):
                bad.add((module, target))
    return bad


def test_every_module_has_a_layer():
    for module in modules():
        layer(module)


def test_no_import_against_the_layering():
    found = upward_imports()
    new = sorted(found - KNOWN)
    assert not new, "imports from a higher layer (docs/ARCHITECTURE.md): " + ", ".join(f"{a} -> {b}" for a, b in new)
    gone = sorted(KNOWN - found)
    assert not gone, "no longer imported: remove from KNOWN: " + ", ".join(f"{a} -> {b}" for a, b in gone)


def test_no_import_cycles():
    """No module reaches itself through imports (inside functions included): each import points one way. (A module
    naming its own package, `from dit_jax.weights import registry` in dit_jax/weights/pretrained.py, is a sibling
    import, not an edge to the package's __init__.)"""
    graph = {m: {t for t in imports(f) if t in modules() and t != m and not m.startswith(t + ".")}
             for m, f in modules().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t):] + [t]) if t in path else f"{m} -> {t}")
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(cycles)
