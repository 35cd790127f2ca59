"""What the benchmarks share: paths, the machine's description, and running each measurement in
a fresh interpreter so that its peak RSS (getrusage) is its own."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CTSEG_SHARED_DATA", REPO.parent / "shared" / "data"))
SHARED = SHARED_DATA / "totalseg_mini"
# Hidden options of every benchmark: which measurement a worker runs and where it writes.
WORKER_OPTIONS = ("--worker", "--workdir", "--result")


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


def run_worker(script: str, name: str, workdir: str, options: Sequence[str]) -> dict:
    """Run measurement `name` of `script` in a fresh interpreter (with `options`, the script's
    own flags) and return its result, peak RSS included."""
    result = Path(workdir) / f"{name}.json"
    command = [sys.executable, script, "--worker", name, "--workdir", workdir,
               "--result", str(result), *options]
    subprocess.run(command, check=True)
    return json.loads(result.read_text())


def serve_worker(work: Callable[[argparse.Namespace], dict], args: argparse.Namespace) -> None:
    """Inside a worker: run `work`, add this process's peak RSS and write the result file."""
    result = work(args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.result).write_text(json.dumps(result))
