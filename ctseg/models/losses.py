"""Training losses of the SegResNet module: MONAI's DiceCE for fully labelled data, and the
marginal DiceCE for partially labelled data (Shi et al., "Marginal loss and exclusion loss for
partially supervised multi-organ segmentation", MedIA 2021): the probabilities of the classes a
sample does not annotate are merged into background before Dice and cross-entropy, so a
structure that is present but not annotated is never taught as background."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss, DiceLoss
from torch import Tensor, nn

from ctseg.errors import ConfigError

LOSSES = ("dice_ce", "marginal")


class MarginalDiceCELoss(nn.Module):
    """DiceCE on marginal probabilities: per sample, background absorbs the softmax mass of the
    classes the sample does not annotate; Dice is averaged over the annotated classes only. With
    every class annotated it equals MONAI's `DiceCELoss(to_onehot_y=True, softmax=True)`."""

    def __init__(self) -> None:
        """MONAI's Dice (per sample and class) on the merged probabilities."""
        super().__init__()
        self.dice = DiceLoss(to_onehot_y=True, softmax=False, reduction="none")

    def forward(self, logits: Tensor, label: Tensor, annotated: Tensor | None = None) -> Tensor:
        """Loss of (B, C, ...) logits against (B, 1, ...) labels, where `annotated` (B, C) bool
        marks the classes each sample annotates (background always counts as annotated; None:
        every class)."""
        batch, classes = logits.shape[:2]
        if annotated is None:
            annotated = torch.ones(batch, classes, dtype=torch.bool, device=logits.device)
        if annotated.shape != (batch, classes):
            raise ValueError(f"annotated has shape {tuple(annotated.shape)}; expected "
                             f"({batch}, {classes}): one flag per sample and class")
        annotated = annotated.to(device=logits.device, dtype=torch.bool).clone()
        annotated[:, 0] = True
        mask = annotated.view(batch, classes, *[1] * (logits.dim() - 2))
        log_p = torch.log_softmax(logits.float(), dim=1)
        # background: log of its own probability plus those of the classes not annotated
        absorbed = log_p.masked_fill(mask, float("-inf"))
        absorbed[:, :1] = log_p[:, :1]
        merged = log_p.masked_fill(~mask, float("-inf"))
        merged[:, :1] = torch.logsumexp(absorbed, dim=1, keepdim=True)
        target = label[:, 0].long()
        cross_entropy = nn.functional.nll_loss(merged, target)
        dice = self.dice(merged.exp(), label).reshape(batch, classes)
        return dice[annotated].mean() + cross_entropy


def make_loss(name: str) -> nn.Module:
    """The training loss `name` (one of LOSSES)."""
    if name == "dice_ce":
        return DiceCELoss(to_onehot_y=True, softmax=True)
    if name == "marginal":
        return MarginalDiceCELoss()
    raise ConfigError(f"model.loss={name}: choose {' or '.join(LOSSES)} (marginal: for partially "
                      "labelled data)")
