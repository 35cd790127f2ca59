"""Statistics over per-case scores (the scores.csv of `python -m ctseg.evaluate` and of native
evaluation): per structure and overall, the mean, SD and a seeded bootstrap 95 % confidence
interval over cases; between two configs on the same cases, a paired Wilcoxon signed-rank test per
structure with Holm's correction across structures. scipy computes every statistic; below
`MIN_CASES` cases they say little, and `few_cases` says so."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from ctseg.errors import DatasetError, blamed_on

METRICS = ("dice", "nsd")
OVERALL = "overall"  # the per-case mean over structures
CONFIDENCE = 0.95
RESAMPLES = 2000
ALPHA = 0.05
# The fewest cases (pairs, for a paired test) whose statistics are reported without a warning.
# Below it a percentile bootstrap CI of the mean is too narrow (resamples of n cases hold at most
# n distinct values), and a two-sided Wilcoxon signed-rank test has little power: with fewer than
# 6 pairs it cannot reach p < 0.05 at all (its smallest p is 2 / 2**n, `smallest_p`).
MIN_CASES = 10
# Where a run folder keeps per-case scores: its test split (callbacks=native_evaluation) and, for
# a fold of a cross-validation (callbacks=cross_validation), its val subjects, the out-of-fold ones.
TEST_SCORES = Path("evaluation") / "scores.csv"
OUT_OF_FOLD_SCORES = Path("evaluation") / "val" / "scores.csv"
# (case, structure) -> {"dice": ..., "nsd": ...}
Table = dict[tuple[str, str], dict[str, float]]


def read_scores(path: str | Path) -> list[dict[str, Any]]:
    """The rows (case, structure, dice, nsd) of a scores.csv."""
    path = Path(path)
    columns = ("case", "structure", *METRICS)
    with blamed_on(path, f"cannot read the scores (CSV with {', '.join(columns)})"), \
            path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or ())]
        if missing:
            raise DatasetError(path, f"no {missing[0]} column; evaluate the run again")
        rows = [{"case": r["case"], "dataset": r.get("dataset") or "",
                 "class": int(r.get("class") or 0), "structure": r["structure"],
                 **{m: float(r[m]) if r[m] not in ("", None) else math.nan for m in METRICS}}
                for r in reader]
    if not rows:
        raise DatasetError(path, "holds no score; evaluate the run again")
    return rows


def case_table(runs: Iterable[Sequence[Mapping[str, Any]]]) -> Table:
    """One config's scores by (case, structure): the mean over its runs that scored the case (seeds
    repeat cases; cross-validation folds each score their own), structures with a NaN left out."""
    sums: dict[tuple[str, str], dict[str, list[float]]] = {}
    for rows in runs:
        for row in rows:
            entry = sums.setdefault((row["case"], row["structure"]), {m: [] for m in METRICS})
            for metric in METRICS:
                if not math.isnan(row[metric]):
                    entry[metric].append(row[metric])
    return {key: {m: float(np.mean(v[m])) if v[m] else math.nan for m in METRICS}
            for key, v in sums.items()}


def per_case(table: Table, metric: str, structure: str = OVERALL) -> dict[str, float]:
    """Case -> the `metric` of `structure`, or of the mean over the case's structures."""
    if structure != OVERALL:
        return {c: v[metric] for (c, s), v in table.items()
                if s == structure and not math.isnan(v[metric])}
    values: dict[str, list[float]] = {}
    for (case, _), v in table.items():
        if not math.isnan(v[metric]):
            values.setdefault(case, []).append(v[metric])
    return {case: float(np.mean(v)) for case, v in values.items()}


def describe(values: Sequence[float], seed: int = 0) -> dict[str, float]:
    """n, mean, SD (ddof 1) and the bootstrap (percentile, seeded) 95 % CI of the mean."""
    data = np.asarray(values, dtype=float)
    out = {"n": len(data), "mean": float(data.mean()) if len(data) else math.nan,
           "sd": float(data.std(ddof=1)) if len(data) > 1 else math.nan,
           "ci_low": math.nan, "ci_high": math.nan}
    if len(data) > 1 and np.ptp(data) > 0:
        ci = stats.bootstrap((data,), np.mean, n_resamples=RESAMPLES,
                             confidence_level=CONFIDENCE, method="percentile",
                             rng=np.random.default_rng(seed)).confidence_interval
        out["ci_low"], out["ci_high"] = float(ci.low), float(ci.high)
    elif len(data) > 1:
        out["ci_low"] = out["ci_high"] = out["mean"]
    return out


def structures(table: Table) -> list[str]:
    """The structures of a table, sorted."""
    return sorted({s for _, s in table})


def summary_rows(config: str, table: Table, seed: int = 0) -> list[dict[str, Any]]:
    """Per structure and overall: the description of Dice and NSD over cases."""
    rows = []
    for structure in [OVERALL, *structures(table)]:
        row: dict[str, Any] = {"config": config, "structure": structure}
        for metric in METRICS:
            described = describe(list(per_case(table, metric, structure).values()), seed)
            row.update({f"{metric}_{k}": v for k, v in described.items()})
        rows.append(row)
    return rows


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN), in the input order."""
    finite = [(p, i) for i, p in enumerate(pvalues) if not math.isnan(p)]
    adjusted = [math.nan] * len(pvalues)
    running, m = 0.0, len(finite)
    for rank, (p, i) in enumerate(sorted(finite)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def paired_tests(a: Table, b: Table, metric: str = "dice") -> list[dict[str, Any]]:
    """Per structure (and overall) of the cases both configs scored: n, mean of B - A, the
    two-sided Wilcoxon signed-rank p-value, Holm's adjusted p over the structures (overall is
    tested on its own) and whether it is below ALPHA."""
    rows = []
    for structure in [OVERALL, *sorted(set(structures(a)) & set(structures(b)))]:
        first, second = per_case(a, metric, structure), per_case(b, metric, structure)
        cases = sorted(set(first) & set(second))
        diff = np.array([second[c] - first[c] for c in cases])
        p = math.nan
        if len(cases) and np.any(diff != 0):
            p = float(stats.wilcoxon(diff).pvalue)
        elif len(cases):
            p = 1.0
        rows.append({"structure": structure, "n": len(cases),
                     "mean_difference": float(diff.mean()) if len(cases) else math.nan,
                     "p": p})
    adjusted = holm([r["p"] for r in rows[1:]])
    rows[0]["p_holm"] = rows[0]["p"]
    for row, p in zip(rows[1:], adjusted, strict=True):
        row["p_holm"] = p
    for row in rows:
        row["significant"] = bool(not math.isnan(row["p_holm"]) and row["p_holm"] < ALPHA)
    return rows


def smallest_p(pairs: int) -> float:
    """The smallest two-sided p-value a Wilcoxon signed-rank test of `pairs` pairs can give (every
    difference of one sign; scipy's exact distribution), 1 without pairs."""
    return float(stats.wilcoxon(np.arange(1.0, pairs + 1)).pvalue) if pairs else 1.0


def few_cases(counts: Mapping[str, int], pairs: int | None) -> str | None:
    """One warning line when a config's statistics rest on fewer than MIN_CASES cases (`counts`:
    config -> cases) or a paired test on fewer than MIN_CASES pairs (`pairs`: the fewest pairs
    of any paired test, None without one); None when none does."""
    few = {config: n for config, n in counts.items() if n < MIN_CASES}
    if not few and (pairs is None or pairs >= MIN_CASES):
        return None
    parts = [f"{config}: {n} cases" for config, n in few.items()]
    if pairs is not None and pairs < MIN_CASES:
        parts.append(f"paired: {pairs} cases, whose two-sided Wilcoxon p cannot go below "
                     f"{smallest_p(pairs):.3g}")
    tested = " and a Wilcoxon test has little power" if pairs is not None else ""
    return (f"warning: fewer than {MIN_CASES} cases ({'; '.join(parts)}): a bootstrap 95 % CI of "
            f"so few cases is too narrow{tested}; read these statistics as a description, and "
            "score more cases for a conclusion")
