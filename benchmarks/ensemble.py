"""Benchmark fold ensembles and mirroring TTA against one model; check both against MONAI's inferer.

    python benchmarks/ensemble.py [--members CKPT ... | --models 2] [--source CT | --shape X Y Z]
                                  [--roi N] [--device cpu|cuda] [--variants one ensemble tta]
                                  [--repeats 3] [--out result.json]
    python benchmarks/ensemble.py --train-members DIR [--models 2]

Members: the checkpoints `--members` names (or one multirun folder: each run's best checkpoint,
as predict.py takes it), else `--models` members this script trains first, untimed:
`experiment=phantom_quick` cut to `MEMBER_EPOCHS` epochs, one seed each, as one multirun
(`--train-members DIR` trains them into DIR and stops; `--members DIR` then reuses them). One CT
is written on the members' grid (RAS, their spacing): a phantom held out from the members'
training (when they trained on phantoms), else `--source` (default: the shared crop), or a
synthetic body of `--shape` voxels as in benchmarks/inference.py; it is cut to a window grid that
is its own mirror image. Then, with the protocol of benchmarks/common.py (one process per
measurement, interleaved rounds, one untimed warm-up, medians; from the input file to the labels
in memory, writing timed apart), predict.py's pipeline predicts it with the first member
(`one`), with all of them (`ensemble`, `ckpt=[...]`) and with the first and `tta=mirror` (8
passes). Expected: time about linear in the number of passes, peak RSS <= 1.2x one model's at
whole-body size (the slab aggregation is shared).

Reference (MONAI, no ctseg averaging): `monai.inferers.SlidingWindowInferer` with predict.py's
window, overlap 0.25, gaussian blend and replicate padding, run over the whole volume per member,
the logits averaged, argmax (nnU-Net v2's fold ensemble); for tta the same inferer on the CT
mirrored along each of the 8 axis subsets, each output mirrored back, averaged (nnU-Net mirrors
each window, which on a symmetric grid is the same). Both are the same averages as ctseg's in
exact arithmetic. Agreement: `ensemble` and `tta` equal their reference on >= 99.9 % of the
voxels. The one model against each reference is reported as a control (`controls`): what an
ensemble that ran only its first member, or a TTA without its mirrored passes, would score. The
script exits non-zero after writing the JSON when a check fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from common import (
    PREDICTION_SPAN,
    REPO,
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
from inference import SHARED_CT, make_ct, predict_span
from monai.data.utils import dense_patch_slices

VARIANTS = ("one", "ensemble", "tta")
# Least share of voxels with labels equal to the reference's, per variant: the same averages in
# exact arithmetic (the CT is cut to a symmetric window grid), so only the order of float
# additions may move a voxel; a wrong average (one member, a mirrored pass not mirrored back)
# moves far more.
THRESHOLDS = {"ensemble": 0.999, "tta": 0.999}
# predict.py's sliding-window settings, given to both sides: overlap, blend, SegResNet's padding.
SW = {"overlap": 0.25, "mode": "gaussian", "padding_mode": "replicate"}
TTA_AXES = (0, 1, 2)
# The members trained without --members: experiment=phantom_quick (the slim SegResNet on 20
# phantoms at 6 mm, whole phantoms per patch) cut to MEMBER_EPOCHS epochs and one validation.
MEMBER_EPOCHS = 40
MEMBER_RECIPE = ("experiment=phantom_quick", f"trainer.max_epochs={MEMBER_EPOCHS}",
                 f"trainer.check_val_every_n_epoch={MEMBER_EPOCHS}", "test=false",
                 "callbacks.progress_bar=null", "callbacks.model_summary=null",
                 "callbacks.overlays=null")


def train_members(folder: Path, count: int) -> list[str]:
    """Train `count` members (seeds 0..count-1) as one multirun into `folder`; their best
    checkpoints."""
    from ctseg.inference.ensemble import run_checkpoints

    command = [sys.executable, "train.py", "-m", f"seed={','.join(map(str, range(count)))}",
               *MEMBER_RECIPE, f"hydra.sweep.dir={folder}", f"paths.data_dir={folder / 'data'}",
               f"paths.log_dir={folder / 'outputs'}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"training the members failed:\n{done.stderr[-3000:]}")
    return [str(p) for p in run_checkpoints(folder)]


def held_out_phantom(checkpoint: str, folder: Path) -> Path | None:
    """A download root under `folder` holding one phantom that `checkpoint` did not train on
    (the shape of its training phantoms, the next phantom seed); None when it did not train on
    phantoms."""
    from ctseg.data.phantoms import write_phantoms
    from ctseg.models.weights import read_checkpoint

    data = read_checkpoint(checkpoint).get("datamodule_hyper_parameters") or {}
    if "phantom_shape" not in data:
        return None
    write_phantoms(folder, 1, seed=int(data["phantom_seed"]) + 1,
                   shape=tuple(data["phantom_shape"]))
    return folder


def symmetric_extent(size: int, roi: int, overlap: float) -> int:
    """The largest extent <= `size` whose window grid along one axis (MONAI's
    `dense_patch_slices` at its interval, int(roi * (1 - overlap))) is its own mirror image; an
    extent thinner than the window is padded evenly."""
    for extent in range(size, 0, -1):
        if extent <= roi:
            if (roi - extent) % 2 == 0:
                return extent
            continue
        interval = max(int(roi * (1 - overlap)), 1)
        starts = [w[0].start for w in dense_patch_slices((extent,), (roi,), (interval,))]
        if sorted(starts) == sorted(extent - roi - s for s in starts):
            return extent
    return size


def crop_symmetric(path: Path, roi: Sequence[int], overlap: float) -> None:
    """Cut the CT at `path` to its centre of `symmetric_extent` voxels per axis: mirroring it
    then mirrors the windows and the padding, so nnU-Net's per-window mirroring (predict.py's)
    and MONAI's inferer on the mirrored CT see the same windows."""
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    extents = [symmetric_extent(s, r, overlap) for s, r in zip(data.shape, roi, strict=True)]
    before = [(s - e) // 2 for s, e in zip(data.shape, extents, strict=True)]
    affine = img.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ np.asarray(before, dtype=float)
    box = tuple(slice(b, b + e) for b, e in zip(before, extents, strict=True))
    nib.save(nib.Nifti1Image(data[box], affine), path)


def worker(args: argparse.Namespace) -> dict:
    """Predict the benchmark CT as variant `args.worker` under the protocol; its passes per
    window."""
    members = json.loads(args.members_json)
    cfg = {"ckpt": members if args.worker == "ensemble" else members[0], "input": args.ct,
           "device": args.device, "masks": False,
           "tta": "mirror" if args.worker == "tta" else None, "tta_axes": list(TTA_AXES),
           "sw": {"roi_size": args.roi and [int(args.roi)] * 3, "batch_size": 1, **SW}}
    passes = {"one": 1, "ensemble": len(members), "tta": 2 ** len(TTA_AXES)}[args.worker]
    return {**predict_span(cfg, Path(args.workdir), args.worker), "passes": passes}


def reference_labels(ct: str, members: Sequence[str], flips: Sequence[tuple[int, ...]],
                     roi: int | None, device: str) -> np.ndarray:
    """MONAI's `SlidingWindowInferer` over the whole preprocessed CT, per member and per mirroring
    of the CT (`flips`: tensor dims, () the CT itself), each output mirrored back; the logits
    summed in that order, divided by their count, argmax."""
    import torch
    from monai.inferers import SlidingWindowInferer

    from ctseg.data.transforms import IMAGE, infer_transforms
    from ctseg.models.loading import load_model

    models = [load_model(m, {}, {}) for m in members]
    image = infer_transforms(models[0].pipeline)({IMAGE: ct})[IMAGE][None].as_tensor()
    image = image.to(device)
    inferer = SlidingWindowInferer(models[0].roi_size if roi is None else (roi,) * 3,
                                   sw_batch_size=1, **SW)
    total = None
    with torch.no_grad():
        for model in models:
            net = model.net.to(device).eval()
            for dims in flips:
                logits = inferer(image.flip(dims) if dims else image, net).float()
                logits = logits.flip(dims) if dims else logits
                total = logits if total is None else total + logits
    return (total / (len(models) * len(flips))).argmax(1)[0].cpu().numpy()


def main() -> None:
    """Parse arguments; run as the coordinator or, with --worker, as one variant."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Smallest setting (minutes on 2 cores: it trains two members first): --models 2 "
        "--repeats 1; with --members of trained checkpoints: seconds")
    parser.add_argument("--members", nargs="+", help="the ensemble's checkpoints, or one "
                        "multirun folder (default: --models members trained first)")
    parser.add_argument("--models", type=int, default=2, help="members to train without "
                        "--members")
    parser.add_argument("--train-members", type=Path, metavar="DIR",
                        help="only train --models members into DIR (for --members DIR)")
    parser.add_argument("--shape", type=int, nargs=3, help="a synthetic body of this size in "
                        "voxels (benchmarks/inference.py's) instead of the default CT")
    parser.add_argument("--source", type=Path, help="CT to resample (default: a phantom held "
                        "out from the members' training, else the shared crop)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--roi", type=int, help="window edge in voxels (default: the members')")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="which to run (one is always run)")
    add_repeats_option(parser)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    add_worker_options(parser, "--ct", "--members-json")
    args = parser.parse_args()
    if args.worker:
        serve_worker(worker, args)
        return
    configure_logging()
    if args.train_members:
        print("\n".join(train_members(args.train_members, args.models)))
        return
    with tempfile.TemporaryDirectory(prefix="ctseg_bench_") as workdir:
        from ctseg.inference.ensemble import mirror_flips
        from ctseg.inference.runner import checkpoint_sources
        from ctseg.models.loading import load_model

        members = (checkpoint_sources(args.members[0]) if args.members and len(args.members) == 1
                   else args.members) or train_members(Path(workdir) / "members", args.models)
        args.workdir, args.ct = workdir, str(Path(workdir) / "ct.nii.gz")
        first = load_model(members[0], {}, {})
        spacing = first.pipeline.spacing
        if len(set(spacing)) != 1:
            raise SystemExit(f"{members[0]}: spacing {spacing}; the benchmark CT takes an "
                             "isotropic one")
        phantom = None if args.shape or args.source else held_out_phantom(
            members[0], Path(workdir) / "phantom")
        source = next(phantom.glob("*/ct.nii.gz")) if phantom else args.source or SHARED_CT
        make_ct(Path(args.ct), tuple(args.shape) if args.shape else None, source, spacing[0])
        crop_symmetric(Path(args.ct), (args.roi,) * 3 if args.roi else first.roi_size,
                       SW["overlap"])
        options = ["--ct", args.ct, "--members-json", json.dumps(members), "--device",
                   args.device, *(["--roi", str(args.roi)] if args.roi else [])]
        sides = run_sides(__file__, {name: options for name in VARIANTS
                                     if name == "one" or name in args.variants},
                          workdir, args.repeats)
        one = np.load(sides["one"]["output"])
        checks, controls = {}, {}
        for name in sides:
            if name == "one":
                continue
            reference = reference_labels(
                args.ct, members if name == "ensemble" else members[:1],
                mirror_flips(TTA_AXES) if name == "tta" else [()], args.roi, args.device)
            what = ("MONAI's inferer per member, logits averaged" if name == "ensemble" else
                    "MONAI's inferer on the 8 mirrored CTs, mirrored back, logits averaged")
            checks[f"{name} vs reference"] = agreement(
                f"share of voxels with labels equal to {what}",
                voxel_agreement(sides[name]["output"], reference), THRESHOLDS[name])
            controls[f"one vs {name} reference"] = voxel_agreement(one, reference)
        shape = nib.load(args.ct).shape
    setting = {"shape": list(shape), "spacing_mm": spacing[0], "members": members,
               "device": args.device, "roi": args.roi, **SW, "controls": controls}
    report = payload("ensemble", PREDICTION_SPAN, args.repeats, setting, sides, checks)
    print(report_text(report, "one", f"CT {'x'.join(map(str, shape))} at {spacing[0]} mm, "
                      f"ensemble of {len(members)}"))
    print("\n".join(f"control: {name}: {value:.6f}" for name, value in controls.items()))
    finish(report, args.out)


if __name__ == "__main__":
    main()
