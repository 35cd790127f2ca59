"""Resuming a training run where it was started: `python train.py ckpt_path=<run folder>` (or a
checkpoint in its `checkpoints/`, or `ckpt_path=last hydra.run.dir=<run folder>`) runs with the
overrides the run was started with (its `.hydra/overrides.yaml`, which Hydra writes in every run
folder), those of the resume command on top, in the same folder."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

from ctseg.atomic import write_atomic
from ctseg.config import launcher_rank
from ctseg.errors import ConfigError

# The overrides a run was started with, in its folder (Hydra's `hydra.overrides.task`).
OVERRIDES = Path(".hydra") / "overrides.yaml"
# Written once a run's pre-flight checks pass (ctseg.training.save_config): in the checkpoint
# folder, or in the run folder itself when no checkpoint callback names one.
STARTED_MARKS = (Path("checkpoints") / "config.yaml", Path("config.yaml"))
# Hydra's command-line flags that take the next word as their value (`--cfg job`, `-cn train`),
# and the values its `--info` may take.
VALUE_FLAGS = frozenset({"-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir",
                         "-c", "--cfg", "-p", "--package", "--experimental-rerun"})
INFO_FLAGS = frozenset({"-i", "--info"})
INFO_VALUES = frozenset({"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"})
MULTIRUN_FLAGS = frozenset({"-m", "--multirun"})
# A value Hydra reads unquoted (no spaces, quotes, brackets, commas, `=` or interpolation).
UNQUOTED = re.compile(r"[\w./+~-]+")


def resumed_folder(ckpt_path: str | None, output_dir: Path | None) -> Path | None:
    """The run folder a resumed run comes from: `output_dir` for `last`, the folder itself, or
    the folder holding `checkpoints/<file>.ckpt`; None for a fresh run."""
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        return output_dir
    path = Path(ckpt_path)
    return path if path.is_dir() else path.parent.parent


def run_folder(ckpt_path: str | None, run_dir: Path | None = None) -> Path | None:
    """The run folder that `ckpt_path` resumes (`resumed_folder`; `run_dir`: hydra.run.dir) if
    it is one Hydra wrote, holding OVERRIDES, and a checkpoint file lies in its `checkpoints/`;
    None otherwise (a checkpoint outside any run folder)."""
    folder = resumed_folder(ckpt_path, run_dir)
    if folder is None or not (folder / OVERRIDES).is_file():
        return None
    path = Path(str(ckpt_path))
    if ckpt_path != "last" and not path.is_dir() and path.parent.name != "checkpoints":
        return None
    return folder


def split_arguments(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(Hydra's flags with their values, the overrides) of train.py's arguments."""
    flags: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        if not word.startswith("-"):
            overrides.append(word)
            i += 1
            continue
        takes = word in VALUE_FLAGS or (word in INFO_FLAGS and i + 1 < len(args)
                                        and args[i + 1] in INFO_VALUES)
        flags += args[i:i + 1 + takes]
        i += 1 + takes
    return flags, overrides


def key(override: Override) -> str:
    """The config key or group an override sets (with its `@package`), without `+`/`++`/`~`."""
    return override.key_or_group + (f"@{override.package}" if override.package else "")


def quoted(value: str) -> str:
    """`value` as Hydra reads it back in an override: bare when plain, else single-quoted."""
    return value if UNQUOTED.fullmatch(value) else "'" + value.replace("'", "\\'") + "'"


@dataclass(frozen=True)
class Resume:
    """train.py's arguments with a run folder's resume applied: the arguments, the run folder
    (None when the command resumes none, its arguments unchanged) and one line per override the
    resume adds or changes."""

    arguments: list[str]
    folder: Path | None = None
    notes: list[str] = field(default_factory=list)


def recorded_overrides(folder: Path) -> list[Override]:
    """The overrides a run folder's run was started with; ConfigError naming the file if it
    cannot be read."""
    path = folder / OVERRIDES
    try:
        lines = OmegaConf.to_container(OmegaConf.load(path))
        if not isinstance(lines, list):
            raise ConfigError(f"a list of overrides, found {type(lines).__name__}")
        return OverridesParser.create().parse_overrides([str(line) for line in lines])
    except (OSError, YAMLError, OmegaConfBaseException, HydraException, ConfigError) as err:
        raise ConfigError(f"{path}: cannot read the run's overrides ({err}); repair it, or "
                          "delete it to resume with the command's settings alone") from err


def resume_arguments(args: Sequence[str]) -> Resume:
    """train.py's arguments `args` resuming the run folder their `ckpt_path` names (run_folder):
    the run's recorded overrides, each replaced by the command's override of the same key (an
    override the run added with `+` is set with `++`), then the command's overrides, then
    `hydra.run.dir=<run folder>` unless given. Anything else (a multirun, a fresh run, a
    checkpoint outside a run folder, a line Hydra will refuse) keeps `args` as they are."""
    unchanged = Resume(list(args))
    flags, overrides = split_arguments(args)
    if MULTIRUN_FLAGS & set(flags):
        return unchanged
    try:
        given = {key(o): o for o in OverridesParser.create().parse_overrides(overrides)}
    except HydraException:
        return unchanged
    ckpt, run_dir = given.get("ckpt_path"), given.get("hydra.run.dir")
    if ckpt is None or ckpt.is_delete() or ckpt.is_sweep_override() or ckpt.value() is None:
        return unchanged
    folder = run_folder(str(ckpt.value()), Path(str(run_dir.value())) if run_dir else None)
    if folder is None:
        return unchanged
    recorded = {key(o): o for o in recorded_overrides(folder)}
    arguments = [*flags, *(o.input_line for name, o in recorded.items() if name not in given)]
    settings = [o.input_line for name, o in recorded.items()
                if name != "ckpt_path" and not o.is_hydra_override()]
    notes = [f"resuming {folder} with the overrides it was started with: "
             f"{' '.join(settings) or '(none)'}"]
    for name, override in given.items():
        before = recorded.get(name)
        line = override.input_line
        if before is not None and before.type != OverrideType.CHANGE \
                and override.type == OverrideType.CHANGE:
            line = f"++{line}"
        arguments.append(line)
        if name == "ckpt_path" or override.is_hydra_override():
            continue
        if before is None:
            notes.append(f"resume adds {override.input_line} (not set when the run started)")
        elif (before.is_delete(), before.get_value_element_as_str()) != \
                (override.is_delete(), override.get_value_element_as_str()):
            notes.append(f"resume changes {override.input_line} (the run had "
                         f"{before.input_line})")
    if run_dir is None:
        arguments.append(f"hydra.run.dir={quoted(str(folder))}")
    return Resume(arguments, folder, notes)


def first_process() -> bool:
    """Whether this is the process the user started (rank 0), not another rank of a torchrun /
    srun job or a DDP rank that Lightning started (LOCAL_RANK > 0) with the same arguments."""
    return not launcher_rank() and os.environ.get("LOCAL_RANK", "0") == "0"


@contextmanager
def kept_unless_started(folder: Path | None) -> Iterator[None]:
    """Put a resumed run folder's `.hydra` files back as they were if the resume ends before
    its run starts (no STARTED_MARKS file rewritten): Hydra rewrites them with the resume's
    overrides first, and a resume refused for a bad setting must not make that setting the
    run's. Only in the process that writes them (first_process)."""
    if folder is None or not first_process():
        yield
        return
    files = {path: path.read_bytes() for path in sorted((folder / ".hydra").glob("*.yaml"))}
    marks = {path: _mtime(folder / path) for path in STARTED_MARKS}
    try:
        yield
    finally:
        if all(_mtime(folder / path) == mtime for path, mtime in marks.items()):
            for path, data in files.items():
                if not path.is_file() or path.read_bytes() != data:
                    write_atomic(path, lambda tmp, data=data: tmp.write_bytes(data))


def _mtime(path: Path) -> int | None:
    """`path`'s modification time in ns, None if it does not exist."""
    return path.stat().st_mtime_ns if path.exists() else None
