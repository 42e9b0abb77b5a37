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
    "dit_jax.models": 1, "dit_jax.diffusion": 1,
    "dit_jax.convert": 2, "dit_jax.data": 2, "dit_jax.weights": 2,
    "dit_jax.train": 3, "dit_jax.sample": 3, "dit_jax.sample_ddt": 3, "dit_jax.evaluate": 3, "dit_jax.bench": 3,
    "dit_jax.multiprocess": 3,
    "dit_jax.cli": 4, "dit_jax.train.cli": 4, "dit_jax.sample_cli": 4, "dit_jax.sample_fid": 4,
    "dit_jax.sample_ddt_cli": 4, "dit_jax.ddt_schedule": 4, "dit_jax.convert.cli": 4, "dit_jax.weights.cli": 4,
    "dit_jax.evaluate.cli": 4, "dit_jax.extract_latents": 4, "dit_jax.bench_cli": 4, "dit_jax.flops": 4,
    "dit_jax.demo": 4,
}

# (importer, imported) pairs against the layering that exist today; issue 18 removes them
KNOWN = {
    ("dit_jax.convert", "dit_jax.convert.cli"),  # the converted-folder format lives in the command module
    ("dit_jax.weights.pretrained", "dit_jax.convert.cli"),  # ... which the weights cache reads
    ("dit_jax.weights", "dit_jax.weights.cli"),  # the package re-exports its command's register()
    ("dit_jax.sample_ddt", "dit_jax.sample_cli"),  # load_model lives in a command module
    ("dit_jax.train.state", "dit_jax.flops"),  # forward_macs lives beside the `flops` command
}


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
