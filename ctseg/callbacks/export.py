"""Export the best checkpoint at the end of fit (TorchScript, ONNX, TensorRT), each file checked
for parity on a validation window; figures logged and written beside the files."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from ctseg.atomic import scratch_folder
from ctseg.data.transforms import IMAGE
from ctseg.export.exporter import centre_window, export_model, sample_window
from ctseg.export.formats import DEFAULT_FORMATS, DEFAULT_MAX_BATCH, DEFAULT_OPSET, check_formats
from ctseg.models.loaded_model import LoadedModel
from ctseg.models.loading import load_model

log = logging.getLogger(__name__)


class ExportBest(Callback):
    """At the end of fit, export the best checkpoint (the current weights when none was saved) to
    `formats` in `output_dir`; parity on the centre window of the first validation volume."""

    def __init__(self, formats: Sequence[str] = DEFAULT_FORMATS, output_dir: str | Path = "export",
                 opset: int = DEFAULT_OPSET, max_batch: int = DEFAULT_MAX_BATCH,
                 parity: Mapping[str, Any] | None = None) -> None:
        """Remember the formats, folder, ONNX opset, TensorRT batch and parity thresholds."""
        self.formats = check_formats(list(formats))
        self.output_dir = Path(output_dir)
        self.opset, self.max_batch = opset, max_batch
        self.parity = dict(parity or {})
        self.manifest: dict[str, Any] = {}

    @staticmethod
    def _window(trainer: L.Trainer, model: LoadedModel) -> Any:
        """Centre window of the first validation volume, or of a phantom without validation."""
        datamodule = trainer.datamodule
        loaders = datamodule.val_dataloader() if datamodule is not None else []
        loader = loaders[0] if isinstance(loaders, list | tuple) and loaders else loaders
        if not loader:
            return sample_window(model)
        image = next(iter(loader))[IMAGE][:1]
        image = image.as_tensor() if hasattr(image, "as_tensor") else image
        return centre_window(image.float(), model.roi_size)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Export on rank 0 (every rank saves the fallback checkpoint together)."""
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or ""
        with scratch_folder("export_current") as tmp:
            if not best or not Path(best).is_file():
                best = str(tmp / "current.ckpt")
                trainer.save_checkpoint(best)
                log.warning("no best checkpoint was saved; exporting the current weights")
            if not trainer.is_global_zero:
                return
            model = load_model(best, {}, {})
            self.manifest = export_model(
                model, self.formats, self.output_dir, self._window(trainer, model).cpu(),
                source=best, opset=self.opset, thresholds=self.parity, max_batch=self.max_batch)
        metrics = {f"export/{fmt}/{key}": float(entry["parity"][key])
                   for fmt, entry in self.manifest["formats"].items()
                   for key in ("max_abs_diff", "argmax_agreement")}
        metrics["epoch"] = trainer.current_epoch
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
