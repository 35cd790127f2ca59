"""What the benchmarks share: paths, the machine's description, and the one protocol every
benchmark measures with.

The protocol: each side of a comparison (ctseg, MONAI, a variant) runs one process per
measurement (its peak RSS, getrusage, is its own), `--repeats` rounds interleaved A, B, A, B, ...
Inside each process (`timed_span`) the setup (loading the model, building the network) is
untimed, one warm-up run of the span is untimed, then the span itself is timed (for prediction:
from the input file to the labels in memory) and writing the result is timed separately. Per side
the JSON holds the median seconds, every run's seconds, the median write seconds, the peak RSS
(max over the runs) and, when CUDA was used, the peak GPU memory. Every benchmark then checks its
agreement with its reference (`agreement`) and, after writing the JSON, exits non-zero naming what
disagreed (`finish`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CTSEG_SHARED_DATA", REPO.parent / "shared" / "data"))
SHARED = SHARED_DATA / "totalseg_mini"
# Hidden options of every benchmark: which measurement a worker runs and where it writes.
WORKER_OPTIONS = ("--worker", "--workdir", "--result")
# The span timed by every prediction benchmark, on both sides.
PREDICTION_SPAN = "input file -> labels in memory"
# Keys of a worker's result that the protocol summarises; the others are kept from the last run.
PROTOCOL_KEYS = ("seconds", "write_seconds", "peak_rss_mb", "peak_gpu_mb")

log = logging.getLogger(__name__)
Result = TypeVar("Result")


def machine() -> dict:
    """CPU model, cores, memory and GPU of this machine."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                  .splitlines() if line.startswith("model name")), platform.processor())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    info = {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(memory, 1)}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def add_worker_options(parser: argparse.ArgumentParser, *extra: str) -> None:
    """The hidden options a worker process receives (`WORKER_OPTIONS` and `extra`)."""
    for option in (*WORKER_OPTIONS, *extra):
        parser.add_argument(option, help=argparse.SUPPRESS)


def add_repeats_option(parser: argparse.ArgumentParser, default: int = 3) -> None:
    """`--repeats`: the interleaved rounds of the protocol (one process per side each)."""
    parser.add_argument("--repeats", type=int, default=default,
                        help=f"interleaved rounds, one process per side each; the median is "
                        f"reported (default {default})")


def slug(name: str) -> str:
    """`name` as a file name."""
    return "".join(c if c.isalnum() else "_" for c in name)


def run_worker(script: str, name: str, workdir: str, options: Sequence[str]) -> dict:
    """Run measurement `name` of `script` in a fresh interpreter (with `options`, the script's
    own flags) and return its result, peak RSS included."""
    result = Path(workdir) / f"{slug(name)}.json"
    command = [sys.executable, script, "--worker", name, "--workdir", workdir,
               "--result", str(result), *options]
    subprocess.run(command, check=True)
    return json.loads(result.read_text())


def serve_worker(work: Callable[[argparse.Namespace], dict], args: argparse.Namespace) -> None:
    """Inside a worker: run `work`, add this process's peak RSS (unless `work` measured the peak
    of processes it ran) and write the result file."""
    result = work(args)
    result.setdefault("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    Path(args.result).write_text(json.dumps(result))


def _cuda_used() -> bool:
    """Whether this process has initialised CUDA."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()


def _synchronize() -> None:
    """Wait for queued CUDA work, so that a clock read after it counts it."""
    if _cuda_used():
        sys.modules["torch"].cuda.synchronize()


def timed_span(span: Callable[[], Result], write: Callable[[Result], object],
               output: Callable[[Result], np.ndarray], output_file: Path) -> dict:
    """Inside a worker, after its untimed setup: one untimed warm-up run of `span`, the timed
    `span`, then `write(result)` timed separately; `output(result)` (the labels) is saved,
    untimed, to `output_file` for the agreement check. Seconds, write seconds, the output file
    and, when CUDA was used, the peak GPU memory."""
    span()
    _synchronize()
    start = time.perf_counter()
    result = span()
    _synchronize()
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    write(result)
    write_seconds = time.perf_counter() - start
    np.save(output_file, output(result))
    out = {"seconds": seconds, "write_seconds": write_seconds, "output": str(output_file)}
    if _cuda_used():
        out["peak_gpu_mb"] = sys.modules["torch"].cuda.max_memory_allocated() / 2**20
    return out


def summarise(runs: Sequence[Mapping[str, Any]]) -> dict:
    """One side's runs as the protocol reports them: median seconds, every run's seconds, median
    write seconds, peak RSS and peak GPU memory (max over the runs); the other keys of the last
    run."""
    side = {key: value for key, value in runs[-1].items() if key not in PROTOCOL_KEYS}
    writes = [r["write_seconds"] for r in runs if r.get("write_seconds") is not None]
    gpu = [r["peak_gpu_mb"] for r in runs if r.get("peak_gpu_mb") is not None]
    return {"seconds": statistics.median(r["seconds"] for r in runs),
            "runs": [r["seconds"] for r in runs],
            "write_seconds": statistics.median(writes) if writes else None,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "peak_gpu_mb": max(gpu) if gpu else None, **side}


def run_sides(script: str, sides: Mapping[str, Sequence[str]], workdir: str, repeats: int,
              warmup_round: bool = False) -> dict[str, dict]:
    """Measure every side (worker name -> its options) `repeats` times, interleaved (A, B, A, B,
    ...), each measurement in a fresh interpreter; the summary of each side (`summarise`). With
    `warmup_round`, an untimed round comes first: the warm-up of measurements that time whole
    processes, which cannot warm up inside."""
    if repeats < 1:
        raise SystemExit(f"--repeats {repeats}: give at least 1")
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for repeat in range(-1 if warmup_round else 0, repeats):
        for name, options in sides.items():
            log.info("%s (%s)", name, f"round {repeat + 1} of {repeats}" if repeat >= 0
                     else "warm-up round")
            result = run_worker(script, name, workdir, options)
            if repeat >= 0:
                runs[name].append(result)
    return {name: summarise(rs) for name, rs in runs.items()}


def agreement(measure: str, value: float, threshold: float) -> dict:
    """One agreement check: what is compared, its value, the threshold and whether it passed
    (`value >= threshold`)."""
    return {"measure": measure, "value": float(value), "threshold": float(threshold),
            "passed": bool(value >= threshold)}


def voxel_agreement(a: np.ndarray | str, b: np.ndarray | str) -> float:
    """Share of equal voxels of two label maps (arrays or `.npy` files)."""
    a = np.load(a) if isinstance(a, str) else a
    b = np.load(b) if isinstance(b, str) else b
    if a.shape != b.shape:
        raise SystemExit(f"label maps of different shapes: {a.shape} and {b.shape}")
    return float((a == b).mean())


def failed_checks(checks: Mapping[str, Mapping[str, Any]]) -> str | None:
    """A one-line message naming the checks below their threshold; None when all passed."""
    failed = [f"{name} ({c['measure']}: {c['value']:.6g} < {c['threshold']:.6g})"
              for name, c in checks.items() if not c["passed"]]
    return f"agreement below threshold: {'; '.join(failed)}" if failed else None


def payload(benchmark: str, span: str, repeats: int, setting: Mapping[str, Any],
            sides: Mapping[str, Mapping[str, Any]], checks: Mapping[str, Mapping[str, Any]]
            ) -> dict:
    """The JSON every benchmark writes; the output files of the sides are left out."""
    return {"benchmark": benchmark, "span": span, "repeats": repeats, "setting": dict(setting),
            "sides": {name: {k: v for k, v in side.items() if k != "output"}
                      for name, side in sides.items()},
            "agreement": dict(checks), "machine": machine()}


def finish(report: Mapping[str, Any], out: Path | None) -> None:
    """Write `report` to `out` (if given), then exit non-zero naming what disagreed."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    message = failed_checks(report["agreement"])
    if message:
        raise SystemExit(message)


def side_rows(sides: Mapping[str, Mapping[str, Any]], base: str) -> list[str]:
    """Markdown rows of the protocol's figures per side, with ratios to side `base`."""
    ref = sides[base]
    lines = ["| side | time (s) | runs (s) | write (s) | peak RSS (MiB) | peak GPU (MiB) | "
             f"time / {base} | RSS / {base} |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for name, s in sides.items():
        write = "-" if s["write_seconds"] is None else f"{s['write_seconds']:.2f}"
        gpu = "-" if s["peak_gpu_mb"] is None else f"{s['peak_gpu_mb']:.0f}"
        lines.append(f"| {name} | {s['seconds']:.2f} | "
                     f"{', '.join(f'{r:.2f}' for r in s['runs'])} | {write} | "
                     f"{s['peak_rss_mb']:.0f} | {gpu} | {s['seconds'] / ref['seconds']:.2f} | "
                     f"{s['peak_rss_mb'] / ref['peak_rss_mb']:.2f} |")
    return lines


def agreement_rows(checks: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown rows of the agreement checks."""
    lines = ["| check | measure | value | threshold | passed |", "|---|---|---:|---:|---|"]
    lines += [f"| {name} | {c['measure']} | {c['value']:.6f} | {c['threshold']:.6f} | "
              f"{'yes' if c['passed'] else 'NO'} |" for name, c in checks.items()]
    return lines


def configure_logging() -> None:
    """Log the coordinator's progress to stderr."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def report_text(report: Mapping[str, Any], base: str, title: str) -> str:
    """The report as markdown: `title`, the span and repeats, the sides, the agreement."""
    return "\n".join([f"{title}; {report['span']}, median of {report['repeats']}", "",
                      *side_rows(report["sides"], base), "", *agreement_rows(report["agreement"])])
