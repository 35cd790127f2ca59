"""Atomic writes: a temp file beside the target, renamed over it only once complete."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib


def write_atomic(path: str | Path, writer: Callable[[Path], Any], suffix: str = ".tmp") -> Path:
    """Call `writer(tmp)` on a temp file beside `path` (ending in `suffix`), then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer(tmp)
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
