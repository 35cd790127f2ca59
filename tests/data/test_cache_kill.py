"""train.py killed (SIGKILL) while it builds its first disk cache is finished by the same command:
the rerun exits 0, every cache entry is complete and readable, and no temporary folder is left."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO

from ctseg.atomic import TEMP_MARK

pytestmark = pytest.mark.slow
PHANTOMS = 12


def command(tmp: Path) -> list[str]:
    """One short epoch on phantoms with the disk cache in `tmp/cache`."""
    return [sys.executable, "train.py", "experiment=phantom_quick", "data/cache=disk",
            f"data.cache_dir={tmp / 'cache'}", f"data.n_phantoms={PHANTOMS}",
            "data.extra_roots=[]", "model.init_filters=8", "data.patch_size=[16,16,16]",
            "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
            "callbacks=none", "test=false", "logger=csv", f"hydra.run.dir={tmp / 'run'}",
            f"paths.data_dir={tmp / 'data'}", f"paths.log_dir={tmp / 'outputs'}"]


def temporaries(root: Path) -> list[Path]:
    """Cache folders being written (or left by a killed writer); none while one is renamed under
    the listing (the next poll sees the new state)."""
    try:
        return [p for p in root.rglob("*") if TEMP_MARK in p.name] if root.is_dir() else []
    except FileNotFoundError:
        return []


def complete(root: Path) -> list[Path]:
    """Finished cache entries (they stay, so a slow poll cannot miss them)."""
    return [p for p in root.glob("*/*") if p.is_dir() and TEMP_MARK not in p.name]


@pytest.mark.parametrize("nth_entry", [1, 4])
def test_a_run_killed_while_caching_is_finished_by_the_same_command(tmp_path, nth_entry):
    cache = tmp_path / "cache"
    proc = subprocess.Popen(command(tmp_path), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        # Kill while an entry at or after the nth is being written: decided on the finished
        # entries, so a poll delayed by a busy machine kills a later entry, never none.
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if temporaries(cache) and len(complete(cache)) >= nth_entry - 1:
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"not killed while caching: {proc.returncode}"
    assert nth_entry - 1 <= len(complete(cache)) < PHANTOMS - 2  # killed during the build

    again = subprocess.run(command(tmp_path), cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not temporaries(cache)
    entries = [p for p in cache.glob("*/*") if p.is_dir()]
    rows = (tmp_path / "data" / "phantoms" / "meta.csv").read_text().splitlines()[1:]
    fitted = [row for row in rows if row.split(";")[-1] in ("train", "val")]
    assert len(entries) == len(fitted) > 0  # each train and val subject cached once
    for entry in entries:
        meta = json.loads((entry / "meta.json").read_text())
        image, label = np.load(entry / "image.npy"), np.load(entry / "label.npy")
        assert image.shape[1:] == label.shape[1:] == tuple(meta["shape"])
        assert {name: (entry / name).stat().st_size for name in meta["bytes"]} == meta["bytes"]
