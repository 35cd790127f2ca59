"""benchmarks/gpu_report.py as a user runs it on a machine without CUDA: one line, exit 0."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the report measures (minutes)")
def test_gpu_report_without_cuda_says_so_in_one_line_and_exits_0(tmp_path):
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_report.py"),
                             "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [
        "gpu_report: CUDA is not available on this machine; nothing measured"]
    assert not out.exists()
