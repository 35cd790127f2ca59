"""Errors a researcher can act on, and how the command lines report them: one line, exit 1.

A `CtsegError` keeps its message when it crosses a process boundary: it pickles (process pools),
it is rebuilt from the traceback text that a DataLoader worker sends back, and `user_message`
finds it inside the traceback text of a spawned DDP process.
"""

from __future__ import annotations

import difflib
import errno
import logging
import os
import re
import shutil
import signal
import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger(__name__)
# What Hydra writes to stderr before re-raising the error of a failed job (run_cli drops it).
HYDRA_FAILURE = "Error executing job with overrides:"


class CtsegError(Exception):
    """A problem with the user's data, checkpoint or settings; the message says what to do."""


class ConfigError(CtsegError, ValueError):
    """A setting, or a combination of settings, that cannot work (found before any work)."""


class CheckpointError(CtsegError, ValueError):
    """A checkpoint ctseg refuses to read: unreadable, not weights, or holding pickled objects."""


class MissingFileError(CtsegError, FileNotFoundError):
    """A file the run needs (checkpoint, weights, input) does not exist."""


class OutputError(CtsegError, OSError):
    """A file or folder ctseg cannot write (permissions, disk full, a file-size limit); the
    message names it."""


# errno values that mean "no room": disk full, quota, file-size limit (ulimit -f).
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class NoRoomError(OutputError):
    """An OutputError because the disk is full, a quota or a file-size limit is reached;
    `reason` is the system's words for which (kept when it crosses a process boundary)."""

    def __init__(self, message: str, reason: str) -> None:
        """`message`, caused by `reason` (e.g. "No space left on device")."""
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[NoRoomError], tuple[str, str]]:
        """Pickle as (message, reason), so process pools re-create the same error."""
        return type(self), (str(self), self.reason)


def output_error(path: str | Path, err: OSError) -> OutputError:
    """An OutputError naming `path` for `err`, with the fix (a NoRoomError for no room)."""
    reason = err.strerror or str(err)
    if err.errno in NO_ROOM:
        return NoRoomError(f"{path}: cannot write ({reason}); free disk space, raise the "
                             "file-size limit, or write elsewhere", reason)
    return OutputError(f"{path}: cannot write ({reason}); choose a writable folder")


class DatasetError(CtsegError, ValueError):
    """A problem with one file of a dataset or input; the message names the file and the problem.

    `DatasetError(message)` with one argument, as a DataLoader worker's re-raise calls it, takes the
    path and problem from the last DatasetError line of that message.
    """

    def __init__(self, path: str | Path, problem: str | None = None) -> None:
        """Remember the offending path and the problem."""
        if problem is None:
            path, problem = _split_message(_last_error(str(path), "DatasetError") or str(path))
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        """Pickle as (path, problem), so process pools re-create the same error."""
        return type(self), (str(self.path), self.problem)


_ERROR_LINE = r"^(?:[\w.]+\.)?({names}): "


def _last_error(text: str, *names: str) -> str | None:
    """The message of the last `<module.>Name: message` line of a traceback text (to its end)."""
    pattern = re.compile(_ERROR_LINE.format(names="|".join(names)), re.MULTILINE)
    matches = list(pattern.finditer(text))
    return text[matches[-1].end():].strip() if matches else None


def _split_message(message: str) -> tuple[str, str]:
    """(path, problem) of a "path: problem" message; the whole message is the problem without
    a path part."""
    path, sep, problem = message.partition(": ")
    return (path, problem) if sep else ("<unknown file>", message)


def _error_names() -> list[str]:
    """Class names of CtsegError and all its subclasses."""
    names, todo = [], [CtsegError]
    while todo:
        cls = todo.pop()
        names.append(cls.__name__)
        todo += cls.__subclasses__()
    return names


def user_message(err: BaseException) -> str | None:
    """The message of the CtsegError behind `err` (itself, its cause or context chain, or the
    traceback text of another process inside its message); None for any other error."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, CtsegError):
            return str(current)
        remote = _last_error(str(current), *_error_names())
        if remote:
            return remote
        current = current.__cause__ or current.__context__
    return None


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception of `err`'s cause chain (MONAI wraps transform errors)."""
    seen = {id(err)}
    while err.__cause__ is not None and id(err.__cause__) not in seen:
        err = err.__cause__
        seen.add(id(err))
    return err


def data_errors() -> tuple[type[BaseException], ...]:
    """What reading or decoding a bad file raises: OS and gzip errors, nibabel's and pydicom's
    file errors (a NIfTI header nibabel cannot interpret: HeaderDataError), YAML syntax errors,
    and the ValueErrors numpy and nibabel raise for inconsistent headers."""
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError
    from pydicom.errors import InvalidDicomError
    from yaml import YAMLError

    return (OSError, EOFError, ValueError, zlib.error, struct.error, ImageFileError,
            HeaderDataError, InvalidDicomError, YAMLError)


def dicom_errors() -> tuple[type[BaseException], ...]:
    """What reading a bad DICOM file with pydicom and MONAI's PydicomReader raises: data_errors(),
    a value of the wrong length (BytesLengthException) or type (TypeError), fewer values than a
    tag needs (IndexError), and an unknown value representation or pixel data no decoder can
    decode (NotImplementedError, RuntimeError)."""
    from pydicom.errors import BytesLengthException

    return (*data_errors(), BytesLengthException, TypeError, IndexError, RuntimeError)


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` says that memory ran out rather than that a file is bad: a MemoryError, an
    OSError with ENOMEM (a memory map), or PyTorch's allocator or memory map failing (a
    RuntimeError quoting ENOMEM's text)."""
    return (isinstance(err, MemoryError)
            or (isinstance(err, OSError) and err.errno == errno.ENOMEM)
            or os.strerror(errno.ENOMEM) in str(err))


@contextmanager
def blamed_on(path: str | Path, doing: str) -> Iterator[None]:
    """Re-raise a failure to read or decode data inside as a DatasetError naming `path`:
    "<doing> (<type>: <cause>)". No room to write (disk full, file-size limit) is an OutputError
    naming the file written; ctseg's own errors, MemoryErrors and anything else (a bug) pass
    unchanged."""
    try:
        yield
    except (CtsegError, MemoryError):
        raise
    except Exception as err:
        cause = root_cause(err)
        if isinstance(cause, CtsegError):
            raise cause from err
        if isinstance(cause, OSError) and cause.errno in NO_ROOM:
            raise output_error(cause.filename or path, cause) from err
        if not isinstance(cause, data_errors()):
            raise
        raise DatasetError(path, f"{doing} ({type(cause).__name__}: {cause})") from err


def cli_message(err: BaseException) -> str | None:
    """The one-line message for an error a user can fix: a CtsegError (however wrapped), an
    error of Hydra about the command line, or an OS error naming a path; None for anything
    else (a bug, which keeps its traceback)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    message = user_message(err)
    if message is not None:
        return message
    if isinstance(err, HydraException) and not isinstance(err, CtsegError):
        return hydra_message(str(err)) or type(err).__name__
    missing = re.search(r"Missing mandatory value: ([\w.]+)", str(err))
    if missing and isinstance(err, OmegaConfBaseException):
        return (f"{missing.group(1)}= is missing: this command needs it on the command line, "
                f"e.g. {missing.group(1)}=<path> (--help lists every key)")
    if isinstance(err, OSError) and err.filename:
        return (f"{err.filename}: {err.strerror or err}; check that the path exists and is "
                "writable (a folder, not a file)")
    return None


def hydra_message(text: str) -> str:
    """Hydra's error text on one line: its lines up to the config search path, a list of
    options (a header ending in ':' and indented lines) as "header a, b, c", and the option
    nearest to a misspelt one ("did you mean ...?")."""
    lines = text.split("Config search path:")[0].splitlines()
    parts: list[str] = []
    options: list[str] = []
    for line in lines:
        if line.startswith(("\t", " ")) and line.strip() and parts and parts[-1].endswith(":"):
            options.append(line.strip())
        elif line.strip():
            if options:
                parts[-1] += " " + ", ".join(options)
                options = []
            parts.append(line.strip())
    if options:
        parts[-1] += " " + ", ".join(options)
    missing = re.search(r"Could not find '(?:[\w/]+/)?([^'/]+)'", text)
    if missing and options_in(text):
        near = difflib.get_close_matches(missing.group(1), options_in(text), n=1)
        parts[-1] += f"; did you mean {near[0]}?" if near else ""
    return " ".join(parts)


def options_in(text: str) -> list[str]:
    """The options Hydra lists under "Available options in '<group>':" in `text`."""
    listed = re.search(r"Available options in '[^']*':\n((?:\t[^\n]*\n?)+)", text)
    return [o.strip() for o in listed.group(1).splitlines()] if listed else []


class Interrupted(SystemExit):
    """A training run stopped by a signal (SIGTERM: `kill`, a pre-emption; SIGINT: Ctrl-C) once
    Lightning finished its batch and the checkpoint callbacks saved its progress. It ends the
    process with 128 + the signal's number, the status a shell reports for a process that
    signal ended; `resume_from` is what `ckpt_path=` resumes it from (None: nothing saved)."""

    def __init__(self, signum: int, epoch: int, step: int, resume_from: Path | None,
                 rank_zero: bool = True) -> None:
        """Record where the run stopped."""
        super().__init__(128 + signum)
        self.signal = signal.Signals(signum)
        self.epoch, self.step = epoch, step
        self.resume_from, self.rank_zero = resume_from, rank_zero


class WorkDone:
    """Mixin of errors raised after a run wrote results of its own (its log folder stays)."""


def remove_unstarted_run() -> None:
    """Delete the run folder Hydra made for a run that ended before writing anything of its own
    (it holds only Hydra's `.hydra`, the log file and empty folders), and the folders above
    it that this leaves empty (never the working folder or its parents), so a run that never
    started leaves no folder behind."""
    # The run folder is where Hydra's job logging writes its file (<run dir>/<job>.log).
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    if not handlers:
        return
    folder = Path(handlers[0].baseFilename).parent
    cwd = Path.cwd().resolve()
    if folder.resolve() in (cwd, *cwd.parents):
        return  # never the folder the user works in (hydra.run.dir=.)
    if not folder.is_dir() or any(p.name != ".hydra" and p.suffix != ".log"
                                  and not (p.is_dir() and not any(p.iterdir()))
                                  for p in folder.iterdir()):
        return
    for handler in handlers:
        logging.getLogger().removeHandler(handler)
        handler.close()
    shutil.rmtree(folder, ignore_errors=True)
    for parent in folder.parents:
        if parent.resolve() in (cwd, *cwd.parents):
            break
        try:
            parent.rmdir()  # only an empty folder goes
        except OSError:
            break


@contextmanager
def reported(program: str, remove_unstarted: bool = False) -> Iterator[None]:
    """Turn a user error (`cli_message`) into `error: <message>` on stderr and exit status 1;
    the traceback goes to the log at debug level. Other errors propagate unchanged. With
    `remove_unstarted`, the Hydra run folder of a run that failed before its work began goes
    (`remove_unstarted_run`; errors that are `WorkDone` keep it)."""
    try:
        yield
    except Exception as err:
        message = cli_message(err)
        if message is None:
            raise
        if remove_unstarted and not isinstance(err, WorkDone):
            remove_unstarted_run()
        log.debug("%s failed", program, exc_info=True)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


class WithoutLines:
    """A text stream passing every write to `stream` except those starting with `prefix`."""

    def __init__(self, stream: TextIO, prefix: str) -> None:
        """Wrap `stream`."""
        self.stream, self.prefix = stream, prefix

    def write(self, text: str) -> int:
        """Write `text` unless it starts with the prefix."""
        return len(text) if text.startswith(self.prefix) else self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        """Everything else as the wrapped stream has it."""
        return getattr(self.stream, name)


def run_cli(main: Callable[[], Any], program: str) -> Any:
    """Run a command line entry point (a `hydra.main` function) so that each user error is one
    `error:` line on stderr with exit status 1, and a run that failed before its work began
    leaves no folder: Hydra raises the errors it meets (its own and the task's) instead of
    printing a traceback, and `cli_message` words them; the line Hydra writes before re-raising
    a failed job's error (HYDRA_FAILURE) is dropped. A bug keeps its traceback."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    with redirect_stderr(WithoutLines(sys.stderr, HYDRA_FAILURE)), \
            reported(program, remove_unstarted=True):
        return main()
