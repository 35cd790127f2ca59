"""Atomic writes: a temp file beside the target, renamed over it only once complete."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib


def default_mode(directory: bool = False) -> int:
    """The permissions `open`/`mkdir` would give under the current umask (the temp files and
    folders of atomic writes start private, 0600/0700, and get these before the rename)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def write_atomic(path: str | Path, writer: Callable[[Path], Any], suffix: str = ".tmp") -> Path:
    """Call `writer(tmp)` on a temp file beside `path` (ending in `suffix`), then rename it
    (with the permissions a plain write would have given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_nifti_atomic(img: nib.Nifti1Image, path: str | Path) -> Path:
    """Save a NIfTI image atomically; the temp name keeps `.nii.gz` so nibabel compresses it."""
    path = Path(path)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    return write_atomic(path, lambda tmp: nib.save(img, tmp), suffix=suffix)
