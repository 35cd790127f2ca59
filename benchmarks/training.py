"""Benchmark the training data pipeline and whole-volume evaluation at real size.

    python benchmarks/training.py [--tile 11] [--patches 60] [--workers 1] [--patch 96]
                                  [--device cuda --train-steps 30 [--train-models ...]
                                  [--strategies single ddp]] [--out result.json]

Builds one real-sized CT: the shared TotalSegmentator crop resampled to 1.5 mm (243x201x59) and,
with its merged v1 label map, tiled `--tile` times along z (mirrored every other time): 11 tiles
give 243x201x649, 31.7 M voxels, the size of a whole-body CT at 1.5 mm, with real anatomy.

Training DataLoader (one process per pipeline, `--workers` workers, one 96^3 patch per item):

- `bundle`: the bundle's train.json transforms (`ctseg.reference.wholebody_bundle`), uncached;
- `bundle_cached`: the same in MONAI's CacheDataset (as train.json, cache_rate 1);
- `ctseg_none`, `ctseg_memory`, `ctseg_disk`: ctseg's `data.cache=none|memory|disk` (the disk
  cache reads patches from memory-mapped arrays).

Each reports patches per second after the first item (cache building excluded, timed apart) and
the peak RSS of its worker process. Evaluation: one volume (`--eval-volume crop|tiled`) through
ctseg's validation step (slab aggregation, per-class counts) against `predict.py` on the same
CT, with the bundle's 105-class SegResNet (random weights). With `--train-steps N` (meant for a
GPU: `--device cuda`), each cached pipeline of `--train-pipelines` also feeds N real training
steps of each model of `--train-models` (the bundle's SegResNet, VISTA3D's vista3d132 or its
small variant) with each of `--strategies` (one process, or Lightning's DDP on one device, the
NCCL path of `trainer=ddp`), batch `--batch-size` of `--patch`-edged patches, AMP on CUDA, and
reports the patches per second the steps consumed and the share of time they waited for data
(`ctseg.callbacks.throughput`). With `--processes` (and
`--no-loaders --skip-eval` for that alone), the test stage as a user runs it, `python train.py
data=totalseg_v1 data.root=<a download holding the volume as its test subject>
model.init_filters=<its width> model.pretrained=<ckpt> data.spacing=<its spacing>
data.patch_size=<its window> train=false test=true`, against `python predict.py ckpt=<ckpt>` on
the same CT, written on the model grid (for a checkpoint trained on phantoms a phantom held out
from its training, else the `--eval-volume`): whole processes, a warm-up round (preparing and
caching the data), then the median of `--repeats` interleaved rounds of time and peak RSS (of the
largest process). The checkpoint is a trained slim SegResNet (train.py's default model;
`--ckpt`, else one member of benchmarks/ensemble.py's recipe, trained first, untimed), so both
mean Dice values are far from 0; they must agree within `PROCESS_TOLERANCE`. Prints tables,
writes JSON.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from common import (
    REPO,
    SHARED,
    add_repeats_option,
    add_worker_options,
    agreement,
    finish,
    machine,
    payload,
    report_text,
    run_sides,
    run_worker,
    serve_worker,
)

SPACING = 1.5
PATCH = (96, 96, 96)
PIPELINES = ("bundle", "bundle_cached", "ctseg_none", "ctseg_memory", "ctseg_disk")
# Patches timed per pipeline when --patches is given for the fast ones; uncached ones take fewer.
SLOW = ("bundle", "ctseg_none")


def make_volume(workdir: Path, tile: int, spacing: float = SPACING, source: Path = SHARED
                ) -> dict[str, str]:
    """Write the first subject of the download `source` (default: the shared crop), tiled, as a
    CT and label map at `spacing` mm (RAS); return their paths."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

    from ctseg.data.merge import prepare

    workdir.mkdir(parents=True, exist_ok=True)
    record = prepare(source, out=workdir / "prepared").records[0]
    keys = ("image", "label")
    load = Compose([LoadImaged(keys=keys), EnsureChannelFirstd(keys=keys),
                    Orientationd(keys=keys, axcodes="RAS",
                                 labels=(("L", "R"), ("P", "A"), ("I", "S"))),
                    Spacingd(keys=keys, pixdim=spacing, mode=("bilinear", "nearest"))])
    data = load({"image": record["image"], "label": record["label"]})
    affine = np.asarray(data["image"].affine, dtype=np.float64)
    paths = {}
    for key, dtype in (("image", np.int16), ("label", np.uint8)):
        array = np.rint(np.asarray(data[key][0])).astype(dtype)
        array = np.concatenate([array, array[:, :, ::-1]] * (tile // 2) + [array] * (tile % 2), 2)
        paths[key] = str(workdir / f"{key}.nii.gz")
        nib.save(nib.Nifti1Image(array, affine), paths[key])
    return paths


def _dataset(name: str, record: dict, cache_dir: Path, patch: tuple[int, int, int] = PATCH):
    """The training dataset of pipeline `name` (patches of `patch` voxels), built as the
    DataModule (or train.json) does."""
    from monai.data import CacheDataset, Dataset

    from ctseg.data.transforms import PipelineConfig, train_transforms
    from ctseg.data.volume_cache import CachedPatches, VolumeCache
    from ctseg.reference import wholebody_bundle as bundle

    if name.startswith("bundle"):
        transform = bundle.train_preprocessing((SPACING,) * 3, patch)
        if name == "bundle_cached":
            return CacheDataset([record], transform, cache_rate=1.0, progress=False)
        return Dataset([record], transform)
    pipeline = PipelineConfig(spacing=SPACING, patch_size=patch, num_classes=105)
    if name == "ctseg_disk":
        cache = VolumeCache(cache_dir, pipeline)
        cache.warm([record])  # as the DataModule's setup does, before any worker starts
        return CachedPatches(cache, [record])
    if name == "ctseg_memory":
        return CacheDataset([record], train_transforms(pipeline), cache_rate=1.0, progress=False)
    return Dataset([record], train_transforms(pipeline))


def worker_loader(args: argparse.Namespace) -> dict:
    """Time one pipeline's DataLoader: first item (cache building), then patches per second."""
    import torch
    from monai.data import DataLoader

    record = {"image": args.image, "label": args.label}
    start = time.perf_counter()
    dataset = _dataset(args.worker, record, Path(args.workdir) / "cache", patch_of(args))
    setup = time.perf_counter() - start
    count = max(2, args.patches // 10) if args.worker in SLOW else args.patches
    loader = DataLoader(torch.utils.data.Subset(dataset, [0] * (count + 1)), batch_size=1,
                        num_workers=args.workers, persistent_workers=False)
    batches = iter(loader)
    start = time.perf_counter()
    first = next(batches)
    first_s = time.perf_counter() - start
    assert tuple(first["image"].shape[-3:]) == patch_of(args), first["image"].shape
    start = time.perf_counter()
    for _ in batches:
        pass
    seconds = time.perf_counter() - start
    del batches, loader
    worker_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"setup_s": setup, "first_item_s": first_s, "patches": count,
            "patches_per_s": count / seconds, "worker_peak_rss_mb": worker_rss}


TRAINED = ("bundle_cached", "ctseg_memory", "ctseg_disk")
# Models the training steps may train: the bundle's SegResNet, and VISTA3D (the bundle's network,
# vista3d132, or model=vista3d_small's; benchmarks/vista3d.py's variants).
MODELS = ("segresnet", "vista3d132", "vista3d_small")
# How the steps run: one process as train.py's trainer=gpu, or Lightning's DDP strategy on one
# device (trainer=ddp with devices=1: the process group, NCCL on CUDA, gloo on CPU; VISTA3D with
# train.py's find-unused-parameters variant).
STRATEGIES = {"single": "auto", "ddp": "ddp"}


def patch_of(args: argparse.Namespace) -> tuple[int, int, int]:
    """The patch edge `--patch` as a 3D patch size."""
    return (int(args.patch),) * 3


def train_module(model: str, patch: tuple[int, int, int]):
    """A freshly seeded training module of `model` (MODELS) with `patch`-sized windows."""
    import torch
    from vista3d import VARIANTS

    from ctseg.labels import label_names
    from ctseg.models.segresnet import SegResNetModule
    from ctseg.models.vista3d import VISTA3DModule

    torch.manual_seed(0)
    if model == "segresnet":
        return SegResNetModule(roi_size=patch)
    variant = VARIANTS["small" if model == "vista3d_small" else "vista3d132"]
    return VISTA3DModule(105, label_names("v1"), roi_size=patch, **variant)


def worker_train(args: argparse.Namespace) -> dict:
    """Feed real training steps of `--model` from one pipeline's DataLoader, AMP on CUDA, with
    `--strategy`."""
    import lightning as L
    import torch
    from monai.data import DataLoader

    from ctseg.callbacks.throughput import DataThroughput
    from ctseg.training import ddp_strategy

    name = args.worker.removeprefix("train_").split(" ")[0]
    dataset = _dataset(name, {"image": args.image, "label": args.label},
                       Path(args.workdir) / "cache", patch_of(args))
    items = args.train_steps * args.batch_size
    loader = DataLoader(torch.utils.data.Subset(dataset, [0] * items), batch_size=args.batch_size,
                        num_workers=args.workers, shuffle=False)
    module = train_module(args.model, patch_of(args))
    throughput = DataThroughput()
    cuda = args.device == "cuda"
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, max_epochs=1,
                        strategy=ddp_strategy(STRATEGIES[args.strategy], module),
                        precision="16-mixed" if cuda else "32", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[throughput])
    trainer.fit(module, loader)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("perf/")}
    out = {"steps": throughput.steps, "model": args.model, "strategy": args.strategy,
           "strategy_class": type(trainer.strategy).__name__, **metrics}
    if cuda:
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def worker_eval(args: argparse.Namespace) -> dict:
    """Evaluate one volume as validation does (slab aggregation, per-class counts)."""
    import torch

    from ctseg.data.transforms import PipelineConfig, eval_transforms
    from ctseg.models.segresnet import SegResNetModule

    device = torch.device(args.device)
    module = SegResNetModule(roi_size=patch_of(args), sw_batch_size=1)
    module.net.load_state_dict(torch.load(args.weights, weights_only=True))
    module = module.to(device).eval()
    start = time.perf_counter()
    pipeline = PipelineConfig(spacing=SPACING, patch_size=patch_of(args), smooth_sigma=0.0)
    data = eval_transforms(pipeline)({"image": args.image, "label": args.label})
    batch = {"image": data["image"][None].to(device), "label": data["label"][None].to(device)}
    with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
        module.validation_step(batch, 0)
    dice = module.val_dice.compute()
    result = {"seconds": time.perf_counter() - start, "voxels": int(data["image"].numel()),
              "classes_with_ground_truth": int((~torch.isnan(dice)).sum())}
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def worker_predict(args: argparse.Namespace) -> dict:
    """Predict the same CT with predict.py's runner (bare bundle state dict)."""
    from ctseg.inference.runner import run

    out = Path(args.workdir) / "predict"
    cfg = {"ckpt": args.weights, "input": args.image, "output": str(out), "device": args.device,
           "masks": False, "overwrite": True, "progress": False,
           "model": {"num_classes": 105}, "data": {"version": "v1", "spacing": SPACING}}
    start = time.perf_counter()
    if run(cfg):
        raise SystemExit("prediction failed")
    result = {"seconds": time.perf_counter() - start}
    report = json.loads((out / "timing.json").read_text())["cases"][0]
    if "peak_gpu_mb" in report:
        result["peak_gpu_mb"] = report["peak_gpu_mb"]
    return result


def write_download(workdir: Path, volume: dict[str, str]) -> Path:
    """A TotalSegmentator-layout root holding `volume` as its one test subject (its label map
    split into the v1 masks), as a user's download has it."""
    from ctseg.labels import class_names

    subject = workdir / "download" / "s0001"
    (subject / "segmentations").mkdir(parents=True, exist_ok=True)
    shutil.copy(volume["image"], subject / "ct.nii.gz")
    label_img = nib.load(volume["label"])
    label = np.asanyarray(label_img.dataobj)
    for index, name in class_names("v1").items():
        nib.save(nib.Nifti1Image((label == index).astype(np.uint8), label_img.affine),
                 subject / "segmentations" / f"{name}.nii.gz")
    (subject.parent / "meta.csv").write_text("image_id;split\ns0001;test\n")
    return subject.parent


# The sides of --processes: whole commands.
TRAIN_TEST, PREDICT = "train.py train=false test=true", "predict.py"
PROCESS_SPAN = "command start -> command exit (whole process)"
# Most |mean test Dice of train.py - mean Dice of predict.py's labels| of a trained checkpoint:
# the CT is on the model grid and both run the checkpoint's window, so both score the same labels
# (the test stage within the foreground crop, predict.py over the whole CT).
PROCESS_TOLERANCE = 0.005


def worker_process(args: argparse.Namespace) -> dict:
    """Run one whole command (`--command`, JSON) and time it; the peak RSS of its processes and,
    for train.py, the mean test Dice it logged."""
    argv = json.loads(args.command)
    start = time.perf_counter()
    result = subprocess.run(argv, cwd=REPO, env={**os.environ, "CTSEG_CACHE": str(
        Path(args.workdir) / "cache")}, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{result.stderr[-3000:]}")
    out = {"seconds": seconds, "write_seconds": None,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    if args.worker == TRAIN_TEST:
        metrics = max((Path(args.workdir) / "outputs").rglob("metrics.csv"),
                      key=lambda path: path.stat().st_mtime)
        with metrics.open(newline="") as table:
            out["mean_dice"] = next(float(row["test/mean_dice"]) for row in
                                    reversed(list(csv.DictReader(table)))
                                    if row.get("test/mean_dice"))
    return out


def predicted_mean_dice(labels: str, truth: str, spacing: float) -> float:
    """Mean Dice over the classes in `truth` of predict.py's label map."""
    from ctseg.evaluate.metrics import case_scores

    pred = np.asanyarray(nib.load(labels).dataobj)
    target = np.asanyarray(nib.load(truth).dataobj)
    classes = [int(c) for c in np.unique(target) if c]
    scores = case_scores(pred, target, (spacing,) * 3, classes, 2.0)
    return float(np.mean([scores[c][0] for c in classes]))


def checkpoint_volume(args: argparse.Namespace, workdir: Path) -> dict[str, str]:
    """The CT and label map of `--processes`, on the grid of `args.ckpt` (whose spacing, window
    and network width it records in `args`): for a checkpoint trained on phantoms one held out
    from its training, else the `--eval-volume`."""
    from ensemble import held_out_phantom

    from ctseg.models.loading import load_model
    from ctseg.models.weights import read_checkpoint

    model = load_model(args.ckpt, {}, {})
    spacing = model.pipeline.spacing
    if len(set(spacing)) != 1:
        raise SystemExit(f"{args.ckpt}: spacing {spacing}; --processes takes an isotropic one")
    args.ckpt_spacing, args.ckpt_window = spacing[0], model.roi_size
    args.ckpt_filters = read_checkpoint(args.ckpt)["hyper_parameters"]["init_filters"]
    phantom = held_out_phantom(args.ckpt, workdir / "phantom")
    if phantom is None:
        args.processes_volume = args.eval_volume
        tile = args.tile if args.eval_volume == "tiled" else 1
        return make_volume(workdir, tile, args.ckpt_spacing)
    args.processes_volume = "a phantom held out from the checkpoint's training"
    return make_volume(workdir, 1, args.ckpt_spacing, phantom)


def whole_processes(args: argparse.Namespace, volume: dict[str, str]) -> dict:
    """The test stage as a user runs it (`train.py ... train=false test=true` on a prepared,
    cached download) against `predict.py` on the same CT, both with the trained `args.ckpt` on
    its own grid and window: each a whole process, a warm-up round, then `--repeats` interleaved
    rounds (the common protocol); its report."""
    work = Path(args.workdir)
    root = write_download(work, volume)
    gpu = ["trainer=gpu"] if args.device == "cuda" else []
    commands = {
        TRAIN_TEST: [sys.executable, "train.py", "data=totalseg_v1", f"data.root={root}",
                     f"data.spacing={args.ckpt_spacing}",
                     f"data.patch_size=[{','.join(map(str, args.ckpt_window))}]",
                     f"model.init_filters={args.ckpt_filters}", f"model.pretrained={args.ckpt}",
                     "train=false", "test=true", "logger=csv",
                     *gpu, f"paths.log_dir={work / 'outputs'}", "callbacks.progress_bar=null"],
        PREDICT: [sys.executable, "predict.py", f"ckpt={args.ckpt}",
                  f"input={root / 's0001' / 'ct.nii.gz'}", f"output={work / 'predicted'}",
                  "masks=false", "overwrite=true", "progress=false", f"device={args.device}"],
    }
    sides = run_sides(__file__, {name: ["--command", json.dumps(argv)]
                                 for name, argv in commands.items()}, args.workdir,
                      args.repeats, warmup_round=True)
    ours = predicted_mean_dice(str(next((work / "predicted").rglob("labels.nii.gz"))),
                               volume["label"], args.ckpt_spacing)
    theirs = sides[TRAIN_TEST]["mean_dice"]
    checks = {"train.py test vs predict.py": agreement(
        f"1 - abs(mean test Dice of train.py ({theirs:.4f}) - mean Dice of predict.py's labels "
        f"({ours:.4f}))", 1 - abs(theirs - ours), 1 - PROCESS_TOLERANCE)}
    setting = {"volume": args.processes_volume, "spacing_mm": args.ckpt_spacing,
               "device": args.device, "ckpt": args.ckpt,
               "mean_dice": {TRAIN_TEST: theirs, PREDICT: ours},
               "commands": {name: " ".join(argv[1:]) for name, argv in commands.items()}}
    return payload("training --processes", PROCESS_SPAN, args.repeats, setting, sides, checks)


def measure(name: str, args: argparse.Namespace, image: str, label: str,
            extra: Sequence[str] = ()) -> dict:
    """Run one measurement in a fresh interpreter (with the worker options `extra`); its result
    with the process's peak RSS."""
    return run_worker(__file__, name, args.workdir, [
        "--image", image, "--label", label, "--weights", args.weights, "--workers",
        str(args.workers), "--patches", str(args.patches), "--device", args.device,
        "--train-steps", str(args.train_steps), "--batch-size", str(args.batch_size),
        "--patch", str(args.patch), *extra])


def tables(payload: dict) -> str:
    """The benchmark as markdown tables."""
    loader, evaluation = payload["loader"], payload.get("evaluation")
    lines = [f"Machine: {payload['machine']}"]
    if loader:
        lines += ["", f"Training patches from a {'x'.join(map(str, payload['shape']))} CT at "
                      f"{SPACING} mm ({payload['voxels'] / 1e6:.1f} M voxels), "
                      f"{payload['workers']} DataLoader worker(s):",
                  "", "| pipeline | patches/s | vs bundle | vs ctseg memory | first item (s) | "
                      "worker peak RSS (MiB) |", "|---|---:|---:|---:|---:|---:|"]
    base = loader.get("bundle", {}).get("patches_per_s")
    memory = loader.get("ctseg_memory", {}).get("patches_per_s")
    for name in PIPELINES if loader else ():
        r = loader[name]
        lines.append(f"| {name} | {r['patches_per_s']:.2f} | {r['patches_per_s'] / base:.1f}x | "
                     f"{r['patches_per_s'] / memory:.2f}x | {r['first_item_s'] + r['setup_s']:.1f}"
                     f" | {r['worker_peak_rss_mb']:.0f} |")
    if payload.get("training"):
        lines += ["", f"Real training steps ({payload['device']}, batch "
                      f"{payload['batch_size']}, {payload['workers']} worker(s)):", "",
                  "| pipeline, model, strategy | steps | patches/s consumed | data wait | "
                  "step (s) |", "|---|---:|---:|---:|---:|"]
        for name, r in payload["training"].items():
            lines.append(f"| {name} | {r['steps']} | {r['perf/patches_per_s']:.1f} | "
                         f"{r['perf/data_wait']:.0%} | {r['perf/step_s']:.3f} |")
    if payload.get("processes"):
        pr = payload["processes"]
        lines += ["", "The test stage as a user runs it against predict.py:", "",
                  report_text(pr, PREDICT, "whole processes")]
    if not evaluation:
        return "\n".join(lines)
    ev, pr = evaluation["validation"], evaluation["predict"]
    lines += ["", f"Evaluating one {evaluation['volume']} volume ({ev['voxels'] / 1e6:.1f} M "
                  "voxels, 105-class bundle SegResNet):", "",
              "| path | time (s) | peak RSS (MiB) |", "|---|---:|---:|",
              f"| validation step | {ev['seconds']:.1f} | {ev['peak_rss_mb']:.0f} |",
              f"| predict.py | {pr['seconds']:.1f} | {pr['peak_rss_mb']:.0f} |",
              f"| ratio | {ev['seconds'] / pr['seconds']:.2f} | "
              f"{ev['peak_rss_mb'] / pr['peak_rss_mb']:.2f} |"]
    return "\n".join(lines)


def main() -> None:
    """Parse arguments; run as the coordinator or, with --worker, as one measurement."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Smallest setting (minutes on 2 cores: it trains its checkpoint first): --tile 1 "
        "--no-loaders --skip-eval --processes --repeats 1; with --ckpt: a minute")
    parser.add_argument("--tile", type=int, default=11, help="copies of the crop along z")
    parser.add_argument("--patches", type=int, default=60, help="patches timed per fast pipeline")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    parser.add_argument("--eval-volume", choices=("crop", "tiled"), default="crop")
    parser.add_argument("--skip-eval", action="store_true", help="no evaluation measurement")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="device of the evaluation, prediction and training steps")
    parser.add_argument("--train-steps", type=int, default=0,
                        help="real training steps fed by each cached pipeline (0: none)")
    parser.add_argument("--batch-size", type=int, default=4, help="patches per training step")
    parser.add_argument("--train-pipelines", nargs="+", choices=TRAINED, default=list(TRAINED),
                        help="cached pipelines that feed the training steps")
    parser.add_argument("--train-models", nargs="+", choices=MODELS, default=["segresnet"],
                        help="models the training steps train")
    parser.add_argument("--strategies", nargs="+", choices=tuple(STRATEGIES),
                        default=["single"], help="single: one process; ddp: Lightning's DDP "
                        "strategy on one device (trainer=ddp devices=1)")
    parser.add_argument("--patch", type=int, default=PATCH[0],
                        help="edge of the training patches (and evaluation windows) in voxels")
    parser.add_argument("--processes", action="store_true",
                        help="also time the whole `train.py train=false test=true` process against "
                        "the whole predict.py process, with a trained checkpoint (--ckpt)")
    parser.add_argument("--ckpt", type=Path, help="trained slim SegResNet checkpoint (train.py's "
                        "default model) for --processes (default: one trained first, "
                        "benchmarks/ensemble.py's recipe); the CT is written on its grid")
    add_repeats_option(parser)
    parser.add_argument("--loaders", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the training DataLoaders (--no-loaders: skip them)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    add_worker_options(parser, "--image", "--label", "--weights", "--command", "--model",
                       "--strategy")
    args = parser.parse_args()
    if args.worker:
        work = worker_process if args.command else {
            "eval": worker_eval, "predict": worker_predict}.get(
            args.worker, worker_train if args.worker.startswith("train_") else worker_loader)
        serve_worker(work, args)
        return
    with tempfile.TemporaryDirectory(prefix="ctseg_train_bench_") as workdir:
        args.workdir = workdir
        args.weights = str(Path(workdir) / "model.pt")
        import torch

        from ctseg.reference import wholebody_bundle as bundle

        torch.manual_seed(0)
        torch.save(bundle.network().state_dict(), args.weights)
        tiled = make_volume(Path(workdir), args.tile)
        shape = nib.load(tiled["image"]).shape
        payload = {"machine": machine(), "shape": list(shape), "voxels": int(np.prod(shape)),
                   "workers": args.workers, "patch": list(patch_of(args)),
                   "device": args.device,
                   "batch_size": args.batch_size, "loader": {}}
        for name in PIPELINES if args.loaders else ():
            print(f"measuring {name} ...", flush=True)
            payload["loader"][name] = measure(name, args, tiled["image"], tiled["label"])
        if args.train_steps:
            payload["training"] = {}
            for name, model, strategy in itertools.product(args.train_pipelines,
                                                           args.train_models, args.strategies):
                row = f"{name} {model} {strategy}"
                print(f"training {model} ({strategy}) from {name} ...", flush=True)
                payload["training"][row] = measure(
                    f"train_{row}", args, tiled["image"], tiled["label"],
                    ["--model", model, "--strategy", strategy])
        volume = tiled if args.eval_volume == "tiled" else make_volume(Path(workdir) / "crop", 1)
        if not args.skip_eval:
            payload["evaluation"] = {"volume": args.eval_volume, **{
                key: measure(name, args, volume["image"], volume["label"])
                for key, name in (("validation", "eval"), ("predict", "predict"))}}
        if args.processes:
            from ensemble import train_members

            args.ckpt = str(args.ckpt or train_members(Path(workdir) / "members", 1)[0])
            volume = checkpoint_volume(args, Path(workdir) / "processes")
            payload["processes"] = whole_processes(args, volume)
        print(tables(payload))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
    if args.processes:
        finish(payload["processes"], None)


if __name__ == "__main__":
    main()
