"""Fingerprints of input files by size and modification time: they change when a file is
replaced or edited, without reading it (what the prepared masks and the disk cache are keyed by)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping


def file_stamp(files: Mapping[str, str | os.PathLike[str]], header: Iterable[str] = ()) -> str:
    """SHA-256 (hex) of the `header` lines and, for each named file, its size and modification
    time (`missing` where it does not exist)."""
    parts = list(header)
    for name, path in files.items():
        try:
            stat = os.stat(path)
            parts.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
        except FileNotFoundError:
            parts.append(f"{name}:missing")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()
