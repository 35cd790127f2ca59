"""`python -m ctseg.compare <run or sweep folders...> [--out DIR]`: compare finished runs
without a W&B server, from the files every ctseg run folder holds (checkpoints/config.yaml,
.hydra/overrides.yaml, csv/*/metrics.csv): a Markdown and a CSV table sorted by the optimized
metric, the overrides that differ between runs as columns, per-structure Dice of the best run,
and a PNG of the validation curves. Runs that scored their test cases (callbacks=native_evaluation:
evaluation/scores.csv) add statistics per config (runs differing only in seed or data.fold are one
config): mean, SD and bootstrap 95 % CI over cases, paired Wilcoxon tests against the best config
with Holm's correction, and a box plot. When the runs logged to W&B (logger=wandb), the tables
and the box plot are also logged as a W&B run of their project (job type `compare`), offline
when they were."""

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

import matplotlib.pyplot as plt
import numpy as np
from omegaconf import OmegaConf

from ctseg.atomic import swapped_folder
from ctseg.errors import ConfigError, blamed_on, reported
from ctseg.evaluate import statistics
from ctseg.figures import save_png
from ctseg.logger.wandb_runs import ID_FILE

log = logging.getLogger(__name__)

CONFIG = Path("checkpoints") / "config.yaml"
OVERRIDES = Path(".hydra") / "overrides.yaml"
OUTPUTS = ("compare.md", "compare.csv", "val_curves.png")
STATISTICS_OUTPUTS = ("statistics.csv", "paired_tests.csv", "dice_per_config.png")
SCORES = Path("evaluation") / "scores.csv"
# The output folder inside the first folder compared, when --out is not given.
DEFAULT_OUT = "comparison"
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
    run = Run(folder, overrides, metric, mode, _metrics_rows(folder))
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


def plot_curves(runs: Sequence[Run], root: Path, path: Path) -> None:
    """Validation curves of the optimized metric, one line per run, as a PNG."""
    figure, axes = plt.subplots(figsize=(8, 5))
    for run in runs:
        epochs, values = zip(*run.curve(run.metric), strict=True)
        axes.plot(epochs, values, marker="o", label=_name(run, root))
    axes.set_xlabel("epoch")
    axes.set_ylabel(runs[0].metric)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    save_png(figure, path)


def names_root(folders: Sequence[str | Path]) -> Path:
    """The folder run names are given relative to: the one folder compared, else `/`."""
    return Path(folders[0]) if len(folders) == 1 else Path("/")


def config_tables(runs: Sequence[Run]) -> dict[str, list[list[dict[str, Any]]]]:
    """Config -> the per-case score rows of each of its runs that wrote evaluation/scores.csv."""
    tables: dict[str, list[list[dict[str, Any]]]] = {}
    keys = varying(runs)
    for run in runs:
        if (run.folder / SCORES).is_file():
            tables.setdefault(run.config(keys), []).append(
                statistics.read_scores(run.folder / SCORES))
    return tables


def config_statistics(runs: Sequence[Run], seed: int = 0
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Per config and structure the description of Dice and NSD over cases (with the number of
    runs and the SD of their overall means), the paired tests of every config against the best,
    and each config's per-case overall Dice (for the box plot); empty without scores."""
    tables = {config: (rows, statistics.case_table(rows))
              for config, rows in config_tables(runs).items()}
    summary: list[dict[str, Any]] = []
    for config, (rows, table) in tables.items():
        run_means = [np.mean(list(statistics.per_case(statistics.case_table([r]),
                                                      "dice").values())) for r in rows]
        for row in statistics.summary_rows(config, table, seed):
            row.update(runs=len(rows), run_sd=float(np.std(run_means, ddof=1))
                       if len(rows) > 1 else math.nan)
            summary.append(row)
    overall = {r["config"]: r["dice_mean"] for r in summary if r["structure"] == statistics.OVERALL}
    ranked = sorted(overall, key=lambda c: -overall[c])
    paired = [{"config": other, "against": ranked[0], **row}
              for other in ranked[1:]
              for row in statistics.paired_tests(tables[ranked[0]][1], tables[other][1])]
    boxes = {c: list(statistics.per_case(tables[c][1], "dice").values()) for c in ranked}
    return summary, paired, boxes


def statistics_markdown(summary: Sequence[dict[str, Any]], paired: Sequence[dict[str, Any]]
                        ) -> str:
    """The overall statistics per config and the structures where a config differs from the
    best significantly, as Markdown."""
    lines = ["", "Statistics over test cases (evaluation/scores.csv; mean, SD and bootstrap 95 % "
             "CI over cases; runs differing only in seed or fold pooled):", "",
             "| config | runs | cases | Dice mean | Dice SD | Dice 95 % CI | NSD mean | "
             "NSD 95 % CI | SD over runs |", "|---|---:|---:|---:|---:|---|---:|---|---:|"]
    for r in summary:
        if r["structure"] == statistics.OVERALL:
            lines.append(f"| {r['config']} | {r['runs']} | {r['dice_n']} | {r['dice_mean']:.4f} "
                         f"| {r['dice_sd']:.4f} | {r['dice_ci_low']:.4f}-{r['dice_ci_high']:.4f} "
                         f"| {r['nsd_mean']:.4f} | {r['nsd_ci_low']:.4f}-{r['nsd_ci_high']:.4f} "
                         f"| {r['run_sd']:.4f} |")
    for against in sorted({p["against"] for p in paired}):
        for config in sorted({p["config"] for p in paired if p["against"] == against}):
            rows = [p for p in paired if p["config"] == config and p["against"] == against]
            overall = rows[0]
            significant = [p["structure"] for p in rows[1:] if p["significant"]]
            lines += ["", f"{config} vs the best, {against}: overall Dice difference "
                      f"{overall['mean_difference']:+.4f} (Wilcoxon p = {overall['p']:.3g}, "
                      f"{overall['n']} cases); structures that differ (Holm-adjusted p < "
                      f"{statistics.ALPHA}): {', '.join(significant) or 'none'}"]
    return "\n".join(lines) + "\n"


def plot_boxes(boxes: dict[str, list[float]], path: Path) -> None:
    """Per-case overall Dice of each config as box plots, as a PNG."""
    figure, axes = plt.subplots(figsize=(max(4, 1.6 * len(boxes)), 5))
    axes.boxplot(list(boxes.values()))
    axes.set_xticks(range(1, len(boxes) + 1), list(boxes), rotation=20, ha="right",
                    fontsize="small")
    axes.set_ylabel("per-case mean Dice")
    axes.grid(alpha=0.3, axis="y")
    save_png(figure, path)


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


def compare(folders: Sequence[str | Path], out: Path, seed: int = 0) -> list[Run]:
    """Write compare.md, compare.csv and val_curves.png for the runs under `folders`, and the
    statistics files when runs wrote evaluation/scores.csv (bootstrap seeded with `seed`), as
    the whole content of folder `out` (an earlier comparison there is replaced, its W&B files
    kept)."""
    check_out(out)
    runs = find_runs(folders)
    root = names_root(folders)
    header, rows = table_rows(runs, root)
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    text = markdown(runs, root)
    summary, paired, boxes = config_statistics(runs, seed)
    if summary:
        text += statistics_markdown(summary, paired)
    else:
        log.info("no run wrote %s (train with callbacks=native_evaluation): no statistics", SCORES)
    with swapped_folder(out, own=OUTPUTS[0], keep=KEPT) as staging:
        (staging / OUTPUTS[0]).write_text(text)
        (staging / OUTPUTS[1]).write_text(buffer.getvalue())
        plot_curves(runs, root, staging / OUTPUTS[2])
        if summary:
            (staging / STATISTICS_OUTPUTS[0]).write_text(_csv(summary))
            if paired:
                (staging / STATISTICS_OUTPUTS[1]).write_text(_csv(paired))
            plot_boxes(boxes, staging / STATISTICS_OUTPUTS[2])
    return runs


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


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the folders, compare, print the Markdown table."""
    parser = argparse.ArgumentParser(
        prog="python -m ctseg.compare", description=__doc__.splitlines()[0].split(": ", 1)[-1])
    parser.add_argument("folders", nargs="+", help="run folders, multirun folders, or folders "
                        "holding them (searched recursively)")
    parser.add_argument("--out", type=Path, help="the folder the outputs go to, replaced as a "
                        f"whole (default: <first folder>/{DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap confidence "
                        "intervals (default: 0)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the comparison to "
                        "W&B even when the runs logged there")
    args = parser.parse_args(argv)
    out = args.out or Path(args.folders[0]) / DEFAULT_OUT
    with reported("python -m ctseg.compare"):
        runs = compare(args.folders, out, args.seed)
    print((out / OUTPUTS[0]).read_text())
    written = [out / o for o in (*OUTPUTS, *STATISTICS_OUTPUTS) if (out / o).is_file()]
    print(f"{len(runs)} runs; written {', '.join(map(str, written))}")
    settings = None if args.no_wandb else wandb_settings(runs)
    if settings is not None:
        identifier = log_to_wandb(out, settings)
        where = (f"offline in {out / 'wandb'} (upload: wandb sync)" if settings["offline"]
                 else "online")
        print(f"W&B: tables logged to run {identifier} of project {settings['project']}, {where}")


if __name__ == "__main__":
    main(sys.argv[1:])
