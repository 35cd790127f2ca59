"""Shared LightningModule for ctseg segmentation networks: loss, optimiser, sliding-window Dice.

Validation and test evaluate whole volumes with the memory-bounded slab aggregation of
`ctseg.sliding_window` (the one predict.py uses): label maps, then per-class voxel counts,
never the full classes x voxels logit volume, so evaluating a whole-body CT costs what
predicting it costs. No validation loss is computed (it would need that volume); model
selection and early stopping use the Dice.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from hydra.utils import get_method
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from monai.losses import DiceCELoss
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import Metric

from ctseg.config import plain
from ctseg.data.transforms import ANNOTATED, DATASET, PipelineConfig
from ctseg.models.loaded_model import LoadedModel
from ctseg.models.losses import MarginalDiceCELoss
from ctseg.sliding_window import BATCH_SIZE, MODE, OVERLAP, sliding_window_predict

log = logging.getLogger(__name__)

STAGES = ("train", "val", "test")
# Checkpoint key holding the module's class path (`SegmentationModule.on_save_checkpoint`).
MODULE_CLASS = "ctseg_module_class"
OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], Optimizer]
# Called with the optimiser, total_steps and max_epochs (ctseg.models.schedules).
SchedulerFactory = Callable[..., LRScheduler]
# The MONAI wholeBody_ct_segmentation bundle's optimiser (configs/train.json).
DEFAULT_OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True,
                     "lr": 1e-4, "weight_decay": 1e-5}


class PerClassDice(Metric):
    """Dice per class from voxel counts summed over every volume of an epoch and over DDP ranks.

    `update` takes label maps (any shape, integer class indices) and keeps three (C,) count vectors,
    so memory does not grow with the class count times the volume as one-hot metrics do. `compute`
    returns a (C,) tensor, NaN for classes absent from the ground truth.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        """Count intersections, predicted and true voxels for classes 0..num_classes-1."""
        super().__init__(**kwargs)
        self.num_classes = num_classes
        for name in ("intersection", "pred_count", "target_count"):
            self.add_state(name, default=torch.zeros(num_classes, dtype=torch.long),
                           dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add the voxel counts of predicted and true label maps of the same shape."""
        if preds.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(preds.shape)} differs from label shape "
                             f"{tuple(target.shape)}")
        preds, target = preds.reshape(-1).long(), target.reshape(-1).long()
        top = int(torch.maximum(preds.max(), target.max())) if preds.numel() else 0
        if top >= self.num_classes or min(int(preds.min()), int(target.min())) < 0:
            raise ValueError(f"label value outside 0..{self.num_classes - 1} (found {top}); does "
                             "the data's TotalSegmentator version match the model's num_classes?")
        c = self.num_classes
        self.intersection += torch.bincount(target[preds == target], minlength=c)
        self.pred_count += torch.bincount(preds, minlength=c)
        self.target_count += torch.bincount(target, minlength=c)

    def compute(self) -> Tensor:
        """Dice = 2|P∩T| / (|P|+|T|) per class; NaN where the class has no ground-truth voxel."""
        dice = 2 * self.intersection.double() / (self.pred_count + self.target_count).double()
        return torch.where(self.target_count > 0, dice, torch.nan).float()


def scored_classes(dice: Tensor) -> list[int]:
    """The foreground classes (index >= 1) of a per-class Dice that had ground truth (not NaN)."""
    return [c for c in range(1, len(dice)) if not torch.isnan(dice[c])]


def partial_from(spec: Callable[..., Any] | Mapping[str, Any], what: str) -> Callable[..., Any]:
    """A callable from a partial or a `{_target_: ..., _partial_: true, **kwargs}` mapping (as
    Hydra composes it and as checkpoints store it); `what` names the setting in errors."""
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, Mapping):
        kwargs = {k: v for k, v in spec.items() if k not in ("_target_", "_partial_")}
        if "_target_" not in spec:
            raise ValueError(f"{what} config needs a _target_ (got keys {sorted(spec)})")
        return functools.partial(get_method(spec["_target_"]), **kwargs)
    if not callable(spec):
        raise ValueError(f"{what} must be a partial (a _target_ with _partial_: true), "
                         f"got {spec!r}")
    return spec


def optimizer_factory(spec: OptimizerFactory | Mapping[str, Any] | None) -> OptimizerFactory:
    """A callable `params -> Optimizer` from a partial, a `{_target_: ..., **kwargs}` mapping or
    None (the bundle's AdamW, lr 1e-4, weight decay 1e-5)."""
    return partial_from(DEFAULT_OPTIMIZER if spec is None else spec, "optimizer")


class SegmentationModule(LightningModule):
    """Base of ctseg's segmentation modules: DiceCE loss, sliding-window validation/test with
    per-class Dice, optimiser and schedule. Subclasses implement `configure_models` (setting
    `self.net`).

    Batches are dicts with "image" (B, 1, D, H, W) float and "label" (B, 1, D, H, W) integer class
    indices (B = 1 for validation and test: whole volumes). Logged: `train/loss`,
    `{val,test}/dice/<structure>` for each class with ground truth in the epoch and
    `{val,test}/mean_dice` over those foreground classes.
    """

    monitor = "val/mean_dice"
    mode = "max"
    # Whether a training step can leave parameters without a gradient (DDP must look for them).
    leaves_parameters_unused = False

    def __init__(
        self,
        num_classes: int,
        label_names: Sequence[str] | None = None,
        optimizer: OptimizerFactory | Mapping[str, Any] | None = None,
        scheduler: SchedulerFactory | Mapping[str, Any] | None = None,
        roi_size: Sequence[int] = (96, 96, 96),
        sw_batch_size: int = BATCH_SIZE,
        sw_overlap: float = OVERLAP,
        sw_mode: str = MODE,
    ) -> None:
        """Validate and store hyper-parameters (for `load_from_checkpoint`), then build net, loss
        and metrics through the `configure_*` hooks."""
        super().__init__()
        if num_classes < 2:
            raise ValueError("num_classes must be >= 2 (background + structures), "
                             f"got {num_classes}")
        label_names = (["background"] + [f"class_{i}" for i in range(1, num_classes)]
                       if label_names is None else [str(n) for n in label_names])
        if len(label_names) != num_classes:
            raise ValueError(f"label_names has {len(label_names)} names but num_classes is "
                             f"{num_classes}; they must match (index 0 is background)")
        self.label_names = label_names
        self._optimizer = optimizer_factory(optimizer)
        self._scheduler = None if scheduler is None else partial_from(scheduler, "scheduler")
        self.save_hyperparameters()
        self.save_hyperparameters(plain({**self.hparams, "label_names": label_names,
                                          "optimizer": self._optimizer,
                                          "scheduler": self._scheduler}))
        self.configure_models()
        self.configure_losses()
        self.configure_metrics()

    def configure_models(self) -> None:
        """Build `self.net`, mapping (B, C_in, D, H, W) to logits (B, num_classes, D, H, W)."""
        raise NotImplementedError(f"{type(self).__name__} must implement configure_models")

    def configure_losses(self) -> None:
        """DiceCE on softmax logits against integer labels, as in the MONAI bundle."""
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def configure_metrics(self) -> None:
        """One per-class Dice metric, cloned for validation and test."""
        dice = PerClassDice(self.hparams.num_classes)
        self.val_dice = dice.clone()
        self.test_dice = dice.clone()
        self.dataset_names: list[str] = []

    def setup(self, stage: str) -> None:
        """With several datasets (the DataModule's `dataset_names`), a Dice metric per dataset
        and stage besides the overall one."""
        datamodule = getattr(self.trainer, "datamodule", None)
        names = list(getattr(datamodule, "dataset_names", None) or [])
        if names and names != self.dataset_names:
            self.dataset_names = names
            self.dataset_dice = torch.nn.ModuleDict({
                f"{stage}_{i}": PerClassDice(self.hparams.num_classes)
                for stage in ("val", "test") for i in range(len(names))})

    def forward(self, image: Tensor) -> Tensor:
        """Logits (B, num_classes, D, H, W) of a (B, C_in, D, H, W) patch."""
        return self.net(image)

    def _window_logits(self, windows: Tensor) -> Tensor:
        """Float32 logits of a batch of windows (autocast, if any, stays the trainer's)."""
        return self(windows).float()

    def predict_labels(self, image: Tensor) -> Tensor:
        """(D, H, W) labels of a whole (1, C_in, D, H, W) volume: Gaussian-weighted sliding windows
        blended slab by slab, reduced to labels plane by plane (`sliding_window_predict`)."""
        hp = self.hparams
        return sliding_window_predict(
            image, self._window_logits, tuple(hp.roi_size), hp.sw_overlap, mode=hp.sw_mode,
            sw_batch_size=hp.sw_batch_size,
        ).labels

    @staticmethod
    def _tensors(batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Image and label of a batch as plain tensors: MONAI's MetaTensors would track metadata
        in every op, and logged values must load with weights_only (ddp_spawn sends them so)."""
        return batch["image"].as_subclass(Tensor), batch["label"].as_subclass(Tensor)

    def training_loss(self, image: Tensor, label: Tensor, annotated: Tensor | None = None
                      ) -> Tensor:
        """DiceCE loss of a (B, C_in, D, H, W) patch batch and its (B, 1, D, H, W) labels;
        `annotated` (B, num_classes) bool flags the classes each sample annotates (partially
        labelled data; None: every class), which only a loss that takes it uses."""
        if annotated is not None and isinstance(self.loss, MarginalDiceCELoss):
            return self.loss(self(image), label, annotated)
        return self.loss(self(image), label)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        """The training loss of a patch batch, logged as `train/loss`."""
        image, label = self._tensors(batch)
        loss = self.training_loss(image, label, batch.get(ANNOTATED))
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True,
                 batch_size=image.shape[0])
        return loss

    def _evaluate(self, batch: Mapping[str, Tensor], stage: str) -> Tensor:
        """Add the per-class voxel counts of one whole volume (batch of one) to `stage`'s Dice;
        its (D, H, W) predicted labels."""
        image = self._tensors(batch)[0]
        if image.shape[0] != 1:
            raise ValueError(f"{stage} batches hold one whole volume each, got {image.shape[0]}; "
                             "use batch_size=1 for evaluation loaders")
        pred = self.predict_labels(image)
        scored, target = self.scored_pair(batch, pred)
        getattr(self, f"{stage}_dice").update(scored, target)
        dataset = batch.get(DATASET)
        if self.dataset_names and dataset and dataset[0] in self.dataset_names:
            index = self.dataset_names.index(dataset[0])
            self.dataset_dice[f"{stage}_{index}"].update(scored, target)
        return pred

    def scored_pair(self, batch: Mapping[str, Tensor], pred: Tensor) -> tuple[Tensor, Tensor]:
        """Predicted and true (D, H, W) labels of a whole-volume batch as the Dice counts them:
        a class the sample's dataset does not annotate is no error where predicted (counted as
        background), the truth as `scored_labels` gives it."""
        target = self.scored_labels(self._tensors(batch)[1][0, 0])
        annotated = batch.get(ANNOTATED)
        if annotated is None:
            return pred, target
        keep = annotated[0].to(pred.device, torch.bool)
        return torch.where(keep[pred.long()], pred, torch.zeros_like(pred)), target

    def scored_labels(self, label: Tensor) -> Tensor:
        """Ground-truth labels as the Dice counts them: as they are (a subclass may count some
        classes as background)."""
        return label

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Sliding-window Dice counts of one validation volume; its predicted labels as "pred"
        (for callbacks such as ValidationOverlays)."""
        return {"pred": self._evaluate(batch, "val")}

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Sliding-window Dice counts of one test volume; its predicted labels as "pred" (for
        callbacks such as ForgettingReport)."""
        return {"pred": self._evaluate(batch, "test")}

    def _log_dice(self, stage: str) -> None:
        """Log the epoch's per-class and mean foreground Dice of `stage`, then reset its counts."""
        metric = getattr(self, f"{stage}_dice")
        if not metric.update_called:
            return
        dice = metric.compute()
        metric.reset()
        present = scored_classes(dice)
        values = {f"{stage}/dice/{self.label_names[c]}": dice[c] for c in present}
        if present:
            mean = dice[present].mean()
        else:
            rank_zero_warn(f"no foreground class in the {stage} ground truth; "
                           f"{stage}/mean_dice is NaN this epoch")
            mean = torch.tensor(torch.nan)
        # Values come from counts already summed over ranks; syncing only keeps DDP logging quiet.
        self.log_dict({**values, f"{stage}/mean_dice": mean, **self._dataset_means(stage)},
                      sync_dist=True)

    def _dataset_means(self, stage: str) -> dict[str, Tensor]:
        """`<stage>/<dataset>/mean_dice` of each dataset with ground truth this epoch (every rank
        computes every dataset's metric: the counts are summed over ranks, so all log the same
        keys), its counts reset."""
        means = {}
        for index, name in enumerate(self.dataset_names):
            metric = self.dataset_dice[f"{stage}_{index}"]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*was called before the ``update``")
                dice = metric.compute()
            metric.reset()
            present = scored_classes(dice)
            if present:
                means[f"{stage}/{name}/mean_dice"] = dice[present].mean()
        return means

    def on_validation_epoch_end(self) -> None:
        """Log validation Dice."""
        self._log_dice("val")

    def on_test_epoch_end(self) -> None:
        """Log test Dice."""
        self._log_dice("test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the module's class path (loading rebuilds it with `load_from_checkpoint`) and
        drop `pretrained` from the saved hyper-parameters: the checkpoint holds the weights."""
        checkpoint[MODULE_CLASS] = f"{type(self).__module__}.{type(self).__qualname__}"
        hparams = checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY)
        if hparams is not None and "pretrained" in hparams:
            checkpoint[self.CHECKPOINT_HYPER_PARAMS_KEY] = {**hparams, "pretrained": None}

    def inference_model(self, pipeline: PipelineConfig) -> LoadedModel:
        """This module's network as prediction, export and native evaluation run it, with its
        classes, the preprocessing `pipeline` and its window size (the network is shared, not
        copied; callers set its mode)."""
        return LoadedModel(self.net, list(self.label_names), pipeline, self.roi)

    @property
    def roi(self) -> tuple[int, int, int]:
        """The sliding-window size (`roi_size`) as a tuple of ints."""
        return tuple(int(r) for r in self.hparams.roi_size)

    def configure_optimizers(self) -> Optimizer | dict[str, Any]:
        """The configured optimiser, with the `scheduler` partial (if any) over the trainer's
        whole run, stepped per optimiser step."""
        optimizer = self._optimizer(self.parameters())
        if self._scheduler is None:
            return optimizer
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            raise ValueError("model.scheduler needs a finite run: set trainer.max_epochs or "
                             "trainer.max_steps")
        scheduler = self._scheduler(optimizer, total_steps=int(total),
                                    max_epochs=self.trainer.max_epochs)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
