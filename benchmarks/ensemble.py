"""Benchmark fold ensembles and mirroring TTA against one model: time and peak RSS of predict.py.

    python benchmarks/ensemble.py [--shape X Y Z] [--spacing MM] [--models 5] [--device cpu|cuda]
                                  [--variants one ensemble tta] [--out result.json]

One CT (the shared crop resampled to `--spacing` mm, or a phantom of `--shape` voxels, as in
benchmarks/inference.py) and `--models` random-init 105-class SegResNets (the bundle's
architecture) are written to a work folder; then, each in its own interpreter (peak RSS its own),
`ctseg.inference.runner.run` (predict.py) predicts the CT with one model, with the ensemble of all
of them (`ckpt=[...]`) and with one model and `tta=mirror` (8 passes). Expected: time about linear
in the number of passes, peak RSS <= 1.2x one model's (the slab aggregation is shared).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
from common import add_worker_options, machine, run_worker, serve_worker
from inference import SHARED_CT, SPACING, make_ct, make_weights

VARIANTS = ("one", "ensemble", "tta")


def worker(args: argparse.Namespace) -> dict:
    """Predict the benchmark CT as variant `args.worker`; its time and passes per window."""
    from ctseg.inference.runner import run

    weights = json.loads(args.weights)
    out = Path(args.workdir) / args.worker
    cfg = {"ckpt": weights if args.worker == "ensemble" else weights[0], "input": args.ct,
           "output": str(out), "device": args.device, "masks": False, "overwrite": True,
           "progress": False, "tta": "mirror" if args.worker == "tta" else None,
           "sw": {"roi_size": [args.roi] * 3, "overlap": 0.25, "batch_size": 1},
           "model": {"num_classes": 105},
           "data": {"version": "v1", "spacing": args.spacing, "intensity": "segresnet"}}
    start = time.perf_counter()
    if run(cfg):
        raise SystemExit(f"{args.worker} prediction failed")
    passes = {"one": 1, "ensemble": len(weights), "tta": 8}[args.worker]
    return {"seconds": time.perf_counter() - start, "passes": passes}


def main() -> None:
    """Parse arguments; run as the coordinator or, with --worker, as one variant."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, help="phantom size in voxels")
    parser.add_argument("--source", type=Path, default=SHARED_CT, help="CT to resample")
    parser.add_argument("--spacing", type=float, default=SPACING, help="model grid (mm)")
    parser.add_argument("--models", type=int, default=5, help="ensemble size")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="which to run (one is always run: the reference)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    add_worker_options(parser, "--ct", "--weights")
    args = parser.parse_args()
    if args.worker:
        serve_worker(worker, args)
        return
    with tempfile.TemporaryDirectory(prefix="ctseg_bench_") as workdir:
        args.workdir, args.ct = workdir, str(Path(workdir) / "ct.nii.gz")
        make_ct(Path(args.ct), tuple(args.shape) if args.shape else None, args.source,
                args.spacing)
        weights = [str(Path(workdir) / f"model{i}.pt") for i in range(args.models)]
        for seed, path in enumerate(weights):
            make_weights(Path(path), seed)
        options = ["--ct", args.ct, "--weights", json.dumps(weights), "--device", args.device,
                   "--spacing", str(args.spacing), "--roi", str(args.roi)]
        rows = {name: run_worker(__file__, name, workdir, options) for name in VARIANTS
                if name == "one" or name in args.variants}
        shape = nib.load(args.ct).shape
    base = rows["one"]
    lines = [f"CT {'x'.join(map(str, shape))} at {args.spacing} mm, 105 classes, {args.device}",
             "", "| variant | passes per window | time (s) | time / one | peak RSS (MiB) | "
             "RSS / one |", "|---|---:|---:|---:|---:|---:|"]
    for name, label in (("one", "one model"), ("ensemble", f"ensemble of {args.models}"),
                        ("tta", "one model, tta=mirror")):
        if name not in rows:
            continue
        r = rows[name]
        lines.append(f"| {label} | {r['passes']} | {r['seconds']:.1f} | "
                     f"{r['seconds'] / base['seconds']:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f} |")
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine(), "shape": list(shape),
                                        "spacing_mm": args.spacing, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
