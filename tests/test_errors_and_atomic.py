"""What is blamed on a file and what is not, and atomic writes that fail cleanly."""

from __future__ import annotations

import errno
import gzip
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import REPO

from ctseg.atomic import TEMP_MARK, remove_leftovers, temp_prefix, write_atomic
from ctseg.errors import ConfigError, DatasetError, OutputError, blamed_on


def test_a_truncated_nifti_is_blamed_on_its_file(tmp_path):
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), path)
    path.write_bytes(path.read_bytes()[:60])
    expected = rf"^{path}: cannot read \((EOFError|OSError|BadGzipFile|error|ImageFileError)"
    with pytest.raises(DatasetError, match=expected), blamed_on(path, "cannot read"):
        np.asarray(nib.load(path).dataobj)


def test_a_bug_inside_is_not_blamed_on_the_file(tmp_path):
    with pytest.raises(TypeError), blamed_on(tmp_path / "ct.nii.gz", "cannot read"):
        len(3)  # a programming error, not bad data
    with pytest.raises(ConfigError, match=r"^key: fix"), blamed_on(tmp_path, "cannot read"):
        raise ConfigError("key: fix")


def test_no_room_is_blamed_on_the_file_written_not_the_subject(tmp_path):
    cache = tmp_path / "cache" / "s0001.npy"
    expected = rf"^{cache}: cannot write \(No space left on device\); free disk space"
    with pytest.raises(OutputError, match=expected), \
            blamed_on(tmp_path / "s0001" / "ct.nii.gz", "cannot preprocess"):
        raise OSError(errno.ENOSPC, "No space left on device", str(cache))


def test_write_atomic_names_an_unwritable_target_and_leaves_nothing(tmp_path):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "out" / "labels.json"
    with pytest.raises(OutputError, match=rf"^{target}: cannot write \(Not a directory\); "
                                          "choose a writable folder"):
        write_atomic(target, lambda tmp: tmp.write_text("{}"))


def test_write_atomic_under_a_file_size_limit_keeps_the_old_file(tmp_path):
    """`ulimit -f` in a child process: the write fails with EFBIG (Python ignores SIGXFSZ), the
    error names the target, the old content stays and no temp file remains."""
    target = tmp_path / "labels.nii.gz"
    target.write_bytes(b"old")
    code = f"""
import resource, sys
from ctseg.atomic import TEMP_MARK, remove_leftovers, temp_prefix, write_atomic
from ctseg.errors import OutputError
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
try:
    write_atomic({str(target)!r}, lambda tmp: tmp.write_bytes(b"0" * 100_000))
except OutputError as err:
    print(err)
    sys.exit(1)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 1, result.stderr
    assert result.stdout.strip() == (f"{target}: cannot write (File too large); free disk "
                                     "space, raise the file-size limit, or write elsewhere")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz"]


def test_write_atomic_replaces_the_whole_file(tmp_path):
    target = tmp_path / "a" / "b.json.gz"
    write_atomic(target, lambda tmp: tmp.write_bytes(gzip.compress(b"new")))
    assert gzip.decompress(target.read_bytes()) == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["b.json.gz"]


def test_leftovers_of_a_dead_process_go_and_a_running_ones_stay(tmp_path):
    """A temporary folder and file of a killed process (a pid that no longer runs) are removed;
    this process's own temporary, another machine's and ordinary files stay."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = temp_prefix("case")
    killed = ours.replace(f".{os.getpid()}.", f".{dead}.")
    (tmp_path / f"{killed}abc").mkdir()
    (tmp_path / f"{killed}abc" / "labels.nii.gz").write_bytes(b"partial")
    (tmp_path / f".labels.json{killed[len('.case'):]}x.tmp").write_text("{")
    (tmp_path / f"{ours}mine").mkdir()
    other_host = f".case.{TEMP_MARK}.elsewhere.{dead}.x"
    (tmp_path / other_host).mkdir()
    (tmp_path / "case").mkdir()
    removed = remove_leftovers(tmp_path)
    assert len(removed) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{ours}mine", other_host, "case"])


SAVER = """
import sys, torch
from ctseg.callbacks.checkpoint_io import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), sys.argv[1]
for version in range(1, 10**6):
    io.save_checkpoint({"version": version, "weights": torch.full((4_000_000,), float(version))},
                       path)
    print(version, flush=True)
"""


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_checkpoint_save_killed_at_any_moment_leaves_a_whole_checkpoint(tmp_path, seed):
    """SIGKILL while Lightning saves (through AtomicCheckpointIO) leaves the previous or the new
    checkpoint, whole, and no temporary that the next start would not remove."""
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "1"  # one save done; the next ones are running
    time.sleep(random.Random(seed).uniform(0.0, 1.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    saved = torch.load(path, weights_only=True)
    assert saved["version"] >= 1
    assert torch.equal(saved["weights"], torch.full((4_000_000,), float(saved["version"])))
    remove_leftovers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
