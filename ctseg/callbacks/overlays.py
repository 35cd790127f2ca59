"""Overlays of the first validation volumes, prediction above ground truth, logged to every logger:
TensorBoard and W&B images, PNG files beside other loggers' files (CSV)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from matplotlib.figure import Figure

from ctseg.data.transforms import IMAGE, LABEL
from ctseg.errors import ConfigError
from ctseg.figures import save_png
from ctseg.visualize.overlay import (
    CUT_AXIS,
    MAX_LEGEND,
    PLANES,
    IntensityWindow,
    Slices,
    figure_rgb,
    render_planes,
    slice_indices,
    volume_planes,
    window_bounds,
)

log = logging.getLogger(__name__)

OVERLAY_DIR = "overlays"
TAG = "val_overlay"


def voxel_spacing(image: Any) -> tuple[float, float, float]:
    """Voxel sizes (mm) of the first volume of a batch from its MetaTensor affine; 1 mm for plain
    tensors."""
    affine = getattr(image, "affine", None)
    if affine is None:
        return 1.0, 1.0, 1.0
    matrix = torch.as_tensor(affine).double()
    matrix = matrix[0] if matrix.ndim == 3 else matrix
    sizes = torch.linalg.vector_norm(matrix[:3, :3], dim=0).tolist()
    return sizes[0], sizes[1], sizes[2]


def batch_case_name(batch: Mapping[str, Any], batch_idx: int) -> str:
    """The subject id of a validation batch (its "subject" entry) as a file-name-safe word, else
    `case<batch_idx>`."""
    subject = batch.get("subject")
    if isinstance(subject, list | tuple):
        subject = subject[0] if subject else None
    name = re.sub(r"[^\w.-]+", "_", str(subject)) if subject is not None else ""
    return name or f"case{batch_idx}"


def _volume(tensor: Any) -> torch.Tensor:
    """The (D, H, W) volume of a tensor whose last three dimensions are one volume, as a plain
    tensor on its device."""
    volume = torch.as_tensor(tensor).detach().as_subclass(torch.Tensor)
    return volume.reshape(volume.shape[-3:])


def _planes(tensor: Any, slices: Slices) -> list[np.ndarray]:
    """The axial, coronal and sagittal planes (`volume_planes`) of a volume tensor, copying only
    them to the CPU (floating point as float32: numpy has no bfloat16)."""
    volume = _volume(tensor)
    planes = [volume.select(CUT_AXIS[p], slices[CUT_AXIS[p]]).cpu() for p in PLANES]
    return [(p.float() if p.is_floating_point() else p).numpy() for p in planes]


class ValidationOverlays(Callback):
    """After every `every_n_validations`-th validation (sanity checks skipped), overlays of its
    first `max_cases` volumes on rank 0: the predicted labels (the "pred" of `validation_step`'s
    output) above the ground truth, cut through the centre of the ground truth's structures.

    TensorBoardLogger: `add_image("val_overlay/<case>")`; WandbLogger: `log_image`; any other
    logger with a folder (CSVLogger) or no logger: `<log dir>/overlays/epoch_XXX_<case>.png`.
    """

    def __init__(self, max_cases: int = 2, every_n_validations: int = 1,
                 window: IntensityWindow = "auto", alpha: float = 0.5,
                 max_legend: int = MAX_LEGEND) -> None:
        """Remember how many volumes to show, how often, and the overlay's window, opacity and
        legend length ("auto" window: the training pipeline's images are not in HU)."""
        if max_cases < 0 or every_n_validations < 1:
            raise ConfigError(f"callbacks.overlays: max_cases must be >= 0 and "
                              f"every_n_validations >= 1, got {max_cases} and "
                              f"{every_n_validations}")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"callbacks.overlays.alpha={alpha}: give an opacity in 0..1")
        window_bounds(window)
        self.max_cases, self.every_n_validations = max_cases, every_n_validations
        self.window, self.alpha, self.max_legend = window, alpha, max_legend
        self.validations = 0

    def _active(self, trainer: L.Trainer) -> bool:
        """Whether this validation of rank 0 is one to draw."""
        return (trainer.is_global_zero and not trainer.sanity_checking
                and (self.validations - 1) % self.every_n_validations == 0)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule
                                  ) -> None:
        """Count validations (sanity checks excluded)."""
        if not trainer.sanity_checking:
            self.validations += 1

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        """Draw and log the overlay of one of the first `max_cases` volumes."""
        if batch_idx >= self.max_cases or dataloader_idx or not self._active(trainer):
            return
        start = time.perf_counter()
        truth = _volume(batch[LABEL]).cpu().numpy()
        slices = slice_indices(truth)
        rows = {}
        if isinstance(outputs, Mapping) and outputs.get("pred") is not None:
            rows["prediction"] = _planes(outputs["pred"], slices)
        rows["ground truth"] = volume_planes(truth, slices)
        case = batch_case_name(batch, batch_idx)
        figure = render_planes(
            _planes(batch[IMAGE], slices), rows, voxel_spacing(batch[IMAGE]),
            getattr(pl_module, "label_names", {}), slices, window=self.window, alpha=self.alpha,
            max_legend=self.max_legend,
            title=f"{case}, epoch {trainer.current_epoch}, step {trainer.global_step}")
        self.log_figure(trainer, figure, case)
        log.debug("validation overlay of %s: %.2f s", case, time.perf_counter() - start)

    def log_figure(self, trainer: L.Trainer, figure: Figure, case: str) -> None:
        """Send the figure to each logger of `trainer`: images to TensorBoard and W&B, PNG files
        into the folder of any other logger (or the run folder without loggers)."""
        loggers: Sequence[Logger] = trainer.loggers
        step, epoch = trainer.global_step, trainer.current_epoch
        images = any(isinstance(lg, TensorBoardLogger | WandbLogger) for lg in loggers)
        rgb = figure_rgb(figure) if images else None
        folders = [] if loggers else [Path(trainer.default_root_dir)]
        for logger in loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(f"{TAG}/{case}", rgb, step, dataformats="HWC")
            elif isinstance(logger, WandbLogger):
                logger.log_image(key=f"{TAG}/{case}", images=[rgb], step=step)
            elif logger.log_dir is not None:
                folders.append(Path(logger.log_dir))
        for folder in folders:
            save_png(figure, folder / OVERLAY_DIR / f"epoch_{epoch:03d}_{case}.png")
