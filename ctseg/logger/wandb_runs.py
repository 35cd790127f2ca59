"""The W&B logger of conf/logger/wandb.yaml: offline by default, runs of one sweep in one group,
the run folder as the run's name, and the run id kept in the run folder, so that resuming from
it (`ckpt_path=<run folder>`, `ckpt_path=last`) continues the same W&B run."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from wandb.sdk.lib.runid import generate_id

from ctseg.atomic import write_atomic
from ctseg.resume import resumed_folder

log = logging.getLogger(__name__)

ID_FILE = "wandb_id.txt"


def run_id(output_dir: Path, resumed: Path | None) -> str:
    """The W&B id of this run: the resumed folder's, else a new one; written to the run folder
    (rank 0 only)."""
    source = resumed / ID_FILE if resumed is not None else None
    if source is not None and source.is_file():
        identifier = source.read_text().strip()
        log.info("W&B: continuing run %s of %s", identifier, resumed)
    elif (output_dir / ID_FILE).is_file():
        identifier = (output_dir / ID_FILE).read_text().strip()
    else:
        identifier = generate_id()
    if rank_zero_only.rank == 0:
        write_atomic(output_dir / ID_FILE, lambda tmp: tmp.write_text(identifier + "\n"))
    return identifier


def sweep_identity(task_name: str, output_dir: Path) -> tuple[str, str]:
    """(name, group): in a multirun `<sweep folder>/<job number>` in the group
    `<task>/<sweep folder>`, otherwise the run folder's name in the group `<task>`."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        sweep = Path(HydraConfig.get().sweep.dir).name
        return f"{sweep}/{output_dir.name}", f"{task_name}/{sweep}"
    return output_dir.name, task_name


def wandb_logger(save_dir: str, task_name: str, project: str = "ctseg",
                 job_type: str = "train", tags: Sequence[str] = (), offline: bool = True,
                 group: str | None = None, ckpt_path: str | None = None,
                 log_model: bool = False, **kwargs: object) -> WandbLogger:
    """A WandbLogger named after the run folder `save_dir`, grouped by sweep (or `group`), with
    the run id of a resumed run folder."""
    output_dir = Path(save_dir)
    name, sweep_group = sweep_identity(task_name, output_dir)
    identifier = run_id(output_dir, resumed_folder(ckpt_path, output_dir))
    return WandbLogger(save_dir=str(output_dir), offline=offline, project=project, name=name,
                       group=group or sweep_group, id=identifier, resume="allow",
                       job_type=job_type, tags=list(tags), log_model=log_model, **kwargs)


def log_dice_table(logger: WandbLogger, metrics: Mapping[str, float], stage: str = "test"
                   ) -> None:
    """A `<stage>/dice_table` of per-structure Dice (structure, dice) from `<stage>/dice/*`."""
    prefix = f"{stage}/dice/"
    rows = [[key.removeprefix(prefix), float(value)] for key, value in metrics.items()
            if key.startswith(prefix)]
    if rows:
        logger.log_table(key=f"{stage}/dice_table", columns=["structure", "dice"], data=rows)
