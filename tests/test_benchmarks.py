"""The benchmarks follow one protocol (benchmarks/common.py): each script, run as a user types it
at its smallest setting on CPU (the ensemble and training scripts with the shared trained
checkpoints instead of training their own), writes both sides' timings over the same span and an
agreement with its reference that passed; an agreement below its threshold exits non-zero, JSON
written. inference.py, export.py, vista3d.py and ensemble.py at their smallest settings are the
sections of the GPU report's CPU smoke run (`gpu_report_smoke`), read here, not run twice."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, SHARED_DATA

_spec = importlib.util.spec_from_file_location("benchmarks_common",
                                               REPO / "benchmarks" / "common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

# Each benchmark run here at its smallest setting (seconds, not minutes; `TRAINED` adds the
# trained checkpoints) and the sides it compares.
SMALLEST = {
    "evaluate": (["--tile", "1", "--spacing", "6"], {"monai", "ctseg"}),
    "air": (["--spacing", "6", "--roi", "32", "--region", "neck"], {"all windows", "skip_air"}),
    "training": (["--tile", "1", "--no-loaders", "--skip-eval", "--processes"],
                 {"train.py train=false test=true", "predict.py"}),
    "dataset_scale": (["--subjects", "2", "--scale", "0.0625"],
                      {"check", "prepare", "cache 1.5 mm", "cache 3 mm"}),
    "startup": (["--subjects", "20"], {"command", "stages"}),
}
# The benchmarks without a separate write time (their span includes writing, or nothing is
# written).
WRITING_IN_SPAN = {"training", "dataset_scale", "startup"}
# The benchmarks the GPU report's smoke run ran at their smallest settings: its section and the
# sides they compare.
REPORTED = {
    "inference": ("predict_1.5mm", {"monai", "ctseg"}),
    "export": ("export", {"monai, 6 mm", "fp32, 6 mm", "fp32 channels-last, 6 mm"}),
    "ensemble": ("ensemble", {"one", "ensemble", "tta"}),
    "vista3d": ("vista3d", {"session small:grid:float32", "fresh small:grid"}),
}
SIDES = {name: sides for name, (_, sides) in {**SMALLEST, **REPORTED}.items()}
# The options naming the trained checkpoints (the session's `ensemble_members`).
TRAINED = {"training": lambda members: ["--ckpt", str(members[0])]}


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory, ensemble_members: list[Path],
            gpu_report_smoke: Path) -> dict[str, dict]:
    """Every benchmark at its smallest setting, one repeat: those of `SMALLEST` run at the same
    time (each in one thread: the figures are not compared, only their shape), those of
    `REPORTED` read from the GPU report's smoke run; its JSON report."""
    tmp = tmp_path_factory.mktemp("benchmarks")
    env = {**os.environ, "CTSEG_SHARED_DATA": str(SHARED_DATA), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                       os.environ.get("PYTHONPATH")]))}
    running = {}
    for name, (options, _) in SMALLEST.items():
        trained = TRAINED[name](ensemble_members) if name in TRAINED else []
        argv = [sys.executable, f"benchmarks/{name}.py", *options, *trained, "--repeats", "1",
                "--out", str(tmp / f"{name}.json")]
        running[name] = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True)
    out = {name: json.loads((gpu_report_smoke / "sections" / f"{section}.json").read_text())
           for name, (section, _) in REPORTED.items()}
    for name, process in running.items():
        output = process.communicate()[0]
        assert process.returncode == 0, f"{name} failed:\n{output[-4000:]}"
        data = json.loads((tmp / f"{name}.json").read_text())
        # training.py reports its DataLoaders beside the protocol's comparison of whole commands.
        out[name] = data["processes"] if name == "training" else data
    return out


@pytest.mark.parametrize("name", SIDES)
def test_benchmark_follows_the_protocol(reports: dict[str, dict], name: str) -> None:
    """Both sides timed over the same span, one run per repeat, peak RSS recorded; every
    agreement passed its threshold."""
    report = reports[name]
    assert report["benchmark"].split()[0] == name and report["repeats"] == 1 and report["span"]
    assert set(report["sides"]) >= SIDES[name]
    whole = report["span"] == "command start -> command exit (whole process)"
    assert whole == (name == "training")
    for side in report["sides"].values():
        assert side["seconds"] > 0 and len(side["runs"]) == report["repeats"]
        # Writing is timed apart from the span, except where the span is the whole command or
        # writing is the work measured.
        assert (side["write_seconds"] is None) if name in WRITING_IN_SPAN \
            else side["write_seconds"] >= 0
        assert side["peak_rss_mb"] > 100 and side["peak_gpu_mb"] is None
    assert report["agreement"]
    for check in report["agreement"].values():
        assert check["passed"] and check["value"] >= check["threshold"], check
    assert report["machine"]["cores"] >= 1


def test_the_ensemble_checks_fail_for_an_ensemble_of_its_first_member_or_tta_without_mirrors(
        reports: dict[str, dict]) -> None:
    """Distinct trained members and a reference per variant: the first member alone (what an
    ensemble that ignored the others, or a TTA that dropped its mirrored passes, would predict)
    scores below each threshold, so the checks can fail."""
    report = reports["ensemble"]
    controls = report["setting"]["controls"]
    assert set(controls) == {"one vs ensemble reference", "one vs tta reference"}
    for variant in ("ensemble", "tta"):
        threshold = report["agreement"][f"{variant} vs reference"]["threshold"]
        assert threshold >= 0.999
        assert controls[f"one vs {variant} reference"] < threshold, controls


def test_the_test_stage_and_predict_agree_on_a_trained_checkpoint(reports: dict[str, dict]
                                                                  ) -> None:
    """Both mean Dice values of the trained checkpoint are far from a random network's ~0, within
    0.005 (measured: 0.1438 both, on a phantom held out from its training)."""
    dice = reports["training"]["setting"]["mean_dice"]
    assert min(dice.values()) > 0.1, dice
    assert abs(dice["train.py train=false test=true"] - dice["predict.py"]) <= 0.005, dice


def test_dataset_scale_projects_what_it_measured(reports: dict[str, dict]) -> None:
    """The projection to the download's 1,228 subjects is the measured seconds per CT voxel
    times the simulated mean subject's voxels, divided by the cores; the bytes per voxel are
    those written; each goal's verdict is its figure against the goal."""
    report = reports["dataset_scale"]
    setting, stages = report["setting"], report["projection"]["stages"]
    assert setting["subjects"] == 2 and set(stages) == SIDES["dataset_scale"]
    # 32 x 32 x 16-50 voxels (a real CT's 512 x 512 x 200-800 at scale 1/16)
    assert 32 * 32 * 16 <= setting["mean_voxels"] <= 32 * 32 * 50
    assert 32 * 32 * 16 <= setting["expected_voxels"] <= 32 * 32 * 50
    per_voxel = {name: side["seconds"] / (setting["mean_voxels"] * 2)
                 for name, side in report["sides"].items()}
    for name, stage in stages.items():
        side = report["sides"][name]
        assert stage["seconds_per_subject"] == pytest.approx(side["seconds"] / 2)
        for cores in (2, 16, 64):
            assert stage["hours"][str(cores)] == pytest.approx(
                per_voxel[name] * setting["expected_voxels"] * 1228 / cores / 3600)
            assert stage["memory_gib"][str(cores)] == pytest.approx(
                cores * side["peak_rss_mb"] / 1024)
        if name != "check":
            assert stage["bytes_per_voxel"] == pytest.approx(side["bytes"] / side["voxels"])
    # the image and its label map: more than one byte per cached voxel
    worst = max(stages[f"cache {s} mm"]["bytes_per_voxel"] for s in ("1.5", "3"))
    assert worst > 1
    hours = stages["prepare"]["hours"]["16"] + stages["cache 1.5 mm"]["hours"]["16"]
    goals = list(report["projection"]["goals"].values())
    assert [g["met"] for g in goals] == [hours <= 2, worst <= 3], goals


def test_skip_air_skips_windows_in_its_smallest_setting(reports: dict[str, dict]) -> None:
    """At the smallest setting the skip_air side computes fewer windows than the grid holds, so
    the comparison compares two different runs."""
    windows = reports["air"]["sides"]["skip_air"]["windows"]
    assert 0 < windows["computed"] < windows["grid"], windows
    assert "windows" not in reports["air"]["sides"]["all windows"]


def test_disagreement_exits_non_zero_after_writing(tmp_path: Path) -> None:
    """An agreement below its threshold: the JSON is written, then the exit names the check."""
    checks = {"ctseg vs MONAI": common.agreement("share of voxels with equal labels", 0.9, 0.999),
              "other": common.agreement("share of voxels with equal labels", 1.0, 0.999)}
    assert not checks["ctseg vs MONAI"]["passed"] and checks["other"]["passed"]
    out = tmp_path / "report.json"
    with pytest.raises(SystemExit) as raised:
        common.finish({"agreement": checks}, out)
    message = str(raised.value.code)
    assert message.startswith("agreement below threshold: ctseg vs MONAI")
    assert "0.9 < 0.999" in message and "other" not in message and "\n" not in message
    assert json.loads(out.read_text())["agreement"] == checks
    common.finish({"agreement": {"other": checks["other"]}}, None)  # all passed: returns


def test_startup_reports_where_its_seconds_go(reports: dict[str, dict]) -> None:
    """The start-up benchmark's stages are the DataModule's, in order, and sum to its side's
    seconds; the command it timed opened no NIfTI file."""
    report = reports["startup"]
    assert report["setting"] == {"subjects": 20}
    stages = report["sides"]["stages"]["stages"]
    assert list(stages) == ["imports, config, DataModule", "prepare_data", "setup",
                            "first batch"]
    assert sum(stages.values()) == pytest.approx(report["sides"]["stages"]["seconds"])
    assert report["sides"]["command"]["nifti_opened"] == 0
