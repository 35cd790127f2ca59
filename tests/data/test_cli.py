"""`python -m ctseg.data`: prepare, check and phantoms from the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
    assert f"error: {tmp_path}/meta.csv: meta.csv not found" in capsys.readouterr().out


def test_help_lists_the_commands() -> None:
    result = subprocess.run([sys.executable, "-m", "ctseg.data", "--help"], capture_output=True,
                            text=True, check=True)
    for command in ("prepare", "check", "phantoms"):
        assert command in result.stdout
