"""Hydra glue: config folder, OmegaConf resolvers and instantiation of callback/logger groups."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ctseg.labels import label_names, num_classes

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "conf"


def register_resolvers() -> None:
    """Register `${ctseg.num_classes:v1}` and `${ctseg.label_names:v1}` with OmegaConf."""
    OmegaConf.register_new_resolver("ctseg.num_classes", num_classes, replace=True)
    OmegaConf.register_new_resolver("ctseg.label_names", label_names, replace=True)


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
    experiment: Any = None
    debug: Any = None


def register_schemas() -> None:
    """Store the schemas in Hydra's ConfigStore so configs can list them in their defaults."""
    ConfigStore.instance().store(name="train_schema", node=TrainSchema)


register_schemas()


register_resolvers()
