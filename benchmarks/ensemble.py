"""Benchmark fold ensembles and mirroring TTA against one model: time and peak RSS of predict.py.

    python benchmarks/ensemble.py [--shape X Y Z] [--spacing MM] [--models 5] [--device cpu|cuda]
                                  [--variants one ensemble tta] [--repeats 3] [--out result.json]

One CT (the shared crop resampled to `--spacing` mm, or a phantom of `--shape` voxels, as in
benchmarks/inference.py) and `--models` copies of one random-init 105-class SegResNet (the
bundle's architecture; each copy is loaded as its own network, so time and memory are those of
any ensemble of that size) are written to a work folder. Then, with the protocol of
benchmarks/common.py (one process per measurement, interleaved rounds, one untimed warm-up,
medians; from the input file to the labels in memory, writing timed apart), predict.py's pipeline
predicts the CT with one model (`one`), with the ensemble of all of them (`ckpt=[...]`) and with
one model and `tta=mirror` (8 passes). Expected: time about linear in the number of passes, peak
RSS <= 1.2x one model's (the slab aggregation is shared).

Agreement: the ensemble's labels equal the one model's on at least 99.9 % of the voxels (its
members are copies, so the average is the one model's probabilities); tta's agreement with the
one model is reported, not checked (threshold 0: random weights have no mirror symmetry, so no
reference exists). The script exits non-zero after writing the JSON when a check fails.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import nibabel as nib
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
    voxel_agreement,
)
from inference import NUM_CLASSES, SHARED_CT, SPACING, make_ct, make_weights, predict_span

VARIANTS = ("one", "ensemble", "tta")
# Least share of voxels with labels equal to the one model's: the ensemble's members are copies
# of the one model's weights (loaded as separate networks: the time and memory of any ensemble of
# that size), so averaging them must give its labels; mirroring TTA has no such reference with
# random weights (they have no mirror symmetry), its agreement is reported with threshold 0.
THRESHOLDS = {"ensemble": 0.999, "tta": 0.0}


def worker(args: argparse.Namespace) -> dict:
    """Predict the benchmark CT as variant `args.worker` under the protocol; its passes per
    window."""
    weights = json.loads(args.weights)
    cfg = {"ckpt": weights if args.worker == "ensemble" else weights[0], "input": args.ct,
           "device": args.device, "masks": False, "tta": "mirror" if args.worker == "tta" else None,
           "sw": {"roi_size": [int(args.roi)] * 3, "overlap": 0.25, "batch_size": 1},
           "model": {"num_classes": NUM_CLASSES},
           "data": {"version": "v1", "spacing": float(args.spacing), "intensity": "segresnet"}}
    passes = {"one": 1, "ensemble": len(weights), "tta": 8}[args.worker]
    return {**predict_span(cfg, Path(args.workdir), args.worker), "passes": passes}


def main() -> None:
    """Parse arguments; run as the coordinator or, with --worker, as one variant."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Smallest setting (seconds): --shape 48 48 40 --roi 32 --models 2 --repeats 1")
    parser.add_argument("--shape", type=int, nargs=3, help="phantom size in voxels (default: "
                        "the shared crop)")
    parser.add_argument("--source", type=Path, default=SHARED_CT, help="CT to resample")
    parser.add_argument("--spacing", type=float, default=SPACING, help="model grid (mm)")
    parser.add_argument("--models", type=int, default=5, help="ensemble size")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--roi", type=int, default=96, help="window edge in voxels")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="which to run (one is always run: the reference)")
    add_repeats_option(parser)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    add_worker_options(parser, "--ct", "--weights")
    args = parser.parse_args()
    if args.worker:
        serve_worker(worker, args)
        return
    configure_logging()
    with tempfile.TemporaryDirectory(prefix="ctseg_bench_") as workdir:
        args.workdir, args.ct = workdir, str(Path(workdir) / "ct.nii.gz")
        make_ct(Path(args.ct), tuple(args.shape) if args.shape else None, args.source,
                args.spacing)
        weights = [str(Path(workdir) / f"model{i}.pt") for i in range(args.models)]
        for path in weights:
            make_weights(Path(path), seed=0)
        options = ["--ct", args.ct, "--weights", json.dumps(weights), "--device", args.device,
                   "--spacing", str(args.spacing), "--roi", str(args.roi)]
        sides = run_sides(__file__, {name: options for name in VARIANTS
                                     if name == "one" or name in args.variants},
                          workdir, args.repeats)
        checks = {f"{name} vs one": agreement(
            "share of voxels with labels equal to the one model's" + (
                " (reported, not checked)" if not THRESHOLDS[name] else ""),
            voxel_agreement(sides[name]["output"], sides["one"]["output"]), THRESHOLDS[name])
            for name in sides if name != "one"}
        shape = nib.load(args.ct).shape
    setting = {"shape": list(shape), "spacing_mm": args.spacing, "models": args.models,
               "device": args.device, "roi": args.roi}
    report = payload("ensemble", PREDICTION_SPAN, args.repeats, setting, sides, checks)
    print(report_text(report, "one", f"CT {'x'.join(map(str, shape))} at {args.spacing} mm, "
                      f"{NUM_CLASSES} classes, {args.device}, ensemble of {args.models}"))
    finish(report, args.out)


if __name__ == "__main__":
    main()
