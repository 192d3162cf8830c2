"""The package's layering, as the README's "What is where" table draws it, holds in the code:
each module imports from its own layer or the layers above it, and no import cycle exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The repository keeps two subpackages in top-level folders (pyproject.toml's package-dir).
FOLDERS = {"ettin_jax.convert": ROOT / "convert", "ettin_jax.train": ROOT / "train", "ettin_jax": ROOT / "ettin_jax"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for file in sorted(folder.glob("*.py")):
            name = package if file.stem == "__init__" else f"{package}.{file.stem}"
            found.setdefault(name, file)
    return found


def readme_layers() -> dict[str, int]:
    """Module name -> layer number, from the README table's rows."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## What is where")[1].split("\n\n")[2]
    layers = {}
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        if not cells[0]:
            continue
        for path in re.findall(r"`([\w/.]+)`", cells[1]):
            if path.endswith("/"):
                package = "ettin_jax." + path.rstrip("/")
                layers.update({m: int(cells[0]) for m in modules() if m == package or m.startswith(package + ".")})
            else:
                layers[path.removesuffix(".py").replace("/", ".")] = int(cells[0])
    return layers


def imports(name: str, file: Path) -> set[str]:
    """The ettin_jax modules that `file` imports, at any depth of its code."""
    known = modules()
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {t for t in targets if t in known and t != name}
    return found


def test_every_module_has_a_layer():
    layers = readme_layers()
    missing = sorted(set(modules()) - set(layers) - {"ettin_jax"})  # the package's own __init__ re-exports
    assert not missing, f"modules with no row in the README's table: {missing}"


def test_imports_flow_one_way():
    layers = readme_layers()
    upward = []
    for name, file in modules().items():
        if name == "ettin_jax":
            continue
        for target in imports(name, file):
            if target != "ettin_jax" and layers[target] > layers[name]:
                upward.append(f"{name} (layer {layers[name]}) imports {target} (layer {layers[target]})")
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = {name: imports(name, file) - {"ettin_jax"} for name, file in modules().items() if name != "ettin_jax"}
    graph = {n: {t for t in targets if not n.startswith(t + ".")} for n, targets in graph.items()}  # parents
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            assert state.get(target) != 1, "import cycle: " + " -> ".join([*path, node, target])
            if target not in state:
                visit(target, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
