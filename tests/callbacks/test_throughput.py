"""DataThroughput: patches per second and the data-wait fraction of real training epochs."""

from __future__ import annotations

import time

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from ctseg.callbacks.throughput import DataThroughput
from ctseg.models.segresnet import SegResNetModule


class Patches(Dataset):
    """Random 16^3 patches with labels, each taking `delay` seconds to produce."""

    def __init__(self, n: int, delay: float) -> None:
        """`n` patches, `delay` seconds each."""
        self.n, self.delay = n, delay

    def __len__(self) -> int:
        """Number of patches."""
        return self.n

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """One patch, after the delay."""
        time.sleep(self.delay)
        gen = torch.Generator().manual_seed(index)
        return {"image": torch.randn((1, 16, 16, 16), generator=gen),
                "label": torch.randint(3, (1, 16, 16, 16), generator=gen)}


def _epoch_metrics(delay: float) -> dict[str, float]:
    """The perf/* metrics of one epoch of 6 batches of 2 patches."""
    torch.manual_seed(0)
    module = SegResNetModule(num_classes=3, init_filters=8, roi_size=(16, 16, 16))
    callback = DataThroughput()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[callback])
    trainer.fit(module, DataLoader(Patches(12, delay), batch_size=2))
    assert (callback.steps, callback.patches) == (6, 12)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("perf/")}


def test_slow_data_shows_as_waiting():
    fast, slow = _epoch_metrics(0.0), _epoch_metrics(0.1)
    assert set(fast) == {"perf/patches_per_s", "perf/data_wait", "perf/step_s"}
    # 0.2 s of data per batch against a step of a few hundredths of a second.
    assert slow["perf/data_wait"] > 0.5 > fast["perf/data_wait"]
    assert slow["perf/patches_per_s"] < 2 / 0.2
    assert slow["perf/step_s"] == pytest.approx(fast["perf/step_s"], rel=1.0)
