"""Benchmark ctseg's memory-bounded prediction against MONAI's standard full-volume pipeline.

    python benchmarks/inference.py [--shape X Y Z] [--spacing MM] [--device cpu|cuda]
                                   [--out result.json]

One CT (the shared crop resampled to `--spacing` mm, default 1.5, or a synthetic phantom of
`--shape` voxels at that spacing) and one random-init 105-class SegResNet (the bundle's
architecture) are written to a work folder. Each pipeline then runs in its own subprocess, so
peak RSS (getrusage) is its own:

- ctseg: `ctseg.inference.runner.run`, i.e. `predict.py` (slab aggregation, argmax, nearest
  inversion, uint8 labels);
- MONAI: the bundle's configs/inference.json as `ctseg.reference.wholebody_bundle` writes it with
  MONAI's own transforms (no ctseg code): preprocessing, `SlidingWindowInferer` over the whole
  volume (all 105 float32 logit channels), softmax, argmax, `Invertd` (nearest).

Prints a table (time, peak RSS, ratios, voxel agreement) and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from common import SHARED, add_worker_options, run_worker, serve_worker

SHARED_CT = SHARED / "s0001" / "ct.nii.gz"
SPACING = 1.5
NUM_CLASSES = 105


def make_ct(path: Path, shape: tuple[int, int, int] | None, source: Path,
            spacing: float = SPACING) -> None:
    """Write the benchmark CT: `source` resampled to `spacing` mm, or a phantom of `shape`
    voxels."""
    if shape is None:
        from monai.transforms import LoadImage, Orientation, Spacing

        image = LoadImage(image_only=True, ensure_channel_first=True)(str(source))
        image = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(image)
        image = Spacing(pixdim=spacing, mode="bilinear")(image)
        data = np.rint(image[0].numpy()).astype(np.int16)
        affine = np.asarray(image.affine, dtype=np.float64)
    else:
        grid = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
        rng = np.random.default_rng(0)
        data = np.full(shape, -1000, dtype=np.int16)
        body = grid[0] ** 2 / 0.8 + grid[1] ** 2 / 0.5 < 1
        data[body] = 40
        for side in (-0.4, 0.4):  # lungs
            data[body & ((grid[0] - side) ** 2 / 0.08 + grid[1] ** 2 / 0.12 + grid[2] ** 2
                         / 0.3 < 1)] = -800
        data[(grid[0] ** 2 + (grid[1] + 0.35) ** 2) < 0.01] = 700  # spine
        data = (data + rng.normal(0, 20, shape)).astype(np.int16)
        affine = np.diag([spacing, spacing, spacing, 1.0])
    nib.save(nib.Nifti1Image(data, affine), path)


def make_weights(path: Path, seed: int) -> None:
    """Save a random-init bundle SegResNet state dict (`model.pt` layout)."""
    import torch

    from ctseg.reference import wholebody_bundle as bundle

    torch.manual_seed(seed)
    torch.save(bundle.network(NUM_CLASSES).state_dict(), path)


def worker_ctseg(args: argparse.Namespace) -> dict:
    """Run ctseg's predict on the benchmark CT; return its timings."""
    from ctseg.inference.runner import run

    out = Path(args.workdir) / "ctseg"
    cfg = {"ckpt": args.weights, "input": args.ct, "output": str(out), "device": args.device,
           "masks": False, "overwrite": True, "progress": False,
           "sw": {"roi_size": [args.roi] * 3, "overlap": args.overlap,
                  "batch_size": args.sw_batch_size},
           "model": {"num_classes": NUM_CLASSES},
           "data": {"version": "v1", "spacing": args.spacing, "intensity": "segresnet"}}
    start = time.perf_counter()
    if run(cfg):
        raise SystemExit("ctseg prediction failed")
    seconds = time.perf_counter() - start
    report = json.loads((out / "timing.json").read_text())["cases"][0]
    return {"seconds": seconds, "stages": report["seconds"],
            "labels": str(out / Path(args.ct).name.removesuffix(".nii.gz") / "labels.nii.gz")}


def worker_monai(args: argparse.Namespace) -> dict:
    """Run the bundle's inference.json recipe (`ctseg.reference.wholebody_bundle`, MONAI's own
    transforms): full-volume logits, softmax, argmax, Invertd (nearest)."""
    import torch

    from ctseg.reference import wholebody_bundle as bundle

    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    net = bundle.network(NUM_CLASSES)
    net.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    net = net.to(device).eval()
    preprocessing = bundle.inference_preprocessing((args.spacing,) * 3)
    inferer = bundle.inference_inferer(sw_batch_size=args.sw_batch_size, overlap=args.overlap,
                                       roi=(args.roi,) * 3)
    postprocessing = bundle.inference_postprocessing(preprocessing)
    start = time.perf_counter()
    data = preprocessing({"image": args.ct})
    with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
        data["pred"] = inferer(data["image"][None].to(device), net)[0]
    data = postprocessing(data)
    labels = np.asarray(data["pred"][0].cpu()).astype(np.uint8)
    seconds = time.perf_counter() - start
    path = Path(args.workdir) / "monai_labels.nii.gz"
    nib.save(nib.Nifti1Image(labels, nib.load(args.ct).affine), path)
    return {"seconds": seconds, "labels": str(path)}


def measure(name: str, args: argparse.Namespace) -> dict:
    """Run one pipeline in a fresh interpreter and return its result with peak RSS."""
    return run_worker(__file__, name, args.workdir, [
        "--ct", args.ct, "--weights", args.weights, "--device", args.device,
        "--spacing", str(args.spacing), "--roi",
        str(args.roi), "--overlap", str(args.overlap), "--sw-batch-size", str(args.sw_batch_size)])


def table(rows: dict[str, dict], agreement: float, shape: tuple[int, ...], spacing: float) -> str:
    """The benchmark as a markdown table."""
    base = rows["monai"]
    lines = [f"CT {shape[0]}x{shape[1]}x{shape[2]} at {spacing} mm, {NUM_CLASSES} classes, "
             f"voxel agreement {agreement * 100:.3f} %", "",
             "| pipeline | time (s) | peak RSS (MiB) | time ratio | RSS ratio |",
             "|---|---:|---:|---:|---:|"]
    for name, label in (("monai", "bundle inference.json (MONAI, full volume)"),
                        ("ctseg", "ctseg predict (slab aggregation)")):
        r = rows[name]
        lines.append(f"| {label} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['seconds'] / base['seconds']:.2f} | "
                     f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    """Parse arguments; run as the coordinator or, with --worker, as one pipeline."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, help="phantom size in voxels (1.5 mm)")
    parser.add_argument("--source", type=Path, default=SHARED_CT, help="CT to resample")
    parser.add_argument("--spacing", type=float, default=SPACING, help="model grid (mm)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--sw-batch-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    add_worker_options(parser, "--ct", "--weights")
    args = parser.parse_args()
    if args.worker:
        serve_worker({"ctseg": worker_ctseg, "monai": worker_monai}[args.worker], args)
        return
    with tempfile.TemporaryDirectory(prefix="ctseg_bench_") as workdir:
        args.workdir = workdir
        args.ct = str(Path(workdir) / "ct.nii.gz")
        args.weights = str(Path(workdir) / "model.pt")
        make_ct(Path(args.ct), tuple(args.shape) if args.shape else None, args.source,
                args.spacing)
        make_weights(Path(args.weights), args.seed)
        shape = nib.load(args.ct).shape
        rows = {name: measure(name, args) for name in ("monai", "ctseg")}
        ours = np.asanyarray(nib.load(rows["ctseg"]["labels"]).dataobj)
        theirs = np.asanyarray(nib.load(rows["monai"]["labels"]).dataobj)
        agreement = float((ours == theirs).mean())
    print(table(rows, agreement, shape, args.spacing))
    payload = {"shape": list(shape), "spacing_mm": args.spacing, "num_classes": NUM_CLASSES,
               "device": args.device, "roi": args.roi, "overlap": args.overlap,
               "threads": os.cpu_count(), "agreement": agreement,
               "ctseg": {k: v for k, v in rows["ctseg"].items() if k != "labels"},
               "monai": {k: v for k, v in rows["monai"].items() if k != "labels"},
               "time_ratio": rows["ctseg"]["seconds"] / rows["monai"]["seconds"],
               "rss_ratio": rows["ctseg"]["peak_rss_mb"] / rows["monai"]["peak_rss_mb"]}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
