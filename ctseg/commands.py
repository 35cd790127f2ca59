"""The training and prediction commands: `ctseg-train` / `python train.py` and `ctseg-predict` /
`python predict.py` (the clone's scripts call these)."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ctseg.config import CONFIG_DIR, RUN_NAME_ENV, check_data, run_name
from ctseg.errors import ConfigError, Interrupted, run_cli
from ctseg.resume import first_process, kept_unless_started, resume_arguments

log = logging.getLogger(__name__)


def shown(path: Path) -> str:
    """`path` as the user would type it: relative to the working folder when inside it."""
    cwd = Path.cwd().resolve()
    resolved = path.resolve()
    return str(resolved.relative_to(cwd)) if resolved.is_relative_to(cwd) else str(path)


def interrupted_line(stop: Interrupted) -> str:
    """The line train.py ends an interrupted run with: where it stopped and the exact command
    that resumes it (the program as it was typed)."""
    program = f"python {sys.argv[0]}" if sys.argv[0].endswith(".py") else Path(sys.argv[0]).name
    where = f"train.py: interrupted by {stop.signal.name} at epoch {stop.epoch}, step {stop.step}"
    if stop.resume_from is None:
        return f"{where}, before any checkpoint was saved: run the same command again"
    return f"{where}; resume with: {program} {shlex.quote(f'ckpt_path={shown(stop.resume_from)}')}"


def train_app(notes: Sequence[str] = ()) -> Callable[[], float | None]:
    """train.py's Hydra app; it logs `notes` (what a resume restores and changes) once Hydra has
    set up the run's logging."""

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
    def train_main(cfg: DictConfig) -> float | None:
        """Run training; return the metric named by `optimized_metric` for Hydra sweepers."""
        for note in notes:
            log.info(note)
        check_data(cfg.get("data"))
        # Imported once Hydra has read the command line and the values are checked: --help,
        # --cfg and a bad value answer without loading torch, Lightning and MONAI.
        from ctseg.training import train

        if cfg.get("hparams_search") is not None:
            raise ConfigError("hparams_search: train.py trains one run; run the search with "
                              "python -m ctseg.hparams_search hparams_search=<space> [overrides]")
        try:
            metrics, _ = train(cfg)
        except Interrupted as stop:
            if stop.rank_zero:
                print(interrupted_line(stop), file=sys.stderr)
            raise
        return metrics.get(cfg.get("optimized_metric"))

    return train_main


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="predict")
def predict_main(cfg: DictConfig) -> None:
    """Predict every input case; a failed case ends the run with an error after the others."""
    # Imported once Hydra has read the command line: --help answers without loading torch.
    from ctseg.inference.runner import run

    run(cfg)


def resumed_train() -> float | None:
    """train.py on its command line, a resume of a run folder first turned into the run's own
    overrides under the command's, in that folder (`ctseg.resume`; the other ranks of a DDP
    run rewrite their arguments alike, the first process alone logs what the resume changes)."""
    resume = resume_arguments(sys.argv[1:])
    sys.argv[1:] = resume.arguments
    with kept_unless_started(resume.folder):
        return train_app(resume.notes if first_process() else ())()


def train_cli() -> None:
    """Console entry point of training (`ctseg-train`, `python train.py`)."""
    # DDP ranks and submitit jobs started from here inherit the run folder's name.
    os.environ[RUN_NAME_ENV] = run_name()
    run_cli(resumed_train, "train.py")


def predict_cli() -> None:
    """Console entry point of prediction (`ctseg-predict`, `python predict.py`)."""
    run_cli(predict_main, "predict.py")
