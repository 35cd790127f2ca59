"""The training run behind train.py: instantiate everything from a composed config, fit, test."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ctseg.atomic import write_atomic
from ctseg.config import instantiate_group

log = logging.getLogger(__name__)


def resolve_ckpt_path(ckpt_path: str | None) -> str | None:
    """Map `ckpt_path` to what Lightning takes: None, "last", a file, or a run's last.ckpt."""
    if ckpt_path is None or ckpt_path in ("last", "best", "hpc"):
        return ckpt_path
    path = Path(ckpt_path)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path}: no checkpoint at {path}; give a .ckpt file, a run folder "
            "holding checkpoints/last.ckpt, or ckpt_path=last with hydra.run.dir=<run folder>"
        )
    return str(path)


def save_config(cfg: DictConfig, folder: Path) -> Path:
    """Write the fully resolved config as `config.yaml` in `folder`, atomically."""
    path = folder / "config.yaml"
    text = OmegaConf.to_yaml(cfg, resolve=True)
    write_atomic(path, lambda tmp: tmp.write_text(text))
    return path


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit the model on the datamodule, test the best checkpoint; return metrics and objects."""
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule: L.LightningDataModule = instantiate(cfg.data)
    model: L.LightningModule = instantiate(cfg.model)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    checkpoint_dir = Path(getattr(trainer.checkpoint_callback, "dirpath", None) or output_dir)
    config_path = save_config(cfg, checkpoint_dir)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    objects = {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer}

    if cfg.get("train"):
        trainer.fit(model, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.get("ckpt_path")),
                    weights_only=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    if cfg.get("test"):
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
        if best is None:
            log.warning("no best checkpoint was saved; testing the current weights")
        trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    log.info("config: %s", config_path)
    log.info("checkpoints: %s", checkpoint_dir)
    for logger in trainer.loggers:
        log.info("%s logs: %s", type(logger).__name__, logger.log_dir or logger.save_dir)
    return metrics, objects
