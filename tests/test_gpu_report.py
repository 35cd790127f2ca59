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
SECTIONS = ("predict_1.5mm", "predict_3mm", "training", "point_stage", "export",
            "export_vista3d", "vista3d", "ensemble")
# The window of experiment=vista3d_quick (its data.patch_size), which the point_stage section
# trains and the export_vista3d section exports.
VISTA3D_QUICK_WINDOW = [32, 32, 24]


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
    for name in ("predict_1.5mm", "predict_3mm", "export", "export_vista3d", "point_stage",
                 "vista3d", "ensemble"):  # the protocol's sides and a checked agreement
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
def test_the_point_stage_section_measures_with_interactive_evaluation(smoke, gpu_report_smoke):
    """Each checkpoint's figures are those of its interactive evaluation's summary (kept beside
    the section's JSON with every output of python -m ctseg.evaluate.interactive), and
    python -m ctseg.compare puts the two side by side in the section's tables."""
    section = smoke[0]["sections"]["point_stage"]
    folder = gpu_report_smoke / "sections" / "point_stage_clicks"
    assert section["result"]["setting"]["clicks_folder"] == str(folder)
    for name, side in section["result"]["sides"].items():
        evaluation = folder / name.replace(" ", "_")
        assert {p.name for p in evaluation.iterdir()} == {
            "clicks", "clicks.csv", "summary.json", "summary.md", "dice_vs_clicks.png"}
        summary = json.loads((evaluation / "summary.json").read_text())
        assert summary["settings"]["clicks"] == side["clicks"] == 2
        assert summary["cases"] == 1 and summary["structures"] == side["structures"] == 1
        assert side["hit_rate"] == summary["first_click_hit_rate"]
        assert side["dice_first"] == summary["dice_after"]["1"]["overall"]["mean"]
        assert side["dice_last"] == summary["dice_after"]["2"]["overall"]["mean"]
        assert side["auc"] == summary["auc"]["overall"]["mean"]
        assert side["first_click_s"] == summary["seconds"]["first"] > 0
        record = json.loads(next((evaluation / "clicks").glob("*.json")).read_text())
        assert record["structures"]["liver"]["clicks"][0]["label"] == 1
    table = (folder / "compare" / "clicks_compare.md").read_text()
    assert "| automatic | 1 |" in table and "| point_stage | 1 |" in table
    assert table.strip() in section["tables"]


@pytest.mark.slow
def test_the_vista3d_export_rows_measure_its_automatic_mode(smoke, gpu_report_smoke):
    """export_vista3d exports the automatic-mode checkpoint the point_stage section trained, in
    the checkpoint's own window and preprocessing: TorchScript and ONNX within their parity
    thresholds and agreeing with fp32, the window compute of the automatic mode itself (the
    module the exports hold, so TorchScript's equals fp32's), the CUDA-only variants named as
    skipped, and the goals table has its rows."""
    data, text, _ = smoke
    ckpt = gpu_report_smoke / "vista3d_automatic.ckpt"
    assert f"--save-automatic {ckpt}" in data["sections"]["point_stage"]["command"]
    section = data["sections"]["export_vista3d"]
    assert section["status"] == "passed" and f"--ckpt {ckpt}" in section["command"]
    setting = section["result"]["setting"]
    assert setting["weights"] == str(ckpt) and setting["roi"] == VISTA3D_QUICK_WINDOW
    built = setting["exports"]["6"]
    assert built["kind"] == "vista3d" and built["roi_size"] == VISTA3D_QUICK_WINDOW
    assert set(built["parity"]) == {"torchscript", "onnx"} and built["seconds"] > 0
    for fmt, parity in built["parity"].items():
        assert parity["window"] == [1, 1, *VISTA3D_QUICK_WINDOW], fmt
        assert parity["max_abs_diff"] <= parity["thresholds"]["max_abs_diff"], (fmt, parity)
        assert parity["argmax_agreement"] >= parity["thresholds"]["min_agreement"], (fmt, parity)
    assert setting["skipped_variants"] == {v: "runs on CUDA only (--device cpu)" for v in
                                           ("AMP fp16", "TensorRT fp32", "TensorRT fp16")}
    sides = section["result"]["sides"]
    assert set(sides) == {"fp32, 6 mm", "TorchScript, 6 mm", "onnxruntime, 6 mm"}
    intensity = torch.load(ckpt, map_location="cpu", weights_only=False)[
        "datamodule_hyper_parameters"]["intensity"]
    for name, side in sides.items():
        assert side["roi_size"] == VISTA3D_QUICK_WINDOW and side["grid_mm"] == [6.0] * 3, name
        assert side["intensity"] == intensity and side["window_s"] > 0, name
    ratio = sides["TorchScript, 6 mm"]["window_s"] / sides["fp32, 6 mm"]["window_s"]
    assert 0.25 <= ratio <= 4, ratio  # the same kernels (loaded CPU: a wide margin)
    checks = section["result"]["agreement"]
    assert set(checks) == {"TorchScript, 6 mm vs fp32", "onnxruntime, 6 mm vs fp32"}
    assert all(c["threshold"] == 0.999 <= c["value"] for c in checks.values()), checks
    rows = {g["goal"]: g for g in data["goals"] if g["goal"].startswith("VISTA3D")}
    assert set(rows) == {
        "VISTA3D automatic mode: export build seconds (torchscript, onnx, 6 mm)",
        "VISTA3D automatic mode: torchscript parity, max logit difference (6 mm)",
        "VISTA3D automatic mode: onnx parity, max logit difference (6 mm)"}
    for fmt in ("torchscript", "onnx"):
        row = rows[f"VISTA3D automatic mode: {fmt} parity, max logit difference (6 mm)"]
        assert row["met"] and row["value"] == built["parity"][fmt]["max_abs_diff"]
        assert f"| {row['goal']} | {row['value']:.3f} | yes |" in text
    assert "TensorRT fp16: skipped (runs on CUDA only (--device cpu))" in section["tables"]


def test_the_vista3d_export_without_a_checkpoint_is_skipped_and_says_how(tmp_path):
    out = tmp_path / "report"
    done = report(out, "--sections", "export_vista3d", timeout=120)
    assert done.returncode == 0, done.stderr
    section = json.loads((out / "gpu_report.json").read_text())["sections"]["export_vista3d"]
    assert section == {"status": "skipped", "message": f"no VISTA3D checkpoint at {out.resolve()}"
                       "/vista3d_automatic.ckpt: the point_stage section did not write one; give "
                       "--vista3d-ckpt or run that section too"}
    assert not list((out / "sections").iterdir())


def test_a_missing_vista3d_checkpoint_is_refused_before_anything_runs(tmp_path):
    out = tmp_path / "report"
    done = report(out, "--vista3d-ckpt", str(tmp_path / "none.ckpt"), timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"error: --vista3d-ckpt {tmp_path / 'none.ckpt'}: no such file; give an automatic-mode "
        "VISTA3D checkpoint (train.py experiment=vista3d_quick), or leave the option out and the "
        "point_stage section trains one"]
    assert not out.exists()


def test_members_are_read_from_the_callers_folder_and_a_missing_one_is_refused(tmp_path):
    """The sections run in the clone; --members given relative to the caller's folder are
    found there (a.ckpt), and a missing one is one error line before anything runs."""
    (tmp_path / "a.ckpt").write_bytes(b"")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPORT), "--device", "cpu", "--smoke", "--out",
                           "report", "--members", "a.ckpt", "b.ckpt"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "error: --members b.ckpt: no such file; give trained checkpoints (paths from the folder "
        "the report is run in), or leave the option out and the ensemble section trains two"]
    assert not (tmp_path / "report").exists()


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
