"""The outputs of interactive evaluation from its per-case records: `clicks.csv` (a row per case,
structure and click), `summary.json` / `summary.md` (Dice after chosen click counts and the area
under the Dice-per-click curve, each with a bootstrap 95 % CI over cases; seconds per first and
next click) and `dice_vs_clicks.png`."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colormaps

from ctseg.atomic import write_atomic
from ctseg.errors import blamed_on
from ctseg.evaluate.statistics import OVERALL, Table, describe, few_cases, paired_tests
from ctseg.figures import save_png

OUTPUTS = ("clicks.csv", "summary.json", "summary.md", "dice_vs_clicks.png")
# Each case's clicks, Dice and seconds per structure (`<case>.json`).
CLICKS_FOLDER = "clicks"
COLUMNS = ("case", "structure", "vista3d_id", "click", "x", "y", "z", "label", "dice", "seconds")


def rows(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per case, structure and click number (x, y, z and label empty where the user had
    stopped: no error was left to click)."""
    out = []
    for record in records:
        for name, entry in record["structures"].items():
            for number, (value, seconds) in enumerate(zip(entry["dice"], entry["seconds"],
                                                          strict=True), start=1):
                click = entry["clicks"][number - 1] if number <= len(entry["clicks"]) else None
                x, y, z = click["point"] if click else ("", "", "")
                out.append({"case": record["case"], "structure": name,
                            "vista3d_id": entry["vista3d_id"], "click": number, "x": x, "y": y,
                            "z": z, "label": click["label"] if click else "",
                            "dice": round(value, 6), "seconds": round(seconds, 4)})
    return out


def area(curve: Sequence[float]) -> float:
    """The area under a Dice-per-click curve over clicks 1..N, divided by N - 1 (so in [0, 1]);
    the one Dice for N = 1."""
    values = np.asarray(curve, dtype=float)
    return float(values[0]) if len(values) == 1 else float(np.trapezoid(values) / (len(values) - 1))


def per_case(records: Sequence[Mapping[str, Any]], value: Any) -> dict[str, dict[str, float]]:
    """Structure (and OVERALL: the case's mean over its structures) -> case -> `value(entry)`."""
    table: dict[str, dict[str, float]] = {OVERALL: {}}
    for record in records:
        values = {name: float(value(entry)) for name, entry in record["structures"].items()}
        for name, v in values.items():
            table.setdefault(name, {})[record["case"]] = v
        if values:
            table[OVERALL][record["case"]] = float(np.mean(list(values.values())))
    return table


def summarise(records: Sequence[Mapping[str, Any]], report_at: Sequence[int],
              settings: Mapping[str, Any], seed: int = 0) -> dict[str, Any]:
    """Dice after each of `report_at` clicks (those within the budget), the area under the
    curve and the mean curve, per structure and overall, described over cases; seconds per
    first and next click (medians over structures and clicks)."""
    budget = int(settings["clicks"])
    at = sorted({k for k in report_at if 1 <= k <= budget} | {1, budget})
    by_click = [per_case(records, lambda e, k=k: e["dice"][k]) for k in range(budget)]
    dice_after = {str(k): {name: describe(list(v.values()), seed)
                           for name, v in by_click[k - 1].items()} for k in at}
    auc = {name: describe(list(v.values()), seed)
           for name, v in per_case(records, lambda e: area(e["dice"])).items()}
    curve = {name: [float(np.mean(list(click[name].values()))) for click in by_click]
             for name in auc}
    overall = [describe(list(click[OVERALL].values()), seed) for click in by_click]
    entries = [e for r in records for e in r["structures"].values()]
    first = [e["seconds"][0] for e in entries]
    later = [s for e in entries for s in e["seconds"][1:len(e["clicks"])]]
    seconds = {"first": float(np.median(first)),
               "next": float(np.median(later)) if later else math.nan,
               "encoder_runs_per_structure": float(np.mean([e["encoder_runs"]
                                                            for e in entries]))}
    seconds["next_over_first"] = seconds["next"] / seconds["first"] if first else math.nan
    stopped = sum(len(e["clicks"]) < budget for e in entries)
    return {"settings": dict(settings), "cases": len(records), "structures": len(entries),
            "first_click_hit_rate": float(np.mean([e["first_click_hit"] for e in entries])),
            "stopped_early": stopped, "dice_after": dice_after, "auc": auc, "curve": curve,
            "curve_ci": [[d["ci_low"], d["ci_high"]] for d in overall], "seconds": seconds}


def _cell(d: Mapping[str, float]) -> str:
    """`mean [low, high]` of a description."""
    if math.isnan(d["mean"]):
        return "-"
    if math.isnan(d["ci_low"]):
        return f"{d['mean']:.3f}"
    return f"{d['mean']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"


def markdown(summary: Mapping[str, Any]) -> str:
    """The summary as Markdown: a line of settings, the table, the timing line."""
    s = summary["settings"]
    at = list(summary["dice_after"])
    source = (f"clicks replayed from {s['clicks_from']}" if s["clicks_from"]
              else f"next click: {s['next_click']}, seed {s['seed']}")
    prompt = "clicks with the structure's id" if s["with_id"] else "clicks alone"
    head = (f"Interactive evaluation: {summary['cases']} case(s), {summary['structures']} "
            f"structure(s), up to {s['clicks']} click(s) each ({source}; {prompt}); "
            "mean [bootstrap 95 % CI over cases].")
    lines = ["| structure | cases | " + " | ".join(f"Dice after {k}" for k in at)
             + " | AUC |", "|---|---:|" + "---:|" * (len(at) + 1)]
    for name, auc in summary["auc"].items():
        cells = [_cell(summary["dice_after"][k][name]) for k in at]
        lines.append(f"| {name} | {auc['n']} | " + " | ".join(cells) + f" | {_cell(auc)} |")
    t = summary["seconds"]
    timing = (f"First click inside the mask it gave: {summary['first_click_hit_rate']:.0%} of "
              f"structures. Seconds per click (medians): first {t['first']:.2f}, next "
              f"{t['next']:.2f} "
              f"({t['next_over_first']:.2f} x); image encoder runs per structure "
              f"{t['encoder_runs_per_structure']:.1f}; structures where no error was left before "
              f"the budget: {summary['stopped_early']}.")
    return "\n\n".join([head, "\n".join(lines), timing]) + "\n"


def plot(summary: Mapping[str, Any], path: Path) -> None:
    """Mean Dice per click: overall with its per-click CI band, each structure as a thin line."""
    curve = summary["curve"]
    clicks = np.arange(1, len(curve[OVERALL]) + 1)
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, values in curve.items():
        if name != OVERALL:
            axes.plot(clicks, values, linewidth=1, alpha=0.6, label=name)
    band = np.asarray(summary["curve_ci"], dtype=float)
    if not np.isnan(band).all():
        axes.fill_between(clicks, band[:, 0], band[:, 1], color="black", alpha=0.15,
                          label="95 % CI")
    axes.plot(clicks, curve[OVERALL], color="black", linewidth=2.5,
              label=f"{OVERALL} (n={summary['cases']} cases)")
    axes.set_xlabel("clicks")
    axes.set_ylabel("Dice")
    axes.set_ylim(0, 1.02)
    axes.set_xticks(clicks)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    axes.set_title("Dice after each simulated click")
    save_png(figure, path)


def write_report(records: Sequence[Mapping[str, Any]], out: Path, report_at: Sequence[int],
                 settings: Mapping[str, Any], seed: int = 0) -> dict[str, Any]:
    """Write every output of OUTPUTS into `out` (each file atomically); the summary."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS))
    writer.writeheader()
    writer.writerows(rows(records))
    summary = summarise(records, report_at, settings, seed)
    write_atomic(out / OUTPUTS[0], lambda tmp: tmp.write_text(buffer.getvalue()))
    text = json.dumps(summary, indent=1, allow_nan=True) + "\n"
    write_atomic(out / OUTPUTS[1], lambda tmp: tmp.write_text(text))
    write_atomic(out / OUTPUTS[2], lambda tmp: tmp.write_text(markdown(summary)))
    plot(summary, out / OUTPUTS[3])
    return summary


@dataclass(frozen=True)
class Evaluation:
    """An interactive evaluation's output folder: its name in a comparison, its summary and its
    per-case records."""

    name: str
    summary: dict[str, Any]
    records: list[dict[str, Any]]


def is_evaluation(folder: Path) -> bool:
    """Whether `folder` is the output of an interactive evaluation."""
    return (folder / OUTPUTS[1]).is_file() and (folder / CLICKS_FOLDER).is_dir()


def load_evaluation(folder: Path, name: str) -> Evaluation:
    """The summary and records of an interactive evaluation's output folder."""
    path = folder / OUTPUTS[1]
    with blamed_on(path, "not an interactive evaluation's summary; run it again"):
        summary = json.loads(path.read_text())
        summary["curve"][OVERALL]
    records = []
    for case in sorted((folder / CLICKS_FOLDER).glob("*.json")):
        with blamed_on(case, "not an interactive evaluation's clicks JSON; run it again"):
            record = json.loads(case.read_text())
            record["structures"] = {k: v for k, v in record["structures"].items()
                                    if k in summary["auc"]}
        records.append(record)
    return Evaluation(name, summary, records)


def auc_table(evaluation: Evaluation) -> Table:
    """(case, structure) -> {"dice": the area under its curve} (statistics' table shape)."""
    return {(r["case"], name): {"dice": area(entry["dice"]), "nsd": math.nan}
            for r in evaluation.records for name, entry in r["structures"].items()}


def comparison_rows(evaluations: Sequence[Evaluation], seed: int = 0) -> list[dict[str, Any]]:
    """Per evaluation: cases, clicks, the overall Dice after each reported count and the AUC
    (mean and CI), and the paired test of its per-case AUC against the first evaluation's."""
    base = auc_table(evaluations[0])
    rows = []
    for evaluation in evaluations:
        s = evaluation.summary
        row: dict[str, Any] = {"evaluation": evaluation.name, "cases": s["cases"],
                               "clicks": s["settings"]["clicks"]}
        for k, described in s["dice_after"].items():
            overall = described[OVERALL]
            row.update({f"dice_after_{k}": overall["mean"], f"dice_after_{k}_ci_low":
                        overall["ci_low"], f"dice_after_{k}_ci_high": overall["ci_high"]})
        auc = describe(list(per_case(evaluation.records,
                                     lambda e: area(e["dice"]))[OVERALL].values()), seed)
        row.update(auc=auc["mean"], auc_ci_low=auc["ci_low"], auc_ci_high=auc["ci_high"])
        test = ({"n": 0, "mean_difference": math.nan, "p": math.nan}
                if evaluation is evaluations[0] else paired_tests(base, auc_table(evaluation))[0])
        row.update(paired_cases=test["n"], auc_difference=test["mean_difference"],
                   wilcoxon_p=test["p"])
        rows.append(row)
    return rows


def comparison_markdown(evaluations: Sequence[Evaluation], rows: Sequence[Mapping[str, Any]]
                        ) -> str:
    """The comparison table (overall Dice after each count and AUC, each mean [CI]), the paired
    AUC tests against the first evaluation, and a warning line when the cases are few."""
    counts = [k for k in evaluations[0].summary["dice_after"]
              if all(k in e.summary["dice_after"] for e in evaluations)]
    lines = ["# Interactive evaluations compared", "",
             "| evaluation | cases | " + " | ".join(f"Dice after {k}" for k in counts)
             + " | AUC | AUC - first (paired cases, Wilcoxon p) |",
             "|---|---:|" + "---:|" * (len(counts) + 2)]
    for evaluation, row in zip(evaluations, rows, strict=True):
        cells = [_cell(evaluation.summary["dice_after"][k][OVERALL]) for k in counts]
        auc = _cell({"mean": row["auc"], "ci_low": row["auc_ci_low"],
                     "ci_high": row["auc_ci_high"]})
        paired = ("-" if row is rows[0] else
                  f"{row['auc_difference']:+.3f} ({row['paired_cases']}, p = "
                  f"{row['wilcoxon_p']:.3g})")
        lines.append(f"| {evaluation.name} | {row['cases']} | " + " | ".join(cells)
                     + f" | {auc} | {paired} |")
    warning = few_cases({e.name: e.summary["cases"] for e in evaluations},
                        min((r["paired_cases"] for r in rows[1:]), default=None))
    return "\n".join(lines) + "\n" + ("" if warning is None else f"\n{warning}\n")


def comparison_figure(evaluations: Sequence[Evaluation]) -> plt.Figure:
    """The overall Dice-per-click curves side by side, each with its CI band."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for i, evaluation in enumerate(evaluations):
        s = evaluation.summary
        clicks = np.arange(1, len(s["curve"][OVERALL]) + 1)
        colour = colormaps["tab10"](i % 10)
        band = np.asarray(s["curve_ci"], dtype=float)
        if not np.isnan(band).all():
            axes.fill_between(clicks, band[:, 0], band[:, 1], color=colour, alpha=0.15)
        axes.plot(clicks, s["curve"][OVERALL], color=colour, linewidth=2, marker="o",
                  label=f"{evaluation.name} (n={s['cases']} cases)")
    axes.set_xlabel("clicks")
    axes.set_ylabel("Dice (mean over structures, then cases)")
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title(f"Dice after each simulated click: {len(evaluations)} evaluations")
    return figure
