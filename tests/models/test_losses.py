"""The marginal DiceCE loss for partially labelled data: MONAI's DiceCELoss when every class is
annotated; otherwise the loss written out by hand from its definition (Shi et al. 2021), blind to
how probability is split between background and a class the sample does not annotate."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss

from ctseg.errors import ConfigError
from ctseg.models.losses import MarginalDiceCELoss
from ctseg.models.segresnet import SegResNetModule

CLASSES = 5


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (2, 5, 6, 6, 6) logits and labels of classes 0-2 (3 and 4 never labelled)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, CLASSES, 6, 6, 6, generator=generator) * 2
    label = torch.randint(0, 3, (2, 1, 6, 6, 6), generator=generator)
    return logits, label


def test_with_every_class_annotated_it_is_monais_dice_ce() -> None:
    logits, label = batch(0)
    full = torch.ones(2, CLASSES, dtype=torch.bool)
    expected = DiceCELoss(to_onehot_y=True, softmax=True)(logits, label)
    assert torch.allclose(MarginalDiceCELoss()(logits, label, full), expected, atol=1e-6)
    assert torch.allclose(MarginalDiceCELoss()(logits, label), expected, atol=1e-6)


def test_not_annotated_classes_are_merged_into_background() -> None:
    logits, label = batch(1)
    annotated = torch.tensor([[True, True, True, False, False],
                              [True, True, False, True, False]])
    label[1][label[1] == 2] = 0  # sample 1 does not annotate class 2: its voxels are background
    loss = MarginalDiceCELoss()(logits, label, annotated)
    # by hand: per sample, background's probability plus the not-annotated ones'
    p = torch.softmax(logits, dim=1)
    ce, dice = [], []
    for i in range(2):
        keep = annotated[i].nonzero()[:, 0].tolist()
        merged = p[i, keep].clone()
        merged[0] = p[i, 0] + p[i, [c for c in range(CLASSES) if c not in keep]].sum(0)
        target = torch.stack([label[i, 0] == c for c in keep]).float()
        ce.append(-torch.log((merged * target).sum(0)).flatten())
        inter = (merged * target).flatten(1).sum(1)
        dice.append(1 - (2 * inter + 1e-5) / (merged.flatten(1).sum(1)
                                              + target.flatten(1).sum(1) + 1e-5))
    expected = torch.cat(dice).mean() + torch.cat(ce).mean()
    assert torch.allclose(loss, expected, atol=1e-5)


def test_a_class_not_annotated_may_take_backgrounds_probability_at_no_cost() -> None:
    logits, label = batch(2)
    annotated = torch.tensor([[True, True, True, False, True]] * 2)
    swapped = logits.clone()
    swapped[:, [0, 3]] = logits[:, [3, 0]]  # class 3 takes background's share, and back
    loss = MarginalDiceCELoss()
    assert torch.allclose(loss(logits, label, annotated), loss(swapped, label, annotated),
                          atol=1e-6)
    plain = DiceCELoss(to_onehot_y=True, softmax=True)  # plain DiceCE punishes it
    assert not torch.allclose(plain(logits, label), plain(swapped, label), atol=1e-3)


def test_the_module_uses_the_flags_of_the_batch_with_the_marginal_loss_only() -> None:
    torch.manual_seed(0)
    module = SegResNetModule(num_classes=CLASSES, init_filters=8, loss="marginal")
    image = torch.randn(2, 1, 16, 16, 16)
    label = torch.randint(0, 3, (2, 1, 16, 16, 16))
    partial = torch.tensor([[True, True, True, False, False]] * 2)
    module.eval()
    with torch.no_grad():
        logits = module(image)
        assert torch.allclose(module.training_loss(image, label, partial),
                              MarginalDiceCELoss()(logits, label, partial))
        plain = SegResNetModule(num_classes=CLASSES, init_filters=8).eval()
        plain.load_state_dict(module.state_dict())
        assert torch.allclose(plain.training_loss(image, label, partial),
                              DiceCELoss(to_onehot_y=True, softmax=True)(logits, label))
    with pytest.raises(ConfigError, match=r"model\.loss=focal"):
        SegResNetModule(num_classes=CLASSES, init_filters=8, loss="focal")
