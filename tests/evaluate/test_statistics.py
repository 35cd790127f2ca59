"""Statistics of comparisons on hand-made score tables: values equal scipy's (bootstrap, Wilcoxon)
and Holm's correction as written in its paper; compare pools seeds and folds into configs and
writes the statistics files."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import wandb_run
from scipy import stats

from ctseg.compare import compare, main
from ctseg.evaluate import statistics
from ctseg.evaluate.statistics import case_table, describe, holm, paired_tests, per_case

STRUCTURES = ("liver", "spleen", "kidney_left")


def scores(seed: int, shift: dict[str, float], cases: range = range(12)) -> list[dict]:
    """Hand-made per-case rows: Dice around 0.8 per structure plus `shift`, NSD 0.1 above."""
    rng = np.random.default_rng(seed)
    rows = []
    for case in cases:
        for s in STRUCTURES:
            dice = float(np.clip(0.8 + shift.get(s, 0.0) + rng.normal(0, 0.03), 0, 1))
            rows.append({"case": f"c{case:02d}", "structure": s, "dice": dice,
                         "nsd": min(1.0, dice + 0.1)})
    return rows


def test_description_equals_numpy_and_scipys_bootstrap() -> None:
    values = [0.71, 0.82, 0.79, 0.9, 0.65, 0.88, 0.77]
    described = describe(values, seed=3)
    ci = stats.bootstrap((np.array(values),), np.mean, n_resamples=statistics.RESAMPLES,
                         confidence_level=0.95, method="percentile",
                         rng=np.random.default_rng(3)).confidence_interval
    assert described["mean"] == pytest.approx(np.mean(values))
    assert described["sd"] == pytest.approx(np.std(values, ddof=1))
    assert (described["ci_low"], described["ci_high"]) == pytest.approx((ci.low, ci.high))
    assert described["ci_low"] < described["mean"] < described["ci_high"]
    assert describe(values, seed=3) == described  # seeded
    assert math.isnan(describe([0.5])["sd"]) and describe([])["n"] == 0


def test_holm_is_the_step_down_rule() -> None:
    p = [0.01, 0.04, 0.03, 0.005, math.nan]
    # sorted: 0.005 x4, 0.01 x3, 0.03 x2, 0.04 x1, each at least the one before
    assert holm(p)[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(holm(p)[4])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_paired_tests_equal_scipys_wilcoxon_and_find_the_changed_structure() -> None:
    a = case_table([scores(0, {})])
    b = case_table([scores(1, {"spleen": 0.1})])
    rows = {r["structure"]: r for r in paired_tests(a, b)}
    for structure in STRUCTURES:
        first, second = per_case(a, "dice", structure), per_case(b, "dice", structure)
        diff = [second[c] - first[c] for c in sorted(first)]
        assert rows[structure]["p"] == pytest.approx(stats.wilcoxon(diff).pvalue)
        assert rows[structure]["mean_difference"] == pytest.approx(np.mean(diff))
    assert rows["spleen"]["significant"] and rows["spleen"]["n"] == 12
    assert not rows["liver"]["significant"] and not rows["kidney_left"]["significant"]
    raw = [rows[s]["p"] for s in sorted(STRUCTURES)]
    assert [rows[s]["p_holm"] for s in sorted(STRUCTURES)] == pytest.approx(holm(raw))
    same = {r["structure"]: r for r in paired_tests(a, a)}
    assert same["liver"]["p"] == 1.0 and not same["overall"]["significant"]


def test_seeds_repeating_cases_are_averaged_folds_are_pooled() -> None:
    seeds = case_table([scores(0, {}), scores(1, {})])
    one, two = case_table([scores(0, {})]), case_table([scores(1, {})])
    key = ("c03", "liver")
    assert seeds[key]["dice"] == pytest.approx((one[key]["dice"] + two[key]["dice"]) / 2)
    folds = case_table([scores(0, {}, range(0, 6)), scores(0, {}, range(6, 12))])
    assert len(per_case(folds, "dice")) == 12


def fake_run(folder: Path, overrides: list[str], rows: list[dict] | None) -> None:
    """A finished run folder: config, overrides, one validation row, and `rows` as its
    evaluation/scores.csv."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "config.yaml").write_text("optimized_metric: val/mean_dice\n")
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / "csv" / "version_0").mkdir(parents=True)
    (folder / "csv" / "version_0" / "metrics.csv").write_text("epoch,val/mean_dice\n0,0.5\n")
    if rows is not None:
        (folder / "evaluation").mkdir()
        with (folder / "evaluation" / "scores.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["case", "class", "structure", "dice", "nsd"])
            writer.writeheader()
            writer.writerows({"class": 1, **r} for r in rows)


def test_compare_writes_statistics_per_config(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for job, (lr, seed) in enumerate([("1e-3", 1), ("1e-3", 2), ("3e-4", 1), ("3e-4", 2)]):
        shift = {"spleen": 0.1} if lr == "3e-4" else {}
        fake_run(sweep / str(job), [f"model.optimizer.lr={lr}", f"seed={seed}"],
                 scores(seed + 10 * job, shift))
    compare([sweep], tmp_path / "out", seed=0)
    with (tmp_path / "out" / "statistics.csv").open() as f:
        summary = list(csv.DictReader(f))
    overall = {r["config"]: r for r in summary if r["structure"] == "overall"}
    assert set(overall) == {"model.optimizer.lr=1e-3", "model.optimizer.lr=3e-4"}
    assert {r["runs"] for r in overall.values()} == {"2"}
    with (tmp_path / "out" / "paired_tests.csv").open() as f:
        paired = {r["structure"]: r for r in csv.DictReader(f)}
    assert paired["spleen"]["significant"] == "True" and paired["liver"]["significant"] == "False"
    assert paired["spleen"]["against"] == "model.optimizer.lr=3e-4"
    text = (tmp_path / "out" / "compare.md").read_text()
    assert "structures that differ (Holm-adjusted p < 0.05): spleen" in text
    assert (tmp_path / "out" / "dice_per_config.png").stat().st_size > 1000


def test_compare_logs_its_tables_to_wandb_when_the_runs_did(tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "sweep"
    for job, lr in enumerate(["1e-3", "3e-4"]):
        fake_run(sweep / str(job), [f"model.optimizer.lr={lr}"], scores(job, {}))
        (sweep / str(job) / "checkpoints" / "config.yaml").write_text(
            "optimized_metric: val/mean_dice\nlogger:\n  wandb:\n    project: cv_demo\n"
            "    offline: true\n")
        (sweep / str(job) / "wandb_id.txt").write_text(f"run{job}\n")
    main([str(sweep), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "of project cv_demo, offline" in printed
    files = tmp_path / "out" / "wandb"
    (statistics_json,) = files.glob("offline-run-*/files/media/table/compare/statistics_*.json")
    table = json.loads(statistics_json.read_text())
    with (tmp_path / "out" / "statistics.csv").open() as f:
        written = list(csv.reader(f))
    assert table["columns"] == written[0] and table["data"] == written[1:]
    assert list(files.glob("offline-run-*/files/media/images/compare/dice_per_config_*.png"))
    run = wandb_run(tmp_path / "out")
    assert run.project == "cv_demo" and run.job_type == "compare"
    main([str(sweep), "--out", str(tmp_path / "plain"), "--no-wandb"])
    assert not (tmp_path / "plain" / "wandb").exists()


def wandb_sweep(sweep: Path, with_scores: bool) -> None:
    """Two finished runs of two learning rates that logged to W&B offline, with per-case scores
    or without."""
    for job, lr in enumerate(["1e-3", "3e-4"]):
        fake_run(sweep / str(job), [f"model.optimizer.lr={lr}"],
                 scores(job, {}) if with_scores else None)
        (sweep / str(job) / "checkpoints" / "config.yaml").write_text(
            "optimized_metric: val/mean_dice\nlogger:\n  wandb:\n    project: cv_demo\n"
            "    offline: true\n")
        (sweep / str(job) / "wandb_id.txt").write_text(f"run{job}\n")


def test_a_comparison_into_the_folder_of_an_earlier_one_keeps_none_of_its_files(tmp_path):
    """`python -m ctseg.compare <runs> --out cmp` twice, the second time for runs without
    scores: no statistics file of the first stays, is listed as written or logged to W&B; the
    first comparison's W&B files stay."""
    wandb_sweep(tmp_path / "scored", with_scores=True)
    wandb_sweep(tmp_path / "unscored", with_scores=False)
    stats_files = ("statistics.csv", "paired_tests.csv", "dice_per_config.png")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    printed = []
    for sweep in ("scored", "unscored"):
        result = subprocess.run([sys.executable, "-m", "ctseg.compare", sweep, "--out", "cmp"],
                                cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        printed.append(result.stdout)
        if sweep == "scored":
            assert all((tmp_path / "cmp" / name).is_file() for name in stats_files)
    written = next(line for line in printed[1].splitlines() if line.startswith("2 runs;"))
    assert written == ("2 runs; written cmp/compare.md, cmp/compare.csv, cmp/val_curves.png")
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == [
        "compare.csv", "compare.md", "val_curves.png", "wandb"]
    assert "Statistics over test cases" not in (tmp_path / "cmp" / "compare.md").read_text()
    first, second = sorted((tmp_path / "cmp" / "wandb").glob("offline-run-*"))
    assert list(first.glob("files/media/table/compare/statistics_*.json"))
    assert list(second.glob("files/media/table/compare/runs_*.json"))
    assert not list(second.glob("files/media/table/compare/statistics_*.json"))
    assert not list(second.glob("files/media/images/compare/*"))


def test_the_default_output_is_a_folder_of_its_own_and_never_a_runs_folder(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for job, lr in enumerate(["1e-3", "3e-4"]):
        fake_run(sweep / str(job), [f"model.optimizer.lr={lr}"], None)
    main([str(sweep), "--no-wandb"])
    assert (sweep / "comparison" / "compare.md").is_file()
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "comparison"]
    before = sorted(str(p) for p in sweep.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        main([str(sweep), "--out", str(sweep), "--no-wandb"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --out {sweep}: holds run folders ({sweep / '0'}); a comparison replaces its "
        "output folder as a whole, so give it a folder of its own (the default: "
        "<first folder>/comparison)")
    assert sorted(str(p) for p in sweep.rglob("*")) == before
