"""Train VISTA3D's point stage on phantoms for a fixed budget, then measure clicks on held-out
phantoms: do clicks learn?

    python benchmarks/point_stage.py [--ckpt automatic.ckpt] [--budget-s 180] [--max-steps N]
                                     [--device cpu|cuda] [--clicks 5] [--cases 3]
                                     [--structures NAME ...] [--repeats 1]
                                     [--save-automatic CKPT] [--out result.json]

The automatic-mode checkpoint is `--ckpt`, else `python train.py experiment=vista3d_quick`
trained first on `--device` (the automatic branch only: class prompts, no clicks);
`--save-automatic` keeps a copy of it (the GPU report exports it). The point
stage starts from it: `python train.py experiment=vista3d_quick model.pretrained=<ckpt>
model.trainable=point_head model.drop_label_prob=1.0 model.drop_point_prob=0.0` on the same 20
phantoms, for `--budget-s` seconds of training (`trainer.max_time`; `--max-steps` caps both runs,
for a smoke test), without validation. `--device cuda` adds `trainer=gpu` (AMP) to both runs.

Clicks, measured by interactive evaluation (`ctseg.evaluate.interactive`, the protocol of
docs/vista3d.md, its settings from conf/interactive.yaml): on the first `--cases` phantoms of the
test split, for each structure of `--structures`, a click session without a class id (a window
centred on each click); the first click at the voxel nearest the centre of the eroded structure
(positive), each next one at a seeded random voxel of the largest eroded error of the last labels
(positive in a missed part, negative in a false positive), up to `--clicks` clicks. Per checkpoint
(`automatic`: its point head untrained; `point stage`: after the budget), each in its own process
with the protocol of benchmarks/common.py (`--repeats` rounds, one warm-up of the whole
evaluation, medians): the first-click hit rate (its voxel labelled), mean Dice after the first
click and after `--clicks` clicks, the area under the Dice-per-click curve, seconds per first and
next click; span: the phantoms' files -> every click's labels and Dice in memory; written
(timed apart): the interactive evaluation's outputs. With `--out`, each checkpoint's outputs
(clicks/<case>.json, clicks.csv, summary.json, summary.md, dice_vs_clicks.png) go to
`<out stem>_clicks/<automatic|point_stage>/` and `python -m ctseg.compare` of the two to
`<out stem>_clicks/compare/` (`<out stem>_clicks` is replaced as a whole).

Agreement: the point-trained session's labels after the last click of the first structure equal
a fresh `CasePredictor.segment` with the same clicks on >= 99.9 % of the voxels (a session that
lost or misplaced a click fails), else the script exits non-zero after writing the JSON.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

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

SPAN = "phantom files -> labels and Dice of every click in memory"
# The comparison of the two evaluations inside the clicks folder: its table, which also marks
# the folder as this script's output (it is replaced only then).
COMPARISON = "compare/clicks_compare.md"
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


def clicks_folder(out: Path) -> Path:
    """Where the interactive evaluations of a run writing `out` go: beside it."""
    return out.with_name(f"{out.stem}_clicks")


def worker(args: argparse.Namespace) -> dict:
    """One checkpoint's interactive evaluation on the held-out phantoms under the protocol: its
    summary's figures; the labels after the last click of the first structure."""
    from ctseg.evaluate.interactive import (
        evaluate_case,
        grouped,
        interactive_config,
        prepare,
        write_case,
    )
    from ctseg.evaluate.interactive_report import write_report
    from ctseg.evaluate.statistics import OVERALL
    from ctseg.inference.inputs import Case
    from ctseg.inference.pipeline import CasePredictor, PredictOptions
    from ctseg.models.vista3d import CLICK_STEPS_KEY
    from ctseg.models.weights import read_checkpoint

    phantoms = Path(args.phantoms)
    cfg = interactive_config(f"ckpt={args.ckpt}", f"gt={phantoms}", "split=test",
                             f"structures=[{','.join(args.structures)}]",
                             f"clicks={args.clicks}", f"device={args.device}",
                             f"output={args.evaluation}", "progress=false")
    plan = prepare(cfg)
    cases = list(grouped(plan.items))[:int(args.cases)]
    kept: dict = {}
    summary: dict = {}

    def keep(target, session) -> None:
        """The first structure's labels and prompt after its last click."""
        if "labels" not in kept:
            kept.update(case=target.case, prompt=session.prompt, labels=session.labels.copy())

    def span() -> list[dict]:
        kept.clear()
        return [evaluate_case(plan.model, case, items, plan.settings, args.device, None, keep)
                for case, items in cases]

    def write(records: list[dict]) -> None:
        for record in records:
            write_case(plan.output, record)
        summary.update(write_report(records, plan.output, list(cfg.report_at), plan.settings,
                                    int(cfg.seed)))

    result = timed_span(span, write, lambda _: kept["labels"],
                        Path(args.workdir) / f"{slug(args.worker)}.npy")
    with CasePredictor(plan.model, PredictOptions(device=args.device,
                                                  prompt=kept["prompt"])) as predictor:
        fresh = predictor.segment(Case(kept["case"], phantoms / kept["case"] / "ct.nii.gz",
                                       "nifti")).labels
    np.save(Path(args.workdir) / f"{slug(args.worker)}_fresh.npy", fresh)
    seconds = summary["seconds"]
    return {**result, "clicks": int(args.clicks), "structures": summary["structures"],
            "hit_rate": summary["first_click_hit_rate"],
            "dice_first": summary["dice_after"]["1"][OVERALL]["mean"],
            "dice_last": summary["dice_after"][str(args.clicks)][OVERALL]["mean"],
            "auc": summary["auc"][OVERALL]["mean"], "first_click_s": seconds["first"],
            "next_click_s": seconds["next"], "stopped_early": summary["stopped_early"],
            "evaluation": str(plan.output),
            "fresh": str(Path(args.workdir) / f"{slug(args.worker)}_fresh.npy"),
            "click_steps": read_checkpoint(args.ckpt).get(CLICK_STEPS_KEY)}


def compare(sides: dict[str, dict], folder: Path) -> str:
    """Put the sides' evaluations in `folder` (as `<side slug>/`) beside their comparison by
    `python -m ctseg.compare` (`compare/`); the comparison's table."""
    for name, side in sides.items():
        shutil.copytree(side["evaluation"], folder / slug(name))
    command = [sys.executable, "-m", "ctseg.compare", *(str(folder / slug(n)) for n in sides),
               "--out", str(folder / "compare"), "--no-wandb"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command[1:])} failed:\n{done.stderr[-3000:]}")
    return (folder / COMPARISON).read_text()


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
             f"| Dice, {clicks} clicks | AUC | first click (s) | next click (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in report["sides"].items():
        lines.append(f"| {name} | {r['click_steps']} | {r['hit_rate']:.2f} | "
                     f"{r['dice_first']:.3f} | {r['dice_last']:.3f} | {r['auc']:.3f} | "
                     f"{r['first_click_s']:.3f} | {r['next_click_s']:.3f} |")
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
    parser.add_argument("--structures", nargs="+", help="structures clicked on each "
                        "(default: conf/interactive.yaml's)")
    add_repeats_option(parser, default=1)
    parser.add_argument("--save-automatic", type=Path, help="copy the automatic-mode checkpoint "
                        "here (trained or --ckpt)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    add_worker_options(parser, "--ckpt-json", "--phantoms", "--evaluation")
    args = parser.parse_args()
    if args.worker:
        args.ckpt = args.ckpt_json
        serve_worker(worker, args)
        return
    configure_logging()
    from ctseg.atomic import swapped_folder
    from ctseg.errors import ConfigError
    from ctseg.evaluate.interactive import interactive_config, structure_ids
    from ctseg.models.loading import DATA_HPARAMS
    from ctseg.models.weights import read_checkpoint

    if args.clicks < 1 or args.cases < 1:
        raise SystemExit(f"error: --clicks {args.clicks} --cases {args.cases}: give at least 1 "
                         "of each")
    args.structures = args.structures or list(interactive_config().structures)
    try:
        structure_ids(args.structures)
    except ConfigError as err:
        raise SystemExit(f"error: --structures {' '.join(args.structures)}: {err}") from None
    folder = clicks_folder(args.out) if args.out else None
    if folder is not None and folder.exists() and not (folder / COMPARISON).is_file():
        raise SystemExit(f"error: --out {args.out}: {folder} exists and is not this script's "
                         f"output (no {COMPARISON} in it); remove it or choose another --out")

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
        ckpts = {"automatic": automatic, "point stage": pointed}
        sides = run_sides(__file__, {name: [*options, "--ckpt-json", ckpt, "--evaluation",
                                            str(work / "evaluations" / slug(name))]
                                     for name, ckpt in ckpts.items()}, workdir, args.repeats)
        with (nullcontext(work / "clicks") if folder is None
              else swapped_folder(folder, own=COMPARISON)) as clicks:
            comparison = compare(sides, clicks)
        trained = sides["point stage"]
        checks = {"point stage session vs fresh": agreement(
            "share of voxels with labels equal to a fresh predict run with the same clicks",
            voxel_agreement(trained["output"], trained["fresh"]), THRESHOLD)}
    setting = {"device": args.device, "budget_s": args.budget_s, "max_steps": args.max_steps,
               "clicks": args.clicks, "cases": args.cases, "structures": args.structures,
               **times, "click_protocol": "python -m ctseg.evaluate.interactive: first click "
               "nearest the centre of the eroded structure, next at a seeded random voxel of the "
               "largest eroded error, clicks alone, a window centred on each click",
               "clicks_folder": None if folder is None else str(folder)}
    for side in sides.values():
        side.pop("fresh", None)
        side.pop("evaluation", None)
    report = payload("point_stage", SPAN, args.repeats, setting, sides, checks)
    # The comparison's heading goes three levels down, under the GPU report's section heading.
    print(report_text(report, "automatic", f"VISTA3D point stage, {args.device}") + "\n\n"
          + table(report) + "\n\n##" + comparison.strip())
    finish(report, args.out)


if __name__ == "__main__":
    main()
