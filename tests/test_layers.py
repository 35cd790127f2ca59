"""The floors of ctseg's packages: each imports only from its own floor or below, and no two
packages import each other. Read from the source with `ast` (nothing is imported)."""

from __future__ import annotations

import ast
from collections.abc import Sequence
from pathlib import Path

import pytest
from helpers import REPO

# Bottom to top; a module or package of `ctseg/` not listed here fails the test.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("errors", "atomic", "labels", "label_space", "vista3d_labels", "config", "figures",
     "sliding_window", "logger", "reference", "resources", "__init__"),
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
                targets = [base]
            for target in targets:
                if target == "ctseg" or target.startswith("ctseg."):
                    imported = unit(target)
                    if imported != source:
                        edges.add((source, imported, str(path.relative_to(root.parent))))
    return edges


def violations(edges: set[tuple[str, str, str]], floors: Sequence[Sequence[str]]) -> list[str]:
    """Upward imports, units on no floor, and pairs of units importing each other."""
    level = {name: i for i, floor in enumerate(floors) for name in floor}
    found = []
    for source, target, path in sorted(edges):
        for name in (source, target):
            if name not in level:
                found.append(f"{path}: ctseg.{name} is on no floor; add it to FLOORS")
        if source in level and target in level and level[target] > level[source]:
            found.append(f"{path}: ctseg.{source} imports ctseg.{target}, a floor above it")
    pairs = {(s, t) for s, t, _ in edges}
    found += [f"ctseg.{s} and ctseg.{t} import each other" for s, t in sorted(pairs)
              if (t, s) in pairs and s < t]
    return sorted(set(found))


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
    ({"data/a.py": "import ctseg.extra\n", "extra.py": ""},
     ["ctseg/data/a.py: ctseg.extra is on no floor; add it to FLOORS"]),
])
def test_a_synthetic_tree_with_an_upward_import_fails(tmp_path, files, expected):
    assert violations(import_edges(_tree(tmp_path, files)), FLOORS) == expected


def test_packages_importing_each_other_are_reported(tmp_path):
    root = _tree(tmp_path, {"export/__init__.py": "from ctseg.inference import run\n",
                            "inference/__init__.py": "from ctseg.export import formats\n"})
    assert "ctseg.export and ctseg.inference import each other" in violations(
        import_edges(root), [("export", "inference")])
