"""`python -m ctseg.data`: prepare, check and phantoms from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import truncate

from ctseg.data.__main__ import main


def test_prepare_prints_splits_and_class_voxels(shared_data: Path, tmp_path: Path, capsys) -> None:
    assert main(["prepare", str(shared_data), "--out", str(tmp_path / "p"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "subjects per split" in out and "│ test  │ 1" in out
    assert "liver" in out and "64 classes have no voxel" in out
    assert (tmp_path / "p" / "v1" / "s0001.nii.gz").is_file()


def test_check_lists_every_problem(mini_copy: Path, capsys) -> None:
    assert main(["check", str(mini_copy)]) == 0
    assert "complete TotalSegmentator v1 download" in capsys.readouterr().out
    seg = mini_copy / "s0001" / "segmentations"
    (seg / "liver.nii.gz").unlink()
    (seg / "spleen.nii.gz").write_bytes(b"garbage")
    assert main(["check", str(mini_copy)]) == 1
    out = capsys.readouterr().out
    assert "liver.nii.gz: mask of liver missing" in out
    assert "spleen.nii.gz: corrupt or truncated" in out
    assert "2 problem(s) in 1 subject(s)" in out


def test_v2_check_on_v1_download_lists_the_missing_masks(shared_data: Path, capsys) -> None:
    assert main(["check", str(shared_data), "--version", "v2"]) == 1
    out = capsys.readouterr().out
    assert "mask of costal_cartilages missing (required by TotalSegmentator v2)" in out


def test_errors_are_one_line_with_exit_status_1(tmp_path: Path, capsys) -> None:
    assert main(["prepare", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert f"error: {tmp_path}: neither dataset.json nor meta.csv here" in captured.err
    assert "error:" not in captured.out


def test_truncated_ct_with_default_workers_is_one_line(two_subjects: Path, tmp_path: Path) -> None:
    truncate(two_subjects / "s0002" / "ct.nii.gz")
    out = tmp_path / "prepared"
    # The default --workers merges in a process pool; the error must cross it intact.
    result = subprocess.run([sys.executable, "-m", "ctseg.data", "prepare", str(two_subjects),
                             "--out", str(out)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {two_subjects}/s0002/ct.nii.gz: corrupt or truncated NIfTI file "
                      f"{errors[0].split('NIfTI file ', 1)[1]}"]
    assert "re-download it" in errors[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert "BrokenProcessPool" not in result.stdout + result.stderr
    # The good subject is merged and recorded; the bad one is redone by the next run.
    manifest = json.loads((out / "v1" / "manifest.json").read_text())
    assert list(manifest["subjects"]) == ["s0001"]
    assert (out / "v1" / "s0001.nii.gz").is_file()


def test_help_lists_the_commands() -> None:
    result = subprocess.run([sys.executable, "-m", "ctseg.data", "--help"], capture_output=True,
                            text=True, check=True)
    for command in ("prepare", "check", "phantoms"):
        assert command in result.stdout
