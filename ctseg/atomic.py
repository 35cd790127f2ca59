"""Atomic writes: a temp file beside the target, flushed to disk and renamed over it only once
complete, then the folder flushed, so a crash or power loss leaves the old file or the new one."""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib

from ctseg.errors import CtsegError, output_error

# In the name of every temporary file or folder ctseg writes, with the writer's host and process
# id, so leftovers of killed processes are recognised (`remove_leftovers`).
TEMP_MARK = "ctseg-tmp"
_OWNER = re.compile(rf"\.{TEMP_MARK}\.([^.]+)\.(\d+)\.")


def _host() -> str:
    """This machine's name without dots (a field of temporary names)."""
    return socket.gethostname().replace(".", "-") or "localhost"


def temp_prefix(name: str) -> str:
    """The prefix of a temporary file or folder that will become `name`."""
    return f".{name}.{TEMP_MARK}.{_host()}.{os.getpid()}."


def default_mode(directory: bool = False) -> int:
    """The permissions `open`/`mkdir` would give under the current umask (the temp files and
    folders of atomic writes start private, 0600/0700, and get these before the rename)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def fsync_path(path: Path) -> None:
    """Flush a written file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, writer: Callable[[Path], Any], suffix: str = ".tmp") -> Path:
    """Call `writer(tmp)` on a temp file beside `path` (ending in `suffix`), flush it, rename it
    (with the permissions a plain write would have given) and flush the folder. A failure to
    write (no permission, disk full, file-size limit) is an OutputError naming `path`; nothing
    is left behind."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name),
                                        suffix=suffix)
    except OSError as err:
        raise output_error(path, err) from err
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer(tmp)
        fsync_path(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise output_error(path, err) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class OutputExists(FileExistsError):
    """The case folder appeared while the case was predicted (another process finished it)."""


@contextmanager
def atomic_folder(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target` that replaces `target` on success and is
    deleted on failure, so a case folder is either complete or absent."""
    tmp = _temp_folder(target)
    try:
        try:
            yield tmp
        except OSError as err:
            if isinstance(err, CtsegError):
                raise
            raise output_error(target, err) from err
        os.chmod(tmp, default_mode(directory=True))
        if target.exists():
            if not overwrite:
                raise OutputExists(f"{target}: output exists; set overwrite=true to replace it")
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=temp_prefix(target.name),
                                        suffix=".old"))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
        fsync_path(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def make_folder(folder: str | Path) -> Path:
    """Create `folder` (and its parents) if needed; OutputError naming it when it cannot be."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise output_error(folder, err) from err
    return folder


def _temp_folder(target: Path) -> Path:
    """A new private temporary folder beside `target` (its parent created); OutputError when
    that cannot be written."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=target.parent, prefix=temp_prefix(target.name)))
    except OSError as err:
        raise output_error(target, err) from err


@contextmanager
def staged_files(folder: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `folder`; on success its files are flushed and
    moved into `folder` (created if needed; files of the same names replaced, others kept), on
    failure it is deleted and `folder` stays as it was."""
    tmp = _temp_folder(folder)
    try:
        yield tmp
        try:
            folder.mkdir(exist_ok=True)
            files = sorted(p for p in tmp.iterdir() if p.is_file())
            for path in files:
                fsync_path(path)
                os.chmod(path, default_mode())
            for path in files:
                os.replace(path, folder / path.name)
            fsync_path(folder)
        except OSError as err:
            raise output_error(folder, err) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_nifti_atomic(img: nib.Nifti1Image, path: str | Path) -> Path:
    """Save a NIfTI image atomically; the temp name keeps `.nii.gz` so nibabel compresses it."""
    path = Path(path)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    return write_atomic(path, lambda tmp: nib.save(img, tmp), suffix=suffix)


def _owner_alive(path: Path) -> bool:
    """Whether the process that made temporary `path` may still be writing it: it runs on another
    machine (unknown), or its process id is running and started before `path` was last changed."""
    import psutil

    found = _OWNER.search(path.name)
    if found is None or found.group(1) != _host():
        return found is not None
    try:
        started = psutil.Process(int(found.group(2))).create_time()
    except psutil.Error:
        return False
    return started <= path.lstat().st_mtime + 1.0


def remove_leftovers(folder: str | Path) -> list[Path]:
    """Delete the temporary files and folders in `folder` whose writer on this machine is gone
    (a killed run); the paths removed. Temporaries of running processes stay."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.glob(f".*{TEMP_MARK}*"):
        try:
            if _owner_alive(path):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue  # another process removed it first
        removed.append(path)
    return removed
