"""The package's layers import one way: every import of every module, read with `ast` (imports inside
functions and under `TYPE_CHECKING` included), goes to its own package or to a lower layer.

    config  <-  core  <-  io  <-  model  <-  interop, train  <-  app  <-  moetune/__init__, __main__

`interop` and `train` share a layer and do not import each other. No module imports itself back
through others (no cycles).
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from tests.helpers import REPO

LAYERS = {"config": 0, "core": 1, "io": 2, "model": 3, "interop": 4, "train": 4, "app": 5}
TOP = 6  # moetune/__init__.py and __main__.py: the public names and `python -m moetune`


def modules(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package at `package`."""
    out = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The moetune modules that module `name` (file `path`) imports, wherever the import statement is."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package `level - 1` steps up
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m == "moetune" or m.startswith("moetune.")}


def layer_of(module: str) -> tuple[int, str]:
    """(layer, group) of a module: group is its top-level name below `moetune`."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("__main__",):
        return TOP, "moetune"
    return LAYERS[parts[1]], parts[1]


def violations(package: Path) -> list[str]:
    known = modules(package)
    graph = {name: imported(name, path, set(known)) for name, path in known.items()}
    bad = []
    for name, targets in sorted(graph.items()):
        layer, group = layer_of(name)
        for target in sorted(targets):
            target_layer, target_group = layer_of(target)
            if target_group != group and target_layer >= layer:
                bad.append(f"{name} imports {target}: layer {group} ({layer}) may not import {target_group}")
    bad += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each module that reaches itself (depth-first search)."""
    found, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            found.append([*path[path.index(node) :], node])
            return
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*path, node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    return found


def test_every_import_goes_down_the_layers():
    assert violations(REPO / "moetune") == []


def test_every_module_is_in_a_layer():
    for name in modules(REPO / "moetune"):
        layer_of(name)  # a KeyError names a package the rule does not place


@pytest.mark.parametrize(
    ("module", "statement", "expected"),
    [
        (
            "core/routing.py",
            "from moetune.model import MoEModel",
            "moetune.core.routing imports moetune.model",
        ),
        ("config.py", "    from moetune.core import routing", "moetune.config imports moetune.core.routing"),
        ("interop/export.py", "from moetune.train import trainer", "interop (4) may not import train"),
        (
            "io/atomic.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from moetune.app.run import RunConfig",
            "moetune.io.atomic imports moetune.app.run",
        ),
        ("core/routing.py", "from moetune.core import losses", "import cycle"),
    ],
)
def test_a_wrong_import_is_caught(tmp_path, module, statement, expected):
    """The check itself: a copy of the package with one import against the rule fails it."""
    copy = tmp_path / "moetune"
    shutil.copytree(REPO / "moetune", copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    if statement.startswith("    "):  # an import inside a function
        statement = f"def _late():\n{statement}\n"
    target.write_text(target.read_text() + "\n" + statement + "\n")
    assert any(expected in v for v in violations(copy)), violations(copy)
