"""Benchmark ctseg's memory-bounded prediction against MONAI's standard full-volume pipeline.

    python benchmarks/inference.py [--shape X Y Z] [--spacing MM] [--roi N] [--device cpu|cuda]
                                   [--repeats 3] [--out result.json]

One CT (the shared crop resampled to `--spacing` mm, default 1.5, or a synthetic phantom of
`--shape` voxels at that spacing) and one random-init 105-class SegResNet (the bundle's
architecture) are written to a work folder. Both sides are measured with the protocol of
benchmarks/common.py (one process per measurement, interleaved rounds, one untimed warm-up,
medians), over the same span, from the input file to the labels in memory; writing is timed
apart:

- ctseg: predict.py's pipeline, `CasePredictor.segment` (read, preprocess, slab aggregation,
  argmax, nearest inversion to uint8 labels) after loading the model with `load_model`; writing:
  the case's outputs as predict.py writes them;
- monai: the bundle's configs/inference.json as `ctseg.reference.wholebody_bundle` writes it with
  MONAI's own transforms (no ctseg code), network built untimed: preprocessing,
  `SlidingWindowInferer` over the whole volume (all 105 float32 logit channels), softmax, argmax,
  `Invertd` (nearest); writing: the labels as NIfTI.

Agreement: the share of voxels where ctseg's labels equal MONAI's, at least `--threshold`
(99.9 %), else the script exits non-zero after writing the JSON. Prints the tables.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from common import (
    PREDICTION_SPAN,
    SHARED,
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
    voxel_agreement,
)

SHARED_CT = SHARED / "s0001" / "ct.nii.gz"
SPACING = 1.5
NUM_CLASSES = 105
# Least share of voxels with equal labels, ctseg against MONAI: both compute in float32 (float16
# on CUDA), so only near-ties of the random weights' classes may differ.
THRESHOLD = 0.999


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


def predict_span(cfg: dict, workdir: Path, name: str,
                 setup: Callable[[Any], dict] | None = None) -> dict:
    """The ctseg side of the protocol for predict.py's configuration `cfg`: load the model(s)
    and build `CasePredictor` (untimed; then `setup(predictor)`, whose figures are added), time
    `CasePredictor.segment` (read, preprocess, infer, invert: input file -> labels in memory)
    and writing the case's outputs as predict.py does; the model grid it ran on (`grid_mm`),
    its intensity scheme and, with sw.skip_air, the windows computed and those of the grid
    (`windows`)."""
    from ctseg.atomic import swapped_folder
    from ctseg.inference.ensemble import check_members
    from ctseg.inference.inputs import discover_cases
    from ctseg.inference.outputs import write_case
    from ctseg.inference.pipeline import CasePredictor
    from ctseg.inference.runner import checkpoint_sources, options_from
    from ctseg.models.loading import load_model

    options = options_from(cfg)
    sources = checkpoint_sources(cfg["ckpt"])
    models = [load_model(source, cfg.get("model", {}), cfg.get("data", {}))
              for source in sources]
    check_members(models, sources)
    case = discover_cases(cfg["input"])[0]
    folder = workdir / slug(name)

    def write(seg: Any) -> None:
        with swapped_folder(folder) as tmp:
            write_case(tmp, seg.labels, seg.affine, seg.header, seg.names, options.masks,
                       seg.probabilities)

    def segment() -> Any:
        seg = predictor.segment(case)
        extra.update({"windows": seg.windows} if seg.windows else {})
        return seg

    with CasePredictor(models[0], options, members=models[1:]) as predictor:
        extra = setup(predictor) if setup else {}
        result = timed_span(segment, write, lambda seg: seg.labels,
                            workdir / f"{slug(name)}_labels.npy")
    return {**extra, **result, "grid_mm": [float(s) for s in models[0].pipeline.spacing],
            "intensity": models[0].pipeline.intensity}


def worker_ctseg(args: argparse.Namespace) -> dict:
    """ctseg's side: predict.py's pipeline on the benchmark CT."""
    cfg = {"ckpt": args.weights, "input": args.ct, "device": args.device, "masks": False,
           "sw": {"roi_size": [int(args.roi)] * 3, "overlap": float(args.overlap),
                  "batch_size": int(args.sw_batch_size)},
           "model": {"num_classes": NUM_CLASSES},
           "data": {"version": "v1", "spacing": float(args.spacing), "intensity": "segresnet"}}
    return predict_span(cfg, Path(args.workdir), args.worker)


def worker_monai(args: argparse.Namespace) -> dict:
    """MONAI's side: the bundle's inference.json recipe (`ctseg.reference.wholebody_bundle`,
    MONAI's own transforms; network built untimed): full-volume logits, softmax, argmax,
    Invertd (nearest); writing the labels as NIfTI."""
    import torch

    from ctseg.reference import wholebody_bundle as bundle

    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    net = bundle.network(NUM_CLASSES)
    net.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    net = net.to(device).eval()
    spacing, roi = float(args.spacing), int(args.roi)
    preprocessing = bundle.inference_preprocessing((spacing,) * 3)
    inferer = bundle.inference_inferer(sw_batch_size=int(args.sw_batch_size),
                                       overlap=float(args.overlap), roi=(roi,) * 3)
    postprocessing = bundle.inference_postprocessing(preprocessing)

    def span() -> np.ndarray:
        data = preprocessing({"image": args.ct})
        with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
            data["pred"] = inferer(data["image"][None].to(device), net)[0]
        data = postprocessing(data)
        return np.asarray(data["pred"][0].cpu()).astype(np.uint8)

    def write(labels: np.ndarray) -> None:
        nib.save(nib.Nifti1Image(labels, nib.load(args.ct).affine),
                 Path(args.workdir) / f"{slug(args.worker)}.nii.gz")

    result = timed_span(span, write, lambda labels: labels,
                        Path(args.workdir) / f"{slug(args.worker)}_labels.npy")
    return {**result, "grid_mm": [spacing] * 3}


def worker_options(args: argparse.Namespace) -> list[str]:
    """The options every worker of this script receives."""
    return ["--ct", args.ct, "--weights", args.weights, "--device", args.device,
            "--spacing", str(args.spacing), "--roi", str(args.roi), "--overlap",
            str(args.overlap), "--sw-batch-size", str(args.sw_batch_size)]


def main() -> None:
    """Parse arguments; run as the coordinator or, with --worker, as one side."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Smallest setting (seconds): --shape 48 48 40 --roi 32 --repeats 1")
    parser.add_argument("--shape", type=int, nargs=3, help="phantom size in voxels (default: "
                        "the shared crop)")
    parser.add_argument("--source", type=Path, default=SHARED_CT, help="CT to resample")
    parser.add_argument("--spacing", type=float, default=SPACING, help="model grid (mm)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--roi", type=int, default=96, help="window edge in voxels")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--sw-batch-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    add_repeats_option(parser)
    parser.add_argument("--threshold", type=float, default=THRESHOLD,
                        help=f"least share of voxels with equal labels (default {THRESHOLD})")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    add_worker_options(parser, "--ct", "--weights")
    args = parser.parse_args()
    if args.worker:
        serve_worker({"ctseg": worker_ctseg, "monai": worker_monai}[args.worker], args)
        return
    configure_logging()
    with tempfile.TemporaryDirectory(prefix="ctseg_bench_") as workdir:
        args.workdir = workdir
        args.ct = str(Path(workdir) / "ct.nii.gz")
        args.weights = str(Path(workdir) / "model.pt")
        make_ct(Path(args.ct), tuple(args.shape) if args.shape else None, args.source,
                args.spacing)
        make_weights(Path(args.weights), args.seed)
        shape = nib.load(args.ct).shape
        options = worker_options(args)
        sides = run_sides(__file__, {"monai": options, "ctseg": options}, workdir,
                          args.repeats)
        checks = {"ctseg vs MONAI": agreement(
            "share of voxels with equal labels",
            voxel_agreement(sides["ctseg"]["output"], sides["monai"]["output"]),
            args.threshold)}
    setting = {"shape": list(shape), "spacing_mm": args.spacing, "num_classes": NUM_CLASSES,
               "device": args.device, "roi": args.roi, "overlap": args.overlap,
               "sw_batch_size": args.sw_batch_size}
    report = payload("inference", PREDICTION_SPAN, args.repeats, setting, sides, checks)
    print(report_text(report, "monai", f"CT {'x'.join(map(str, shape))} at {args.spacing} mm, "
                      f"{NUM_CLASSES} classes, {args.device}"))
    finish(report, args.out)


if __name__ == "__main__":
    main()
