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


def finished(out: Path) -> list[Path]:
    """The merged label maps written so far."""
    return [p for p in (out / "v1").glob("*.nii.gz") if TEMP_MARK not in p.name]


@pytest.mark.parametrize("seed", [0, 1])
def test_a_killed_prepare_is_finished_by_the_same_command(download, tmp_path, seed):
    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "ctseg.data", "prepare", str(download), "--out", str(out),
                "--workers", "1"]

    rng = random.Random(seed)
    merged_before_kill = rng.randint(0, len(SUBJECTS) - 1)  # the kill lands while one is merged
    out = tmp_path / "prepared"
    proc = subprocess.Popen(command(out), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while (not (out / "v1").is_dir() or len(finished(out)) < merged_before_kill) \
                and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.15))  # within the next subject (~0.4 s)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    again = subprocess.run(command(out), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    manifest = json.loads((out / "v1" / "manifest.json").read_text())
    assert sorted(manifest["subjects"]) == list(SUBJECTS)
    for name in SUBJECTS:
        assert nib.load(out / "v1" / f"{name}.nii.gz").shape == nib.load(
            download / name / "ct.nii.gz").shape
    assert not [p for p in out.rglob("*") if TEMP_MARK in p.name]
