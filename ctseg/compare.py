"""`python -m ctseg.compare <run or sweep folders...> [--out DIR]`: compare finished runs
without a W&B server, from the files every ctseg run folder holds (checkpoints/config.yaml,
.hydra/overrides.yaml, csv/*/metrics.csv): a Markdown and a CSV table sorted by the optimized
metric, the overrides that differ between runs as columns, per-structure Dice of the best run,
and a PNG of the validation curves. Runs that scored cases add statistics per config (runs
differing only in seed or data.fold are one config): mean, SD and bootstrap 95 % CI over cases,
paired Wilcoxon tests against the best config on the cases both scored (paired by case id) with
Holm's correction, and a box plot; every figure states its number of cases and runs, and a
warning line says when they are too few. The cases are the out-of-fold ones when every scored run
is a fold of a cross-validation (callbacks=cross_validation: evaluation/val/scores.csv, pooled as
`python -m ctseg.evaluate cv=` pools them), else the test split (callbacks=native_evaluation:
evaluation/scores.csv). When the runs logged to W&B (logger=wandb), the tables and the box plot
are also logged as a W&B run of their project (job type `compare`), offline when they were.

Given the output folders of interactive evaluations (`python -m ctseg.evaluate.interactive`)
instead, it writes their Dice-per-click curves side by side (`CLICK_OUTPUTS`): overall Dice after
each reported click count and the area under the curve, each with its CI, and a paired Wilcoxon
test of the per-case area against the first folder's on the cases both clicked."""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from ctseg.atomic import swapped_folder
from ctseg.data.folds import SPLITS_FILE, read_splits
from ctseg.errors import ConfigError, blamed_on, reported
from ctseg.evaluate import interactive_report, statistics
from ctseg.figures import save_png
from ctseg.logger.wandb_runs import ID_FILE

log = logging.getLogger(__name__)

CONFIG = Path("checkpoints") / "config.yaml"
OVERRIDES = Path(".hydra") / "overrides.yaml"
OUTPUTS = ("compare.md", "compare.csv", "val_curves.png")
STATISTICS_OUTPUTS = ("statistics.csv", "paired_tests.csv", "dice_per_config.png")
# The cases statistics are over, and the file of a run that holds its scores of them.
OUT_OF_FOLD, TEST = "out-of-fold", "test"
SCORE_FILES = {OUT_OF_FOLD: statistics.OUT_OF_FOLD_SCORES, TEST: statistics.TEST_SCORES}
SPLITS = Path("checkpoints") / SPLITS_FILE
HEADINGS = {
    TEST: "Statistics over test cases (evaluation/scores.csv; mean, SD and bootstrap 95 % CI over "
          "cases; runs differing only in seed or fold pooled):",
    OUT_OF_FOLD: "Statistics over out-of-fold cases (each fold's evaluation/val/scores.csv, pooled "
                 "as `python -m ctseg.evaluate cv=` pools them; mean, SD and bootstrap 95 % CI "
                 "over cases; runs: a config's folds, and seeds):",
}
# Line styles of a config's replicates in the validation curves.
LINE_STYLES = ("-", "--", ":", "-.")
# The output folder inside the first folder compared, when --out is not given.
DEFAULT_OUT = "comparison"
# The outputs of a comparison of interactive evaluations.
CLICK_OUTPUTS = ("clicks_compare.md", "clicks_compare.csv", "dice_vs_clicks.png")
# What a comparison keeps of the one it replaces: the W&B files it logged (maybe not yet synced).
KEPT = ("wandb",)
# Overrides that repeat a config (replicates) rather than change it.
REPLICATE_KEYS = ("seed", "data.fold")


@dataclass
class Run:
    """One finished run: its folder, command-line overrides, optimized metric and history."""

    folder: Path
    overrides: dict[str, str]
    metric: str
    mode: str
    rows: list[dict[str, str]] = field(default_factory=list)
    fold: int | None = None

    def curve(self, key: str) -> list[tuple[int, float]]:
        """(epoch, value) of every logged `key`."""
        return [(int(float(r["epoch"])), float(r[key])) for r in self.rows
                if r.get(key) not in (None, "") and r.get("epoch") not in (None, "")]

    @property
    def best(self) -> float:
        """Best logged value of the optimized metric (NaN when never logged)."""
        values = [v for _, v in self.curve(self.metric)]
        if not values:
            return math.nan
        return max(values) if self.mode == "max" else min(values)

    def config(self, keys: Sequence[str]) -> str:
        """The run's config named by its values of `keys` (the overrides that differ between
        the runs compared, seed and fold left out: those repeat a config)."""
        return " ".join(f"{k}={self.overrides.get(k, '')}" for k in keys
                        if k not in REPLICATE_KEYS) or "(defaults)"

    def replicate(self) -> str:
        """The run among its config's replicates: "fold 0 (17 val cases), seed 1", or "" for
        neither."""
        folds = self.folds()
        parts = [] if self.fold is None else [f"fold {self.fold}" + (
            f" ({len(folds[self.fold]['val'])} val cases)" if self.fold < len(folds) else "")]
        if "seed" in self.overrides:
            parts.append(f"seed {self.overrides['seed']}")
        return ", ".join(parts)

    def folds(self) -> list[dict[str, list[str]]]:
        """The folds of the cross-validation the run is a fold of (its splits_final.json), or
        none."""
        return read_splits(self.folder / SPLITS) if (self.folder / SPLITS).is_file() else []

    def last(self, prefix: str) -> dict[str, float]:
        """Last logged value of every metric starting with `prefix`."""
        found: dict[str, float] = {}
        for row in self.rows:
            for key, value in row.items():
                if key.startswith(prefix) and value not in (None, ""):
                    found[key.removeprefix(prefix)] = float(value)
        return found


def _metrics_rows(folder: Path) -> list[dict[str, str]]:
    """Rows of the run's CSV logger files (all versions, in order)."""
    rows: list[dict[str, str]] = []
    for path in sorted(folder.glob("csv/version_*/metrics.csv")):
        with path.open(newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def load_run(folder: Path) -> Run | None:
    """The run in `folder`, or None when it has no logged validation yet."""
    with blamed_on(folder / CONFIG, "cannot read the run's config (YAML)"):
        cfg = OmegaConf.load(folder / CONFIG)
    overrides = {}
    if (folder / OVERRIDES).is_file():
        with blamed_on(folder / OVERRIDES, "cannot read the run's overrides (YAML list)"):
            for item in OmegaConf.load(folder / OVERRIDES):
                key, _, value = str(item).partition("=")
                overrides[key.lstrip("+~")] = value
    metric = str(cfg.get("optimized_metric") or "val/mean_dice")
    mode = "min" if "loss" in metric else "max"
    fold = OmegaConf.select(cfg, "data.fold", default=None, throw_on_resolution_failure=False)
    run = Run(folder, overrides, metric, mode, _metrics_rows(folder),
              None if fold is None else int(fold))
    with blamed_on(folder / "csv", "a metrics.csv value is not a number"):
        return run if run.curve(metric) else None


def find_runs(folders: Sequence[str | Path]) -> list[Run]:
    """Every finished run under `folders` (a run, a multirun or any folder holding runs);
    ConfigError naming the folders without one."""
    runs, empty = [], []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise ConfigError(f"{folder}: no such folder")
        found = [load_run(c.parent.parent) for c in sorted(folder.rglob(str(CONFIG)))]
        finished = [r for r in found if r is not None]
        if not finished:
            empty.append(f"{folder} ({len(found)} run folders, none with a logged validation "
                         "metric in csv/*/metrics.csv)" if found else
                         f"{folder} (no run folder: none holds {CONFIG})")
        runs += finished
    if empty:
        raise ConfigError("no finished ctseg run in " + "; ".join(empty) + "; compare needs "
                          "runs trained with the csv logger (logger=csv or many) that validated "
                          "at least once")
    return sorted(runs, key=lambda r: -r.best if r.mode == "max" else r.best)


def varying(runs: Sequence[Run]) -> list[str]:
    """Override keys whose values differ between runs (missing counts as different)."""
    keys = sorted({k for r in runs for k in r.overrides})
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]


def _name(run: Run, root: Path) -> str:
    """The run's folder relative to `root` when inside it."""
    try:
        return str(run.folder.relative_to(root)) or run.folder.name
    except ValueError:
        return str(run.folder)


def table_rows(runs: Sequence[Run], root: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison: run, metric, test mean Dice, epochs, overrides."""
    keys = varying(runs)
    metric = runs[0].metric
    header = ["rank", "run", f"best {metric}", "test/mean_dice", "epochs", *keys]
    rows = []
    for rank, run in enumerate(runs, start=1):
        test = run.last("test/").get("mean_dice")
        epochs = max((e for e, _ in run.curve(metric)), default=-1) + 1
        rows.append([str(rank), _name(run, root), f"{run.best:.4f}",
                     "" if test is None else f"{test:.4f}", str(epochs),
                     *(run.overrides.get(k, "") for k in keys)])
    return header, rows


def markdown(runs: Sequence[Run], root: Path) -> str:
    """The comparison and the best run's per-structure Dice as Markdown."""
    header, rows = table_rows(runs, root)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    best = runs[0]
    dice = best.last("test/dice/") or best.last("val/dice/")
    stage = "test" if best.last("test/dice/") else "val"
    if dice:
        lines += ["", f"Per-structure {stage} Dice of the best run ({_name(best, root)}):", "",
                  "| structure | Dice |", "|---|---:|"]
        lines += [f"| {name} | {value:.4f} |" for name, value in
                  sorted(dice.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines) + "\n"


def config_colours(configs: Sequence[str]) -> dict[str, Any]:
    """One colour per config, the same in every figure of a comparison (tab10, by name)."""
    palette = colormaps["tab10"]
    return {config: palette(i % palette.N) for i, config in enumerate(sorted(set(configs)))}


def curves_figure(runs: Sequence[Run], root: Path) -> Figure:
    """Validation curves of the optimized metric, one line per run: a colour per config, a line
    style per replicate (fold, seed); the title states the runs and configs."""
    keys = varying(runs)
    configs: dict[str, list[Run]] = {}
    for run in runs:
        configs.setdefault(run.config(keys), []).append(run)
    colours = config_colours(list(configs))
    figure = Figure(figsize=(8, 5))
    axes = figure.add_subplot()
    for config, members in configs.items():
        members.sort(key=lambda r: (-1 if r.fold is None else r.fold, r.overrides.get("seed", "")))
        for i, run in enumerate(members):
            epochs, values = zip(*run.curve(run.metric), strict=True)
            who = run.replicate() or (_name(run, root) if len(members) > 1 else "")
            axes.plot(epochs, values, marker="os^Dv"[i % 5], linestyle=LINE_STYLES[i % 4],
                      color=colours[config], label=f"{config}: {who}" if who else config)
    axes.set_xlabel("epoch")
    axes.set_ylabel(f"{runs[0].metric} (each run's validation cases)")
    axes.set_title(f"Validation {runs[0].metric} per epoch: {len(runs)} runs of "
                   f"{len(configs)} configs")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", title="config: replicate", title_fontsize="small")
    return figure


def names_root(folders: Sequence[str | Path]) -> Path:
    """The folder run names are given relative to: the one folder compared, else `/`."""
    return Path(folders[0]) if len(folders) == 1 else Path("/")


@dataclass
class Statistics:
    """A comparison's statistics: the cases they are over (`source`), per config and structure
    the summary rows, the paired tests against the best config, each config's per-case overall
    Dice (ranked, best first) and runs, and the warning lines about them."""

    source: str
    summary: list[dict[str, Any]]
    paired: list[dict[str, Any]]
    boxes: dict[str, list[float]]
    runs: dict[str, int]
    warnings: list[str]


def scored_configs(runs: Sequence[Run]
                   ) -> tuple[str, dict[str, list[tuple[Run, list[dict[str, Any]]]]], list[str]]:
    """Which cases the statistics are over, each config's runs with their score rows, and
    warnings: the out-of-fold cases when every run that scored cases is a fold of a
    cross-validation, else the test split (runs without test scores left out, with a warning)."""
    has = {source: [r for r in runs if (r.folder / path).is_file()]
           for source, path in SCORE_FILES.items()}
    scored = {r.folder for found in has.values() for r in found}
    source = OUT_OF_FOLD if scored and len(has[OUT_OF_FOLD]) == len(scored) else TEST
    warnings = []
    if source == TEST and has[OUT_OF_FOLD]:
        warnings.append(f"warning: {len(has[OUT_OF_FOLD])} of the {len(scored)} runs that scored "
                        "cases are folds of a cross-validation and the others are not: all are "
                        f"compared on their test split ({SCORE_FILES[TEST]})")
    left = sorted(str(folder) for folder in scored - {r.folder for r in has[source]})
    if left:
        warnings.append(f"warning: {len(left)} runs have no {SCORE_FILES[source]} and are left "
                        f"out of the statistics: {', '.join(left)}")
    keys = varying(runs)
    tables: dict[str, list[tuple[Run, list[dict[str, Any]]]]] = {}
    for run in has[source]:
        tables.setdefault(run.config(keys), []).append(
            (run, statistics.read_scores(run.folder / SCORE_FILES[source])))
    return source, tables, warnings


def unscored_folds(config: str, members: Sequence[Run], cases: set[str]) -> str | None:
    """A warning line when the out-of-fold `cases` of a config's fold runs are not all the
    subjects its folds split (a fold missing or unscored), else None."""
    pool = {case for run in members for fold in run.folds() for case in fold["val"]}
    if not pool or cases >= pool:
        return None
    return (f"warning: {config}: out-of-fold scores of {len(cases & pool)} of the {len(pool)} "
            f"subjects its folds split ({len(pool - cases)} unscored: a fold missing or "
            "unfinished); its statistics are over the scored ones")


def paired_against(best: str, other: str, tables: dict[str, statistics.Table],
                   warnings: list[str]) -> list[dict[str, Any]]:
    """The paired tests of config `other` against `best` on the cases both scored; a warning
    appended when they scored different cases, and no test when none in both."""
    first = set(statistics.per_case(tables[best], "dice"))
    second = set(statistics.per_case(tables[other], "dice"))
    if first != second:
        warnings.append(f"warning: {best} and {other} scored different cases ({len(first)} and "
                        f"{len(second)}, {len(first & second)} in both): "
                        + ("the paired tests use the cases in both" if first & second else
                           "no paired test")
                        + "; compare configs scored on the same subjects (cross-validations: "
                        "folds of the same train + val subjects)")
    if not first & second:
        return []
    return statistics.paired_tests(tables[best], tables[other])


def config_statistics(runs: Sequence[Run], seed: int = 0) -> Statistics | None:
    """Per config and structure the description of Dice and NSD over cases (with the number of
    runs and the SD of their overall means), the paired tests of every config against the best,
    each config's per-case overall Dice, and the warnings about them; None without scores."""
    source, scored, warnings = scored_configs(runs)
    if not scored:
        return None
    tables = {config: statistics.case_table([rows for _, rows in members])
              for config, members in scored.items()}
    summary: list[dict[str, Any]] = []
    for config, members in scored.items():
        run_means = [np.mean(list(statistics.per_case(statistics.case_table([rows]),
                                                      "dice").values())) for _, rows in members]
        for row in statistics.summary_rows(config, tables[config], seed):
            row.update(scores=source, runs=len(members),
                       run_sd=float(np.std(run_means, ddof=1)) if len(members) > 1 else math.nan)
            summary.append(row)
        if source == OUT_OF_FOLD:
            cases = set(statistics.per_case(tables[config], "dice"))
            warning = unscored_folds(config, [run for run, _ in members], cases)
            warnings += [warning] if warning else []
    overall = {r["config"]: r for r in summary if r["structure"] == statistics.OVERALL}
    ranked = sorted(overall, key=lambda c: -overall[c]["dice_mean"])
    runs_of = {config: len(members) for config, members in scored.items()}
    paired = [{"config": other, "against": ranked[0], "scores": source,
               "runs": runs_of[other], "against_runs": runs_of[ranked[0]], **row}
              for other in ranked[1:]
              for row in paired_against(ranked[0], other, tables, warnings)]
    pairs = [p["n"] for p in paired if p["structure"] == statistics.OVERALL]
    few = statistics.few_cases({c: overall[c]["dice_n"] for c in ranked},
                               min(pairs) if pairs else None)
    warnings += [few] if few else []
    boxes = {c: list(statistics.per_case(tables[c], "dice").values()) for c in ranked}
    return Statistics(source, summary, paired, boxes, {c: runs_of[c] for c in ranked}, warnings)


def statistics_markdown(stats: Statistics) -> str:
    """The overall statistics per config, the structures where a config differs from the best
    significantly, and the warnings, as Markdown."""
    lines = ["", HEADINGS[stats.source], "",
             "| config | runs | cases | Dice mean | Dice SD | Dice 95 % CI | NSD mean | "
             "NSD 95 % CI | SD over runs |", "|---|---:|---:|---:|---:|---|---:|---|---:|"]
    for r in stats.summary:
        if r["structure"] == statistics.OVERALL:
            lines.append(f"| {r['config']} | {r['runs']} | {r['dice_n']} | {r['dice_mean']:.4f} "
                         f"| {r['dice_sd']:.4f} | {r['dice_ci_low']:.4f}-{r['dice_ci_high']:.4f} "
                         f"| {r['nsd_mean']:.4f} | {r['nsd_ci_low']:.4f}-{r['nsd_ci_high']:.4f} "
                         f"| {r['run_sd']:.4f} |")
    for config in dict.fromkeys(p["config"] for p in stats.paired):
        rows = [p for p in stats.paired if p["config"] == config]
        overall = rows[0]
        significant = [p["structure"] for p in rows[1:] if p["significant"]]
        lines += ["", f"{config} vs the best, {overall['against']}: overall Dice difference "
                  f"{overall['mean_difference']:+.4f} (Wilcoxon p = {overall['p']:.3g}, "
                  f"{overall['n']} {stats.source} cases paired by case id; "
                  f"{overall['runs']} and {overall['against_runs']} runs); structures that "
                  f"differ (Holm-adjusted p < {statistics.ALPHA}): "
                  f"{', '.join(significant) or 'none'}"]
    if stats.warnings:
        lines += ["", *stats.warnings]
    return "\n".join(lines) + "\n"


def dice_figure(stats: Statistics) -> Figure:
    """Per-case overall Dice of each config as a box plot with its cases as points, a colour per
    config; the tick labels state each config's cases and runs, the title which cases."""
    configs = list(stats.boxes)
    colours = config_colours(configs)
    figure = Figure(figsize=(max(5.5, 2.2 * len(configs)), 5))
    axes = figure.add_subplot()
    boxes = axes.boxplot(list(stats.boxes.values()), patch_artist=True, showfliers=False)
    for i, (config, box) in enumerate(zip(configs, boxes["boxes"], strict=True), start=1):
        box.set(facecolor=colours[config], alpha=0.35)
        values = stats.boxes[config]
        spread = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
        axes.plot(i + spread, values, "o", color=colours[config], markersize=3)
    axes.set_xticks(range(1, len(configs) + 1),
                    [f"{c}\n{len(stats.boxes[c])} cases, {stats.runs[c]} runs" for c in configs],
                    rotation=20, ha="right", fontsize="small")
    axes.set_ylabel("per-case Dice (mean over structures)")
    axes.set_title(f"Per-case Dice over {stats.source} cases")
    axes.grid(alpha=0.3, axis="y")
    return figure


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of dicts as CSV text."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def check_out(out: Path) -> None:
    """ConfigError when folder `out` holds run folders: a comparison replaces its folder whole."""
    held = next(out.rglob(str(CONFIG)), None) if out.is_dir() else None
    if held is not None:
        raise ConfigError(f"--out {out}: holds run folders ({held.parent.parent}); a comparison "
                          "replaces its output folder as a whole, so give it a folder of its own "
                          f"(the default: <first folder>/{DEFAULT_OUT})")


def compare(folders: Sequence[str | Path], out: Path, seed: int = 0
            ) -> tuple[list[Run], Statistics | None]:
    """Write compare.md, compare.csv and val_curves.png for the runs under `folders`, and the
    statistics files when runs scored cases (bootstrap seeded with `seed`), as the whole content
    of folder `out` (an earlier comparison there is replaced, its W&B files kept); the runs and
    the statistics."""
    check_out(out)
    runs = find_runs(folders)
    root = names_root(folders)
    header, rows = table_rows(runs, root)
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    text = markdown(runs, root)
    stats = config_statistics(runs, seed)
    if stats is not None:
        text += statistics_markdown(stats)
    else:
        log.info("no run wrote %s (train with callbacks=native_evaluation, or "
                 "callbacks=cross_validation): no statistics", SCORE_FILES[TEST])
    with swapped_folder(out, own=OUTPUTS[0], keep=KEPT) as staging:
        (staging / OUTPUTS[0]).write_text(text)
        (staging / OUTPUTS[1]).write_text(buffer.getvalue())
        save_png(curves_figure(runs, root), staging / OUTPUTS[2])
        if stats is not None:
            (staging / STATISTICS_OUTPUTS[0]).write_text(_csv(stats.summary))
            if stats.paired:
                (staging / STATISTICS_OUTPUTS[1]).write_text(_csv(stats.paired))
            save_png(dice_figure(stats), staging / STATISTICS_OUTPUTS[2])
    return runs, stats


def compare_clicks(folders: Sequence[str | Path], out: Path, seed: int = 0) -> int:
    """Write CLICK_OUTPUTS for the interactive evaluations in `folders` (named by folder) as the
    whole content of folder `out`; the number of evaluations."""
    check_out(out)
    evaluations = [interactive_report.load_evaluation(Path(f), Path(f).name or str(f))
                   for f in folders]
    rows = interactive_report.comparison_rows(evaluations, seed)
    text = interactive_report.comparison_markdown(evaluations, rows)
    with swapped_folder(out, own=CLICK_OUTPUTS[0]) as staging:
        (staging / CLICK_OUTPUTS[0]).write_text(text)
        (staging / CLICK_OUTPUTS[1]).write_text(_csv(rows))
        save_png(interactive_report.comparison_figure(evaluations), staging / CLICK_OUTPUTS[2])
    return len(evaluations)


def wandb_settings(runs: Sequence[Run]) -> dict[str, Any] | None:
    """Project and offline flag of the W&B logger of the first run that logged to W&B (its
    folder holds the run id file), None when none did."""
    for run in runs:
        if (run.folder / ID_FILE).is_file():
            cfg = OmegaConf.load(run.folder / CONFIG)
            return {"project": str(OmegaConf.select(cfg, "logger.wandb.project",
                                                    default="ctseg")),
                    "offline": bool(OmegaConf.select(cfg, "logger.wandb.offline", default=True))}
    return None


def _wandb_table(text: str) -> Any:
    """A W&B table of CSV text."""
    import wandb

    rows = list(csv.reader(io.StringIO(text)))
    return wandb.Table(columns=rows[0], data=rows[1:])


def log_to_wandb(out: Path, settings: dict[str, Any]) -> str:
    """Log the comparison written in `out` (its tables and box plot) as one W&B run of
    `settings`' project, job type `compare`, its files under `out`/wandb; the run's id."""
    import wandb

    tables = {"compare/runs": OUTPUTS[1], "compare/statistics": STATISTICS_OUTPUTS[0],
              "compare/paired_tests": STATISTICS_OUTPUTS[1]}
    run = wandb.init(project=settings["project"], dir=str(out), job_type="compare",
                     name=f"compare/{out.resolve().name}",
                     mode="offline" if settings["offline"] else "online")
    try:
        logged: dict[str, Any] = {key: _wandb_table((out / name).read_text())
                                  for key, name in tables.items() if (out / name).is_file()}
        if (out / STATISTICS_OUTPUTS[2]).is_file():
            logged["compare/dice_per_config"] = wandb.Image(str(out / STATISTICS_OUTPUTS[2]))
        run.log(logged)
    finally:
        run.finish()
    return run.id


def statistics_line(stats: Statistics) -> str:
    """What the statistics are over, as printed: `statistics of 2 configs over 34 out-of-fold
    cases each; ` (`over 34, 30 ...` when the configs scored different numbers of cases)."""
    counts = list(dict.fromkeys(len(values) for values in stats.boxes.values()))
    each = " each" if len(stats.boxes) > 1 and len(counts) == 1 else ""
    return (f"statistics of {len(stats.boxes)} configs over {', '.join(map(str, counts))} "
            f"{stats.source} cases{each}; ")


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the folders, compare, print the Markdown table."""
    parser = argparse.ArgumentParser(
        prog="python -m ctseg.compare", description=__doc__.splitlines()[0].split(": ", 1)[-1])
    parser.add_argument("folders", nargs="+", help="run folders, multirun folders, or folders "
                        "holding them (searched recursively); or the output folders of "
                        "interactive evaluations (python -m ctseg.evaluate.interactive)")
    parser.add_argument("--out", type=Path, help="the folder the outputs go to, replaced as a "
                        f"whole (default: <first folder>/{DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap confidence "
                        "intervals (default: 0)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the comparison to "
                        "W&B even when the runs logged there")
    args = parser.parse_args(argv)
    out = args.out or Path(args.folders[0]) / DEFAULT_OUT
    clicked = [interactive_report.is_evaluation(Path(f)) for f in args.folders]
    if any(clicked):
        with reported("python -m ctseg.compare"):
            if not all(clicked):
                raise ConfigError("give either interactive evaluations (folders with "
                                  f"{interactive_report.OUTPUTS[1]} and "
                                  f"{interactive_report.CLICKS_FOLDER}/) or runs, not both: "
                                  + ", ".join(f for f, c in zip(args.folders, clicked,
                                                                strict=True) if not c)
                                  + " is no interactive evaluation")
            count = compare_clicks(args.folders, out, args.seed)
        print((out / CLICK_OUTPUTS[0]).read_text())
        print(f"{count} interactive evaluations; written "
              + ", ".join(str(out / o) for o in CLICK_OUTPUTS))
        return
    with reported("python -m ctseg.compare"):
        runs, stats = compare(args.folders, out, args.seed)
    print((out / OUTPUTS[0]).read_text())
    written = [out / o for o in (*OUTPUTS, *STATISTICS_OUTPUTS) if (out / o).is_file()]
    print(f"{len(runs)} runs; {'' if stats is None else statistics_line(stats)}"
          f"written {', '.join(map(str, written))}")
    settings = None if args.no_wandb else wandb_settings(runs)
    if settings is not None:
        identifier = log_to_wandb(out, settings)
        where = (f"offline in {out / 'wandb'} (upload: wandb sync)" if settings["offline"]
                 else "online")
        print(f"W&B: tables logged to run {identifier} of project {settings['project']}, {where}")


if __name__ == "__main__":
    main(sys.argv[1:])
