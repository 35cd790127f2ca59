"""The floors of ctseg's packages: each imports only from its own floor or below, and no import
cycle of any length joins its packages (strongly connected components of the import graph). Read
from the source with `ast` (nothing is imported)."""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

# Bottom to top; a module or package of `ctseg/` not listed here fails the test.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("errors", "atomic", "labels", "label_space", "vista3d_labels", "colours", "config",
     "figures", "sliding_window", "logger", "reference", "resources", "resume", "__init__"),
    ("data",),
    ("models",),
    ("export",),
    ("inference",),
    ("evaluate", "visualize"),
    ("callbacks",),
    ("training",),
    ("hparams_search", "compare", "commands"),
)


def unit(module: str) -> str:
    """The package or top-level module of `ctseg` a dotted module name belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def import_edges(root: Path) -> set[tuple[str, str, str]]:
    """(importing unit, imported unit, file) for every `ctseg.*` import under `root` (the
    `ctseg` package folder), relative imports resolved, imports within a unit left out."""
    edges = set()
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
        source = unit(module)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from ctseg import data` imports the package ctseg.data, not ctseg itself
                targets = [f"{base}.{a.name}" if _is_module(root.parent, f"{base}.{a.name}")
                           else base for a in node.names]
            for target in targets:
                if target == "ctseg" or target.startswith("ctseg."):
                    imported = unit(target)
                    if imported != source:
                        edges.add((source, imported, str(path.relative_to(root.parent))))
    return edges


def _is_module(top: Path, dotted: str) -> bool:
    """Whether `dotted` names a module or package under `top` (the folder holding `ctseg`)."""
    path = top.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or path.is_dir()


def violations(edges: set[tuple[str, str, str]], floors: Sequence[Sequence[str]]) -> list[str]:
    """Upward imports, units on no floor, and import cycles of any length."""
    level = {name: i for i, floor in enumerate(floors) for name in floor}
    found = []
    for source, target, path in sorted(edges):
        for name in (source, target):
            if name not in level:
                found.append(f"{path}: ctseg.{name} is on no floor; add it to FLOORS")
        if source in level and target in level and level[target] > level[source]:
            found.append(f"{path}: ctseg.{source} imports ctseg.{target}, a floor above it")
    return sorted(set(found) | set(import_cycles(edges)))


def import_cycles(edges: set[tuple[str, str, str]]) -> list[str]:
    """One line per import cycle: each strongly connected component of the graph of units with
    more than one member, its members and its shortest cycle through the first of them (with the
    file of each import)."""
    files: dict[tuple[str, str], str] = {}
    for source, target, path in sorted(edges):
        files.setdefault((source, target), path)
    units = sorted({name for pair in files for name in pair})
    index = {name: i for i, name in enumerate(units)}
    rows, cols = zip(*((index[s], index[t]) for s, t in files), strict=True) if files else ((), ())
    graph = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(units), len(units)))
    _, component = connected_components(graph, directed=True, connection="strong")
    found = []
    for label in sorted(set(component.tolist())):
        members = [name for name in units if component[index[name]] == label]
        if len(members) < 2:
            continue
        cycle = shortest_cycle(members[0], {p for p in files if set(p) <= set(members)})
        steps = " -> ".join(f"ctseg.{t} ({files[s, t]})" for s, t in pairwise(cycle))
        found.append(f"import cycle among {', '.join(f'ctseg.{m}' for m in members)}: "
                     f"ctseg.{cycle[0]} -> {steps}")
    return found


def shortest_cycle(start: str, pairs: set[tuple[str, str]]) -> list[str]:
    """The units of a shortest cycle from `start` back to it along `pairs` (importer,
    imported), `start` first and last (breadth-first search)."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for source, target in sorted(pairs):
            if source != node:
                continue
            if target == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if target not in parent:
                parent[target] = node
                queue.append(target)
    raise ValueError(f"ctseg.{start} is on no cycle of these imports")


def test_ctseg_imports_only_look_down():
    edges = import_edges(REPO / "ctseg")
    assert len(edges) > 20  # the reader found the imports
    assert violations(edges, FLOORS) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "ctseg"
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("files, expected", [
    ({"data/__init__.py": "", "models/__init__.py": "from ctseg.data import x\n"}, []),
    ({"data/__init__.py": "from ctseg.models.base import Module\n", "models/__init__.py": ""},
     ["ctseg/data/__init__.py: ctseg.data imports ctseg.models, a floor above it"]),
    ({"data/io.py": "from ..models import base\n", "models/__init__.py": ""},
     ["ctseg/data/io.py: ctseg.data imports ctseg.models, a floor above it"]),
    ({"data/io.py": "from ctseg import models, __version__\n", "models/__init__.py": ""},
     ["ctseg/data/io.py: ctseg.data imports ctseg.models, a floor above it"]),
    ({"data/io.py": "from .. import models\n", "models/base.py": ""},
     ["ctseg/data/io.py: ctseg.data imports ctseg.models, a floor above it"]),
    ({"data/a.py": "import ctseg.extra\n", "extra.py": ""},
     ["ctseg/data/a.py: ctseg.extra is on no floor; add it to FLOORS"]),
])
def test_a_synthetic_tree_with_an_upward_import_fails(tmp_path, files, expected):
    assert violations(import_edges(_tree(tmp_path, files)), FLOORS) == expected


def test_packages_importing_each_other_are_reported(tmp_path):
    root = _tree(tmp_path, {"export/__init__.py": "from ctseg.inference import run\n",
                            "inference/__init__.py": "from ctseg.export import formats\n"})
    assert violations(import_edges(root), [("export", "inference")]) == [
        "import cycle among ctseg.export, ctseg.inference: ctseg.export -> ctseg.inference "
        "(ctseg/export/__init__.py) -> ctseg.export (ctseg/inference/__init__.py)"]


def test_a_cycle_of_three_packages_on_one_floor_is_reported(tmp_path):
    """No two of the three import each other and no import goes up a floor: only the cycle."""
    root = _tree(tmp_path, {"evaluate/a.py": "from ctseg.visualize import b\n",
                            "visualize/b.py": "import ctseg.compare\n",
                            "compare.py": "from ctseg.evaluate.a import run\n",
                            "callbacks/c.py": "from ctseg import evaluate, visualize\n"})
    assert violations(import_edges(root), [("evaluate", "visualize", "compare"),
                                           ("callbacks",)]) == [
        "import cycle among ctseg.compare, ctseg.evaluate, ctseg.visualize: ctseg.compare -> "
        "ctseg.evaluate (ctseg/compare.py) -> ctseg.visualize (ctseg/evaluate/a.py) -> "
        "ctseg.compare (ctseg/visualize/b.py)"]


def test_cycles_of_any_length_are_found_and_acyclic_imports_are_not():
    chain = {(f"u{i}", f"u{i + 1}", f"ctseg/u{i}.py") for i in range(6)}
    assert import_cycles(chain) == []
    five = chain | {("u4", "u0", "ctseg/u4.py"), ("u2", "u1", "ctseg/u2.py")}
    assert import_cycles(five) == [
        "import cycle among ctseg.u0, ctseg.u1, ctseg.u2, ctseg.u3, ctseg.u4: ctseg.u0 -> "
        "ctseg.u1 (ctseg/u0.py) -> ctseg.u2 (ctseg/u1.py) -> ctseg.u3 (ctseg/u2.py) -> "
        "ctseg.u4 (ctseg/u3.py) -> ctseg.u0 (ctseg/u4.py)"]
    two = {("a", "b", "ctseg/a.py"), ("b", "a", "ctseg/b.py"), ("c", "d", "ctseg/c.py"),
           ("d", "e", "ctseg/d.py"), ("e", "c", "ctseg/e.py")}
    assert [line.split(":")[0] for line in import_cycles(two)] == [
        "import cycle among ctseg.a, ctseg.b", "import cycle among ctseg.c, ctseg.d, ctseg.e"]
