"""`python -m ctseg.evaluate pred=<dir> gt=<root or folder> version=v1|v2 [split=test]`: Dice and
NSD per case and class on the ground truth's grid, written as CSV, JSON, Markdown and PNGs."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue
from rich.progress import track

from ctseg.config import CONFIG_DIR
from ctseg.data.layout import DATASET_JSON, META, load_nifti, same_grid, stored_labels
from ctseg.errors import ConfigError, DatasetError, run_cli
from ctseg.evaluate.metrics import case_rows, mapped, names_lookup
from ctseg.evaluate.native import GROUND_TRUTH, PREDICTIONS
from ctseg.evaluate.postprocess import choose
from ctseg.evaluate.report import OUTPUTS, markdown, write_outputs
from ctseg.evaluate.statistics import OUT_OF_FOLD_SCORES, read_scores
from ctseg.inference.outputs import LABELS_FILE, LABELS_JSON, read_label_json
from ctseg.inference.postprocess import POSTPROCESSING_FILE, write_choice
from ctseg.label_space import LabelSpace, annotated_channels
from ctseg.labels import check_version, label_names

log = logging.getLogger(__name__)

# A fold's kept out-of-fold predictions in its run folder (callbacks=cross_validation).
CV_PREDICTIONS = Path("evaluation") / "val" / PREDICTIONS


@dataclass(frozen=True)
class TruthCase:
    """A ground-truth label map: its case, file, dataset and the classes it annotates (None:
    every class)."""

    case: str
    label: Path
    dataset: str
    classes: list[int] | None = None


def ground_truth(gt: Path, space: LabelSpace, split: str | None) -> list[TruthCase]:
    """The label maps of one ground-truth folder: merged from a TotalSegmentator root (its
    meta.csv split), mapped onto `space` by name from an nnU-Net raw dataset (labelsTr: split
    train, labelsTs: test; scored on the classes its dataset.json names), or the <case>.nii.gz
    files of a folder."""
    from ctseg.data.merge import prepare
    from ctseg.data.nnunet import prepare_nnunet

    if (gt / META).is_file() or (gt / DATASET_JSON).is_file():
        prepared = (prepare(gt, version=space.version) if (gt / META).is_file()
                    else prepare_nnunet(gt, space, gt.name))
        records = prepared.by_split().get(split, []) if split else prepared.records
        return [TruthCase(str(r["image_id"]), Path(r["label"]), gt.name,
                          annotated_channels(r["annotated"]) if "annotated" in r else None)
                for r in records]
    if split:
        raise ConfigError(f"split={split} needs a dataset root with meta.csv or dataset.json; "
                          f"{gt} has neither")
    return [TruthCase(p.name.removesuffix(".nii.gz"), p, gt.name)
            for p in sorted(gt.glob("*.nii.gz"))]


def ground_truths(folders: list[Path], space: LabelSpace, split: str | None) -> list[TruthCase]:
    """The cases of every ground-truth folder; ConfigError when two folders hold one case name
    (predictions are found by case name)."""
    cases: list[TruthCase] = []
    seen: dict[str, Path] = {}
    for folder in folders:
        for truth in ground_truth(folder, space, split):
            if seen.setdefault(truth.case, folder) != folder:
                raise ConfigError(f"gt: case {truth.case} is in both {seen[truth.case]} and "
                                  f"{folder}; predict and evaluate them separately")
            cases.append(truth)
    return cases


def load_pair(pred_path: Path, gt_path: Path) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Prediction and ground truth as integer arrays of one grid, and its spacing (mm)."""
    pred = load_nifti(pred_path, "predict the case again (overwrite=true)")
    gt = load_nifti(gt_path, "merge or write the ground truth again")
    if not same_grid(pred, gt):
        raise DatasetError(pred_path, f"grid {pred.shape} (affine diagonal "
                           f"{np.round(np.diag(pred.affine)[:3], 3).tolist()}) differs from the "
                           f"ground truth {gt_path} ({gt.shape}, "
                           f"{np.round(np.diag(gt.affine)[:3], 3).tolist()}); predict on the "
                           "ground truth's own CT, whose grid predict.py keeps")
    spacing = tuple(float(s) for s in gt.header.get_zooms()[:3])
    return stored_labels(pred, pred_path), stored_labels(gt, gt_path), spacing


def check_classes(labels: np.ndarray, path: Path, names: list[str], version: str,
                  fix: str) -> None:
    """Refuse a label map with values above the version's classes (a map of another version or
    label space would be scored wrongly without a word)."""
    if int(labels.max(initial=0)) < len(names):
        return
    above = np.unique(labels[labels >= len(names)])
    shown = ", ".join(str(v) for v in above[:5]) + (", ..." if len(above) > 5 else "")
    raise DatasetError(path, f"label values {shown} are above the {len(names) - 1} classes of "
                       f"version={version}; {fix}")


def class_lookup(case_dir: Path, names: list[str]) -> np.ndarray | None:
    """Prediction value -> class index of `names` from the labels.json that predict.py wrote
    beside the label map (`names_lookup`); None without one or when the values already are
    `names`' indices."""
    path = case_dir / LABELS_JSON
    if not path.is_file():
        return None
    table = read_label_json(path, "fix or remove it (without it values are taken as class "
                                  "indices)")
    return names_lookup(table, names, path)


def evaluate_cv(folder: Path, output: Path | None, tolerance: float) -> dict[str, Any]:
    """The cross-validation score of a multirun of folds: every fold's out-of-fold scores
    (`evaluation/val/scores.csv`, written by callbacks=cross_validation) pooled and summarised
    into `output` (default `<folder>/cv_evaluation`), as nnU-Net reports its CV figure."""
    if not folder.is_dir():
        raise ConfigError(f"cv={folder}: no such folder")
    files = sorted(folder.rglob(str(OUT_OF_FOLD_SCORES)))
    if not files:
        raise ConfigError(f"cv={folder}: no run below it wrote {OUT_OF_FOLD_SCORES}; train the "
                          "folds with callbacks=cross_validation (docs/training.md)")
    rows: list[dict[str, Any]] = []
    fold_of: dict[str, Path] = {}
    for path in files:
        run = path.parents[2]
        for row in read_scores(path):
            if fold_of.setdefault(row["case"], run) != run:
                raise ConfigError(f"cv={folder}: case {row['case']} is out-of-fold in both "
                                  f"{fold_of[row['case']]} and {run}; the runs are not the folds "
                                  "of one cross-validation")
            rows.append(row)
    out = output or folder / "cv_evaluation"
    runs = [path.parents[2] for path in files]
    choice = None
    if all((run / CV_PREDICTIONS / GROUND_TRUTH).is_file() for run in runs):
        choice = choose_postprocessing(runs)
    else:
        log.info("no kept out-of-fold predictions (callbacks=cross_validation keeps them): no "
                 "post-processing chosen")
    summary = write_outputs(rows, out, tolerance, extra=None if choice is None else
                            lambda staging: write_choice(staging, *choice))
    summary.update(output=str(out), folds=[str(run) for run in runs], missing=[])
    if choice is not None:
        summary["postprocessing"] = choice[0]
    log.info("cross-validation: %d out-of-fold cases of %d folds", len(fold_of), len(files))
    return summary


def choose_postprocessing(runs: list[Path]) -> tuple[list[str], dict[str, Any]]:
    """Choose, on the folds' kept out-of-fold predictions, the structures whose largest component
    alone does not lower their Dice; write the choice beside every fold's checkpoints; the
    chosen structures and the Dice figures of the structures tested."""
    version = str(OmegaConf.load(runs[0] / "checkpoints" / "config.yaml").data.version)

    def cases() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Each fold's out-of-fold predictions and their ground truth, one case at a time."""
        for run in runs:
            truth = json.loads((run / CV_PREDICTIONS / GROUND_TRUTH).read_text())
            for case, label in truth.items():
                pred, gt, _ = load_pair(run / CV_PREDICTIONS / f"{case}.nii.gz", Path(label))
                yield pred, gt

    chosen, tested = choose(cases(), label_names(version))
    for run in runs:
        write_choice(run / "checkpoints", chosen, tested)
    log.info("post-processing: the largest component kept for %d of %d structures (%s)",
             len(chosen), len(tested), POSTPROCESSING_FILE)
    return chosen, tested


def evaluate(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Score every ground-truth case that has a prediction, or pool the out-of-fold scores of a
    cross-validation (`cv=`); write the outputs; the summary."""
    if cfg.get("cv"):
        try:
            output = cfg.get("output")
        except (MissingMandatoryValue, InterpolationToMissingValueError):  # no pred to follow
            output = None
        return evaluate_cv(Path(str(cfg["cv"])), Path(str(output)) if output else None,
                           float(cfg.get("tolerance_mm", 3.0)))
    pred = Path(str(cfg["pred"]))
    gts = [Path(str(g)) for g in (cfg["gt"] if isinstance(cfg["gt"], Sequence | ListConfig)
                                  and not isinstance(cfg["gt"], str) else [cfg["gt"]])]
    version, tolerance = str(cfg.get("version", "v1")), float(cfg.get("tolerance_mm", 3.0))
    check_version(version)
    for folder, what in ((pred, "pred"), *((g, "gt") for g in gts)):
        if not folder.is_dir():
            raise ConfigError(f"{what}={folder}: no such folder")
    space = LabelSpace.of(version, cfg.get("extra_classes"))
    names = space.names
    cases = ground_truths(gts, space, cfg.get("split"))
    present = [t for t in cases if (pred / t.case / LABELS_FILE).is_file()]
    missing = [t.case for t in cases if not (pred / t.case / LABELS_FILE).is_file()]
    if not present:
        raise ConfigError(f"no prediction in {pred} for the {len(cases)} ground-truth cases of "
                          f"{', '.join(map(str, gts))} (expected {pred}/<case>/{LABELS_FILE}, "
                          f"e.g. {pred}/{cases[0].case if cases else 's0001'}/{LABELS_FILE})")
    if missing:
        log.warning("%d cases have no prediction and are not scored: %s", len(missing),
                    ", ".join(missing))
    rows = []
    for truth in track(present, description="evaluate", disable=not cfg.get("progress", True)):
        case_dir = pred / truth.case
        p, g, spacing = load_pair(case_dir / LABELS_FILE, truth.label)
        p = mapped(p, class_lookup(case_dir, names), case_dir / LABELS_FILE)
        check_classes(p, case_dir / LABELS_FILE, names, version,
                      "score it with the version it was predicted for, or keep the labels.json "
                      "predict.py writes beside it")
        check_classes(g, truth.label, names, version,
                      "score against ground truth of the same TotalSegmentator version")
        rows += case_rows(truth.case, p, g, spacing, names, tolerance, truth.classes,
                          truth.dataset if len(gts) > 1 else "")
    out = Path(str(cfg.get("output") or pred / "evaluation"))
    summary = write_outputs(rows, out, tolerance)
    summary.update(output=str(out), missing=missing)
    return summary


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Evaluate, print the region table and where the outputs went."""
    summary = evaluate(cfg)
    print(markdown(summary, float(cfg.tolerance_mm)).split("\n\n")[0])
    print("written: " + ", ".join(str(Path(summary["output"]) / o) for o in OUTPUTS))


def cli() -> None:
    """Console entry point (`ctseg-evaluate`, `python -m ctseg.evaluate`)."""
    run_cli(main, "python -m ctseg.evaluate")


if __name__ == "__main__":
    cli()
