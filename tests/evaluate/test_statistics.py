"""Statistics of comparisons on hand-made score tables: values equal scipy's (bootstrap, Wilcoxon)
and Holm's correction as written in its paper; compare pools seeds and folds into configs and
writes the statistics files."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import wandb_run
from scipy import stats

from ctseg.compare import compare, config_statistics, curves_figure, dice_figure, find_runs, main
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


def write_scores(path: Path, rows: list[dict]) -> None:
    """`rows` as a scores.csv at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case", "class", "structure", "dice", "nsd"])
        writer.writeheader()
        writer.writerows({"class": 1, **r} for r in rows)


def fake_cv(folder: Path, lr: str, pool: list[str], folds: list[list[str]],
            shift: dict[str, float], seed: int) -> dict[str, dict[str, float]]:
    """A finished cross-validation of `pool` in multirun folder `folder`, as
    callbacks=cross_validation leaves it: per fold a run folder (data.fold in its config, the
    splits in checkpoints/splits_final.json), its out-of-fold scores (evaluation/val/scores.csv)
    and its scores of the two test cases (evaluation/scores.csv); case -> structure -> the
    out-of-fold Dice written."""
    every = scores(seed, shift, range(len(pool)))
    by_case: dict[str, dict[str, float]] = {}
    for row in every:
        case = pool[int(row["case"][1:])]
        by_case.setdefault(case, {})[row["structure"]] = row["dice"]
    splits = [{"train": sorted(set(pool) - set(val)), "val": sorted(val)} for val in folds]
    for fold, val in enumerate(folds):
        run = folder / str(fold)
        fake_run(run, [f"data.fold={fold}", f"model.optimizer.lr={lr}"], None)
        (run / "checkpoints" / "config.yaml").write_text(
            f"optimized_metric: val/mean_dice\ndata:\n  fold: {fold}\n  num_folds: {len(folds)}\n")
        (run / "checkpoints" / "splits_final.json").write_text(json.dumps(splits))
        write_scores(run / "evaluation" / "val" / "scores.csv",
                     [{**r, "case": pool[int(r["case"][1:])]} for r in every
                      if pool[int(r["case"][1:])] in val])
        write_scores(run / "evaluation" / "scores.csv", scores(seed + 100 + fold, shift, range(2)))
    return by_case


POOL = [f"s{i:04d}" for i in range(12)]


def test_cross_validations_are_compared_on_their_out_of_fold_cases_paired_by_subject(
        tmp_path: Path, capsys) -> None:
    """Two 2-fold cross-validations of one pool of 12 subjects, split differently: compare's
    statistics are over the 12 out-of-fold subjects that `python -m ctseg.evaluate cv=` pools, not
    the 2 test cases, and its Wilcoxon test pairs them by subject."""
    from ctseg.evaluate.__main__ import evaluate_cv

    a = fake_cv(tmp_path / "cv_a", "1e-3", POOL, [POOL[:6], POOL[6:]], {"spleen": 0.1}, 0)
    b = fake_cv(tmp_path / "cv_b", "3e-4", POOL, [POOL[::2], POOL[1::2]], {}, 1)
    main([str(tmp_path / "cv_a"), str(tmp_path / "cv_b"), "--out", str(tmp_path / "cmp"),
          "--no-wandb"])
    printed = capsys.readouterr().out
    with (tmp_path / "cmp" / "statistics.csv").open() as f:
        overall = {r["config"]: r for r in csv.DictReader(f) if r["structure"] == "overall"}
    best, other = "model.optimizer.lr=1e-3", "model.optimizer.lr=3e-4"
    assert {c: (r["dice_n"], r["runs"]) for c, r in overall.items()} == {
        best: ("12", "2"), other: ("12", "2")}  # the 12 subjects of the pool, 2 folds
    assert {r["scores"] for r in overall.values()} == {"out-of-fold"}
    # the same per-case figures as the cross-validation's own evaluation (cv_evaluation)
    evaluate_cv(tmp_path / "cv_a", None, 3.0)
    pooled = statistics.read_scores(tmp_path / "cv_a" / "cv_evaluation" / "scores.csv")
    assert {r["case"] for r in pooled} == set(POOL)
    per_subject = {s: np.mean(list(a[s].values())) for s in POOL}
    assert float(overall[best]["dice_mean"]) == pytest.approx(np.mean(list(per_subject.values())))
    assert float(overall[best]["dice_mean"]) == pytest.approx(np.mean(
        [np.mean([r["dice"] for r in pooled if r["case"] == s]) for s in POOL]))
    with (tmp_path / "cmp" / "paired_tests.csv").open() as f:
        paired = {r["structure"]: r for r in csv.DictReader(f)}
    spleen = [b[s]["spleen"] - a[s]["spleen"] for s in POOL]
    assert paired["spleen"]["n"] == "12"
    assert float(paired["spleen"]["p"]) == pytest.approx(stats.wilcoxon(spleen).pvalue)
    assert paired["spleen"]["significant"] == "True"
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "Statistics over out-of-fold cases" in text
    assert "12 out-of-fold cases paired by case id; 2 and 2 runs" in text
    assert "warning" not in text  # 12 cases, the same subjects, every fold scored
    assert ("4 runs; statistics of 2 configs over 12 out-of-fold cases each; written "
            in printed)


def test_few_cases_or_different_subjects_are_one_warning_line_each(tmp_path: Path,
                                                                   capsys) -> None:
    """Two configs scored on 2 test cases: one line says the statistics rest on too few cases
    (and the smallest p two pairs allow); cross-validations of different subjects, or one with a
    fold unscored, are warned about, and their paired test uses only the subjects of both."""
    for job, lr in enumerate(["1e-3", "3e-4"]):
        fake_run(tmp_path / "few" / str(job), [f"model.optimizer.lr={lr}"],
                 scores(job, {}, range(2)))
    main([str(tmp_path / "few"), "--no-wandb"])
    printed = capsys.readouterr().out
    (warning,) = [line for line in printed.splitlines() if line.startswith("warning:")]
    assert warning.startswith(f"warning: fewer than {statistics.MIN_CASES} cases "
                              "(model.optimizer.lr=")
    assert "2 cases; paired: 2 cases, whose two-sided Wilcoxon p cannot go below 0.5)" in warning
    assert warning in (tmp_path / "few" / "comparison" / "compare.md").read_text()
    assert "statistics of 2 configs over 2 test cases each; written" in printed
    assert statistics.smallest_p(6) == pytest.approx(1 / 32) and statistics.smallest_p(5) > 0.05
    assert "Wilcoxon" not in statistics.few_cases({"one config": 7}, None)  # no test to warn of

    other = [*POOL[:10], "x0010", "x0011"]
    fake_cv(tmp_path / "cv_a", "1e-3", POOL, [POOL[:6], POOL[6:]], {}, 0)
    fake_cv(tmp_path / "cv_b", "3e-4", other, [other[:6], other[6:]], {"spleen": 0.1}, 1)
    shutil.rmtree(tmp_path / "cv_b" / "1" / "evaluation")  # fold 1 unfinished: no scores
    main([str(tmp_path / "cv_a"), str(tmp_path / "cv_b"), "--out", str(tmp_path / "cmp"),
          "--no-wandb"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert lines[0] == ("warning: model.optimizer.lr=3e-4: out-of-fold scores of 6 of the 12 "
                        "subjects its folds split (6 unscored: a fold missing or unfinished); its "
                        "statistics are over the scored ones")
    assert lines[1] == ("warning: model.optimizer.lr=3e-4 and model.optimizer.lr=1e-3 scored "
                        "different cases (6 and 12, 6 in both): the paired tests use the cases "
                        "in both; compare configs scored on the same subjects (cross-validations: "
                        "folds of the same train + val subjects)")
    assert lines[2].startswith("warning: fewer than 10 cases (model.optimizer.lr=3e-4: 6 cases; "
                               "paired: 6 cases")
    with (tmp_path / "cmp" / "paired_tests.csv").open() as f:
        assert next(csv.DictReader(f))["n"] == "6"


def test_the_figures_state_their_cases_runs_and_configs(tmp_path: Path) -> None:
    """val_curves.png and dice_per_config.png as matplotlib builds them: a title, the number of
    runs and cases, a colour per config shared by both figures, a legend entry per run."""
    fake_cv(tmp_path / "cv_a", "1e-3", POOL, [POOL[:7], POOL[7:]], {"spleen": 0.1}, 0)
    fake_cv(tmp_path / "cv_b", "3e-4", POOL, [POOL[::2], POOL[1::2]], {}, 1)
    runs = find_runs([tmp_path])
    curves = curves_figure(runs, tmp_path).axes[0]
    assert curves.get_title() == "Validation val/mean_dice per epoch: 4 runs of 2 configs"
    assert curves.get_xlabel() == "epoch"
    legend = {t.get_text() for t in curves.get_legend().get_texts()}
    assert legend == {"model.optimizer.lr=1e-3: fold 0 (7 val cases)",
                      "model.optimizer.lr=1e-3: fold 1 (5 val cases)",
                      "model.optimizer.lr=3e-4: fold 0 (6 val cases)",
                      "model.optimizer.lr=3e-4: fold 1 (6 val cases)"}
    colour = {line.get_label(): line.get_color() for line in curves.get_lines()}
    assert colour["model.optimizer.lr=1e-3: fold 0 (7 val cases)"] == colour[
        "model.optimizer.lr=1e-3: fold 1 (5 val cases)"] != colour[
        "model.optimizer.lr=3e-4: fold 0 (6 val cases)"]
    stats_ = config_statistics(runs)
    boxes = dice_figure(stats_).axes[0]
    assert boxes.get_title() == "Per-case Dice over out-of-fold cases"
    assert boxes.get_ylabel() == "per-case Dice (mean over structures)"
    assert [t.get_text() for t in boxes.get_xticklabels()] == [
        "model.optimizer.lr=1e-3\n12 cases, 2 runs", "model.optimizer.lr=3e-4\n12 cases, 2 runs"]
    points = [line for line in boxes.get_lines() if line.get_marker() == "o"]
    assert [len(line.get_ydata()) for line in points] == [12, 12]
    assert points[0].get_color() == colour["model.optimizer.lr=1e-3: fold 0 (7 val cases)"]
