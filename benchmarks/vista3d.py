"""Benchmark VISTA3D click sessions: first click vs next clicks, against a fresh predict run per
click, and the automatic "everything" mode, on a whole-body-sized CT on CPU.

    python benchmarks/vista3d.py [--runs VARIANT:WINDOWS:CACHE ...] [--everything [VARIANT ...]]
                                 [--tile 12] [--repeats 3] [--threads N] [--out result.json]

The CT is the shared crop resampled to 1.5 mm and tiled `--tile` times along z (default 12:
243 x 201 x 708 voxels, 1.06 m); the checkpoints are random-init VISTA3Ds (`small`:
model=vista3d_small's 16 channels and 4 levels; `vista3d132`: the bundle's network) with the
bundle's 128^3 window at 1.5 mm and the 97 v1 classes with a VISTA3D id. Each measurement runs
in a fresh interpreter (peak RSS is its own):

- session (`ctseg.inference.click_session.ClickSession`), per run VARIANT:WINDOWS:CACHE (windows
  `grid`: point_window=false, `centred`: point_window=true; cache float32 or float16; default
  small:grid:float32 small:centred:float32 small:grid:float16 vista3d132:grid:float32), clicks
  alone (the point head): a warm-up click in another session first; `--repeats` times a new
  session opened (load + preprocess) and its first click; in the last one `--repeats` next
  clicks a few voxels from it (each adds a click: the prompt holds all clicks so far). After each
  next click a fresh `CasePredictor.segment` run (predict.py without writing files: load,
  preprocess, every window, post-processing, inversion) with the same clicks is timed and its
  labels compared voxel by voxel. Times: medians over the repeats, wall and CPU time of the
  process (which a machine shared with other jobs disturbs less).
- everything (`--everything`, default small): `CasePredictor.segment` without a prompt (all 97
  classes), time and peak RSS.

Prints the table and writes it beside this script as vista3d.md (and JSON with --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from common import SHARED, add_worker_options, machine, run_worker, serve_worker

SHARED_CT = SHARED / "s0001" / "ct.nii.gz"
SPACING = 1.5
ROI = (128, 128, 128)
VARIANTS = {"small": {"encoder_embed_dim": 16, "blocks_down": (1, 1, 1, 1)},
            "vista3d132": {"encoder_embed_dim": 48, "blocks_down": (1, 2, 2, 4, 4)}}
MODES = {"grid": False, "centred": True}
# First click: the crop's voxel [40, 30, 12] (a kidney) in the middle tile, in input voxels at
# 1.5 mm: inside one window of the 128^3 grid at the default --tile (the ratios do not depend on
# how many windows a click falls in); next clicks: a few voxels from it, alternately negative and
# positive.
FIRST = (80, 60, 24)
NEXT = (((4, 0, 0), 0), ((0, -4, 0), 1), ((0, 0, 4), 0), ((-4, 4, 0), 1), ((0, 4, -4), 0))
CACHES = ("float32", "float16")
RUNS = ("small:grid:float32", "small:centred:float32", "small:grid:float16",
        "vista3d132:grid:float32")
TABLE = Path(__file__).with_name("vista3d.md")


def run_spec(text: str) -> tuple[str, str, str]:
    """VARIANT:WINDOWS:CACHE as a checked triple."""
    parts = tuple(text.split(":"))
    if len(parts) != 3 or parts[0] not in VARIANTS or parts[1] not in MODES or \
            parts[2] not in CACHES:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give VARIANT:WINDOWS:CACHE with VARIANT in {list(VARIANTS)}, WINDOWS in "
            f"{list(MODES)}, CACHE in {list(CACHES)}")
    return parts  # type: ignore[return-value]


def make_ct(path: Path, tile: int) -> None:
    """The shared crop resampled to 1.5 mm (RAS), tiled `tile` times along z."""
    from monai.transforms import LoadImage, Orientation, Spacing

    image = LoadImage(image_only=True, ensure_channel_first=True)(str(SHARED_CT))
    image = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(image)
    image = Spacing(pixdim=SPACING, mode="bilinear")(image)
    data = np.tile(np.rint(image[0].numpy()).astype(np.int16), (1, 1, tile))
    nib.save(nib.Nifti1Image(data, np.asarray(image.affine, dtype=np.float64)), path)


def make_checkpoint(path: Path, variant: str, seed: int) -> None:
    """A random-init VISTA3D checkpoint of `variant` (v1 classes, 1.5 mm, 128^3 windows)."""
    import torch

    from ctseg.labels import label_names
    from ctseg.models.vista3d import VISTA3DModule

    torch.manual_seed(seed)
    module = VISTA3DModule(105, label_names("v1"), roi_size=ROI, **VARIANTS[variant])
    data = {"version": "v1", "spacing": SPACING, "intensity": "hu_window", "smooth_sigma": 0.0,
            "patch_size": list(ROI)}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "datamodule_hyper_parameters": data}, path)


def _clock(work: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """`work()`'s result and its wall and CPU (this process) times in seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return result, {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def _median(times: list[dict[str, float]]) -> dict[str, float]:
    """Median wall and CPU times of repeated measurements."""
    return {k: statistics.median(t[k] for t in times) for k in ("wall", "cpu")}


def worker_session(args: argparse.Namespace) -> dict:
    """Warm up; first clicks (each in a new session), then next clicks, each against a fresh
    predict run with the same clicks."""
    import torch

    from ctseg.inference.click_session import ClickSession
    from ctseg.inference.inputs import Case
    from ctseg.inference.pipeline import CasePredictor, PredictOptions
    from ctseg.models.loading import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.ckpt, {}, {})
    case = Case("ct", Path(args.ct), "nifti")
    point_window = MODES[args.mode]
    dtype = torch.float16 if args.cache == "float16" else torch.float32
    first = [int(c) for c in args.first.split(",")]
    with ClickSession.open(model, case, point_window=point_window) as warm:
        warm.click([[s // 4 for s in nib.load(args.ct).shape]])  # another window
    opens, firsts = [], []
    for _ in range(args.repeats):
        session, seconds = _clock(lambda: ClickSession.open(
            model, case, point_window=point_window, cache_dtype=dtype))
        opens.append(seconds)
        firsts.append(_clock(lambda s=session: s.click([first]))[1])
        first_runs, first_bytes = session.encoder_runs, session.cache_bytes
        if len(firsts) < args.repeats:
            session.close()
    nexts, fresh, agreement, runs = [], [], [], []
    for offset, positive in NEXT[:args.repeats]:
        point = [c + o for c, o in zip(first, offset, strict=True)]
        before = session.encoder_runs
        labels, seconds = _clock(lambda p=point, q=positive: session.click([p], [q]))
        nexts.append(seconds)
        runs.append(session.encoder_runs - before)
        with CasePredictor(model, PredictOptions(device="cpu", prompt=session.prompt)) as run:
            seg, seconds = _clock(lambda r=run: r.segment(case))
        fresh.append(seconds)
        agreement.append(float((seg.labels == labels).mean()))
    result = {"open": _median(opens), "first": _median(firsts), "next": _median(nexts),
              "fresh": _median(fresh), "first_all": firsts, "next_all": nexts,
              "fresh_all": fresh, "agreement": agreement, "first_encoder_runs": first_runs,
              "next_encoder_runs": runs, "cache_bytes_first": first_bytes,
              "cache_bytes": session.cache_bytes, "cached_windows": session.cached_windows,
              "foreground": float((labels > 0).mean())}
    session.close()
    return result


def worker_everything(args: argparse.Namespace) -> dict:
    """The automatic mode (every class the checkpoint knows) through predict's segment."""
    import torch

    from ctseg.inference.inputs import Case
    from ctseg.inference.pipeline import CasePredictor, PredictOptions
    from ctseg.models.loading import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.ckpt, {}, {})
    with CasePredictor(model, PredictOptions(device="cpu")) as predictor:
        seg, seconds = _clock(lambda: predictor.segment(Case("ct", Path(args.ct), "nifti")))
    return {"seconds": seconds, "classes": len(model.known_ids),
            "labelled": len(np.unique(seg.labels))}


def measure(name: str, args: argparse.Namespace, ckpt: str, mode: str = "grid",
            cache: str = "float32") -> dict:
    """One measurement in a fresh interpreter; its result with peak RSS."""
    return run_worker(__file__, f"{name}_{Path(ckpt).stem}_{mode}_{cache}", args.workdir, [
        "--ct", args.ct, "--ckpt", ckpt, "--mode", mode, "--cache", cache,
        "--repeats", str(args.repeats), "--threads", str(args.threads), "--kind", name,
        "--first", args.first])


def table(rows: list[dict], everything: dict, shape: tuple[int, ...], threads: int) -> str:
    """The benchmark as markdown."""
    info = machine()
    lines = [f"CT {shape[0]}x{shape[1]}x{shape[2]} at {SPACING} mm (the shared crop tiled), "
             f"128^3 windows, random-init weights, clicks alone; CPU ({info['cpu']}, {threads} "
             f"thread(s) of {info['cores']} cores). Seconds, wall (CPU of the process), medians "
             f"over the repeats; fresh run: predict's segment with the same clicks (load, "
             "preprocess, every window, post-processing, inversion); agreement: session labels "
             "equal to the fresh run's, lowest over the next clicks.",
             "",
             "| variant | windows | cache | open | first click | next click | next / first "
             "wall (CPU) | fresh run | next / fresh wall (CPU) | encoder runs first; next | "
             "cache MiB first; end | agreement | peak RSS MiB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|"]

    def pair(t: dict) -> str:
        return f"{t['wall']:.2f} ({t['cpu']:.2f})"

    def ratio(a: dict, b: dict) -> str:
        return f"{a['wall'] / b['wall']:.2f} ({a['cpu'] / b['cpu']:.2f})"

    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['mode']} | {r['cache']} | {pair(r['open'])} | "
            f"{pair(r['first'])} | {pair(r['next'])} | {ratio(r['next'], r['first'])} | "
            f"{pair(r['fresh'])} | {ratio(r['next'], r['fresh'])} | {r['first_encoder_runs']}; "
            f"{', '.join(map(str, r['next_encoder_runs']))} | "
            f"{r['cache_bytes_first'] / 2**20:.0f}; {r['cache_bytes'] / 2**20:.0f} | "
            f"{min(r['agreement']) * 100:.3f} % | {r['peak_rss_mb']:.0f} |")
    lines.append("")
    for variant, e in everything.items():
        lines.append(f"Everything mode ({variant}, {e['classes']} classes, predict's segment): "
                     f"{pair(e['seconds'])} s, peak RSS {e['peak_rss_mb']:.0f} MiB.")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse arguments; run as the coordinator or, with --worker, as one measurement."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", type=run_spec, default=[run_spec(r) for r in RUNS],
                        help="sessions as VARIANT:WINDOWS:CACHE, e.g. small:grid:float16")
    parser.add_argument("--tile", type=int, default=12, help="copies of the crop along z")
    parser.add_argument("--repeats", type=int, default=3, choices=range(1, len(NEXT) + 1),
                        help="next clicks")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: "
                        "torch's)")
    parser.add_argument("--everything", nargs="*", choices=tuple(VARIANTS), default=["small"],
                        help="variants whose everything mode is measured (none: skip it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    add_worker_options(parser, "--ct", "--ckpt", "--mode", "--cache", "--kind", "--first")
    args = parser.parse_args()
    if args.threads is None:
        import torch

        args.threads = torch.get_num_threads()
    if args.worker:
        work = {"session": worker_session, "everything": worker_everything}[args.kind]
        serve_worker(work, args)
        return
    with tempfile.TemporaryDirectory(prefix="ctseg_bench_vista3d_") as workdir:
        args.workdir = workdir
        args.ct = str(Path(workdir) / "ct.nii.gz")
        make_ct(Path(args.ct), args.tile)
        shape = nib.load(args.ct).shape
        middle = shape[2] // args.tile * (args.tile // 2)
        args.first = ",".join(map(str, (FIRST[0], FIRST[1], FIRST[2] + middle)))
        ckpts = {}
        for variant in dict.fromkeys([v for v, _, _ in args.runs] + args.everything):
            ckpts[variant] = str(Path(workdir) / f"{variant}.ckpt")
            make_checkpoint(Path(ckpts[variant]), variant, args.seed)
        rows, everything, failed = [], {}, []
        for variant, mode, cache in args.runs:
            try:
                result = measure("session", args, ckpts[variant], mode, cache)
            except subprocess.CalledProcessError as err:
                failed.append(f"{variant}:{mode}:{cache} (exit {err.returncode})")
                continue
            rows.append({"variant": variant, "mode": mode, "cache": cache, **result})
            print(f"{variant} {mode} {cache}: first {result['first']['wall']:.1f} s, next "
                  f"{result['next']['wall']:.2f} s, fresh {result['fresh']['wall']:.1f} s",
                  flush=True)
            report(args, shape, rows, everything, failed)
        for variant in args.everything:
            try:
                everything[variant] = measure("everything", args, ckpts[variant])
            except subprocess.CalledProcessError as err:
                failed.append(f"{variant} everything (exit {err.returncode})")
    print(report(args, shape, rows, everything, failed))


def report(args: argparse.Namespace, shape: tuple[int, ...], rows: list[dict],
           everything: dict, failed: list[str]) -> str:
    """Write the table beside this script (and the JSON to --out) as it stands; the table."""
    text = table(rows, everything, shape, args.threads)
    if failed:
        text += "\nFailed: " + "; ".join(failed) + "\n"
    TABLE.write_text(f"# VISTA3D click sessions\n\n`python benchmarks/vista3d.py "
                     f"{' '.join(sys.argv[1:])}`\n\n{text}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"shape": list(shape), "spacing_mm": SPACING,
                                        "threads": args.threads, "machine": machine(),
                                        "sessions": rows, "everything": everything,
                                        "failed": failed}, indent=2) + "\n")
    return text


if __name__ == "__main__":
    main()
