"""SegmentationModule: per-class Dice, optimiser specs, LR schedules, logging and plain hparams."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from monai.inferers import SlidingWindowInferer
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from ctseg.models import schedules
from ctseg.models.base import DEFAULT_OPTIMIZER, PerClassDice, optimizer_factory
from ctseg.models.segresnet import SegResNetModule

PATCH = (16, 16, 16)


COSINE = {"_target_": "ctseg.models.schedules.cosine", "_partial_": True}


def warmup_cosine(**kwargs: Any) -> dict[str, Any]:
    """The warmup_cosine scheduler config with `kwargs`."""
    return {"_target_": "ctseg.models.schedules.warmup_cosine", "_partial_": True, **kwargs}


def tiny_module(**kwargs: Any) -> SegResNetModule:
    """A 3-class SegResNet small enough to train a few steps in a second."""
    torch.manual_seed(0)
    kwargs = {"num_classes": 3, "init_filters": 8, "roi_size": PATCH, "sw_batch_size": 2,
              "dropout_prob": None, **kwargs}
    return SegResNetModule(**kwargs)


def batches(n: int, classes: tuple[int, ...] = (0, 1, 2), shape: tuple[int, ...] = PATCH,
            seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`n` random (image, label) volumes whose labels use only `classes`."""
    gen = torch.Generator().manual_seed(seed)
    choice = torch.tensor(classes)
    return [{"image": torch.randn((1, *shape), generator=gen),
             "label": choice[torch.randint(len(classes), (1, *shape), generator=gen)]}
            for _ in range(n)]


def trainer(**kwargs: Any) -> L.Trainer:
    """A quiet CPU trainer without loggers or checkpoints."""
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


class LrRecorder(L.Callback):
    """Records the first parameter group's learning rate before every training step."""

    def __init__(self) -> None:
        """Start with no recorded rates."""
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        """Record the rate the coming optimiser step uses."""
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


# --- PerClassDice ------------------------------------------------------------------------------

def test_per_class_dice_exact_values_over_two_updates():
    dice = PerClassDice(4)
    target = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0]).reshape(2, 2, 2)
    preds = torch.tensor([0, 1, 1, 1, 0, 2, 0, 0]).reshape(2, 2, 2)
    dice.update(preds, target)
    first = dice.compute()
    assert first[:3].tolist() == pytest.approx([4 / 7, 2 / 3, 2 / 3])
    assert math.isnan(first[3])
    # Class 3 is predicted but has no ground truth: still NaN, yet its false positive counts.
    dice.update(torch.tensor([[3, 0]]), torch.tensor([[0, 0]]))
    total = dice.compute()
    assert total[:3].tolist() == pytest.approx([6 / 10, 2 / 3, 2 / 3])
    assert math.isnan(total[3])
    assert dice.pred_count.tolist() == [5, 3, 1, 1]
    dice.reset()
    dice.update(torch.ones(3, dtype=torch.long), torch.ones(3, dtype=torch.long))
    assert dice.compute()[1] == 1.0 and torch.isnan(dice.compute()[[0, 2, 3]]).all()


def test_per_class_dice_all_wrong_is_zero():
    dice = PerClassDice(3)
    dice.update(torch.tensor([2, 2, 1]), torch.tensor([1, 1, 2]))
    assert dice.compute()[1:].tolist() == [0.0, 0.0]


@pytest.mark.parametrize(("preds", "target"), [([0, 3], [0, 1]), ([0, 1], [5, 1]),
                                               ([0, -1], [0, 1])])
def test_per_class_dice_rejects_labels_out_of_range(preds, target):
    with pytest.raises(ValueError, match=r"label value outside 0\.\.2.*num_classes"):
        PerClassDice(3).update(torch.tensor(preds), torch.tensor(target))


def test_per_class_dice_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"prediction shape \(2, 2\) differs from label shape"):
        PerClassDice(3).update(torch.zeros(2, 2), torch.zeros(4))


# --- optimiser ---------------------------------------------------------------------------------

def test_optimizer_default_is_the_bundle_adamw():
    opt = optimizer_factory(None)([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["lr"] == DEFAULT_OPTIMIZER["lr"] == 1e-4
    assert opt.defaults["weight_decay"] == 1e-5


@pytest.mark.parametrize("spec", [
    functools.partial(torch.optim.SGD, lr=0.5, momentum=0.9),
    {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.5, "momentum": 0.9},
    OmegaConf.create({"_target_": "torch.optim.SGD", "lr": 0.5, "momentum": 0.9}),
])
def test_optimizer_from_partial_or_mapping(spec):
    module = tiny_module(optimizer=spec)
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD)
    assert (opt.defaults["lr"], opt.defaults["momentum"]) == (0.5, 0.9)
    assert module.hparams.optimizer == {"_target_": "torch.optim.sgd.SGD", "_partial_": True,
                                        "lr": 0.5, "momentum": 0.9}


@pytest.mark.parametrize(("spec", "message"), [
    ({"lr": 0.1}, "needs a _target_"),
    (3, "optimizer must be a partial"),
])
def test_bad_optimizer_spec(spec, message):
    with pytest.raises(ValueError, match=message):
        optimizer_factory(spec)


def test_optimizer_partial_with_positional_args_is_refused():
    with pytest.raises(ValueError, match="keyword arguments only"):
        tiny_module(optimizer=functools.partial(torch.optim.SGD, [], 0.1))


# --- constructor checks ------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_classes": 1}, "num_classes must be >= 2"),
    ({"label_names": ["background", "liver"]}, "label_names has 2 names but num_classes is 3"),
    ({"scheduler": "cosine"}, "scheduler must be a partial"),
    ({"scheduler": {"warmup_epochs": 3}}, "scheduler config needs a _target_"),
])
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_module(**kwargs)


# --- schedules ---------------------------------------------------------------------------------

def test_cosine_schedule_spans_the_run():
    recorder = LrRecorder()
    module = tiny_module(scheduler=COSINE, optimizer={"_target_": "torch.optim.SGD", "lr": 0.1})
    trainer(max_epochs=2, callbacks=[recorder], limit_val_batches=0).fit(
        module, DataLoader(batches(3), batch_size=1))
    assert recorder.lrs == pytest.approx([0.05 * (1 + math.cos(math.pi * k / 6))
                                          for k in range(6)])


def test_warmup_cosine_schedule_warms_up_then_decays():
    recorder = LrRecorder()
    module = tiny_module(scheduler=warmup_cosine(warmup_epochs=1),
                         optimizer={"_target_": "torch.optim.SGD", "lr": 0.1})
    trainer(max_epochs=3, callbacks=[recorder], limit_val_batches=0).fit(
        module, DataLoader(batches(2), batch_size=1))
    # 6 steps, the first 2 (one epoch) warm up linearly from 0, the last 4 follow a half cosine.
    expected = [0.0, 0.05] + [0.05 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert recorder.lrs == pytest.approx(expected)


def test_warmup_starts_at_the_multiplier_of_the_learning_rate():
    recorder = LrRecorder()
    module = tiny_module(scheduler=warmup_cosine(warmup_epochs=1, warmup_multiplier=0.1),
                         optimizer={"_target_": "torch.optim.SGD", "lr": 0.1})
    trainer(max_epochs=3, callbacks=[recorder], limit_val_batches=0).fit(
        module, DataLoader(batches(2), batch_size=1))
    # MONAI's WarmupCosineSchedule: lr x (m + (1 - m) x step / warmup) during the warm-up.
    assert recorder.lrs[:2] == pytest.approx([0.01, 0.055])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"warmup_epochs": 2}, r"warmup_epochs=2 must be below trainer\.max_epochs=2"),
    ({"warmup_epochs": -1}, "warmup_epochs must be >= 0"),
    ({"warmup_multiplier": 1.5}, r"warmup_multiplier must be in \[0, 1\)"),
])
def test_bad_warmup_is_refused_when_fitting_starts(kwargs, message):
    module = tiny_module(scheduler=warmup_cosine(**kwargs))
    with pytest.raises(ValueError, match=message):
        trainer(max_epochs=2, limit_val_batches=0).fit(module, DataLoader(batches(1)))


def test_schedule_needs_a_finite_run():
    module = tiny_module(scheduler=COSINE)
    with pytest.raises(ValueError, match="needs a finite run"):
        trainer(max_epochs=-1, limit_val_batches=0).fit(module, DataLoader(batches(1)))


# --- validation logging ------------------------------------------------------------------------

def test_validation_dice_equals_monai_full_volume_counts():
    names = ["background", "liver", "kidney"]
    module = tiny_module(label_names=names)
    # Larger than the window along every axis, so windows overlap and are blended.
    data = batches(2, classes=(0, 2), shape=(40, 36, 20))
    metrics = trainer().validate(module, DataLoader(data, batch_size=1), verbose=False)[0]
    assert set(metrics) == {"val/dice/kidney", "val/mean_dice"}
    # The reference: MONAI's full-volume sliding window (all logit channels), argmax, counts.
    inferer = SlidingWindowInferer(roi_size=PATCH, sw_batch_size=2, overlap=0.25,
                                   mode="gaussian")
    reference = PerClassDice(3)
    module.eval()
    with torch.no_grad():
        for item in data:
            reference.update(inferer(item["image"][None], module.net).argmax(1)[0],
                             item["label"][0])
    expected = float(reference.compute()[2])
    assert 0 < expected < 1
    assert metrics["val/dice/kidney"] == pytest.approx(expected, abs=1e-6)
    assert metrics["val/mean_dice"] == pytest.approx(expected, abs=1e-6)


def test_evaluation_needs_one_volume_per_batch():
    module = tiny_module()
    with pytest.raises(ValueError, match="one whole volume each, got 2"):
        trainer().validate(module, DataLoader(batches(2), batch_size=2), verbose=False)


def test_validation_without_foreground_warns_and_logs_nan():
    module = tiny_module()
    with pytest.warns(UserWarning, match="no foreground class in the val ground truth"):
        metrics = trainer().validate(module, DataLoader(batches(1, classes=(0,))), verbose=False)[0]
    assert math.isnan(metrics["val/mean_dice"])


# --- hyper-parameters --------------------------------------------------------------------------

def _is_plain(value: Any) -> bool:
    """Whether `value` is made of builtins only."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


def test_hparams_are_plain_and_checkpoint_loads_weights_only(tmp_path: Path):
    module = tiny_module(
        label_names=OmegaConf.create(["background", "liver", "kidney"]),
        roi_size=OmegaConf.create(list(PATCH)),
        optimizer=functools.partial(torch.optim.SGD, lr=0.5, momentum=0.9),
        scheduler=functools.partial(schedules.cosine),
    )
    assert _is_plain(dict(module.hparams))
    ckpt = tmp_path / "tiny.ckpt"
    fit = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    fit.fit(module, DataLoader(batches(1), batch_size=1))
    fit.save_checkpoint(ckpt)
    raw = torch.load(ckpt, weights_only=True)
    assert raw["hyper_parameters"]["label_names"] == ["background", "liver", "kidney"]
    assert raw["ctseg_module_class"] == "ctseg.models.segresnet.SegResNetModule"
    loaded = SegResNetModule.load_from_checkpoint(ckpt, weights_only=True)
    assert loaded.label_names == ["background", "liver", "kidney"]
    assert loaded.hparams.scheduler == COSINE
    opt = loaded._optimizer(loaded.parameters())
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["lr"] == 0.5
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
