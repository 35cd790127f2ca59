"""Train VISTA3D's point stage on phantoms for a fixed budget, then measure clicks on held-out
phantoms: do clicks learn?

    python benchmarks/point_stage.py [--ckpt automatic.ckpt] [--budget-s 180] [--max-steps N]
                                     [--device cpu|cuda] [--clicks 5] [--repeats 1]
                                     [--save-automatic CKPT] [--out result.json]

The automatic-mode checkpoint is `--ckpt`, else `python train.py experiment=vista3d_quick`
trained first on `--device` (the automatic branch only: class prompts, no clicks);
`--save-automatic` keeps a copy of it (the GPU report exports it). The point
stage starts from it: `python train.py experiment=vista3d_quick model.pretrained=<ckpt>
model.trainable=point_head model.drop_label_prob=1.0 model.drop_point_prob=0.0` on the same 20
phantoms, for `--budget-s` seconds of training (`trainer.max_time`; `--max-steps` caps both runs,
for a smoke test), without validation. `--device cuda` adds `trainer=gpu` (AMP) to both runs.

Clicks, with the simplest protocol ctseg's tests use (to be replaced by the interactive-
evaluation protocol of issue 37): on each phantom of the test split, for each structure of
`CLICKED`, a click session without a class id (a window centred on each click, predict's
default); the first click at the structure's deepest voxel (positive), each next click at the
deepest voxel of the largest error of the last labels (positive in a missed part, negative in a
false positive). Per checkpoint (`automatic`: its point head untrained; `point stage`: after the
budget), each in its own process with the protocol of benchmarks/common.py (`--repeats` rounds,
one warm-up of the whole evaluation, medians): the hit rate of the first click (its voxel
labelled), the mean Dice after the first click and after `--clicks` clicks; span: the phantoms'
files -> the labels of every click in memory.

Agreement: the point-trained session's labels after the last click of the first structure equal
a fresh `CasePredictor.segment` with the same clicks on >= 99.9 % of the voxels (a session that
lost or misplaced a click fails), else the script exits non-zero after writing the JSON.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from common import (
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
    slug,
    timed_span,
    voxel_agreement,
)
from scipy import ndimage

CLICKED = ("liver", "spleen", "kidney_left", "kidney_right", "stomach")
SPAN = "phantom files -> labels of every click in memory"
# Least share of voxels where the session's labels after its last click equal a fresh predict run
# with the same clicks (the session runs the same windows).
THRESHOLD = 0.999
# The point stage of the paper on vista3d_quick's frozen encoder: clicks only, point head only.
POINT_STAGE = ("model.trainable=point_head", "model.drop_label_prob=1.0",
               "model.drop_point_prob=0.0")
# Both runs: CSV logs, no test stage, no progress bar; the point stage without validation and
# without the best-Dice checkpoint (its last.ckpt is the result).
COMMON = ("experiment=vista3d_quick", "logger=csv", "test=false", "callbacks.progress_bar=null",
          "callbacks.overlays=null")
NO_VALIDATION = ("trainer.limit_val_batches=0", "callbacks.model_checkpoint=null",
                 "callbacks.early_stopping=null", "trainer.max_epochs=100000")


def train(work: Path, name: str, overrides: list[str], phantoms: Path) -> tuple[str, float]:
    """`python train.py` with the COMMON overrides and `overrides` on the phantoms in `phantoms`
    into `work/name`; its last checkpoint and the seconds the process took."""
    command = [sys.executable, "train.py", *COMMON, *overrides, f"hydra.run.dir={work / name}",
               f"data.root={phantoms}", f"paths.log_dir={work / 'outputs'}"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command[1:])} failed:\n{done.stderr[-3000:]}")
    return str(work / name / "checkpoints" / "last.ckpt"), seconds


def max_time(seconds: float) -> str:
    """`seconds` as Lightning's `max_time` string, DD:HH:MM:SS (whole seconds, at least 1)."""
    total = max(1, round(seconds))
    return f"{total // 86400:02d}:{total // 3600 % 24:02d}:{total // 60 % 60:02d}:{total % 60:02d}"


def held_out(phantoms: Path) -> list[str]:
    """The phantoms of the test split of `phantoms/meta.csv`."""
    with (phantoms / "meta.csv").open() as f:
        return [r["image_id"] for r in csv.DictReader(f, delimiter=";") if r["split"] == "test"]


def deepest_voxel(mask: np.ndarray) -> tuple[int, int, int]:
    """The voxel of `mask` farthest from its boundary."""
    depth = ndimage.distance_transform_edt(mask)
    return tuple(int(i) for i in np.unravel_index(np.argmax(depth), mask.shape))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of `mask` (empty when `mask` is)."""
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if not count:
        return mask
    sizes = ndimage.sum(mask, components, range(1, count + 1))
    return components == 1 + int(np.argmax(sizes))


def next_click(labels: np.ndarray, mask: np.ndarray) -> tuple[tuple[int, int, int], int]:
    """The next click: the deepest voxel of the largest error, positive in a missed part (1),
    negative in a false positive (0)."""
    missed = largest_component(mask & ~labels)
    extra = largest_component(labels & ~mask)
    if missed.sum() >= extra.sum():
        return deepest_voxel(missed), 1
    return deepest_voxel(extra), 0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1 when both are empty)."""
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def worker(args: argparse.Namespace) -> dict:
    """One checkpoint's clicks on the held-out phantoms under the protocol: hit rate, Dice after
    the first and the last click; the labels after the last click of the first structure."""
    from ctseg.inference.click_session import ClickSession
    from ctseg.inference.inputs import Case
    from ctseg.inference.pipeline import CasePredictor, PredictOptions
    from ctseg.models.loading import load_model
    from ctseg.models.vista3d import CLICK_STEPS_KEY
    from ctseg.models.weights import read_checkpoint

    phantoms = Path(args.phantoms)
    model = load_model(args.ckpt, {}, {})
    cases = held_out(phantoms)[:int(args.cases)]
    clicks = int(args.clicks)
    scores: dict = {}

    def evaluate() -> dict:
        hits, first, last, kept = [], [], [], {}
        for case in cases:
            folder = phantoms / case
            with ClickSession.open(model, folder / "ct.nii.gz", device=args.device) as session:
                for name in args.structures:
                    mask = np.asarray(nib.load(folder / "segmentations" / f"{name}.nii.gz")
                                      .dataobj) > 0
                    session.reset()
                    point, positive = deepest_voxel(mask), 1
                    for k in range(clicks):
                        labels = session.click([list(point)], [positive]) == 1
                        if k == 0:
                            hits.append(bool(labels[point]))
                            first.append(dice(labels, mask))
                        point, positive = next_click(labels, mask)
                    last.append(dice(labels, mask))
                    if not kept:
                        kept = {"case": case, "prompt": session.prompt,
                                "labels": session.labels.copy()}
        scores.update(hit_rate=float(np.mean(hits)), dice_first=float(np.mean(first)),
                      dice_last=float(np.mean(last)), structures=len(hits))
        return kept

    def write(kept: dict) -> None:
        nib.save(nib.Nifti1Image(kept["labels"], nib.load(
            phantoms / kept["case"] / "ct.nii.gz").affine),
                 Path(args.workdir) / f"{slug(args.worker)}.nii.gz")

    kept: dict = {}

    def span() -> dict:
        kept.update(evaluate())
        return kept

    result = timed_span(span, write, lambda k: k["labels"],
                        Path(args.workdir) / f"{slug(args.worker)}.npy")
    options = PredictOptions(device=args.device, prompt=kept["prompt"])
    with CasePredictor(model, options) as predictor:
        fresh = predictor.segment(Case(kept["case"], phantoms / kept["case"] / "ct.nii.gz",
                                       "nifti")).labels
    np.save(Path(args.workdir) / f"{slug(args.worker)}_fresh.npy", fresh)
    return {**result, **scores, "clicks": clicks,
            "fresh": str(Path(args.workdir) / f"{slug(args.worker)}_fresh.npy"),
            "click_steps": read_checkpoint(args.ckpt).get(CLICK_STEPS_KEY)}


def table(report: dict) -> str:
    """The clicks of each checkpoint as markdown."""
    setting = report["setting"]
    clicks = setting["clicks"]
    trained = ", ".join(f"{name.removesuffix('_train_s').replace('_', ' ')} {setting[name]:.0f} s"
                        for name in ("automatic_train_s", "point_stage_train_s")
                        if name in setting)
    cap = "" if setting["max_steps"] is None else f", at most {setting['max_steps']} step(s)"
    lines = [f"Training processes: {trained} (point-stage budget {setting['budget_s']:g} s{cap}).",
             "", "| checkpoint | training steps with clicks | first-click hit rate | Dice, 1 click "
             f"| Dice, {clicks} clicks |", "|---|---:|---:|---:|---:|"]
    for name, r in report["sides"].items():
        lines.append(f"| {name} | {r['click_steps']} | {r['hit_rate']:.2f} | "
                     f"{r['dice_first']:.3f} | {r['dice_last']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    """Parse arguments; run as the coordinator or, with --worker, as one checkpoint's clicks."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Smallest setting (minutes on 2 cores: it trains twice): --max-steps 1 --clicks 2 "
        "--cases 1 --structures liver --repeats 1")
    parser.add_argument("--ckpt", type=Path, help="automatic-mode VISTA3D checkpoint trained on "
                        "vista3d_quick's phantoms (default: train.py experiment=vista3d_quick "
                        "first)")
    parser.add_argument("--budget-s", type=float, default=180.0,
                        help="seconds of point-stage training (trainer.max_time)")
    parser.add_argument("--max-steps", type=int, help="cap both trainings at this many steps")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--clicks", type=int, default=5, help="clicks per structure")
    parser.add_argument("--cases", type=int, default=3, help="held-out phantoms clicked (of 3)")
    parser.add_argument("--structures", nargs="+", choices=CLICKED, default=list(CLICKED),
                        help="structures clicked on each")
    add_repeats_option(parser, default=1)
    parser.add_argument("--save-automatic", type=Path, help="copy the automatic-mode checkpoint "
                        "here (trained or --ckpt)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    add_worker_options(parser, "--ckpt-json", "--phantoms")
    args = parser.parse_args()
    if args.worker:
        args.ckpt = args.ckpt_json
        serve_worker(worker, args)
        return
    configure_logging()
    from ctseg.models.loading import DATA_HPARAMS
    from ctseg.models.weights import read_checkpoint

    gpu = ["trainer=gpu"] if args.device == "cuda" else []
    steps = [f"trainer.max_steps={args.max_steps}"] if args.max_steps else []
    with tempfile.TemporaryDirectory(prefix="ctseg_point_stage_") as workdir:
        work = Path(workdir)
        times = {}
        if args.ckpt:
            automatic = str(args.ckpt)
            phantoms = Path(read_checkpoint(automatic)[DATA_HPARAMS].get("phantom_root", ""))
        else:
            phantoms = work / "phantoms"
            automatic, times["automatic_train_s"] = train(work, "automatic", [*gpu, *steps],
                                                          phantoms)
        if not (phantoms / "meta.csv").is_file():
            raise SystemExit(f"error: --ckpt {args.ckpt}: its phantoms ({phantoms}) are gone; "
                             "give a checkpoint of experiment=vista3d_quick whose phantoms are "
                             "in place, or none to train one")
        if args.save_automatic:
            from ctseg.atomic import write_atomic

            write_atomic(args.save_automatic, lambda tmp: shutil.copyfile(automatic, tmp))
        pointed, times["point_stage_train_s"] = train(work, "point_stage", [
            *gpu, *steps, *POINT_STAGE, *NO_VALIDATION, f"model.pretrained={automatic}",
            f"+trainer.max_time='{max_time(args.budget_s)}'"], phantoms)
        options = ["--phantoms", str(phantoms), "--device", args.device, "--clicks",
                   str(args.clicks), "--cases", str(args.cases), "--structures",
                   *args.structures]
        sides = run_sides(__file__, {"automatic": [*options, "--ckpt-json", automatic],
                                     "point stage": [*options, "--ckpt-json", pointed]},
                          workdir, args.repeats)
        trained = sides["point stage"]
        checks = {"point stage session vs fresh": agreement(
            "share of voxels with labels equal to a fresh predict run with the same clicks",
            voxel_agreement(trained["output"], trained["fresh"]), THRESHOLD)}
    setting = {"device": args.device, "budget_s": args.budget_s, "max_steps": args.max_steps,
               "clicks": args.clicks, "cases": args.cases, "structures": args.structures,
               **times,
               "click_protocol": "first click at the deepest voxel; next at the deepest voxel of "
               "the largest error (tests' protocol; issue 37's will replace it)"}
    for side in sides.values():
        side.pop("fresh", None)
    report = payload("point_stage", SPAN, args.repeats, setting, sides, checks)
    print(report_text(report, "automatic", f"VISTA3D point stage, {args.device}") + "\n\n"
          + table(report))
    finish(report, args.out)


if __name__ == "__main__":
    main()
