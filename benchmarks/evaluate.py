"""Benchmark the scoring of `python -m ctseg.evaluate` (Dice and NSD per class) at real size.

    python benchmarks/evaluate.py [--tile 11] [--shift 3] [--tolerance 3] [--out result.json]

Ground truth: the shared crop's merged v1 label map at 1.5 mm, tiled `--tile` times along z as in
benchmarks/training.py (11 tiles: 243x201x649 = 31.7 M voxels, a whole-body CT at 1.5 mm) and
relabelled so that each (tile, structure) pair up to 104 is a class of its own: 104 localised
structures of real shapes, as in a whole-body scan. Prediction: the ground truth shifted by
`--shift` voxels along x. Each measurement runs in its own process (its own peak RSS):

- `ctseg_crop`: `ctseg.evaluate.metrics.case_scores` on one tile (the crop at 1.5 mm);
- `monai_crop`: MONAI's straightforward use on the same tile: `DiceMetric` and
  `compute_surface_dice(use_subvoxels=True)` on full one-hot volumes of 105 classes; its values
  are compared with ctseg's (they must agree);
- `ctseg_wholebody`: `case_scores` on the tiled volume. MONAI's one-hot route is not run there: its
  two float32 one-hot volumes alone would take 2 x 105 x voxels x 4 bytes (estimate reported).

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from common import add_worker_options, machine, run_worker, serve_worker
from training import SPACING, make_volume

NUM_CLASSES = 105
MEASUREMENTS = ("ctseg_crop", "monai_crop", "ctseg_wholebody")


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


def write_label(workdir: Path, tiles: int) -> str:
    """The relabelled, tiled ground truth as NIfTI; its path."""
    paths = make_volume(workdir, tiles)
    img = nib.load(paths["label"])
    label = distinct_classes(np.asarray(img.dataobj), tiles)
    path = workdir / "truth.nii.gz"
    nib.save(nib.Nifti1Image(label, img.affine), path)
    return str(path)


def _pair(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """Prediction (shifted truth) and ground truth of the measurement's volume."""
    truth = np.asarray(nib.load(args.label).dataobj)
    return np.roll(truth, int(args.shift), axis=0), truth


def worker(args: argparse.Namespace) -> dict:
    """Score one volume with ctseg (per class on bounding boxes) or MONAI (full one-hot)."""
    import torch

    pred, truth = _pair(args)
    spacing = (SPACING,) * 3
    start = time.perf_counter()
    if args.worker.startswith("ctseg"):
        from ctseg.evaluate.metrics import case_scores

        scores = case_scores(pred, truth, spacing, range(1, NUM_CLASSES), float(args.tolerance))
        dice = [scores[c][0] for c in range(1, NUM_CLASSES)]
        nsd = [scores[c][1] for c in range(1, NUM_CLASSES)]
    else:
        from monai.metrics import DiceMetric, compute_surface_dice
        from monai.networks.utils import one_hot

        def onehot(labels: np.ndarray) -> torch.Tensor:
            return one_hot(torch.from_numpy(labels.astype(np.int64))[None, None], NUM_CLASSES)

        p, g = onehot(pred), onehot(truth)
        dice = DiceMetric(include_background=False, reduction="none")(p, g)[0].tolist()
        nsd = compute_surface_dice(p, g, [float(args.tolerance)] * (NUM_CLASSES - 1),
                                   include_background=False, spacing=spacing,
                                   use_subvoxels=True)[0].tolist()
    seconds = time.perf_counter() - start
    return {"voxels": int(truth.size), "shape": list(truth.shape), "seconds": seconds,
            "dice": dice, "nsd": nsd,
            "classes": int(sum(1 for d in dice if not math.isnan(d)))}


def max_difference(a: list[float], b: list[float], truth_present: list[bool]) -> float:
    """Largest |a - b| over the classes present in the ground truth."""
    return max((abs(x - y) for x, y, present in zip(a, b, truth_present, strict=True) if present),
               default=0.0)


def main() -> None:
    """Build the volumes, run each measurement in a fresh process, print and save the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile", type=int, default=11, help="tiles of the whole-body volume")
    parser.add_argument("--shift", type=int, default=3, help="prediction shift in voxels (x)")
    parser.add_argument("--tolerance", type=float, default=3.0, help="NSD tolerance in mm")
    parser.add_argument("--out", type=Path, help="JSON file for the results")
    add_worker_options(parser, "--label")
    args = parser.parse_args()
    if args.worker:
        serve_worker(worker, args)
        return
    options = ["--shift", str(args.shift), "--tolerance", str(args.tolerance)]
    results = {}
    with tempfile.TemporaryDirectory(prefix="ctseg_bench_eval_") as tmp:
        labels = {"crop": write_label(Path(tmp) / "crop", 1),
                  "wholebody": write_label(Path(tmp) / "wholebody", args.tile)}
        for name in MEASUREMENTS:
            label = labels[name.split("_", 1)[1]]
            results[name] = run_worker(__file__, name, tmp, [*options, "--label", label])
    ours, theirs = results["ctseg_crop"], results["monai_crop"]
    present = [not math.isnan(d) for d in ours["dice"]]
    agreement = {"max_abs_dice": max_difference(ours["dice"], theirs["dice"], present),
                 "max_abs_nsd": max_difference(ours["nsd"], theirs["nsd"], present)}
    voxels = results["ctseg_wholebody"]["voxels"]
    onehot_gb = 2 * NUM_CLASSES * voxels * 4 / 1e9
    print(f"{'measurement':<16}{'shape':>16}{'classes':>9}{'seconds':>9}{'peak RSS MB':>13}")
    for name, r in results.items():
        shape = "x".join(str(s) for s in r["shape"])
        print(f"{name:<16}{shape:>16}{r['classes']:>9}{r['seconds']:>9.1f}"
              f"{r['peak_rss_mb']:>13.0f}")
    print(f"ctseg vs MONAI on the crop: max |dDice| {agreement['max_abs_dice']:.2e}, max |dNSD| "
          f"{agreement['max_abs_nsd']:.2e}; MONAI one-hot at whole-body size: {onehot_gb:.1f} GB "
          "for the two one-hot volumes alone (not run)")
    report = {"machine": machine(), "args": {"tile": args.tile, "shift": args.shift,
                                             "tolerance": args.tolerance},
              "results": {k: {key: v for key, v in r.items() if key not in ("dice", "nsd")}
                          for k, r in results.items()},
              "agreement": agreement, "monai_onehot_wholebody_gb": onehot_gb}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
