"""predict.py killed at random moments is finished by running it again, and two processes share
one output folder: every case complete, finished cases byte-identical, no temporary left."""

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
from ctseg.inference.outputs import LABELS_FILE, TIMING_FILE

pytestmark = pytest.mark.slow
CASES = ("a", "b", "c", "d")


@pytest.fixture(scope="module")
def inputs(shared_ct: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of four copies of the shared CT crop."""
    folder = tmp_path_factory.mktemp("inputs")
    for name in CASES:
        shutil.copy(shared_ct, folder / f"{name}.nii.gz")
    return folder


def command(ckpt: Path, inputs: Path, out: Path) -> list[str]:
    """predict.py on `inputs` into `out`, as a user types it (defaults otherwise)."""
    return [sys.executable, str(REPO / "predict.py"), f"ckpt={ckpt}", f"input={inputs}",
            f"output={out}", "progress=false"]


def case_bytes(out: Path) -> dict[str, bytes]:
    """The label file of every finished case, by case name (a killed run's temporary folders left
    out: the next run removes them)."""
    return {p.parent.name: p.read_bytes() for p in sorted(out.glob(f"*/{LABELS_FILE}"))
            if TEMP_MARK not in p.parent.name}


def leftovers(out: Path) -> list[Path]:
    """Temporary files or folders anywhere under `out`."""
    return [p for p in out.rglob("*") if TEMP_MARK in p.name]


@pytest.fixture(scope="module")
def reference(tiny_ckpt: Path, inputs: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[dict[str, bytes], float]:
    """The labels of an uninterrupted run, and its wall time."""
    out = tmp_path_factory.mktemp("reference") / "out"
    start = time.monotonic()
    done = subprocess.run(command(tiny_ckpt, inputs, out), capture_output=True, text=True,
                          timeout=600, cwd=out.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return case_bytes(out), time.monotonic() - start


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_killed_run_is_finished_by_the_same_command(tiny_ckpt, inputs, reference, tmp_path,
                                                       seed):
    expected, seconds = reference
    out = tmp_path / "out"
    proc = subprocess.Popen(command(tiny_ckpt, inputs, out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=tmp_path)
    time.sleep(random.Random(seed).uniform(0.3, 1.0) * seconds)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    finished = case_bytes(out)
    assert all(finished[c] == expected[c] for c in finished)  # complete or absent, never partial
    again = subprocess.run(command(tiny_ckpt, inputs, out), capture_output=True, text=True,
                           timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert case_bytes(out) == expected
    assert not leftovers(out)
    timing = json.loads((out / TIMING_FILE).read_text())
    assert sorted(timing["skipped"]) == sorted(finished)
    assert sorted(r["case"] for r in timing["cases"]) == sorted(set(CASES) - set(finished))


def test_two_processes_on_one_output_folder_both_succeed(tiny_ckpt, inputs, reference,
                                                         tmp_path):
    expected, _ = reference
    out = tmp_path / "out"
    procs = [subprocess.Popen(command(tiny_ckpt, inputs, out), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    assert case_bytes(out) == expected
    for name in CASES:
        assert nib.load(out / name / LABELS_FILE).shape == nib.load(inputs / f"{name}.nii.gz").shape
    assert not leftovers(out)
