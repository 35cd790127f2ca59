"""The evaluation's outputs: a CSV of case x class scores, a summary (JSON and Markdown: mean and
median per class, overall and per region) and two PNGs (per-class Dice box plot, per-region
bars)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from ctseg.atomic import TEMP_MARK, swapped_folder
from ctseg.figures import save_png
from ctseg.inference.postprocess import POSTPROCESSING_FILE

OUTPUTS = ("scores.csv", "summary.json", "summary.md", "dice_per_class.png",
           "dice_per_region.png")
# Name patterns of TotalSegmentator's structure groups; anything else counts as an organ.
REGIONS = {
    "vertebrae": ("vertebrae_",),
    "ribs": ("rib_", "sternum", "costal_cartilages"),
    "cardiovascular": ("heart", "aorta", "artery", "vein", "vena", "atrial", "trunk", "carotid"),
    "muscles": ("gluteus_", "autochthon_", "iliopsoas_"),
    "other bones": ("humerus", "scapula", "clavicula", "femur", "hip_", "sacrum", "skull"),
}


def region(name: str) -> str:
    """The structure group of a TotalSegmentator class name."""
    for group, patterns in REGIONS.items():
        if any(p in name for p in patterns):
            return group
    return "organs"


def _stats(values: Sequence[float]) -> dict[str, float | int]:
    """Mean, median and count of the finite values (NaN: excluded structures)."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return {"mean": math.nan, "median": math.nan, "n": 0}
    return {"mean": float(np.mean(finite)), "median": float(np.median(finite)), "n": len(finite)}


def class_stats(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per structure of `rows`: its region and the statistics of its Dice and NSD over cases."""
    by_class: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_class.setdefault(row["structure"], []).append(row)
    return {name: {"region": region(name),
                   "dice": _stats([r["dice"] for r in group]),
                   "nsd": _stats([r["nsd"] for r in group])}
            for name, group in by_class.items()}


def over_classes(classes: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float | int]]:
    """Statistics of Dice and NSD over classes (`class_stats` entries), each by its mean."""
    classes = list(classes)
    return {metric: _stats([c[metric]["mean"] for c in classes]) for metric in ("dice", "nsd")}


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per class, per region and overall statistics of Dice and NSD; per dataset (rows naming
    one) the mean over the classes it scores and its case count."""
    classes = class_stats(rows)
    regions = {group: over_classes([c for c in classes.values() if c["region"] == group])
               for group in sorted({c["region"] for c in classes.values()})}
    summary = {"overall": over_classes(classes.values()), "regions": regions, "classes": classes,
               "cases": sorted({r["case"] for r in rows})}
    datasets = {}
    for name in sorted({r["dataset"] for r in rows if r.get("dataset")}):
        own = [r for r in rows if r.get("dataset") == name]
        datasets[name] = {**over_classes(class_stats(own).values()),
                          "cases": len({r["case"] for r in own})}
    if datasets:
        summary["datasets"] = datasets
    return summary


def markdown(summary: Mapping[str, Any], tolerance: float) -> str:
    """The summary as Markdown tables."""
    def cell(value: float) -> str:
        return "-" if math.isnan(value) else f"{value:.4f}"

    o = summary["overall"]
    lines = [f"{len(summary['cases'])} cases; NSD at {tolerance:g} mm; mean over classes: Dice "
             f"{cell(o['dice']['mean'])}, NSD {cell(o['nsd']['mean'])}", "",
             "| region | Dice | NSD | classes |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {cell(r['dice']['mean'])} | {cell(r['nsd']['mean'])} | "
              f"{r['dice']['n']} |" for name, r in summary["regions"].items()]
    datasets = summary.get("datasets", {})
    if len(datasets) > 1:
        lines += ["", "| dataset | Dice | NSD | classes | cases |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {name} | {cell(d['dice']['mean'])} | {cell(d['nsd']['mean'])} | "
                  f"{d['dice']['n']} | {d['cases']} |" for name, d in datasets.items()]
    lines += ["", "| structure | region | Dice mean | Dice median | NSD mean | NSD median | "
              "cases |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, c in summary["classes"].items():
        lines.append(f"| {name} | {c['region']} | {cell(c['dice']['mean'])} | "
                     f"{cell(c['dice']['median'])} | {cell(c['nsd']['mean'])} | "
                     f"{cell(c['nsd']['median'])} | {c['dice']['n']} |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], out: Path) -> None:
    """Per-class Dice box plot and per-region mean Dice / NSD bars."""
    names = [n for n, c in summary["classes"].items() if c["dice"]["n"]]
    values = [[r["dice"] for r in rows if r["structure"] == n and not math.isnan(r["dice"])]
              for n in names]
    figure, axes = plt.subplots(figsize=(max(6, 0.25 * len(names) + 2), 5))
    if names:
        axes.boxplot(values, tick_labels=names)
    axes.set_ylabel("Dice")
    axes.set_ylim(0, 1.02)
    axes.tick_params(axis="x", labelrotation=90, labelsize=7)
    axes.grid(axis="y", alpha=0.3)
    save_png(figure, out / OUTPUTS[3])
    regions = summary["regions"]
    figure, axes = plt.subplots(figsize=(7, 4))
    x = np.arange(len(regions))
    for shift, metric in ((-0.2, "dice"), (0.2, "nsd")):
        axes.bar(x + shift, [r[metric]["mean"] for r in regions.values()], width=0.4,
                 label=metric.upper() if metric == "nsd" else "Dice")
    axes.set_xticks(x, list(regions), rotation=20)
    axes.set_ylim(0, 1.02)
    axes.legend()
    save_png(figure, out / OUTPUTS[4])


def write_outputs(rows: Sequence[Mapping[str, Any]], out: Path, tolerance: float,
                  extra: Callable[[Path], Any] | None = None) -> dict[str, Any]:
    """Write every output of OUTPUTS, and the post-processing choice that `extra(folder)` may
    write, as folder `out` (`swapped_folder`: a failure or a kill never leaves a mix of old and
    new outputs, and no earlier one of these files stays); what other steps wrote there (native
    evaluation's `val/` and `predictions/`) is kept; the summary."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["case", "dataset", "class", "structure",
                                                "region", "dice", "nsd"])
    writer.writeheader()
    writer.writerows({"dataset": "", **r, "region": region(r["structure"])} for r in rows)
    summary = summarise(rows)
    summary["tolerance_mm"] = tolerance
    text = json.dumps(summary, indent=2, allow_nan=True) + "\n"
    others = [p.name for p in out.iterdir() if p.name not in (*OUTPUTS, POSTPROCESSING_FILE)
              and TEMP_MARK not in p.name] if out.is_dir() else []
    with swapped_folder(out, own=OUTPUTS[1], keep=others) as staging:
        (staging / OUTPUTS[0]).write_text(buffer.getvalue())
        (staging / OUTPUTS[1]).write_text(text)
        (staging / OUTPUTS[2]).write_text(markdown(summary, tolerance))
        plot(rows, summary, staging)
        if extra is not None:
            extra(staging)
    return summary
