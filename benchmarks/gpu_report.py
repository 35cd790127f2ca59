"""One prepared GPU report: the benchmark scripts with `--device cuda`, under their protocol.

    python benchmarks/gpu_report.py [--out gpu_report] [--budget-min 8] [--repeats 3]
                                    [--sections NAME ...] [--point-budget-s 60]
                                    [--vista3d-ckpt CKPT] [--members CKPT ...]
                                    [--device cuda|cpu] [--smoke [--jobs N]]

Each section runs one benchmark script as a user types it, in its own process, with the
protocol of benchmarks/common.py (one process per measurement, the same span on both sides, an
untimed warm-up, the median of the rounds, an agreement checked against its threshold), and
writes that script's JSON to `<out>/sections/<name>.json` and its output to
`<out>/logs/<name>.log`. In this order:

- `predict_1.5mm`, `predict_3mm`: benchmarks/inference.py, predict.py's pipeline against the
  bundle's inference.json pipeline (AMP on CUDA) on a whole-body-sized phantom CT at 1.5 mm
  (273x273x397) and 3 mm (137x137x199), `--repeats` rounds: time, peak GPU memory, agreement;
  goal at 1.5 mm: <= 0.5x the bundle's time and GPU memory;
- `training`: benchmarks/training.py, 30 AMP training steps of the bundle's SegResNet and of
  VISTA3D (vista3d132) fed by `data.cache=disk` with 4 workers, one process and Lightning's DDP on
  one device: patches/s and data-wait share (goal <= 5 %);
- `point_stage`: benchmarks/point_stage.py, VISTA3D's point head trained for `--point-budget-s`
  seconds (default 60; the issue's 3 minutes with 180) from an automatic-mode checkpoint
  (`--vista3d-ckpt`, else experiment=vista3d_quick trained first and kept as
  `<out>/vista3d_automatic.ckpt`), both checkpoints measured on held-out phantoms by
  interactive evaluation (`ctseg.evaluate.interactive`: hit rate, Dice after 1 and 5 clicks,
  AUC, seconds per click), their evaluations and comparison in
  `<out>/sections/point_stage_clicks/`;
- `export`: benchmarks/export.py, AMP, TensorRT fp32 and fp16 of the bundle's SegResNet on the
  shared crop at 1.5 mm (one round; engine build time, the median time of 10 windows, parity,
  agreement; without torch-tensorrt the TensorRT variants are recorded as skipped);
- `export_vista3d`: benchmarks/export.py with `--ckpt` the automatic-mode VISTA3D checkpoint
  (`--vista3d-ckpt`, else the one the point_stage section trained: it waits for that section),
  its automatic mode over the checkpoint's known ids in its own window: AMP, TorchScript, ONNX
  Runtime, TensorRT fp32 and fp16 against fp32 at 1.5 mm, as the `export` section (the smoke
  run at 6 mm, where AMP and TensorRT are recorded as skipped: CUDA only);
- `vista3d`: benchmarks/vista3d.py, vista3d132's click session and everything mode on the
  shared crop tiled 4x (one round; the smoke run skips the everything mode, minutes on a CPU);
- `ensemble`: benchmarks/ensemble.py, two members (`--members`, else trained first), their
  ensemble and mirroring TTA against MONAI's inferer (one round).

The order puts first what the issue asks most (prediction against the bundle, training, whether
clicks learn). Every section has a budget (seconds on one H100, estimated); a section is started
only while the time spent plus its budget stays within `--budget-min`, and the one running is
stopped at that limit: the report finishes within it, recording the sections skipped. Writes
`gpu_report.json` and `gpu_report.md` to `--out`, prints each section's elapsed time, and exits 1
naming the sections whose script failed (an agreement below its threshold included). Without
CUDA it prints one line and exits 0. `--device cpu --smoke` runs every section at its smallest
setting on CPU (minutes on 2 cores; nothing is measured that way, the set-up is exercised);
`--jobs N` runs N sections at a time there. The goals table gets, per export section, the
build seconds, each TensorRT variant's window compute over AMP and each format's parity (largest
logit difference against its threshold).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from common import REPO, machine

# The report's own time limit (minutes) and how many rounds the predict sections run.
BUDGET_MIN = 8.0
REPEATS = 3
# Seconds of point-stage training in the point_stage section.
POINT_BUDGET_S = 60.0
# Goals of the issue, checked on the report's figures.
TIME_GOAL, MEMORY_GOAL, DATA_WAIT_GOAL = 0.5, 0.5, 0.05
# Issue 36's seed anchors of TensorRT window compute over AMP, measured on an A100.
TRT_ANCHORS = "2.39x and 1.81x on an A100"
# The export sections and the model each exports, as the goals table names it.
EXPORTS = {"export": "SegResNet", "export_vista3d": "VISTA3D automatic mode"}
# Where the point_stage section keeps the automatic-mode checkpoint it trained (under --out).
AUTOMATIC_CKPT = "vista3d_automatic.ckpt"
# The export_vista3d section's variants (fp32, the reference, always runs).
VISTA3D_VARIANTS = ("AMP fp16", "TorchScript", "onnxruntime", "TensorRT fp32", "TensorRT fp16")


@dataclass(frozen=True)
class Section:
    """One section: its script, its options at full size and at the smallest size, and the
    seconds it is budgeted at full size (one H100) and at the smallest (2 CPU cores); `needs`:
    the section whose output it reads unless `--vista3d-ckpt` is given (it waits for it)."""

    script: str
    full: Callable[[argparse.Namespace], list[str]]
    smoke: Callable[[argparse.Namespace], list[str]]
    budget_s: float
    smoke_budget_s: float
    needs: str | None = None


def _threshold(args: argparse.Namespace) -> list[str]:
    """inference.py's --threshold, when the report was given one."""
    return [] if args.predict_threshold is None else ["--threshold", str(args.predict_threshold)]


def _ckpt(args: argparse.Namespace) -> list[str]:
    """point_stage.py's --ckpt, when the report was given one; else where it keeps the one it
    trains."""
    if args.vista3d_ckpt:
        return ["--ckpt", str(args.vista3d_ckpt)]
    return ["--save-automatic", str(args.out / AUTOMATIC_CKPT)]


def vista3d_ckpt(args: argparse.Namespace) -> Path:
    """The automatic-mode VISTA3D checkpoint the export_vista3d section exports."""
    return args.vista3d_ckpt or args.out / AUTOMATIC_CKPT


def _members(args: argparse.Namespace) -> list[str]:
    """ensemble.py's --members, when the report was given them."""
    return ["--members", *map(str, args.members)] if args.members else []


SECTIONS = {
    "predict_1.5mm": Section(
        "inference.py",
        lambda a: ["--shape", "273", "273", "397", "--spacing", "1.5", "--repeats",
                   str(a.repeats), *_threshold(a)],
        lambda a: ["--shape", "32", "32", "32", "--roi", "32", "--spacing", "1.5", "--repeats",
                   "1", *_threshold(a)], 100, 60),
    "predict_3mm": Section(
        "inference.py",
        lambda a: ["--shape", "137", "137", "199", "--spacing", "3", "--repeats", str(a.repeats),
                   *_threshold(a)],
        lambda a: ["--shape", "32", "32", "32", "--roi", "32", "--spacing", "3", "--repeats",
                   "1", *_threshold(a)], 60, 60),
    "training": Section(
        "training.py",
        lambda a: ["--tile", "11", "--no-loaders", "--skip-eval", "--train-steps", "30",
                   "--workers", "4", "--train-pipelines", "ctseg_disk", "--train-models",
                   "segresnet", "vista3d132", "--strategies", "single", "ddp"],
        lambda a: ["--tile", "1", "--no-loaders", "--skip-eval", "--patch", "32",
                   "--train-steps", "2", "--batch-size", "1", "--workers", "0",
                   "--train-pipelines", "ctseg_disk", "--train-models", "segresnet",
                   "vista3d_small", "--strategies", "ddp"], 110, 90),
    "point_stage": Section(
        "point_stage.py",
        lambda a: ["--budget-s", f"{a.point_budget_s:g}", "--clicks", "5", *_ckpt(a)],
        lambda a: ["--max-steps", "1", "--clicks", "2", "--cases", "1", "--structures", "liver",
                   *_ckpt(a)], 180, 180),
    "export": Section(
        "export.py",
        lambda a: ["--spacing", "1.5", "--variants", "AMP fp16", "TensorRT fp32",
                   "TensorRT fp16", "--windows", "10", "--repeats", "1"],
        lambda a: ["--spacing", "6", "--roi", "32", "--variants", "fp32", "fp32 channels-last",
                   "onnxruntime", "--windows", "1", "--repeats", "1"], 150, 90),
    "export_vista3d": Section(
        "export.py",
        lambda a: ["--ckpt", str(vista3d_ckpt(a)), "--spacing", "1.5", "--variants",
                   *VISTA3D_VARIANTS, "--windows", "10", "--repeats", "1"],
        lambda a: ["--ckpt", str(vista3d_ckpt(a)), "--spacing", "6", "--variants",
                   *VISTA3D_VARIANTS, "--windows", "1", "--repeats", "1"], 120, 90,
        needs="point_stage"),
    "vista3d": Section(
        "vista3d.py",
        lambda a: ["--tile", "4", "--runs", "vista3d132:grid:float32", "--everything",
                   "vista3d132", "--repeats", "1", "--table", str(a.out / "vista3d.md")],
        lambda a: ["--tile", "1", "--runs", "small:grid:float32", "--everything", "--clicks",
                   "1", "--repeats", "1", "--table", str(a.out / "vista3d.md")], 60, 90),
    "ensemble": Section(
        "ensemble.py",
        lambda a: [*_members(a), "--repeats", "1"],
        lambda a: [*_members(a), "--repeats", "1"], 120, 60),
}


def command(args: argparse.Namespace, name: str) -> list[str]:
    """The command line of section `name`."""
    section = SECTIONS[name]
    options = section.smoke(args) if args.smoke else section.full(args)
    return [sys.executable, f"benchmarks/{section.script}", *options, "--device", args.device,
            "--out", str(args.out / "sections" / f"{name}.json")]


def run_section(args: argparse.Namespace, name: str, limit_s: float) -> dict:
    """Run section `name` for at most `limit_s` seconds; its status, seconds, command, the
    script's tables (its standard output) and JSON."""
    argv = command(args, name)
    log_file = args.out / "logs" / f"{name}.log"
    start = time.perf_counter()
    with log_file.open("w") as log:
        process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True,
                                   start_new_session=True)
        try:
            tables = process.communicate(timeout=limit_s)[0]
            status = "passed" if process.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the script and the workers it started
            tables, status = process.communicate()[0], "timed out"
    section = {"status": status, "seconds": time.perf_counter() - start,
               "returncode": process.returncode, "command": shlex.join(argv[1:]),
               "log": str(log_file), "tables": tables.strip()}
    result = Path(argv[argv.index("--out") + 1])
    if result.is_file():
        section["result"] = json.loads(result.read_text())
    if status != "passed":
        lines = log_file.read_text().strip().splitlines()
        section["message"] = lines[-1] if lines else status
    return section


def goals(sections: dict) -> list[dict]:
    """The issue's goals, each with the figure it was checked on and whether it was met (None:
    a figure reported against its anchor, without a goal)."""
    rows = []
    predict = sections.get("predict_1.5mm", {}).get("result")
    if predict:
        ours, theirs = predict["sides"]["ctseg"], predict["sides"]["monai"]
        rows.append({"goal": f"predict.py time <= {TIME_GOAL}x the bundle's at 1.5 mm",
                     "value": ours["seconds"] / theirs["seconds"], "limit": TIME_GOAL})
        if ours["peak_gpu_mb"] and theirs["peak_gpu_mb"]:
            rows.append({"goal": f"predict.py peak GPU memory <= {MEMORY_GOAL}x the bundle's at "
                         "1.5 mm", "value": ours["peak_gpu_mb"] / theirs["peak_gpu_mb"],
                         "limit": MEMORY_GOAL})
    training = sections.get("training", {}).get("result", {}).get("training", {})
    for row, figures in training.items():
        if row.startswith("ctseg_disk") and "perf/data_wait" in figures:
            rows.append({"goal": f"data wait <= {DATA_WAIT_GOAL:.0%} ({row})",
                         "value": figures["perf/data_wait"], "limit": DATA_WAIT_GOAL})
    for section, model in EXPORTS.items():
        rows += export_rows(sections.get(section, {}).get("result"), model)
    for row in rows:
        row["met"] = None if row["limit"] is None else bool(row["value"] <= row["limit"])
    return rows


def export_rows(export: dict | None, model: str) -> list[dict]:
    """The goal rows of one export section's result: build seconds per spacing, each format's
    parity (largest logit difference, limit its threshold), each TensorRT variant's window
    compute speed-up over AMP."""
    rows: list[dict] = []
    if not export:
        return rows
    for spacing, built in export["setting"]["exports"].items():
        rows.append({"goal": f"{model}: export build seconds ({', '.join(built['parity'])}, "
                     f"{spacing} mm)", "value": built["seconds"], "limit": None})
        for fmt, parity in built["parity"].items():
            rows.append({"goal": f"{model}: {fmt} parity, max logit difference ({spacing} mm)",
                         "value": parity["max_abs_diff"],
                         "limit": parity["thresholds"]["max_abs_diff"]})
    amp = next((s for n, s in export["sides"].items() if n.startswith("AMP fp16")), None)
    for name, side in export["sides"].items():
        if amp and name.startswith("TensorRT") and "window_s" in side:
            rows.append({"goal": f"{model}, {name}: window compute speed-up over AMP (anchors: "
                         f"{TRT_ANCHORS})", "value": amp["window_s"] / side["window_s"],
                         "limit": None})
    return rows


def markdown(report: dict) -> str:
    """The report as markdown: the machine, the goals, then each section's command, status,
    elapsed time and its script's tables."""
    host = report["machine"]
    lines = ["# ctseg GPU report", "", f"{report['date']}; {host.get('gpu', 'no GPU')}; "
             f"{host['cpu']}, {host['cores']} cores, {host['memory_gib']} GiB; device "
             f"{report['device']}{' (smoke sizes)' if report['smoke'] else ''}; "
             f"{report['seconds']:.0f} s of a {report['budget_min']:g}-minute budget"]
    if report["goals"]:
        lines += ["", "| goal | value | met |", "|---|---:|---|"]
        met = {True: "yes", False: "no", None: "-"}
        lines += [f"| {g['goal']} | {g['value']:.3f} | {met[g['met']]} |"
                  for g in report["goals"]]
    lines += ["", "| section | status | seconds |", "|---|---|---:|"]
    lines += [f"| {name} | {s['status']} | {s.get('seconds', 0):.0f} |"
              for name, s in report["sections"].items()]
    for name, section in report["sections"].items():
        lines += ["", f"## {name}", ""]
        if section["status"] == "skipped":
            lines.append(f"Skipped: {section['message']}")
            continue
        lines += [f"`python {section['command']}`: {section['status']} in "
                  f"{section['seconds']:.0f} s", ""]
        if "message" in section:
            lines += [f"Message: {section['message']}", ""]
        lines.append(section["tables"])
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    """The report's options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_report"),
                        help="folder for gpu_report.md, gpu_report.json, sections/ and logs/")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--smoke", action="store_true",
                        help="every section at its smallest setting (for --device cpu)")
    parser.add_argument("--sections", nargs="+", choices=tuple(SECTIONS), default=list(SECTIONS),
                        help="sections to run, in the report's order")
    parser.add_argument("--budget-min", type=float, default=BUDGET_MIN,
                        help=f"minutes the report may take (default {BUDGET_MIN:g})")
    parser.add_argument("--repeats", type=int, default=REPEATS,
                        help=f"rounds of the predict sections (default {REPEATS})")
    parser.add_argument("--point-budget-s", type=float, default=POINT_BUDGET_S,
                        help=f"seconds of point-stage training (default {POINT_BUDGET_S:g})")
    parser.add_argument("--vista3d-ckpt", type=Path, help="automatic-mode VISTA3D checkpoint of "
                        "experiment=vista3d_quick for the point_stage and export_vista3d sections "
                        "(default: trained in the point_stage section)")
    parser.add_argument("--members", type=Path, nargs="+", help="trained ensemble members "
                        "(default: trained in the ensemble section)")
    parser.add_argument("--jobs", type=int, default=1, help="sections run at the same time "
                        "(more than 1 only with --smoke, whose figures are not compared)")
    parser.add_argument("--predict-threshold", type=float, help="least share of equal labels "
                        "in the predict sections (default: inference.py's)")
    return parser.parse_args()


def say(line: str) -> None:
    """Print one whole line of progress (sections may run side by side)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_within(args: argparse.Namespace, name: str, start: float, budget_s: float,
               needed: Future | None = None) -> dict:
    """Section `name`, run unless its budget would pass the report's `budget_s` (the report
    started at `start`) or the VISTA3D checkpoint it exports is missing (after the section
    `needed` finished), or recorded as skipped; said as it goes."""
    if needed is not None:
        needed.result()
    if SECTIONS[name].needs and not vista3d_ckpt(args).is_file():
        section = {"status": "skipped", "message": f"no VISTA3D checkpoint at "
                   f"{vista3d_ckpt(args)}: the {SECTIONS[name].needs} section did not write one; "
                   "give --vista3d-ckpt or run that section too"}
        say(f"[{name}] skipped: {section['message']}")
        return section
    spent = time.perf_counter() - start
    need = SECTIONS[name].smoke_budget_s if args.smoke else SECTIONS[name].budget_s
    if spent + need > budget_s:
        section = {"status": "skipped", "message": f"its budget of {need:.0f} s would pass the "
                   f"report's {budget_s:.0f} s ({spent:.0f} s spent); run it with --sections "
                   f"{name}"}
        say(f"[{name}] skipped: {section['message']}")
        return section
    say(f"[{name}] running (budget {need:.0f} s) ...")
    section = run_section(args, name, budget_s - spent)
    say(f"[{name}] {section['status']} in {section['seconds']:.0f} s")
    return section


def main() -> int:
    """Run the sections within the budget; write the report; 1 when a section failed."""
    args = parse_args()
    if args.jobs < 1 or (args.jobs > 1 and not args.smoke):
        print(f"error: --jobs {args.jobs}: give 1, or more only with --smoke (sections measured "
              "side by side share the machine, so their figures are not comparable)",
              file=sys.stderr)
        return 1
    if args.vista3d_ckpt and not args.vista3d_ckpt.is_file():
        print(f"error: --vista3d-ckpt {args.vista3d_ckpt}: no such file; give an automatic-mode "
              "VISTA3D checkpoint (train.py experiment=vista3d_quick), or leave the option out and "
              "the point_stage section trains one", file=sys.stderr)
        return 1
    missing = [member for member in args.members or () if not member.is_file()]
    if missing:
        print(f"error: --members {missing[0]}: no such file; give trained checkpoints (paths "
              "from the folder the report is run in), or leave the option out and the ensemble "
              "section trains two", file=sys.stderr)
        return 1
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gpu_report: CUDA is not available on this machine; nothing measured")
            return 0
    args.out = args.out.resolve()
    args.vista3d_ckpt = args.vista3d_ckpt and args.vista3d_ckpt.resolve()
    args.members = args.members and [member.resolve() for member in args.members]
    for folder in ("sections", "logs"):
        (args.out / folder).mkdir(parents=True, exist_ok=True)
    if "point_stage" in args.sections and not args.vista3d_ckpt:  # never an earlier run's
        (args.out / AUTOMATIC_CKPT).unlink(missing_ok=True)
    budget_s, start = args.budget_min * 60, time.perf_counter()
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    running: dict[str, Future] = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # started in the report's order
        for name in (n for n in SECTIONS if n in args.sections):
            needs = None if args.vista3d_ckpt else SECTIONS[name].needs
            running[name] = pool.submit(run_within, args, name, start, budget_s,
                                        running.get(needs))
    sections = {name: future.result() for name, future in running.items()}
    report = {"date": date, "machine": machine(), "device": args.device, "smoke": args.smoke,
              "budget_min": args.budget_min, "seconds": time.perf_counter() - start,
              "sections": sections, "goals": goals(sections)}
    (args.out / "gpu_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "gpu_report.md").write_text(markdown(report))
    print(f"wrote {args.out / 'gpu_report.md'} and {args.out / 'gpu_report.json'}")
    failed = [f"{name} ({s['message']})" for name, s in sections.items()
              if s["status"] in ("failed", "timed out")]
    if failed:
        print(f"gpu_report: {len(failed)} section(s) failed: {'; '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
