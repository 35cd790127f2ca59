"""Benchmark `sw.skip_air`: sliding windows in the air of a scanner's field of view, skipped.

    python benchmarks/air.py [--spacing 1.5] [--region legs] [--roi 96] [--repeats 3]
                             [--out air.json]

A modelled whole-body CT as a scanner writes it: a 500 mm field of view of air (-1000 HU) holding
a body of soft tissue (40 HU) whose cross-section follows the regions of an adult lying on a
patient table (carbon fibre, 200 HU, 440 mm wide, under the back): head, neck, trunk, two thighs,
two calves (`REGIONS`). First the geometry: the windows of MONAI's grid (`--roi`^3 voxels,
default 96, overlap 0.25) that touch the body, per region and over the whole body, as
`ctseg.inference.air` counts them (no network). Then predict.py with and without `sw.skip_air`
on one region (`--region`), with a random-init 105-class bundle SegResNet, under the common
protocol (input file -> labels in memory); the skip_air side records the windows it computed
and those of the grid (`windows`). Agreement: the labels are equal on every voxel that no skipped
window covers (there the same windows are blended in the same order); voxels that a skipped
window covers are air, where a trained network predicts background and random weights predict
anything.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from common import (
    PREDICTION_SPAN,
    add_repeats_option,
    add_worker_options,
    agreement,
    configure_logging,
    finish,
    payload,
    report_text,
    run_sides,
    serve_worker,
)
from inference import NUM_CLASSES, make_weights, predict_span

FOV_MM = 500.0
# Region: (length along the body in mm, LR and AP diameters of the ellipses in mm, centres of the
# ellipses left-right in mm).
REGIONS = {
    "head": (230.0, (150.0, 190.0), (0.0,)),
    "neck": (100.0, (120.0, 120.0), (0.0,)),
    "trunk": (600.0, (340.0, 240.0), (0.0,)),
    "thighs": (450.0, (150.0, 150.0), (-90.0, 90.0)),
    "legs": (420.0, (100.0, 100.0), (-80.0, 80.0)),
}
TABLE_MM = (440.0, 20.0)  # width, thickness
BACK_MM = -120.0  # the body's posterior surface (AP), where the table begins
ROI, OVERLAP = 96, 0.25  # the bundle's window (the default of --roi)
THRESHOLD = 0.9999


def body_ct(regions: list[str], spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """The modelled CT (x LR, y AP, z head to feet) of `regions` at `spacing` mm and its affine."""
    n = round(FOV_MM / spacing)
    axis = (np.arange(n) - (n - 1) / 2) * spacing
    x, y = np.meshgrid(axis, axis, indexing="ij")
    table = (np.abs(x) <= TABLE_MM[0] / 2) & (y < BACK_MM) & (y >= BACK_MM - TABLE_MM[1])
    slabs = []
    for name in regions:
        length, (lr, ap), centres = REGIONS[name]
        inside = np.zeros_like(x, dtype=bool)
        for c in centres:
            inside |= ((x - c) / (lr / 2)) ** 2 + ((y - BACK_MM - ap / 2) / (ap / 2)) ** 2 <= 1
        plane = np.where(inside, 40, np.where(table, 200, -1000)).astype(np.int16)
        slabs.append(np.repeat(plane[:, :, None], round(length / spacing), axis=2))
    return np.concatenate(slabs, axis=2), np.diag([spacing, spacing, spacing, 1.0])


def window_counts(spacing: float, roi: int) -> dict[str, dict[str, int]]:
    """Windows touching the body / windows of the grid, per region and for the whole body."""
    from ctseg.inference.air import body_mask, body_window_starts

    counts = {}
    for name in (*REGIONS, "whole body"):
        ct, affine = body_ct(list(REGIONS) if name == "whole body" else [name], spacing)
        starts, total = body_window_starts(body_mask(ct), affine, affine, ct.shape, (roi,) * 3,
                                           OVERLAP)
        counts[name] = {"computed": len(starts), "grid": total}
    return counts


def worker_predict(args: argparse.Namespace) -> dict:
    """predict.py's pipeline on the region's CT, with or without `sw.skip_air`."""
    cfg = {"ckpt": args.weights, "input": args.ct, "device": "cpu", "masks": False,
           "sw": {"roi_size": [int(args.roi)] * 3, "overlap": OVERLAP,
                  "skip_air": args.worker == "skip_air"},
           "model": {"num_classes": NUM_CLASSES},
           "data": {"version": "v1", "spacing": float(args.spacing), "intensity": "segresnet"}}
    return predict_span(cfg, Path(args.workdir), args.worker)


def free_of_skipped(ct: np.ndarray, affine: np.ndarray, size: int) -> np.ndarray:
    """The voxels of `ct` that no skipped window of `size`^3 covers (its grid is the model
    grid: RAS at the model's spacing, as `body_ct` writes it)."""
    from ctseg.inference.air import body_mask, body_window_starts
    from ctseg.inference.vista3d import window_coverage
    from ctseg.sliding_window import grid_windows

    roi = (size,) * 3
    starts = set(body_window_starts(body_mask(ct), affine, affine, ct.shape, roi, OVERLAP)[0])
    padded = [max(s, size) for s in ct.shape]
    grid = [tuple(a for a, _ in window) for window in grid_windows(padded, roi, OVERLAP)]
    covered = window_coverage([s for s in grid if s not in starts], padded, roi).numpy()
    before = [(p - s) // 2 for p, s in zip(padded, ct.shape, strict=True)]
    return ~covered[tuple(slice(b, b + s) for b, s in zip(before, ct.shape, strict=True))]


def main() -> None:
    """Parse arguments; run as the coordinator or, with --worker, as one side."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Smallest setting (seconds; windows in air skipped): --spacing 6 --roi 32 "
        "--region neck --repeats 1")
    parser.add_argument("--spacing", type=float, default=1.5, help="model grid and CT (mm)")
    parser.add_argument("--region", choices=tuple(REGIONS), default="legs",
                        help="the region predict.py runs on, with and without sw.skip_air")
    add_repeats_option(parser)
    parser.add_argument("--roi", type=int, default=ROI, help=f"window edge in voxels "
                        f"(default {ROI}, the bundle's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    add_worker_options(parser, "--ct", "--weights")
    args = parser.parse_args()
    if args.worker:
        serve_worker(worker_predict, args)
        return
    configure_logging()
    counts = window_counts(args.spacing, args.roi)
    with tempfile.TemporaryDirectory(prefix="ctseg_air_") as workdir:
        args.workdir = workdir
        args.ct = str(Path(workdir) / "ct.nii.gz")
        args.weights = str(Path(workdir) / "model.pt")
        ct, affine = body_ct([args.region], args.spacing)
        nib.save(nib.Nifti1Image(ct, affine), args.ct)
        make_weights(Path(args.weights), args.seed)
        options = ["--ct", args.ct, "--weights", args.weights, "--spacing", str(args.spacing),
                   "--roi", str(args.roi)]
        sides = run_sides(__file__, {"all windows": options, "skip_air": options}, workdir,
                          args.repeats)
        kept = np.load(sides["all windows"]["output"]), np.load(sides["skip_air"]["output"])
        free = free_of_skipped(ct, affine, args.roi)
        checks = {"skip_air vs all windows": agreement(
            "share of voxels no skipped window covers with equal labels",
            float((kept[0][free] == kept[1][free]).mean()), THRESHOLD)}
    setting = {"spacing_mm": args.spacing, "region": args.region, "shape": list(ct.shape),
               "roi": args.roi, "overlap": OVERLAP, "num_classes": NUM_CLASSES,
               "windows": counts}
    report = payload("air", PREDICTION_SPAN, args.repeats, setting, sides, checks)
    lines = ["| region | windows touching the body | windows of the grid | share |",
             "|---|---:|---:|---:|"]
    lines += [f"| {name} | {c['computed']} | {c['grid']} | {c['computed'] / c['grid']:.2f} |"
              for name, c in counts.items()]
    print("\n".join(lines) + "\n")
    print(report_text(report, "all windows", f"{args.region} at {args.spacing} mm, "
                      f"{'x'.join(map(str, ct.shape))} voxels"))
    finish(report, args.out)


if __name__ == "__main__":
    main()
