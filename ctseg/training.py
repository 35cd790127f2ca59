"""The training run behind train.py: instantiate everything from a composed config, check that the
run can finish, fit, test."""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import wandb
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import StrategyRegistry
from omegaconf import DictConfig, OmegaConf

from ctseg.atomic import remove_leftovers, temp_prefix, write_atomic
from ctseg.callbacks.checkpoint_io import AtomicCheckpointIO
from ctseg.config import CONFIG_DIR, instantiate_group, log_through_root
from ctseg.data.folds import SPLITS_FILE, write_splits
from ctseg.errors import ConfigError, Interrupted, MissingFileError
from ctseg.logger.wandb_runs import log_dice_table
from ctseg.models.loading import module_class
from ctseg.models.weights import network_state_dict, read_checkpoint
from ctseg.resume import run_folder

log = logging.getLogger(__name__)

# Lightning's DDP strategies that have a `<name>_find_unused_parameters_true` variant.
DDP_STRATEGIES = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")
# The key of conf/trainer that is ctseg's, not a Trainer argument: a DDP rank's wait limit.
DDP_TIMEOUT_KEY = "ddp_timeout_min"


def resolve_ckpt_path(ckpt_path: str | None, checkpoint_dir: Path | None = None) -> str | None:
    """Map `ckpt_path` to a checkpoint file or None: a file, a run folder (its last.ckpt), or
    "last" (`<checkpoint_dir>/last.ckpt`); MissingFileError naming what is missing."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        if checkpoint_dir is None:
            raise ConfigError("ckpt_path=last needs the run's checkpoint folder")
        path = checkpoint_dir / "last.ckpt"
    else:
        path = Path(ckpt_path)
        if path.is_dir():
            path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise MissingFileError(
            f"ckpt_path={ckpt_path}: no checkpoint at {path}; give a .ckpt file, a run folder "
            "holding checkpoints/last.ckpt, or ckpt_path=last with hydra.run.dir=<run folder>"
        )
    return str(path)


def requeued_ckpt_path(ckpt_path: str | None, checkpoint_dir: Path) -> str | None:
    """`ckpt_path`, or "last" when this is a requeued SLURM job (SLURM_RESTART_COUNT > 0, e.g.
    after pre-emption or a time-limit requeue) whose run folder holds last.ckpt."""
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    if ckpt_path is None and restarts.isdigit() and int(restarts) > 0 \
            and (checkpoint_dir / "last.ckpt").is_file():
        log.info("requeued SLURM job (restart %s): resuming from %s", restarts,
                 checkpoint_dir / "last.ckpt")
        return "last"
    return ckpt_path


def model_target(name: str) -> str | None:
    """The `_target_` of conf/model/<name>.yaml, or of the model option its defaults extend."""
    conf = OmegaConf.load(CONFIG_DIR / "model" / f"{name}.yaml")
    if "_target_" in conf:
        return str(conf["_target_"])
    bases = [entry for entry in conf.get("defaults") or () if isinstance(entry, str)
             and entry != "_self_"]
    return next(filter(None, map(model_target, bases)), None)


def model_options(cls: type) -> list[str]:
    """The `model=<name>` options (conf/model/<name>.yaml) that build `cls`."""
    target = f"{cls.__module__}.{cls.__qualname__}"
    return [path.stem for path in sorted((CONFIG_DIR / "model").glob("*.yaml"))
            if model_target(path.stem) == target]


def check_resumed_class(ckpt_path: str, checkpoint: Any, model: L.LightningModule) -> None:
    """ConfigError when the checkpoint to resume records another module class than the
    composed config builds (its weights could not load into the model); the error names both
    and the fix."""
    path = Path(ckpt_path)
    cls = module_class(path, checkpoint, network_state_dict(checkpoint, path))
    if type(model) is cls:
        return
    options = " or ".join(f"model={name}" for name in model_options(cls)) or "its model"
    folder = run_folder(ckpt_path) or "<its run folder>"
    raise ConfigError(f"{path}: a checkpoint of {cls.__module__}.{cls.__qualname__}, but the "
                      f"config builds {type(model).__name__} (model._target_); resume it with "
                      f"the settings it was trained with: ckpt_path={folder}, or choose its "
                      f"model: {options}")


def save_config(cfg: DictConfig, folder: Path) -> Path:
    """Write the fully resolved config as `config.yaml` in `folder`, atomically."""
    path = folder / "config.yaml"
    text = OmegaConf.to_yaml(cfg, resolve=True)
    write_atomic(path, lambda tmp: tmp.write_text(text))
    return path


def check_writable(folder: Path, what: str) -> None:
    """Create `folder` and write a probe file in it; ConfigError naming the folder otherwise."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=temp_prefix("probe")):
            pass
    except OSError as err:
        raise ConfigError(f"{folder}: cannot write the {what} there ({err.strerror or err}); "
                          "choose a writable folder (hydra.run.dir=... or paths.log_dir=...)"
                          ) from err


@dataclass(frozen=True)
class RunPlan:
    """What the pre-flight checks found: the checkpoint to resume and whether to test."""

    ckpt_path: str | None
    test: bool


def preflight(cfg: DictConfig, datamodule: L.LightningDataModule, model: L.LightningModule,
              trainer: L.Trainer, checkpoint_dir: Path) -> RunPlan:
    """Check before the first step everything the run needs: writable output folders, a safe
    resume checkpoint of the configured model class, prepared data with subjects for every
    stage, matching class counts.

    A run without test subjects skips the test stage (one warning line) rather than failing
    after training. Raises CtsegError subclasses naming the file or setting at fault.
    """
    check_writable(Path(cfg.paths.output_dir), "run's logs")
    check_writable(checkpoint_dir, "checkpoints")
    remove_leftovers(checkpoint_dir)
    ckpt_path = resolve_ckpt_path(requeued_ckpt_path(cfg.get("ckpt_path"), checkpoint_dir),
                                  checkpoint_dir)
    if ckpt_path is not None:
        check_resumed_class(ckpt_path, read_checkpoint(ckpt_path, "checkpoint to resume",
                                                       mmap=True), model)
    data_classes = getattr(datamodule, "num_classes", None)
    model_classes = model.hparams.get("num_classes")
    if data_classes is not None and model_classes is not None and data_classes != model_classes:
        raise ConfigError(f"the model has {model_classes} output classes but the data has "
                          f"{data_classes} (data.version={datamodule.hparams.get('version')}); "
                          "set model.num_classes to match, or leave it to the config's "
                          "interpolation")
    test = bool(cfg.get("test"))
    if not hasattr(datamodule, "split_sizes"):
        return RunPlan(ckpt_path, test)
    datamodule.prepare_data()
    sizes = datamodule.split_sizes()
    if cfg.get("train"):
        if not sizes["train"]:
            raise ConfigError(f"{datamodule.meta_files()}: no 'train' subject; set the split "
                              "column of meta.csv or add a dataset root")
        if not sizes["val"] and trainer.limit_val_batches != 0:
            raise ConfigError(f"{datamodule.meta_files()}: no 'val' subject and too few train "
                              "subjects to hold one out (data.val_fraction); add val rows or "
                              "subjects, or run without validation (trainer.limit_val_batches=0 "
                              "callbacks=none)")
    if test and not sizes["test"]:
        log.warning("%s: no 'test' subject, so the test stage is skipped (test=false silences "
                    "this)", datamodule.meta_files())
        test = False
    return RunPlan(ckpt_path, test)


def ddp_strategy(strategy: Any, model: L.LightningModule, timeout_min: float | None = None
                 ) -> Any:
    """`strategy`, or its find-unused-parameters variant for a model whose steps can leave
    parameters without a gradient (VISTA3D: a step without clicks skips the point head), as the
    MONAI vista3d bundle wraps its network (`find_unused_parameters: true`); with `timeout_min`,
    a DDP strategy is built whose process group waits that long for the other ranks at every
    collective (its start, barriers, gradient syncs) before it fails."""
    name = strategy
    if getattr(model, "leaves_parameters_unused", False) and strategy in DDP_STRATEGIES:
        log.info("trainer.strategy=%s: using %s_find_unused_parameters_true (%s can leave "
                 "parameters unused in a step)", strategy, strategy, type(model).__name__)
        name = f"{strategy}_find_unused_parameters_true"
    if timeout_min is None or strategy not in DDP_STRATEGIES:
        return name
    entry = StrategyRegistry[name]
    return entry["strategy"](**entry["init_params"], timeout=timedelta(minutes=timeout_min))


def build_trainer(trainer_cfg: DictConfig, model: L.LightningModule,
                  callbacks: Sequence[Callback] = (), loggers: Sequence[Any] = ()) -> L.Trainer:
    """The Trainer of a `trainer` config: a DDP strategy waits `ddp_timeout_min` minutes for
    the other ranks (ctseg's key, not a Trainer argument), checkpoints are written atomically
    unless plugins are configured."""
    settings = OmegaConf.to_container(trainer_cfg, resolve=True)
    timeout = settings.pop(DDP_TIMEOUT_KEY, None)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ConfigError(f"trainer.{DDP_TIMEOUT_KEY}={timeout}: give the minutes a DDP rank "
                          "waits for the others, a number > 0 (e.g. 240 for hours-long caching)")
    strategy = settings.get("strategy")
    if strategy is not None:
        settings["strategy"] = ddp_strategy(strategy, model, timeout)
    if not settings.get("plugins"):
        settings["plugins"] = [AtomicCheckpointIO()]
    return instantiate(settings, callbacks=list(callbacks), logger=list(loggers) or False)


@contextmanager
def interruptible(trainer: L.Trainer, run_dir: Path, checkpoint_dir: Path) -> Iterator[None]:
    """Raise Interrupted when Lightning ends a fit or test stopped by SIGTERM or Ctrl-C: it
    finishes the batch, lets the checkpoint callbacks save (last.ckpt) and ends the stage with a
    SystemExit (its SIGTERMException, or sys.exit(1) after a KeyboardInterrupt), which would
    otherwise end train.py silently (with status 0 after SIGTERM)."""
    try:
        yield
    except SystemExit as stop:
        if not trainer.interrupted:
            raise
        signum = signal.SIGTERM if trainer.received_sigterm else signal.SIGINT
        last = checkpoint_dir / "last.ckpt"
        resume_from = (run_dir if last == run_dir / "checkpoints" / "last.ckpt" else last) \
            if last.is_file() else None
        raise Interrupted(signum, trainer.current_epoch, trainer.global_step, resume_from,
                          trainer.is_global_zero) from stop


def train(cfg: DictConfig, extra_callbacks: Sequence[Callback] = ()
          ) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit the model on the datamodule, test the best checkpoint; return metrics and objects.
    `extra_callbacks` join the configured ones (e.g. a hyper-parameter search's pruning). A run
    stopped by SIGTERM or Ctrl-C raises Interrupted once its progress is saved."""
    log_through_root()
    windows = (cfg.get("sw") or {}).get("batch_size")
    if windows is not None and (isinstance(windows, bool) or not isinstance(windows, int)
                                or windows < 1):
        raise ConfigError(f"sw.batch_size={windows}: validation and test in train.py take a "
                          "number of windows per pass (auto is predict.py's, on CUDA); set "
                          "sw.batch_size=1 or more")
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule: L.LightningDataModule = instantiate(cfg.data)
    model: L.LightningModule = instantiate(cfg.model)
    callbacks = [*instantiate_group(cfg.get("callbacks")), *extra_callbacks]
    loggers = instantiate_group(cfg.get("logger"))
    trainer = build_trainer(cfg.trainer, model, callbacks, loggers)
    checkpoint_dir = Path(getattr(trainer.checkpoint_callback, "dirpath", None) or output_dir)
    plan = preflight(cfg, datamodule, model, trainer, checkpoint_dir)
    config_path = checkpoint_dir / "config.yaml"
    if trainer.is_global_zero:
        save_config(cfg, checkpoint_dir)
        if getattr(datamodule, "folds", None):  # cross-validation: the folds, nnU-Net's format
            write_splits(checkpoint_dir / SPLITS_FILE, datamodule.folds)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    objects = {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer}

    if cfg.get("train"):
        with interruptible(trainer, output_dir, checkpoint_dir):
            trainer.fit(model, datamodule=datamodule, ckpt_path=plan.ckpt_path,
                        weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    if plan.test:
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
        if not cfg.get("train") and plan.ckpt_path is not None:
            best = plan.ckpt_path  # train=false ckpt_path=...: test the checkpoint it names
            log.info("testing %s", best)
        elif best is None:
            log.warning("no best checkpoint was saved; testing the current weights")
        with interruptible(trainer, output_dir, checkpoint_dir):
            trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    if wandb_loggers and trainer.is_global_zero:
        if plan.test:
            log_dice_table(wandb_loggers[0], metrics)
        wandb.finish()  # each job of a multirun is a run of its own

    log.info("config: %s", config_path)
    log.info("checkpoints: %s", checkpoint_dir)
    for logger in trainer.loggers:
        log.info("%s logs: %s", type(logger).__name__, logger.log_dir or logger.save_dir)
    return metrics, objects
