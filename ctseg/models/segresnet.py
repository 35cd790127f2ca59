"""SegResNetModule: MONAI SegResNet with the wholeBody_ct_segmentation bundle's architecture."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from monai.networks.nets import SegResNet

from ctseg.models.base import OptimizerFactory, SchedulerFactory, SegmentationModule
from ctseg.models.losses import make_loss
from ctseg.models.weights import (
    SEGRESNET_HEAD,
    checkpoint_label_names,
    load_into,
    network_state_dict,
    read_checkpoint,
)
from ctseg.sliding_window import BATCH_SIZE, MODE, OVERLAP

log = logging.getLogger(__name__)


class SegResNetModule(SegmentationModule):
    """SegResNet (defaults: the bundle's 3D, 1 channel, 32 filters, blocks (1,2,2,4)/(1,1,1),
    dropout 0.2, GroupNorm of 8 groups) at `self.net`, whose state dict has the keys of the
    bundle's `model.pt`. `norm` takes MONAI's forms, e.g. ("INSTANCE", {"affine": True}), which
    trains faster than 8 groups of 1-2 channels in slim CPU models.

    `pretrained` is a bundle `model.pt` / `model_lowres.pt` or a ctseg `.ckpt` loaded at
    construction; `reinit_head=True` keeps the output layer freshly initialised (fine-tuning to
    another class count, e.g. 105-class v1 weights into a 118-class v2 model). Checkpoints written
    by Lightning store `pretrained=None`: their own state dict already holds the weights.
    """

    def __init__(
        self,
        num_classes: int = 105,
        label_names: Sequence[str] | None = None,
        in_channels: int = 1,
        init_filters: int = 32,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        blocks_up: Sequence[int] = (1, 1, 1),
        dropout_prob: float | None = 0.2,
        norm: str | Sequence[Any] = ("GROUP", {"num_groups": 8}),
        spatial_dims: int = 3,
        pretrained: str | os.PathLike[str] | None = None,
        reinit_head: bool = False,
        optimizer: OptimizerFactory | Mapping[str, Any] | None = None,
        scheduler: SchedulerFactory | Mapping[str, Any] | None = None,
        roi_size: Sequence[int] = (96, 96, 96),
        sw_batch_size: int = BATCH_SIZE,
        sw_overlap: float = OVERLAP,
        sw_mode: str = MODE,
        loss: str = "dice_ce",
    ) -> None:
        """Store the architecture and training settings (`loss`: one of
        ctseg.models.losses.LOSSES); see SegmentationModule for the rest."""
        super().__init__(
            num_classes=num_classes, label_names=label_names, optimizer=optimizer,
            scheduler=scheduler, roi_size=roi_size,
            sw_batch_size=sw_batch_size, sw_overlap=sw_overlap, sw_mode=sw_mode,
        )

    def configure_losses(self) -> None:
        """`loss`: MONAI's DiceCE (the bundle's) or the marginal DiceCE for partial labels."""
        self.loss = make_loss(self.hparams.loss)

    def configure_models(self) -> None:
        """Build the SegResNet and load `pretrained` weights into it when given."""
        hp = self.hparams
        self.net = SegResNet(
            spatial_dims=hp.spatial_dims, in_channels=hp.in_channels, out_channels=hp.num_classes,
            init_filters=hp.init_filters, blocks_down=tuple(hp.blocks_down),
            blocks_up=tuple(hp.blocks_up), dropout_prob=hp.dropout_prob,
            norm=hp.norm if isinstance(hp.norm, str) else tuple(hp.norm),
        )
        if hp.pretrained:
            weights = read_checkpoint(hp.pretrained, "pretrained weights file")
            load_into(self.net, network_state_dict(weights, hp.pretrained),
                      reinit_head=hp.reinit_head, source=hp.pretrained, head_prefix=SEGRESNET_HEAD,
                      label_names=(checkpoint_label_names(weights), self.label_names))
            log.info("loaded pretrained SegResNet weights from %s", hp.pretrained)
