"""Hydra glue: config folder, OmegaConf resolvers and instantiation of callback/logger groups."""

from __future__ import annotations

import functools
import logging
import math
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, Optional

import numpy as np
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ctseg.errors import ConfigError
from ctseg.label_space import LabelSpace

log = logging.getLogger(__name__)

# The config tree: `ctseg/conf` in an installed wheel (the build copies the clone's top-level
# conf/ there), `<clone>/conf` in the clone and in an editable install.
_PACKAGE_CONFIG = Path(__file__).resolve().parent / "conf"
CONFIG_DIR = (_PACKAGE_CONFIG if _PACKAGE_CONFIG.is_dir()
              else Path(__file__).resolve().parents[1] / "conf")


# The run folder name: train.py exports it, so that the processes it starts (DDP ranks, submitit
# jobs of a sweep) use the same folder; set it yourself to choose the name.
RUN_NAME_ENV = "CTSEG_RUN_NAME"


# Loggers that libraries give console handlers of their own: Lightning's `lightning` always,
# `lightning.pytorch` and `lightning.fabric` when imported before the root logger had a handler.
# Beside Hydra's job logging (the root logger's console and log-file handlers) each of their
# lines would print twice, once per format.
OWN_HANDLER_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


def log_through_root() -> None:
    """Once the root logger has handlers (Hydra's job logging), send the OWN_HANDLER_LOGGERS'
    records through them alone, as ctseg's own loggers do: their handlers removed, propagation
    on. One console line per message, in one format, and every one in the run's log file."""
    if not logging.getLogger().handlers:
        return
    for name in OWN_HANDLER_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True


@functools.cache
def run_name() -> str:
    """This process's run (or sweep) folder name, fixed at first use: CTSEG_RUN_NAME if set;
    under `srun` and `torchrun --rdzv-id` derived from the job's id, so that every rank and a
    requeued SLURM job agree; otherwise date, time and a random suffix, so that jobs started in
    the same second differ."""
    env = os.environ
    step = env.get("SLURM_STEP_ID", "")
    run_id = env.get("TORCHELASTIC_RUN_ID", "none")
    if env.get(RUN_NAME_ENV):
        name = env[RUN_NAME_ENV]
    elif env.get("SLURM_JOB_ID") and step.isdigit():
        array = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
        name = f"slurm-{f'{array[0]}_{array[1]}' if all(array) else env['SLURM_JOB_ID']}"
        name += f"-step{step}"
    elif run_id != "none":
        name = f"torchrun-{run_id}"
    else:
        name = f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{secrets.token_hex(3)}"
    return name


def launcher_rank() -> int:
    """Global rank given to this process by torchrun or srun (0 when neither started it)."""
    for key in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(key, "")
        if value.isdigit() and (key != "SLURM_PROCID" or os.environ.get("SLURM_STEP_ID")):
            return int(value)
    return 0


def rank_suffix() -> str:
    """"" on rank 0, "_rank<N>" on the other ranks of a torchrun / srun job: their log files."""
    rank = launcher_rank()
    return f"_rank{rank}" if rank else ""


def hydra_subdir() -> str | None:
    """Hydra's config subfolder, written by rank 0 only."""
    return None if launcher_rank() else ".hydra"


def slurm_gpus(devices: Any) -> int:
    """GPUs (= tasks) per node for SLURM from `trainer.devices`, which must be a count there."""
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"trainer.devices={devices!r}: SLURM jobs need the number of GPUs per "
                         "node, e.g. trainer.devices=4 (not -1 or auto)")
    return devices


def launch_dir() -> str:
    """The folder the command was started from: Hydra's `runtime.cwd` inside a job, the current
    folder before Hydra has set its config (a multirun's sweep folder is resolved then, where
    the `hydra:` resolver cannot answer)."""
    return HydraConfig.get().runtime.cwd if HydraConfig.initialized() else os.getcwd()


def required(key: str, what: str) -> NoReturn:
    """A value the command line must give (an experiment sets `key: ${ctseg.required:key,what}`):
    ConfigError naming the key and what to give."""
    raise ConfigError(f"{key} is required here: give {what} ({key}=...)")


def space_size(version: str, extra_classes: Sequence[str] = ()) -> int:
    """Output channels of TotalSegmentator `version`'s classes plus `extra_classes`."""
    return LabelSpace.of(version, extra_classes).num_classes


def space_names(version: str, extra_classes: Sequence[str] = ()) -> list[str]:
    """Class names of TotalSegmentator `version` plus `extra_classes`, background first."""
    return LabelSpace.of(version, extra_classes).names


def register_resolvers() -> None:
    """Register the `${ctseg.*:}` resolvers (class tables, run name, launch folder, ranks) with
    OmegaConf."""
    OmegaConf.register_new_resolver("ctseg.num_classes", space_size, replace=True)
    OmegaConf.register_new_resolver("ctseg.label_names", space_names, replace=True)
    OmegaConf.register_new_resolver("ctseg.run_name", run_name, replace=True)
    OmegaConf.register_new_resolver("ctseg.launch_dir", launch_dir, replace=True)
    OmegaConf.register_new_resolver("ctseg.rank_suffix", rank_suffix, replace=True)
    OmegaConf.register_new_resolver("ctseg.hydra_subdir", hydra_subdir, replace=True)
    OmegaConf.register_new_resolver("ctseg.slurm_gpus", slurm_gpus, replace=True)
    OmegaConf.register_new_resolver("ctseg.required", required, replace=True)


def plain(value: Any) -> Any:
    """`value` as builtins: OmegaConf containers resolved, mappings as dicts, sequences as lists,
    paths as strings, a keyword-only partial as its `{_target_, _partial_: true, ...}` config;
    scalars unchanged. What checkpoints (`weights_only=True`) and loggers can hold."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, functools.partial):
        if value.args:
            raise ValueError(f"{value.func.__qualname__} must be a partial with keyword arguments "
                             f"only (got positional {value.args})")
        target = f"{value.func.__module__}.{value.func.__qualname__}"
        return {"_target_": target, "_partial_": True, **plain(value.keywords)}
    if isinstance(value, str | os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, Sequence):
        return [plain(v) for v in value]
    return value


# Keys of the data group that take one value or one per axis (z, y, x), and each value's type.
PER_AXIS = {"spacing": float, "patch_size": int}


def per_axis(value: Any, name: str, kind: type) -> tuple:
    """`value` (one number, or three: one per axis) as three `kind` values, each finite and > 0
    (ints whole numbers); ConfigError naming `data.<name>` and what it must be otherwise."""
    values = [value] * 3 if np.ndim(value) == 0 else list(value)
    if len(values) != 3:
        raise ConfigError(f"data.{name}={value!r}: needs one value or three (one per axis)")
    try:
        if any(isinstance(v, bool) for v in values):
            raise TypeError(name)
        out = tuple(kind(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"data.{name}={value!r}: must be a number > 0, or three numbers (one "
                          "per axis)") from None
    if kind is int and out != tuple(values):
        raise ConfigError(f"data.{name}={value!r}: values must be whole numbers")
    if not all(math.isfinite(v) and v > 0 for v in out):
        raise ConfigError(f"data.{name}={value!r}: values must be finite and > 0")
    return out


def check_data(data: Any) -> None:
    """Check the composed data group's per-axis values (PER_AXIS) before any work starts:
    ConfigError naming the key. The DataModule checks them again with the same rule."""
    if not isinstance(data, DictConfig):
        return
    for name, kind in PER_AXIS.items():
        if data.get(name) is not None:
            per_axis(plain(data[name]), name, kind)


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every `_target_` entry of a named dict of configs (callbacks, loggers)."""
    if not group:
        return []
    if not isinstance(group, DictConfig):
        raise TypeError(f"expected a mapping of name -> config, got {type(group).__name__}")
    objects = []
    for name, conf in group.items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            log.debug("instantiating %s <%s>", name, conf._target_)
            objects.append(instantiate(conf))
    return objects



@dataclass
class TrainSchema:
    """Types of the top-level keys of conf/train.yaml, checked when Hydra composes."""

    task_name: str = "train"
    tags: list[str] = field(default_factory=list)
    seed: int = 42
    train: bool = True
    test: bool = True
    ckpt_path: Optional[str] = None  # noqa: UP045 - OmegaConf needs Optional, not `X | None`
    optimized_metric: Optional[str] = "val/mean_dice"  # noqa: UP045
    data: Any = None
    model: Any = None
    trainer: Any = None
    callbacks: Any = None
    logger: Any = None
    paths: Any = None
    sw: Any = None
    experiment: Any = None
    hparams_search: Any = None
    debug: Any = None


def register_schemas() -> None:
    """Store the schemas in Hydra's ConfigStore so configs can list them in their defaults."""
    ConfigStore.instance().store(name="train_schema", node=TrainSchema)


register_schemas()


register_resolvers()
