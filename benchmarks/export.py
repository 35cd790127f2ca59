"""Benchmark the prediction backends: model compute of one window and end-to-end prediction of a
CT, for fp32, channels-last, reduced precision (bf16 on CPU, AMP on CUDA), TorchScript,
ONNX Runtime and, on a GPU, TensorRT fp32/fp16, against MONAI's pipeline (the bundle's
inference.json) at each spacing.

    python benchmarks/export.py [--spacing 3 1.5] [--device cpu|cuda] [--ckpt trained.ckpt]
                                [--out export.json]

Weights: a random-init bundle SegResNet (105 classes), or `--ckpt` (a ctseg checkpoint: its own
architecture, classes and preprocessing; the MONAI row then needs the bundle architecture and
is left out, agreement is against ctseg fp32). The CT is the shared crop resampled to each
spacing. The network is exported once (`python -m ctseg.export`, parity checked); then every
variant runs in its own interpreter: 1 warm-up + `--repeats` timed windows of random input,
then `predict.py`'s run on the CT. Prints one table per spacing and writes all as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from common import SHARED, add_worker_options, machine, run_worker, serve_worker
from inference import NUM_CLASSES, make_ct, make_weights, worker_monai

SHARED_CT = SHARED / "s0001" / "ct.nii.gz"
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
CUDA_VARIANTS = ("fp32", "fp32 channels-last", "AMP fp16", "TorchScript", "onnxruntime",
                 "TensorRT fp32", "TensorRT fp16")


def predict_cfg(args: argparse.Namespace, options: dict, out: Path) -> dict:
    """predict.py's configuration for one variant."""
    ckpt = args.weights if options["backend"] == "torch" else args.model
    return {"ckpt": ckpt, "input": args.ct, "output": str(out), "device": args.device,
            "masks": False, "overwrite": True, "progress": False,
            "sw": {"overlap": 0.25, "batch_size": 1},
            "model": {"num_classes": NUM_CLASSES},
            "data": {"version": "v1", "spacing": args.spacing, "intensity": "segresnet"},
            **options}


def worker_export(args: argparse.Namespace) -> dict:
    """Export the network (parity checked) to the formats the device runs; seconds taken."""
    from ctseg.export.__main__ import run

    formats = ["torchscript", "onnx"] + (["trt_fp32", "trt_fp16"] if args.device == "cuda"
                                         else [])
    start = time.perf_counter()
    manifest = run({"ckpt": args.weights, "output": args.model, "formats": formats,
                    "sample": args.ct, "device": args.device,
                    "model": {"num_classes": NUM_CLASSES},
                    "data": {"version": "v1", "spacing": args.spacing}})
    return {"seconds": time.perf_counter() - start,
            "parity": {f: e["parity"] for f, e in manifest["formats"].items()},
            "skipped": manifest.get("skipped", {})}


def worker_variant(args: argparse.Namespace) -> dict:
    """Time one window and one end-to-end prediction with the variant's options."""
    import torch

    from ctseg.inference.pipeline import CasePredictor
    from ctseg.inference.runner import options_from, run
    from ctseg.models.loading import load_model

    slug = "".join(c if c.isalnum() else "_" for c in args.variant)
    cfg = predict_cfg(args, VARIANTS[args.variant], Path(args.workdir) / f"pred_{slug}")
    model = load_model(cfg["ckpt"], cfg["model"], cfg["data"])
    device = torch.device(args.device)
    window = torch.randn(1, 1, *model.roi_size, device=device)
    with CasePredictor(model, options_from(cfg)) as predictor:
        predict = predictor._predictor(predictor.runner)
        times = []
        with torch.no_grad():
            for _ in range(args.repeats + 1):
                start = time.perf_counter()
                predict(window)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
    start = time.perf_counter()
    if run(cfg):
        raise SystemExit(f"{args.variant}: prediction failed")
    seconds = time.perf_counter() - start
    out = Path(cfg["output"])
    report = json.loads((out / "timing.json").read_text())["cases"][0]
    return {"window_s": statistics.median(times[1:]), "seconds": seconds,
            "stages": report["seconds"],
            "labels": str(out / Path(args.ct).name.removesuffix(".nii.gz") / "labels.nii.gz")}


def measure(name: str, args: argparse.Namespace, variant: str = "") -> dict:
    """Run one measurement in a fresh interpreter."""
    options = ["--ct", args.ct, "--weights", args.weights, "--model", args.model,
               "--device", args.device, "--spacing", str(args.spacing),
               "--repeats", str(args.repeats), "--roi", "96", "--overlap", "0.25",
               "--sw-batch-size", "1"]
    if variant:
        options += ["--variant", variant]
    return run_worker(__file__, name, args.workdir, options)


def read_labels(path: str) -> np.ndarray:
    """A label map written by a variant."""
    return np.asanyarray(nib.load(path).dataobj)


def table(spacing: float, shape: tuple[int, ...], rows: dict[str, dict]) -> str:
    """One spacing's results as a markdown table."""
    base, monai = rows["fp32"], rows.get("monai")
    lines = [f"CT {'x'.join(map(str, shape))} at {spacing} mm", "",
             "| variant | window (s) | window speed-up | predict (s) | vs MONAI pipeline | "
             "labels = MONAI | labels = fp32 | peak RSS (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        window = f"{r['window_s']:.3f}" if "window_s" in r else "-"
        speed = f"{base['window_s'] / r['window_s']:.2f}x" if "window_s" in r else "-"
        versus = f"{r['seconds'] / monai['seconds']:.2f}x" if monai else "-"
        same_monai = f"{r['agreement_monai'] * 100:.3f} %" if "agreement_monai" in r else "-"
        lines.append(f"| {name} | {window} | {speed} | {r['seconds']:.1f} | {versus} | "
                     f"{same_monai} | {r['agreement_fp32'] * 100:.3f} % | "
                     f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    """Parse arguments; run as the coordinator or, with --worker, as one measurement."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spacing", type=float, nargs="+", default=[3.0, 1.5])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--ckpt", type=Path, help="trained ctseg checkpoint (default: random "
                        "bundle weights)")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per variant")
    parser.add_argument("--source", type=Path, default=SHARED_CT, help="CT to resample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    add_worker_options(parser, "--ct", "--weights", "--model", "--variant", "--roi",
                       "--overlap", "--sw-batch-size")
    args = parser.parse_args()
    if args.worker:
        args.spacing = float(args.spacing[0]) if isinstance(args.spacing, list) \
            else float(args.spacing)
        args.repeats = int(args.repeats)
        for option in ("roi", "sw_batch_size"):
            setattr(args, option, int(getattr(args, option)))
        args.overlap = float(args.overlap)
        work = {"export": worker_export, "variant": worker_variant, "monai": worker_monai}
        serve_worker(work[args.worker], args)
        return
    variants = CUDA_VARIANTS if args.device == "cuda" else CPU_VARIANTS
    results: dict = {"machine": machine(), "device": args.device, "spacings": {},
                     "weights": str(args.ckpt) if args.ckpt else "random bundle SegResNet"}
    for spacing in args.spacing:
        with tempfile.TemporaryDirectory(prefix="ctseg_export_bench_") as workdir:
            args.workdir, args.spacing = workdir, spacing
            args.ct = str(Path(workdir) / "ct.nii.gz")
            args.weights = str(args.ckpt or Path(workdir) / "model.pt")
            args.model = str(Path(workdir) / "export")
            make_ct(Path(args.ct), None, args.source, spacing)
            if not args.ckpt:
                make_weights(Path(args.weights), args.seed)
            export = measure("export", args)
            rows = {} if args.ckpt else {"monai": measure("monai", args)}
            for name in variants:
                rows[name] = measure("variant", args, name)
            fp32 = read_labels(rows["fp32"]["labels"])
            monai = read_labels(rows["monai"]["labels"]) if "monai" in rows else None
            for r in rows.values():
                labels = read_labels(r.pop("labels"))
                r["agreement_fp32"] = float((labels == fp32).mean())
                if monai is not None:
                    r["agreement_monai"] = float((labels == monai).mean())
            shape = nib.load(args.ct).shape
        print(table(spacing, shape, rows) + "\n")
        results["spacings"][str(spacing)] = {"shape": list(shape), "export": export,
                                             "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
