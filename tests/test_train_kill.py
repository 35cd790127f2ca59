"""train.py killed (SIGKILL) at a random moment after its first checkpoint (checkpoints are saved
at every epoch end and validation, so a kill can land inside a save) is finished by the same
command with ckpt_path=<run folder>: the steps of an uninterrupted run, a readable last.ckpt
and no temporary file left."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO

from ctseg.atomic import TEMP_MARK

pytestmark = pytest.mark.slow
EPOCHS = 8
# Tiny phantoms, 3 steps per epoch, a checkpoint at the end of every epoch (last.ckpt) and after
# every validation (the best): saves take a good share of the run's time.
TINY = (
    "experiment=phantom_quick", "model.init_filters=8", "data.n_phantoms=8",
    "data.phantom_shape=[24,24,16]", "data.patch_size=[16,16,16]", "data.batch_size=2",
    "data.samples_per_volume=1", "data.extra_roots=[]", "model.sw_batch_size=2",
    "trainer.check_val_every_n_epoch=1", "callbacks.progress_bar=null",
    "callbacks.model_summary=null", "test=false", "logger=csv", f"trainer.max_epochs={EPOCHS}",
)


def command(run: Path, tmp: Path, *extra: str) -> list[str]:
    """train.py with the tiny settings, writing into `run`."""
    return [sys.executable, "train.py", *TINY, f"hydra.run.dir={run}",
            f"paths.data_dir={tmp / 'data'}", f"paths.log_dir={tmp / 'outputs'}", *extra]


@pytest.mark.parametrize("seed", [0, 1])
def test_a_killed_run_resumes_to_the_same_number_of_steps(tmp_path, seed):
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(command(run, tmp_path), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert last.is_file(), f"no checkpoint in time; exit code {proc.poll()}"
        time.sleep(random.Random(seed).uniform(0.0, 2.0))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    killed_at = torch.load(last, weights_only=True)["global_step"]  # readable after the kill

    again = subprocess.run(command(run, tmp_path, f"ckpt_path={run}"), cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    saved = torch.load(last, weights_only=True)
    steps_per_epoch = 3  # 6 train phantoms, batches of 2
    assert (saved["epoch"], saved["global_step"]) == (EPOCHS - 1, EPOCHS * steps_per_epoch)
    assert saved["global_step"] >= killed_at
    assert not [p for p in (run / "checkpoints").iterdir() if TEMP_MARK in p.name]
