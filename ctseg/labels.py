"""Class tables: TotalSegmentator v1 (104 classes), v2 (117 classes) and the VISTA3D label set."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from typing import Any

import numpy as np

from ctseg.errors import ConfigError

VERSIONS = ("v1", "v2")
BACKGROUND = "background"


def check_version(version: str) -> str:
    """Return `version` if it is a known TotalSegmentator version, else raise ConfigError (a
    ValueError naming the key)."""
    if version not in VERSIONS:
        raise ConfigError(f"version={version}: unknown TotalSegmentator version {version!r}; "
                          f"choose one of {', '.join(VERSIONS)}")
    return version


@cache
def _load(name: str) -> Any:
    """Read a JSON table shipped in ctseg/resources."""
    return json.loads(resources.files("ctseg.resources").joinpath(name).read_text())


def class_names(version: str) -> dict[int, str]:
    """Map class index (1..N) to structure name for a TotalSegmentator version, official order."""
    table = _load(f"totalseg_{check_version(version)}_classes.json")
    return {int(k): v for k, v in table.items()}


def num_classes(version: str) -> int:
    """Number of output channels for a version: background plus its structures (105 or 118)."""
    return len(class_names(version)) + 1


def label_names(version: str) -> list[str]:
    """Channel names in output order, index 0 being background."""
    names = class_names(version)
    return [BACKGROUND] + [names[i] for i in range(1, len(names) + 1)]


def label_map_dtype(num_classes: int) -> type[np.unsignedinteger]:
    """Smallest unsigned type holding class indices 0..num_classes-1 (uint8 or uint16)."""
    return np.uint8 if num_classes <= 256 else np.uint16


def vista3d_table() -> dict[str, Any]:
    """The VISTA3D label dictionary, everything/subclass lists and TotalSegmentator mapping."""
    return _load("vista3d_labels.json")


Names = Sequence[str] | Mapping[int, str]


def label_table(names: Names) -> dict[int, str]:
    """Label value -> name: a list is indexed 0..N-1 (class indices), a mapping is used as is
    (e.g. VISTA3D ids)."""
    return dict(names) if isinstance(names, Mapping) else dict(enumerate(names))
