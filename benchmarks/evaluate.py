"""Benchmark the scoring of `python -m ctseg.evaluate` (Dice and NSD per class) at real size.

    python benchmarks/evaluate.py [--tile 11] [--spacing 1.5] [--shift 3] [--tolerance 3]
                                  [--repeats 3] [--out result.json]

Ground truth: the shared crop's merged v1 label map at `--spacing` mm, tiled `--tile` times along
z as in benchmarks/training.py (11 tiles at 1.5 mm: 243x201x649 = 31.7 M voxels, a whole-body CT)
and relabelled so that each (tile, structure) pair up to 104 is a class of its own: 104 localised
structures of real shapes, as in a whole-body scan. Prediction: the ground truth shifted by
`--shift` voxels along x. Both are written as NIfTI. The sides are measured with the protocol of
benchmarks/common.py (one process per measurement, interleaved rounds, one untimed warm-up,
medians) over the same span, from the two label files to the Dice and NSD per class in memory;
writing the scores as JSON is timed apart:

- `ctseg`: `ctseg.evaluate.metrics.case_scores` on one tile (the crop);
- `monai`: MONAI's straightforward use on the same tile: `DiceMetric` and
  `compute_surface_dice(use_subvoxels=True)` on full one-hot volumes of 105 classes;
- `ctseg wholebody` (with `--tile` > 1): `case_scores` on the tiled volume. MONAI's one-hot route
  is not run there: its two float32 one-hot volumes alone would take 2 x 105 x voxels x 4 bytes
  (estimate reported).

Agreement: every Dice and NSD value of ctseg, over the classes in the ground truth, within
TOLERANCE (1e-4) of MONAI's; else the script exits non-zero after writing the JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from common import (
    add_repeats_option,
    add_worker_options,
    agreement,
    configure_logging,
    finish,
    payload,
    report_text,
    run_sides,
    serve_worker,
    slug,
    timed_span,
)
from training import SPACING, make_volume

NUM_CLASSES = 105
SPAN = "prediction and truth files -> Dice and NSD per class in memory"
# Largest difference of a Dice or NSD value from MONAI's that still agrees: both compute the same
# definitions (NSD on subvoxel surfaces), so only float rounding may differ.
TOLERANCE = 1e-4


def distinct_classes(label: np.ndarray, tiles: int, classes: int = NUM_CLASSES - 1) -> np.ndarray:
    """`label` (tiled along z) with each (tile, structure) pair numbered 1, 2, ... up to
    `classes`; later pairs become background."""
    out = np.zeros_like(label)
    depth = label.shape[2] // tiles
    next_class = 1
    for k in range(tiles):
        part = label[:, :, k * depth:(k + 1) * depth]
        lookup = np.zeros(int(label.max()) + 1, dtype=label.dtype)
        for value in (int(v) for v in np.unique(part) if v):
            if next_class <= classes:
                lookup[value] = next_class
                next_class += 1
        out[:, :, k * depth:(k + 1) * depth] = lookup[part]
    return out


def write_pair(workdir: Path, tiles: int, spacing: float, shift: int) -> dict[str, str]:
    """The relabelled, tiled ground truth and the prediction (the truth shifted by `shift` voxels
    along x) as NIfTI; their paths."""
    paths = make_volume(workdir, tiles, spacing)
    img = nib.load(paths["label"])
    truth = distinct_classes(np.asarray(img.dataobj), tiles)
    out = {"truth": str(workdir / "truth.nii.gz"), "pred": str(workdir / "pred.nii.gz")}
    nib.save(nib.Nifti1Image(truth, img.affine), out["truth"])
    nib.save(nib.Nifti1Image(np.roll(truth, shift, axis=0), img.affine), out["pred"])
    return out


def worker(args: argparse.Namespace) -> dict:
    """One side: read both label maps and score them per class with ctseg (on bounding boxes) or
    MONAI (full one-hot volumes); writing the scores as JSON is timed apart."""
    import torch

    spacing = (float(args.spacing),) * 3
    tolerance = float(args.tolerance)
    classes = range(1, NUM_CLASSES)

    def read() -> tuple[np.ndarray, np.ndarray]:
        return (np.asarray(nib.load(args.pred).dataobj),
                np.asarray(nib.load(args.truth).dataobj))

    def ctseg_scores() -> np.ndarray:
        from ctseg.evaluate.metrics import case_scores

        pred, truth = read()
        scores = case_scores(pred, truth, spacing, classes, tolerance)
        return np.array([[scores[c][0] for c in classes], [scores[c][1] for c in classes]])

    def monai_scores() -> np.ndarray:
        from monai.metrics import DiceMetric, compute_surface_dice
        from monai.networks.utils import one_hot

        def onehot(labels: np.ndarray) -> torch.Tensor:
            return one_hot(torch.from_numpy(labels.astype(np.int64))[None, None], NUM_CLASSES)

        p, g = (onehot(labels) for labels in read())
        dice = DiceMetric(include_background=False, reduction="none")(p, g)[0]
        nsd = compute_surface_dice(p, g, [tolerance] * (NUM_CLASSES - 1),
                                   include_background=False, spacing=spacing,
                                   use_subvoxels=True)[0]
        return np.array([dice.tolist(), nsd.tolist()])

    def write(scores: np.ndarray) -> None:
        rows = {str(c): {"dice": d, "nsd": n} for c, d, n in zip(classes, *scores.tolist(),
                                                                 strict=True)}
        (Path(args.workdir) / f"{slug(args.worker)}_scores.json").write_text(json.dumps(rows))

    span = monai_scores if args.worker == "monai" else ctseg_scores
    result = timed_span(span, write, lambda scores: scores,
                        Path(args.workdir) / f"{slug(args.worker)}_scores.npy")
    truth = nib.load(args.truth)
    scores = np.load(result["output"])
    return {**result, "voxels": int(np.prod(truth.shape)), "shape": list(truth.shape),
            "classes": int((~np.isnan(scores[0])).sum())}


def score_agreement(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    """Share of the (metric, class) values, over the classes in the ground truth, within
    TOLERANCE of MONAI's; the largest difference."""
    present = ~np.isnan(theirs[0])
    difference = np.abs(ours[:, present] - theirs[:, present])
    difference[np.isnan(difference)] = np.inf  # a value on one side only
    return float((difference <= TOLERANCE).mean()), float(difference.max(initial=0.0))


def main() -> None:
    """Build the volumes, measure each side with the protocol, print and save the report."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Smallest setting (seconds): --tile 1 --spacing 3 --repeats 1")
    parser.add_argument("--tile", type=int, default=11, help="tiles of the whole-body volume "
                        "(1: no whole-body side)")
    parser.add_argument("--spacing", type=float, default=SPACING, help="grid of the volumes (mm)")
    parser.add_argument("--shift", type=int, default=3, help="prediction shift in voxels (x)")
    parser.add_argument("--tolerance", type=float, default=3.0, help="NSD tolerance in mm")
    add_repeats_option(parser)
    parser.add_argument("--out", type=Path, help="JSON file for the results")
    add_worker_options(parser, "--truth", "--pred")
    args = parser.parse_args()
    if args.worker:
        serve_worker(worker, args)
        return
    configure_logging()
    with tempfile.TemporaryDirectory(prefix="ctseg_bench_eval_") as tmp:
        options = ["--spacing", str(args.spacing), "--tolerance", str(args.tolerance)]
        crop = write_pair(Path(tmp) / "crop", 1, args.spacing, args.shift)
        sides = {"monai": [*options, "--truth", crop["truth"], "--pred", crop["pred"]],
                 "ctseg": [*options, "--truth", crop["truth"], "--pred", crop["pred"]]}
        if args.tile > 1:
            whole = write_pair(Path(tmp) / "wholebody", args.tile, args.spacing, args.shift)
            sides["ctseg wholebody"] = [*options, "--truth", whole["truth"], "--pred",
                                        whole["pred"]]
        measured = run_sides(__file__, sides, tmp, args.repeats)
        share, largest = score_agreement(np.load(measured["ctseg"]["output"]),
                                         np.load(measured["monai"]["output"]))
    checks = {"ctseg vs MONAI": agreement(
        f"share of Dice and NSD values within {TOLERANCE:g} of MONAI's (largest difference "
        f"{largest:.2e})", share, 1.0)}
    voxels = measured.get("ctseg wholebody", measured["ctseg"])["voxels"]
    setting = {"tile": args.tile, "spacing_mm": args.spacing, "shift": args.shift,
               "tolerance_mm": args.tolerance, "num_classes": NUM_CLASSES,
               "monai_onehot_wholebody_gb": 2 * NUM_CLASSES * voxels * 4 / 1e9}
    report = payload("evaluate", SPAN, args.repeats, setting, measured, checks)
    print(report_text(report, "monai", f"Dice and NSD of {NUM_CLASSES - 1} classes, crop "
                      f"{'x'.join(map(str, measured['ctseg']['shape']))} at {args.spacing} mm"))
    print(f"MONAI one-hot at the whole-body size ({voxels / 1e6:.1f} M voxels): "
          f"{setting['monai_onehot_wholebody_gb']:.1f} GB for the two one-hot volumes alone "
          "(not run)")
    finish(report, args.out)


if __name__ == "__main__":
    main()
