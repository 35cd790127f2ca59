"""benchmarks/gpu_report.py: without CUDA one line and exit 0; `--device cpu --smoke` (the
session's `gpu_report_smoke`) runs every section's benchmark script at its smallest setting, each
writing its rows; a broken agreement exits 1 after writing; the time budget skips the sections
that would pass it and records them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, SHARED_DATA

REPORT = REPO / "benchmarks" / "gpu_report.py"
SECTIONS = ("predict_1.5mm", "predict_3mm", "training", "point_stage", "export", "vista3d",
            "ensemble")


def report(out: Path, *options: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    """Run the report on CPU at its smallest setting into `out` (one thread per process)."""
    env = {**os.environ, "CTSEG_SHARED_DATA": str(SHARED_DATA), "OMP_NUM_THREADS": "1",
           "CTSEG_CACHE": str(out.parent / "cache"), "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, str(REPORT), "--device", "cpu", "--smoke", "--out",
                           str(out), *options], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(gpu_report_smoke: Path) -> tuple[dict, str, str]:
    """The smoke report with every section (the session's run): its JSON, markdown and
    standard output."""
    return (json.loads((gpu_report_smoke / "gpu_report.json").read_text()),
            (gpu_report_smoke / "gpu_report.md").read_text(),
            (gpu_report_smoke / "stdout.txt").read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the report measures (minutes)")
def test_gpu_report_without_cuda_says_so_in_one_line_and_exits_0(tmp_path):
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, str(REPORT), "--out", str(out)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [
        "gpu_report: CUDA is not available on this machine; nothing measured"]
    assert not out.exists()


@pytest.mark.slow
def test_every_section_runs_its_script_and_writes_its_rows(smoke):
    data, text, stdout = smoke
    assert list(data["sections"]) == list(SECTIONS)
    for name, section in data["sections"].items():
        assert section["status"] == "passed", (name, section.get("message"))
        assert section["command"].startswith("benchmarks/"), section["command"]
        assert "--device cpu" in section["command"] and section["seconds"] > 0
        assert f"[{name}] passed in " in stdout
        assert f"## {name}\n" in text and section["tables"] and section["tables"] in text
        result = section["result"]
        checks = result.get("agreement") or {}
        assert all(c["passed"] for c in checks.values()), (name, checks)
    for name in ("predict_1.5mm", "predict_3mm", "export", "point_stage", "vista3d",
                 "ensemble"):  # the protocol's sides and a checked agreement
        result = data["sections"][name]["result"]
        assert result["sides"] and result["agreement"], name
        assert all(len(side["runs"]) == 1 for side in result["sides"].values()), name
    rows = data["sections"]["training"]["result"]["training"]
    assert set(rows) == {"ctseg_disk segresnet ddp", "ctseg_disk vista3d_small ddp"}
    for row in rows.values():  # Lightning's DDP strategy, VISTA3D with unused parameters allowed
        assert row["steps"] == 2 and row["strategy_class"] == "DDPStrategy"
        assert 0 <= row["perf/data_wait"] <= 1 and row["perf/patches_per_s"] > 0
    assert [g["goal"] for g in data["goals"]][:1] == [
        "predict.py time <= 0.5x the bundle's at 1.5 mm"]


@pytest.mark.slow
def test_predict_3mm_runs_both_sides_on_the_3mm_grid(smoke):
    """Both sides predict on the CT's grid: ctseg no longer at its 1.5 mm default against the
    bundle at 3 mm."""
    for name, spacing in (("predict_3mm", 3.0), ("predict_1.5mm", 1.5)):
        result = smoke[0]["sections"][name]["result"]
        assert result["setting"]["spacing_mm"] == spacing
        assert {side: r["grid_mm"] for side, r in result["sides"].items()} == {
            "monai": [spacing] * 3, "ctseg": [spacing] * 3}, name


@pytest.mark.slow
def test_the_vista3d_checkpoints_the_report_writes_load(smoke):
    """The VISTA3D sections load the checkpoints they write (Lightning's format, version
    included) and the point stage trains with clicks from an automatic-mode one."""
    sections = smoke[0]["sections"]
    vista3d = sections["vista3d"]["result"]
    assert set(vista3d["sides"]) == {"session small:grid:float32", "fresh small:grid"}
    assert vista3d["agreement"]["small:grid:float32 session vs fresh"]["passed"]
    sides = sections["point_stage"]["result"]["sides"]
    assert sides["automatic"]["click_steps"] == 0 and sides["point stage"]["click_steps"] >= 1
    for side in sides.values():
        assert 0 <= side["hit_rate"] <= 1 and 0 <= side["dice_first"] <= 1


@pytest.mark.slow
def test_a_broken_agreement_exits_1_after_writing_the_report(tmp_path):
    out = tmp_path / "report"
    done = report(out, "--sections", "predict_3mm", "--predict-threshold", "1.01")
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        "gpu_report: 1 section(s) failed: predict_3mm (agreement below threshold: ctseg vs MONAI")
    section = json.loads((out / "gpu_report.json").read_text())["sections"]["predict_3mm"]
    assert section["status"] == "failed" and section["returncode"] == 1
    assert not section["result"]["agreement"]["ctseg vs MONAI"]["passed"]
    assert "Message: agreement below threshold" in (out / "gpu_report.md").read_text()


def test_the_budget_skips_sections_that_would_pass_it_and_records_them(tmp_path):
    out = tmp_path / "report"
    done = report(out, "--sections", "predict_3mm", "export", "--budget-min", "0.5",
                  timeout=120)
    assert done.returncode == 0, done.stderr
    sections = json.loads((out / "gpu_report.json").read_text())["sections"]
    assert {name: s["status"] for name, s in sections.items()} == {
        "predict_3mm": "skipped", "export": "skipped"}
    assert "would pass the report's 30 s" in sections["export"]["message"]
    assert "[predict_3mm] skipped: its budget of 60 s" in done.stdout
    assert not list((out / "sections").iterdir())


def test_jobs_side_by_side_only_for_the_smoke_run(tmp_path):
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, str(REPORT), "--jobs", "2", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "error: --jobs 2: give 1, or more only with --smoke (sections measured side by side "
        "share the machine, so their figures are not comparable)"]
    assert not out.exists()
