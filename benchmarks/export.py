"""Benchmark the prediction backends: model compute of one window and end-to-end prediction of a
CT, for fp32, channels-last, reduced precision (bf16 on CPU, AMP on CUDA), TorchScript,
ONNX Runtime and, on a GPU, TensorRT fp32/fp16, against MONAI's pipeline (the bundle's
inference.json) at each spacing.

    python benchmarks/export.py [--spacing 3 1.5] [--device cpu|cuda] [--ckpt trained.ckpt]
                                [--variants ...] [--roi 96] [--repeats 3] [--out export.json]

Weights: a random-init bundle SegResNet (105 classes), or `--ckpt` (a ctseg checkpoint, SegResNet or
VISTA3D: its own architecture, classes and preprocessing, only the spacing set by `--spacing`; a
VISTA3D runs and is exported in its automatic mode over the checkpoint's known ids; the MONAI side
then needs the bundle architecture and is left out, agreement is against ctseg fp32 only). The
window is `--roi` voxels per axis (default: the bundle's 96, or the checkpoint's own window with
`--ckpt`), the same for the export (TensorRT engines are built for it) and the sliding window. The
CT is the shared crop resampled to each spacing. The network is exported once per spacing to the
formats the variants need (`python -m ctseg.export`, parity checked, untimed); then every variant
and MONAI's pipeline are measured with the protocol of benchmarks/common.py (one process per
measurement, interleaved rounds, one untimed warm-up, medians), over the same span as
benchmarks/inference.py: from the input file to the labels in memory, writing timed apart. Each
variant's process also times one window of random input (the median of `--windows`, after a warm-up
window): the model compute alone (for a VISTA3D the automatic mode over its known ids, the module
its exports hold).

Agreement: each variant's labels against fp32's and against MONAI's, at least 99.9 % of the
voxels for the float32 variants and 98 % for the reduced-precision ones (bf16, AMP fp16,
TensorRT fp16: with random weights the 105 classes are near-ties, see REDUCED_THRESHOLD); the
script exits non-zero after writing the JSON when one is below. A variant whose format the
export skipped (TensorRT without torch-tensorrt or without CUDA), or one asked for that the
device does not run (AMP fp16 and TensorRT on CPU, bf16 on CUDA), is not run and is recorded in
`setting.skipped_variants` with the reason. Prints the tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
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
    run_worker,
    serve_worker,
    voxel_agreement,
)
from inference import NUM_CLASSES, THRESHOLD, make_ct, make_weights, predict_span, worker_monai

SHARED_CT = SHARED / "s0001" / "ct.nii.gz"
log = logging.getLogger(__name__)
# Variant -> predict.py options; which run where.
VARIANTS = {
    "fp32": {"backend": "torch", "channels_last": False, "amp": False},
    "fp32 channels-last": {"backend": "torch", "channels_last": True, "amp": False},
    "bf16 (CPU autocast)": {"backend": "torch", "channels_last": True, "cpu_bf16": True},
    "AMP fp16": {"backend": "torch", "channels_last": True, "amp": True},
    "TorchScript": {"backend": "torchscript", "amp": False},
    "onnxruntime": {"backend": "onnxruntime", "amp": False},
    "TensorRT fp32": {"backend": "tensorrt", "amp": False},
    "TensorRT fp16": {"backend": "tensorrt", "amp": True},
}
CPU_VARIANTS = ("fp32", "fp32 channels-last", "bf16 (CPU autocast)", "TorchScript",
                "onnxruntime")
# Export format each exported variant runs.
FORMATS = {"TorchScript": "torchscript", "onnxruntime": "onnx", "TensorRT fp32": "trt_fp32",
           "TensorRT fp16": "trt_fp16"}
# Reduced-precision variants and their least share of voxels with labels equal to fp32's (and
# MONAI's): the random weights' 105 classes are near-ties almost everywhere, so rounding to bf16 /
# fp16 flips 1-2 % of the voxels (a trained network keeps 99.94 %, see benchmarks/README.md);
# every other variant computes in float32 and must keep THRESHOLD (99.9 %).
REDUCED = ("bf16 (CPU autocast)", "AMP fp16", "TensorRT fp16")
REDUCED_THRESHOLD = 0.98
CUDA_VARIANTS = ("fp32", "fp32 channels-last", "AMP fp16", "TorchScript", "onnxruntime",
                 "TensorRT fp32", "TensorRT fp16")
# The window edge (voxels) of the random bundle weights: the bundle's inference.json roi_size.
BUNDLE_ROI = 96


def data_cfg(args: argparse.Namespace) -> dict:
    """predict.py's and the export's `data` config: the spacing and window of the benchmark; the
    bundle's classes and intensity scheme for the random weights, a checkpoint's own otherwise."""
    data: dict[str, Any] = {"spacing": float(args.spacing)}
    if args.roi:
        data["patch_size"] = [int(args.roi)] * 3
    if not args.ckpt_given:
        data.update(version="v1", intensity="segresnet")
    return data


def predict_cfg(args: argparse.Namespace, options: dict) -> dict:
    """predict.py's configuration for one variant."""
    ckpt = args.weights if options["backend"] == "torch" else args.model
    data = data_cfg(args)
    if options["backend"] != "torch":  # an export runs the window it was exported with
        data.pop("patch_size", None)
    return {"ckpt": ckpt, "input": args.ct, "device": args.device, "masks": False,
            "sw": {"overlap": 0.25, "batch_size": 1}, "model": {"num_classes": NUM_CLASSES},
            "data": data, **options}


def worker_export(args: argparse.Namespace) -> dict:
    """Export the network (parity checked) to the formats the variants need; seconds taken."""
    from ctseg.export.__main__ import run
    from ctseg.export.formats import DEFAULT_MAX_BATCH, DEFAULT_OPSET

    formats = json.loads(args.formats)
    start = time.perf_counter()
    manifest = run({"ckpt": args.weights, "output": args.model, "formats": formats,
                    "sample": args.ct, "device": args.device, "opset": DEFAULT_OPSET,
                    "max_batch": DEFAULT_MAX_BATCH,
                    "model": {"num_classes": NUM_CLASSES}, "data": data_cfg(args)})
    return {"seconds": time.perf_counter() - start, "kind": manifest["kind"],
            "roi_size": manifest["roi_size"],
            "parity": {f: e["parity"] for f, e in manifest["formats"].items()},
            "skipped": manifest.get("skipped", {})}


def worker_variant(args: argparse.Namespace) -> dict:
    """One variant's side: the median time of one window of random input (model compute; one
    warm-up window first; a VISTA3D's automatic mode over its known ids, as its exports), then
    predict.py's span under the protocol."""
    import torch

    from ctseg.inference.backends import torch_runner
    from ctseg.models.loading import window_network

    device = torch.device(args.device)

    def windows(predictor: Any) -> dict:
        runner, model = predictor.runner, predictor.model
        if predictor.vista3d and predictor.format == "torch":
            runner = torch_runner(window_network(model.net, model.kind, model.known_ids), device,
                                  predictor.options.channels_last)
        predict = predictor._predictor(runner)
        window = torch.randn(1, 1, *predictor.roi, device=device)
        times = []
        with torch.no_grad():
            for _ in range(int(args.windows) + 1):
                start = time.perf_counter()
                predict(window)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        return {"window_s": statistics.median(times[1:]), "roi_size": list(predictor.roi)}

    cfg = predict_cfg(args, VARIANTS[args.variant])
    return predict_span(cfg, Path(args.workdir), args.worker, setup=windows)


def side_name(variant: str, spacing: float) -> str:
    """The name of a variant's side at one spacing."""
    return f"{variant}, {spacing:g} mm"


def checks_of(sides: dict[str, dict], variants: list[str], spacing: float,
              with_monai: bool) -> dict[str, dict]:
    """The agreement checks at one spacing: each variant against fp32 and against MONAI."""
    checks = {}
    fp32 = sides[side_name("fp32", spacing)]["output"]
    monai = sides[side_name("monai", spacing)]["output"] if with_monai else None
    for variant in variants:
        labels = sides[side_name(variant, spacing)]["output"]
        threshold = REDUCED_THRESHOLD if variant in REDUCED else THRESHOLD
        if variant != "fp32":
            checks[f"{side_name(variant, spacing)} vs fp32"] = agreement(
                "share of voxels with labels equal to fp32's", voxel_agreement(labels, fp32),
                threshold)
        if monai is not None:
            checks[f"{side_name(variant, spacing)} vs MONAI"] = agreement(
                "share of voxels with labels equal to MONAI's", voxel_agreement(labels, monai),
                threshold)
    return checks


def table(report: dict, spacing: float, variants: list[str]) -> str:
    """One spacing's variants as a markdown table (the protocol's figures are in report_text)."""
    sides, checks = report["sides"], report["agreement"]
    monai = sides.get(side_name("monai", spacing))
    base = sides[side_name("fp32", spacing)]
    shape = "x".join(map(str, report["setting"]["shapes"][f"{spacing:g}"]))
    lines = [f"CT {shape} at {spacing:g} mm", "",
             "| variant | window (s) | window speed-up | predict (s) | vs MONAI | write (s) | "
             "labels = MONAI | labels = fp32 | peak RSS (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for variant in (["monai"] if monai else []) + variants:
        name = side_name(variant, spacing)
        r = sides[name]
        window = f"{r['window_s']:.3f}" if "window_s" in r else "-"
        speed = f"{base['window_s'] / r['window_s']:.2f}x" if "window_s" in r else "-"
        versus = f"{r['seconds'] / monai['seconds']:.2f}x" if monai else "-"
        same = {ref: f"{checks[f'{name} vs {ref}']['value'] * 100:.3f} %"
                if f"{name} vs {ref}" in checks else "-" for ref in ("MONAI", "fp32")}
        lines.append(f"| {variant} | {window} | {speed} | {r['seconds']:.2f} | {versus} | "
                     f"{r['write_seconds']:.2f} | {same['MONAI']} | {same['fp32']} | "
                     f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    """Parse arguments; run as the coordinator or, with --worker, as one measurement."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Smallest setting (seconds): --spacing 6 --roi 32 --variants fp32 onnxruntime "
        "--repeats 1")
    parser.add_argument("--spacing", type=float, nargs="+", default=[3.0, 1.5],
                        help="model grids (mm) at which the shared crop is predicted")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--ckpt", type=Path, help="trained ctseg checkpoint (default: random "
                        "bundle weights)")
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS),
                        help="variants to run (fp32, the reference, always runs; default: all "
                        "the device runs)")
    parser.add_argument("--roi", type=int, help=f"window edge in voxels (default: {BUNDLE_ROI}, "
                        "the bundle's; with --ckpt the checkpoint's window)")
    parser.add_argument("--windows", type=int, default=3, help="timed windows per variant")
    add_repeats_option(parser)
    parser.add_argument("--source", type=Path, default=SHARED_CT, help="CT to resample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    add_worker_options(parser, "--ct", "--weights", "--model", "--variant", "--overlap",
                       "--sw-batch-size", "--formats", "--ckpt-given")
    args = parser.parse_args()
    if args.worker:
        args.ckpt_given = args.ckpt_given == "1"
        args.spacing = args.spacing[0]
        if args.worker == "export":
            serve_worker(worker_export, args)
        else:
            serve_worker(worker_monai if args.variant == "monai" else worker_variant, args)
        return
    configure_logging()
    device_variants = CUDA_VARIANTS if args.device == "cuda" else CPU_VARIANTS
    variants = [v for v in device_variants if v == "fp32" or v in (args.variants or
                                                                   device_variants)]
    skipped = {v: f"runs on {'CPU' if args.device == 'cuda' else 'CUDA'} only (--device "
               f"{args.device})" for v in args.variants or () if v not in device_variants}
    if not args.ckpt:
        args.roi = args.roi or BUNDLE_ROI
    sides: dict[str, dict] = {}
    checks: dict[str, dict] = {}
    exports, shapes = {}, {}
    for spacing in args.spacing:
        with tempfile.TemporaryDirectory(prefix="ctseg_export_bench_") as workdir:
            args.workdir = workdir
            args.ct = str(Path(workdir) / "ct.nii.gz")
            args.weights = str(args.ckpt or Path(workdir) / "model.pt")
            args.model = str(Path(workdir) / "export")
            make_ct(Path(args.ct), None, args.source, spacing)
            if not args.ckpt:
                make_weights(Path(args.weights), args.seed)
            options = ["--ct", args.ct, "--weights", args.weights, "--model", args.model,
                       "--device", args.device, "--spacing", str(spacing), "--overlap", "0.25",
                       "--sw-batch-size", "1", "--windows", str(args.windows), "--ckpt-given",
                       "1" if args.ckpt else "0", *(["--roi", str(args.roi)] if args.roi else [])]
            formats = list(dict.fromkeys(FORMATS[v] for v in variants if v in FORMATS))
            if formats:
                exports[f"{spacing:g}"] = run_worker(__file__, "export", workdir, [
                    *options, "--formats", json.dumps(formats)])
                unavailable = exports[f"{spacing:g}"]["skipped"]
                skipped |= {v: unavailable[FORMATS[v]] for v in variants
                            if FORMATS.get(v) in unavailable}
                variants = [v for v in variants if v not in skipped]
                for variant, reason in skipped.items():
                    log.info("%s skipped: %s", variant, reason)
            names = (["monai"] if not args.ckpt else []) + variants
            at = run_sides(__file__, {side_name(v, spacing): [*options, "--variant", v]
                                      for v in names}, workdir, args.repeats)
            for v in names:
                at[side_name(v, spacing)].update(variant=v, spacing_mm=spacing)
            checks.update(checks_of(at, variants, spacing, not args.ckpt))
            sides.update(at)
            shapes[f"{spacing:g}"] = list(nib.load(args.ct).shape)
    setting = {"spacings_mm": args.spacing, "shapes": shapes, "device": args.device,
               "roi": sides[side_name("fp32", args.spacing[0])]["roi_size"],
               "variants": variants, "skipped_variants": skipped, "exports": exports,
               "weights": str(args.ckpt) if args.ckpt else "random bundle SegResNet"}
    report = payload("export", PREDICTION_SPAN, args.repeats, setting, sides, checks)
    base = side_name("monai" if not args.ckpt else "fp32", args.spacing[0])
    print(report_text(report, base, f"Export backends, {args.device}") + "\n")
    for spacing in args.spacing:
        print(table(report, spacing, variants) + "\n")
    for variant, reason in skipped.items():
        print(f"{variant}: skipped ({reason})")
    finish(report, args.out)


if __name__ == "__main__":
    main()
