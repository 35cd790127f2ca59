"""train.py when the disk fills while it builds the volume cache: a real kernel write failure
(a file-size limit, `ulimit -f`: writes past it fail with EFBIG, as ENOSPC on a full disk) ends it
with one `error:` line naming the cache folder, the cause and the setting that moves the cache;
no partial entry is left, and the same command with room continues, the finished entries kept.
`python -m ctseg.data prepare` likewise names the prepared folder and the settings that move it,
leaves no partial label map, and the same command with room finishes."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO

from ctseg.atomic import TEMP_MARK

pytestmark = pytest.mark.slow
PHANTOMS = 4
# Bytes a file may reach in the limited run: more than a phantom's cropped label map, less than
# the larger entries' image.npy (132, 260 and 292 kB for the seeded phantoms at coarse spacing).
FILE_LIMIT = 200_000


def command(tmp: Path) -> list[str]:
    """One short epoch on phantoms (written beforehand) with the disk cache in `tmp/cache`."""
    return [sys.executable, "train.py", "experiment=phantom_quick", "data/cache=disk",
            f"data.cache_dir={tmp / 'cache'}", f"data.n_phantoms={PHANTOMS}",
            "model.init_filters=8", "data.patch_size=[16,16,16]", "trainer.max_epochs=1",
            "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "callbacks=none",
            "test=false", "logger=csv", f"hydra.run.dir={tmp / 'run'}",
            f"paths.data_dir={tmp / 'data'}", f"paths.log_dir={tmp / 'outputs'}"]


def limit_file_size(limit: int = FILE_LIMIT) -> None:
    """In the child: writes past `limit` bytes fail with EFBIG (SIGXFSZ ignored)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def write_phantoms(folder: Path) -> None:
    """PHANTOMS phantoms (train.py's settings) written into `folder` without a limit."""
    run = subprocess.run([sys.executable, "-m", "ctseg.data", "phantoms", str(folder), "--n",
                          str(PHANTOMS)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def entries(cache: Path) -> dict[Path, tuple[int, int]]:
    """Every cache entry folder -> (inode, mtime in ns) of its image.npy, each checked complete:
    its files have the sizes its meta.json records and load with its shape."""
    found = {}
    for entry in sorted(p for p in cache.glob("*/*") if p.is_dir()):
        meta = json.loads((entry / "meta.json").read_text())
        assert {name: (entry / name).stat().st_size for name in meta["bytes"]} == meta["bytes"]
        image, label = np.load(entry / "image.npy"), np.load(entry / "label.npy")
        assert image.shape[1:] == label.shape[1:] == tuple(meta["shape"])
        stat = (entry / "image.npy").stat()
        found[entry] = (stat.st_ino, stat.st_mtime_ns)
    return found


def test_a_full_disk_while_caching_is_one_error_line_and_the_rerun_continues(tmp_path):
    write_phantoms(tmp_path / "data" / "phantoms")
    cache = tmp_path / "cache"

    full = subprocess.run(command(tmp_path), cwd=REPO, capture_output=True, text=True,
                          timeout=600, preexec_fn=limit_file_size)
    assert full.returncode == 1, full.stderr[-3000:]
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    (root,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert lines[0].startswith(f"error: {root}: no room to write the volume cache (File too "
                               "large); "), lines[0]
    assert "data.cache_dir" in lines[0] and "CTSEG_CACHE" in lines[0]
    assert not [p for p in cache.rglob("*") if TEMP_MARK in p.name]
    kept = entries(cache)
    rows = (tmp_path / "data" / "phantoms" / "meta.csv").read_text().splitlines()[1:]
    fitted = [row for row in rows if row.split(";")[-1] in ("train", "val")]
    # the seeded phantoms' small entry is built before a larger one fails
    assert 1 <= len(kept) < len(fitted)

    again = subprocess.run(command(tmp_path), cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not [p for p in cache.rglob("*") if TEMP_MARK in p.name]
    rebuilt = entries(cache)
    assert len(rebuilt) == len(fitted)  # each train and val subject cached once
    assert {entry: rebuilt[entry] for entry in kept} == kept  # finished entries not rewritten


def test_a_full_disk_while_preparing_is_one_error_line_and_the_rerun_finishes(tmp_path):
    write_phantoms(tmp_path / "phantoms")
    prepare = [sys.executable, "-m", "ctseg.data", "prepare", str(tmp_path / "phantoms"),
               "--out", str(tmp_path / "prepared"), "--workers", "2"]
    # The phantoms' label maps take 5.8-7.1 kB gzipped: none fits.
    full = subprocess.run(prepare, cwd=REPO, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: limit_file_size(3000))
    assert full.returncode == 1, full.stderr[-3000:]
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    folder = tmp_path / "prepared" / "v1"
    assert errors == [line for line in full.stderr.splitlines() if line.strip()][-1:]
    assert "Traceback" not in full.stderr
    assert errors[0].startswith(f"error: {folder}: no room to write the prepared label maps "
                                "(File too large); "), errors[0]
    assert all(key in errors[0] for key in ("--out", "data.prepared_dir", "CTSEG_CACHE"))
    # nothing partial: no label map, temp file or finished-subject record (only locks)
    assert not [p for p in folder.rglob("*") if p.is_file() and p.suffix != ".lock"]

    again = subprocess.run(prepare, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in folder.glob("*.nii.gz")) == [
        f"s{i:04d}.nii.gz" for i in range(1, PHANTOMS + 1)]
