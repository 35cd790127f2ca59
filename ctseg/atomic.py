"""Atomic writes: a file, or a whole folder (`swapped_folder`), is written under a marked
temporary name beside its target, flushed to disk and renamed over it only once complete, then
the parent flushed, so a kill or power loss leaves the old output or the new one, never a mix;
the next run removes what a killed one left (`remove_leftovers`). Scratch files a step needs
only while it runs go to a marked folder of the system's temporary folder (`scratch_folder`)."""

from __future__ import annotations

import errno
import glob
import logging
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib

from ctseg.errors import ConfigError, CtsegError, output_error

log = logging.getLogger(__name__)

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
    """The output folder exists and may not be replaced (overwrite is off), or appeared while
    its replacement was written (another process finished it)."""


# The suffix of a replaced folder while it is moved aside (`swapped_folder` step 4).
ASIDE = ".old"
_TARGET = re.compile(rf"^\.(.+)\.{TEMP_MARK}\.")


def fsync_tree(root: Path) -> None:
    """Flush every file under `root` and every folder's entries, `root`'s included, to disk."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(folder, name)
            if not path.is_symlink():
                fsync_path(path)
        fsync_path(Path(folder))


def _link_or_copy(source: str, target: str) -> None:
    """Hard-link `source` at `target` (a copy across file systems or where links fail)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _check_replaceable(target: Path, replace: bool, own: str | None,
                       keep: Collection[str]) -> None:
    """Refuse an existing `target` when it may not be replaced: OutputExists without `replace`,
    ConfigError when it holds more than `keep` and is not an earlier output of this writer (it
    lacks `own`)."""
    if not os.path.lexists(target):
        return
    if not replace:
        raise OutputExists(f"{target}: output exists; set overwrite=true to replace it")
    if own is not None and not (target / own).is_file() and \
            (not target.is_dir() or target.is_symlink() or
             any(p.name not in keep for p in target.iterdir())):
        raise ConfigError(f"{target}: exists and is not an output of this command (no {own} in "
                          "it), so it is not replaced; remove it or choose another folder")


def _swap_in(tmp: Path, target: Path, replace: bool, own: str | None,
             keep: Collection[str]) -> list[Path]:
    """Rename `tmp` to `target`, an existing `target` first renamed aside (to a marked name,
    restored when the rename of `tmp` fails); the folders moved aside, to delete."""
    asides: list[Path] = []
    while True:
        _check_replaceable(target, replace, own, keep)
        if os.path.lexists(target):
            aside = target.parent / f"{temp_prefix(target.name)}{uuid.uuid4().hex}{ASIDE}"
            try:
                os.rename(target, aside)
            except FileNotFoundError:
                continue  # another process moved it first
            os.utime(aside, follow_symlinks=False)  # now: the mark of a living writer's folder
            asides.append(aside)
        try:
            os.rename(tmp, target)
            return asides
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                if asides and not os.path.lexists(target):
                    os.rename(asides.pop(), target)
                raise
            # another process renamed its folder in meanwhile: replace it too, or refuse


@contextmanager
def swapped_folder(target: str | Path, replace: bool = True, own: str | None = None,
                   keep: Collection[str] = ()) -> Iterator[Path]:
    """Yield an empty private folder in which the caller writes the whole new content of folder
    `target`; on success it becomes `target`, on failure it is deleted and `target` stays as it
    was. A reader of `target` sees the old folder, the new one, or (between two renames) none,
    never a part of one, and never a file of the old folder beside the new ones.

    `replace=False`: an existing `target` is an OutputExists (also when another process renames
    its folder there first). `keep`: entries of the old folder that other writers own (a log
    folder, a subfolder of another step), carried into the new one as hard links, so no kill
    loses them. `own`: a file every earlier output of the caller holds; a `target` holding
    anything besides `keep` without it is not the caller's and is refused (ConfigError) rather
    than deleted.

    The steps, and what a SIGKILL at each leaves (the same command run again finishes the work;
    every temporary name carries TEMP_MARK, this host and the process id, see `remove_leftovers`):
    1. earlier writers' leftovers of `target` are cleaned up (`remove_leftovers`);
    2. the caller writes into `.<target>.ctseg-tmp.<host>.<pid>.<random>` beside `target`, the
       entries of `keep` are linked in; killed: `target` untouched, the temporary folder is
       removed by the next run;
    3. every file and folder of it is flushed to disk (fsync); killed: as 2;
    4. an existing `target` is renamed aside to `.<target>.ctseg-tmp.<host>.<pid>.<random>.old`;
       killed: no `target`, the old folder whole at that name; the next run (any
       `remove_leftovers` of the parent) renames it back, then replaces it again;
    5. the new folder is renamed to `target` and the parent folder flushed; killed: the new
       folder is `target`, whole (the old one aside is removed by the next run);
    6. the old folder is deleted; killed: as 5.
    A power loss after step 5 keeps the new folder (its files were flushed before the rename)."""
    target = Path(target)
    remove_leftovers(target.parent, target.name)
    _check_replaceable(target, replace, own, keep)
    tmp = _temp_folder(target)
    try:
        try:
            yield tmp
            for name in keep:
                if os.path.lexists(target / name) and not os.path.lexists(tmp / name):
                    if (target / name).is_dir() and not (target / name).is_symlink():
                        shutil.copytree(target / name, tmp / name, symlinks=True,
                                        copy_function=_link_or_copy)
                    else:
                        _link_or_copy(str(target / name), str(tmp / name))
            os.chmod(tmp, default_mode(directory=True))
            fsync_tree(tmp)
            asides = _swap_in(tmp, target, replace, own, keep)
            fsync_path(target.parent)
        except OSError as err:
            if isinstance(err, (CtsegError, OutputExists)):
                raise
            raise output_error(target, err) from err
        for aside in asides:
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def scratch_folder(name: str) -> Iterator[Path]:
    """Yield a new private folder in the system's temporary folder (TMPDIR) for files needed only
    while a step runs, deleted when it ends. Its name carries TEMP_MARK, so one a kill leaves is
    removed when the next scratch folder is made (`remove_leftovers`)."""
    parent = Path(tempfile.gettempdir())
    remove_leftovers(parent)
    folder = _temp_folder(parent / name)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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


def remove_leftovers(folder: str | Path, name: str | None = None) -> list[Path]:
    """Clean up the temporary files and folders in `folder` (only those of `name` when given)
    whose writer on this machine is gone (a killed run): a folder a killed `swapped_folder` moved
    aside is renamed back when nothing took its place, the others are deleted; the paths
    cleaned up. Temporaries of running processes, and those this process may not delete,
    stay."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f".{glob.escape(name)}.{TEMP_MARK}.*" if name else f".*{TEMP_MARK}*"
    removed = []
    for path in sorted(folder.glob(pattern)):
        try:
            if _owner_alive(path):
                continue
            found = _TARGET.match(path.name)
            target = folder / found.group(1) if found else None
            if path.name.endswith(ASIDE) and target is not None and \
                    not os.path.lexists(target):
                os.rename(path, target)
                log.info("%s: restored the folder a killed run had moved aside", target)
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue  # another process removed it first
        except OSError as err:
            log.debug("%s: left in place (%s)", path, err)
            continue
        removed.append(path)
    return removed
