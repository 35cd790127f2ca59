"""One prepared GPU report: TensorRT, prediction against the bundle, training and VISTA3D.

    python benchmarks/gpu_report.py [--out gpu_report] [--steps 60]

Meant to run once on one GPU in under 8 minutes. Each section runs in its own interpreter
(`common.run_worker`; its failure is recorded in the report and the next section runs) with the
bundle's 105-class SegResNet (random weights) and a whole-body-sized phantom CT:

- `predict_3mm`, `predict_1.5mm`: `predict.py` with its defaults (AMP, placement planned from
  the free GPU memory) and with `sw.batch_size=auto`, against the bundle's inference.json
  pipeline with AMP (`ctseg.reference.wholebody_bundle`: full-volume logits on the GPU) on a
  137x137x199 CT at 3 mm and a 273x273x397 CT at 1.5 mm: time, peak GPU memory, label agreement;
- `vista3d`: VISTA3D (the bundle's network) "everything" on the 1.5 mm CT: time, peak GPU memory;
- `training`: SegResNet AMP training steps from the disk cache with 4 DataLoader workers on a
  phantom at 1.5 mm: patches per second and the share of time spent waiting for data;
- `tensorrt`: export to TensorRT fp32 and fp16 with ctseg's parity check; window compute
  (windows/s, batches of 4) of torch fp32, torch AMP and both engines; end-to-end `predict.py`
  on the 3 mm CT with each (speedups against torch fp32 and AMP).

Writes `gpu_report.md` and `gpu_report.json` to `--out`. Without CUDA it prints one line and
exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from common import add_worker_options, machine, run_worker, serve_worker

NUM_CLASSES = 105
ROI = (96, 96, 96)
CTS = {"3mm": ((137, 137, 199), 3.0), "1.5mm": ((273, 273, 397), 1.5)}
ENGINE_BATCH = 4
COMPUTE_BATCHES = 20


def make_ct(path: Path, shape: tuple[int, int, int], spacing: float) -> None:
    """A whole-body-sized phantom CT of `shape` voxels at `spacing` mm."""
    from ctseg.data.phantoms import render_subject

    affine = np.diag([spacing, spacing, spacing, 1.0])
    hu, _ = render_subject(shape, affine, np.random.default_rng(0))
    nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), path)


def make_weights(path: Path) -> None:
    """A random-init bundle SegResNet state dict (`model.pt` layout)."""
    import torch

    from ctseg.reference import wholebody_bundle as bundle

    torch.manual_seed(0)
    torch.save(bundle.network(NUM_CLASSES).state_dict(), path)


def _peak_gpu_mb() -> float:
    """Peak GPU memory torch allocated in this process, in MiB."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def worker_ctseg(args: argparse.Namespace) -> dict:
    """predict.py on `args.ct` (defaults, or `args.variant`: auto batch, fp32, TensorRT)."""
    from ctseg.inference.runner import run

    out = Path(args.workdir) / f"ctseg_{args.variant}_{Path(args.ct).name[:-7]}"
    sw = {"batch_size": "auto"} if args.variant == "auto" else {}
    cfg = {"ckpt": args.ckpt, "input": args.ct, "output": str(out), "device": "cuda",
           "masks": False, "overwrite": True, "progress": False, "sw": sw,
           "amp": args.variant not in ("fp32", "trt_fp32"),
           "backend": "tensorrt" if args.variant.startswith("trt") else "auto"}
    if not args.variant.startswith("trt"):  # bundle weights; an export folder has its classes
        cfg |= {"model": {"num_classes": NUM_CLASSES}, "data": {"version": "v1"}}
    start = time.perf_counter()
    run(cfg)
    wall = time.perf_counter() - start
    report = json.loads((out / "timing.json").read_text())["cases"][0]
    return {"seconds": report["seconds"]["total"], "wall_s": wall, "stages": report["seconds"],
            "peak_gpu_mb": report.get("peak_gpu_mb"),
            "labels": str(out / Path(args.ct).name.removesuffix(".nii.gz") / "labels.nii.gz")}


def worker_bundle(args: argparse.Namespace) -> dict:
    """The bundle's inference.json pipeline with AMP on the GPU (full-volume logits)."""
    import torch

    from ctseg.reference import wholebody_bundle as bundle

    device = torch.device("cuda")
    net = bundle.network(NUM_CLASSES)
    net.load_state_dict(torch.load(args.ckpt, map_location="cpu", weights_only=True))
    net = net.to(device).eval()
    spacing = float(nib.load(args.ct).header.get_zooms()[0])
    preprocessing = bundle.inference_preprocessing((spacing,) * 3)
    inferer = bundle.inference_inferer()
    postprocessing = bundle.inference_postprocessing(preprocessing)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    data = preprocessing({"image": args.ct})
    with torch.no_grad(), torch.autocast("cuda"):
        data["pred"] = inferer(data["image"][None].to(device), net)[0]
    data = postprocessing(data)
    labels = np.asarray(data["pred"][0].cpu()).astype(np.uint8)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    path = Path(args.workdir) / f"bundle_{Path(args.ct).name}"
    nib.save(nib.Nifti1Image(labels, nib.load(args.ct).affine), path)
    return {"seconds": seconds, "peak_gpu_mb": _peak_gpu_mb(), "labels": str(path)}


def worker_vista3d(args: argparse.Namespace) -> dict:
    """VISTA3D "everything" (all classes the checkpoint knows) through predict's segment."""
    import torch

    from ctseg.inference.inputs import Case
    from ctseg.inference.pipeline import CasePredictor, PredictOptions
    from ctseg.labels import label_names
    from ctseg.models.loading import load_model
    from ctseg.models.vista3d import VISTA3DModule

    torch.manual_seed(0)
    module = VISTA3DModule(NUM_CLASSES, label_names("v1"), roi_size=(128, 128, 128))
    ckpt = Path(args.workdir) / "vista3d.ckpt"
    data = {"version": "v1", "spacing": 1.5, "intensity": "hu_window", "smooth_sigma": 0.0,
            "patch_size": [128, 128, 128]}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "datamodule_hyper_parameters": data}, ckpt)
    model = load_model(ckpt, {}, {})
    with CasePredictor(model, PredictOptions(device="cuda")) as predictor:
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        seg = predictor.segment(Case("ct", Path(args.ct), "nifti"))
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_gpu_mb": _peak_gpu_mb(), "classes": len(model.known_ids),
            "labelled": len(np.unique(seg.labels))}


def worker_training(args: argparse.Namespace) -> dict:
    """SegResNet AMP training steps fed from the disk cache by 4 DataLoader workers."""
    import lightning as L
    import torch
    from monai.data import DataLoader

    from ctseg.callbacks.throughput import DataThroughput
    from ctseg.data.phantoms import render_subject
    from ctseg.data.transforms import PipelineConfig
    from ctseg.data.volume_cache import CachedPatches, VolumeCache
    from ctseg.models.segresnet import SegResNetModule

    work = Path(args.workdir)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    hu, labels = render_subject((240, 200, 300), affine, np.random.default_rng(1))
    record = {"image": str(work / "train_ct.nii.gz"), "label": str(work / "train_label.nii.gz")}
    nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), record["image"])
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), record["label"])
    pipeline = PipelineConfig(spacing=1.5, patch_size=ROI, num_classes=NUM_CLASSES)
    cache = VolumeCache(work / "cache", pipeline)
    cache.warm([record])
    dataset = CachedPatches(cache, [record])
    batch = 2
    loader = DataLoader(torch.utils.data.Subset(dataset, [0] * (args.steps * batch)),
                        batch_size=batch, num_workers=4, shuffle=False)
    torch.manual_seed(0)
    module = SegResNetModule(roi_size=ROI)
    throughput = DataThroughput()
    trainer = L.Trainer(accelerator="gpu", devices=1, max_epochs=1, precision="16-mixed",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[throughput])
    trainer.fit(module, loader)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("perf/")}
    return {"steps": throughput.steps, "batch": batch, **metrics}


def worker_tensorrt(args: argparse.Namespace) -> dict:
    """TensorRT fp32 / fp16 export with parity, then windows per second of each runner."""
    import torch

    from ctseg.export.exporter import export_model, sample_window
    from ctseg.export.runtime import load_runner
    from ctseg.inference.backends import torch_runner
    from ctseg.models.loading import load_export, load_model

    model = load_model(args.ckpt, {"num_classes": NUM_CLASSES}, {"version": "v1"})
    folder = Path(args.workdir) / "export"
    start = time.perf_counter()
    manifest = export_model(model, ["trt_fp32", "trt_fp16"], folder, sample_window(model),
                            max_batch=ENGINE_BATCH)
    export_s = time.perf_counter() - start
    exported = load_export(folder)
    net = torch_runner(model.net, torch.device("cuda"), channels_last=False)

    def amp(windows: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda"):
            return net(windows).float()

    runners: dict[str, Callable] = {"torch_fp32": net, "torch_amp": amp}
    for fmt in manifest["formats"]:
        runners[fmt] = load_runner(folder / exported.formats[fmt], fmt, "cuda",
                                   exported.digests[fmt])
    windows = torch.randn(ENGINE_BATCH, 1, *ROI, device="cuda")
    speed = {}
    with torch.no_grad():
        for name, runner in runners.items():
            for _ in range(3):
                runner(windows)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(COMPUTE_BATCHES):
                runner(windows)
            torch.cuda.synchronize()
            speed[name] = COMPUTE_BATCHES * ENGINE_BATCH / (time.perf_counter() - start)
    return {"export_s": export_s, "export": str(folder), "windows_per_s": speed,
            "parity": {fmt: entry["parity"] for fmt, entry in manifest["formats"].items()},
            "skipped": manifest.get("skipped", {})}


WORKERS = {"ctseg": worker_ctseg, "bundle": worker_bundle, "vista3d": worker_vista3d,
           "training": worker_training, "tensorrt": worker_tensorrt}


def measure(args: argparse.Namespace, worker: str, ct: str = "", ckpt: str = "",
            variant: str = "default") -> dict:
    """Run one worker in a fresh interpreter."""
    return run_worker(__file__, worker, args.workdir, [
        "--ct", ct, "--ckpt", ckpt, "--variant", variant, "--steps", str(args.steps)])


def agreement(a: str, b: str) -> float:
    """Fraction of voxels where two label files agree."""
    return float((np.asanyarray(nib.load(a).dataobj) == np.asanyarray(nib.load(b).dataobj))
                 .mean())


def section_predict(args: argparse.Namespace, ct: str) -> dict:
    """predict.py (defaults, auto batch) against the bundle's pipeline on one CT."""
    bundle = measure(args, "bundle", ct, args.weights)
    rows = {"bundle": bundle}
    for variant in ("default", "auto"):
        row = measure(args, "ctseg", ct, args.weights, variant)
        row["agreement"] = agreement(row["labels"], bundle["labels"])
        row["time_ratio"] = row["seconds"] / bundle["seconds"]
        row["gpu_memory_ratio"] = row["peak_gpu_mb"] / bundle["peak_gpu_mb"]
        rows[f"ctseg_{variant}"] = row
    return rows


def section_tensorrt(args: argparse.Namespace) -> dict:
    """Export and window compute, then predict.py end to end with each backend (3 mm CT)."""
    result = measure(args, "tensorrt", ckpt=args.weights)
    speed = result["windows_per_s"]
    result["compute_speedup"] = {name: {"vs_torch_fp32": s / speed["torch_fp32"],
                                        "vs_torch_amp": s / speed["torch_amp"]}
                                 for name, s in speed.items()}
    ct = args.cts["3mm"]
    runs = {"torch_fp32": measure(args, "ctseg", ct, args.weights, "fp32"),
            "torch_amp": measure(args, "ctseg", ct, args.weights, "default")}
    for fmt in result["parity"]:
        runs[fmt] = measure(args, "ctseg", ct, result["export"], fmt)
    result["end_to_end"] = {name: {"seconds": r["seconds"],
                                   "vs_torch_fp32": runs["torch_fp32"]["seconds"] / r["seconds"],
                                   "vs_torch_amp": runs["torch_amp"]["seconds"] / r["seconds"]}
                            for name, r in runs.items()}
    return result


def markdown(results: dict) -> str:
    """The report as Markdown: one heading per section, its figures as JSON lines or error."""
    lines = ["# ctseg GPU report", "", f"Machine: {results['machine']}", ""]
    for name, section in results["sections"].items():
        lines += [f"## {name}", ""]
        if "error" in section:
            lines += ["Failed:", "", "```", section["error"], "```", ""]
            continue
        for key, value in section.items():
            lines.append(f"- **{key}**: `{json.dumps(value, default=str)}`")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    """Parse arguments; run as a worker, or every section and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_report"),
                        help="folder for gpu_report.md and gpu_report.json")
    parser.add_argument("--steps", type=int, default=60, help="training steps")
    add_worker_options(parser, "--ct", "--ckpt", "--variant")
    args = parser.parse_args()
    if args.worker:
        serve_worker(WORKERS[args.worker], args)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_report: CUDA is not available on this machine; nothing measured")
        return 0
    results: dict = {"machine": machine(), "sections": {}}
    with tempfile.TemporaryDirectory(prefix="ctseg_gpu_report_") as workdir:
        args.workdir = workdir
        args.weights = str(Path(workdir) / "model.pt")
        make_weights(Path(args.weights))
        args.cts = {}
        for name, (shape, spacing) in CTS.items():
            args.cts[name] = str(Path(workdir) / f"ct_{name}.nii.gz")
            make_ct(Path(args.cts[name]), shape, spacing)
        sections = {"predict_3mm": lambda: section_predict(args, args.cts["3mm"]),
                    "predict_1.5mm": lambda: section_predict(args, args.cts["1.5mm"]),
                    "vista3d": lambda: measure(args, "vista3d", args.cts["1.5mm"]),
                    "training": lambda: measure(args, "training"),
                    "tensorrt": lambda: section_tensorrt(args)}
        for name, work in sections.items():
            print(f"[{name}] running ...", flush=True)
            start = time.perf_counter()
            try:
                results["sections"][name] = work()
            except Exception:
                results["sections"][name] = {"error": traceback.format_exc(limit=3)}
            status = "failed" if "error" in results["sections"][name] else "done"
            print(f"[{name}] {status} in {time.perf_counter() - start:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_report.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.out / "gpu_report.md").write_text(markdown(results) + "\n")
    print(f"wrote {args.out / 'gpu_report.md'} and {args.out / 'gpu_report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
