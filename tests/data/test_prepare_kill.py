"""`python -m ctseg.data prepare` on a simulated download: killed (SIGKILL) after some subjects
are finished, the same command redoes only the others; two processes started at once on one
root (each with a pool of two workers) share the subjects, each written by exactly one of
them."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from filelock import FileLock
from helpers import REPO

from ctseg.atomic import TEMP_MARK
from ctseg.data.__main__ import main
from ctseg.data.merge import CLAIMS, RECORDS, prepare

pytestmark = pytest.mark.slow
N = 6
SUBJECTS = [f"s{i:04d}" for i in range(1, N + 1)]
WRITTEN = re.compile(r"(s\d{4})\.nii\.gz: label map written")


@pytest.fixture(scope="module")
def download(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six subjects of the simulated v2 download at its smallest practical scale."""
    root = tmp_path_factory.mktemp("simulated") / "download"
    assert main(["phantoms", str(root), "--n", str(N), "--seed", "2", "--size", "wholebody",
                 "--scale", "0.0625"]) == 0
    return root


@pytest.fixture(scope="module")
def uninterrupted(download: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prepared folder of one uninterrupted prepare."""
    out = tmp_path_factory.mktemp("uninterrupted")
    prepare(download, out=out, version="v2")
    return out / "v2"


def command(download: Path, out: Path, workers: int = 1) -> list[str]:
    """The prepare command line of the tests."""
    return [sys.executable, "-m", "ctseg.data", "prepare", str(download), "--version", "v2",
            "--out", str(out), "--workers", str(workers)]


def recorded(folder: Path) -> list[str]:
    """Subjects whose label map and record were written, not yet folded into the manifest."""
    return sorted(p.stem for p in (folder / RECORDS).glob("s*.json"))


def assert_same_result(folder: Path, reference: Path) -> None:
    """Same manifest entries and label maps as the reference folder, no temporary left."""
    assert json.loads((folder / "manifest.json").read_text())["subjects"] == \
        json.loads((reference / "manifest.json").read_text())["subjects"]
    for name in SUBJECTS:
        np.testing.assert_array_equal(np.asanyarray(nib.load(folder / f"{name}.nii.gz").dataobj),
                                      np.asanyarray(nib.load(reference / f"{name}.nii.gz").dataobj))
    assert not [p for p in folder.parent.rglob("*") if TEMP_MARK in p.name]
    assert not recorded(folder)  # every record folded into the manifest


def test_a_killed_prepare_resumes_without_redoing_finished_subjects(download, uninterrupted,
                                                                    tmp_path):
    rng = random.Random(0)
    out = tmp_path / "prepared"
    folder = out / "v2"
    target = rng.randint(1, N - 2)  # finished subjects before the kill
    proc = subprocess.Popen(command(download, out), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while len(recorded(folder)) < target and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.15))  # the kill lands within the next subject
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    finished = recorded(folder)
    assert target <= len(finished) < N
    stamps = {name: (s.st_ino, s.st_mtime_ns) for name in finished
              for s in [(folder / f"{name}.nii.gz").stat()]}
    again = subprocess.run(command(download, out), cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{N - len(finished)} of {N} label maps" in again.stderr
    assert sorted(WRITTEN.findall(again.stderr)) == sorted(set(SUBJECTS) - set(finished))
    assert {name: (s.st_ino, s.st_mtime_ns) for name in finished
            for s in [(folder / f"{name}.nii.gz").stat()]} == stamps  # not rewritten
    assert_same_result(folder, uninterrupted)


def test_two_processes_on_one_root_share_the_subjects(download, uninterrupted, tmp_path):
    out = tmp_path / "prepared"
    claims = out / "v2" / CLAIMS
    claims.mkdir(parents=True)
    # Every subject claimed here, as by a third process busy with all of them, until both
    # processes are running: then they start together whatever their start-up times.
    held = [FileLock(str(claims / f"{name}.lock")) for name in SUBJECTS]
    for lock in held:
        lock.acquire()
    procs = [subprocess.Popen(command(download, out, workers=2), cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    starts = []
    for proc in procs:
        lines = [proc.stderr.readline()]
        while "label maps of" not in lines[-1] and lines[-1]:
            lines.append(proc.stderr.readline())
        starts.append("".join(lines))
    for lock in held:
        lock.release()
    logs = [begun + proc.communicate(timeout=600)[1] for begun, proc in zip(starts, procs,
                                                                             strict=True)]
    assert [proc.returncode for proc in procs] == [0, 0], logs
    written = [WRITTEN.findall(log) for log in logs]
    assert sorted(written[0] + written[1]) == SUBJECTS  # each subject written exactly once
    assert written[0] and written[1]  # by both processes: the work was shared
    for log, own in zip(logs, written, strict=True):
        assert f"{N} of {N} label maps" in log
        assert f"wrote {len(own)} label maps into {out / 'v2'}; {N - len(own)} were written " \
               "by other processes" in log
    assert_same_result(out / "v2", uninterrupted)
