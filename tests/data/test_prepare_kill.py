"""`python -m ctseg.data prepare` killed (SIGKILL) at random moments is finished by the same
command: a valid manifest naming every subject, label maps that load, no temporary left."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import pytest
from helpers import REPO

from ctseg.atomic import TEMP_MARK

pytestmark = pytest.mark.slow
SUBJECTS = ("s0001", "s0002", "s0003", "s0004")


@pytest.fixture
def download(shared_data: Path, tmp_path: Path) -> Path:
    """A download of four subjects, each a copy of the shared crop."""
    root = tmp_path / "download"
    for name in SUBJECTS:
        shutil.copytree(shared_data / "s0001", root / name,
                        ignore=shutil.ignore_patterns("label_totalseg_v2.nii.gz"))
    (root / "meta.csv").write_text("image_id;split\n" + "".join(f"{s};train\n" for s in SUBJECTS))
    return root


@pytest.mark.parametrize("seed", [0, 1])
def test_a_killed_prepare_is_finished_by_the_same_command(download, tmp_path, seed):
    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "ctseg.data", "prepare", str(download), "--out", str(out),
                "--workers", "1"]

    start = time.monotonic()
    subprocess.run(command(tmp_path / "uninterrupted"), cwd=REPO, check=True,
                   capture_output=True, timeout=600)
    seconds = time.monotonic() - start
    out = tmp_path / "prepared"
    proc = subprocess.Popen(command(out), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(random.Random(seed).uniform(0.5, 0.95) * seconds)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL  # killed, not finished
    again = subprocess.run(command(out), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    manifest = json.loads((out / "v1" / "manifest.json").read_text())
    assert sorted(manifest["subjects"]) == list(SUBJECTS)
    for name in SUBJECTS:
        assert nib.load(out / "v1" / f"{name}.nii.gz").shape == nib.load(
            download / name / "ct.nii.gz").shape
    assert not [p for p in out.rglob("*") if TEMP_MARK in p.name]
