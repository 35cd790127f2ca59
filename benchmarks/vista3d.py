"""Benchmark VISTA3D click sessions against a fresh predict run with the same clicks, and the
automatic "everything" mode, on a whole-body-sized CT on CPU (or `--device cuda`).

    python benchmarks/vista3d.py [--runs VARIANT:WINDOWS:CACHE ...] [--everything [VARIANT ...]]
                                 [--tile 12] [--clicks 3] [--repeats 3] [--threads N]
                                 [--device cpu|cuda] [--table vista3d.md] [--out result.json]

The CT is the shared crop resampled to 1.5 mm and tiled `--tile` times along z (default 12:
243 x 201 x 708 voxels, 1.06 m); the checkpoints are random-init VISTA3Ds (`small`:
model=vista3d_small's 16 channels and 4 levels; `vista3d132`: the bundle's network) with the
bundle's 128^3 window at 1.5 mm and the 97 v1 classes with a VISTA3D id. Every side is measured
with the protocol of benchmarks/common.py (one process per measurement, interleaved rounds, one
untimed warm-up, medians; model loaded untimed), over the same span: from the input file and the
clicks (a first click in a kidney of the middle tile, then `--clicks` next clicks a few voxels
from it) to the labels of the last click in memory; writing them is timed apart:

- `session VARIANT:WINDOWS:CACHE` (`ctseg.inference.click_session.ClickSession`; windows `grid`:
  point_window=false, `centred`: point_window=true; cache float32 or float16; default
  small:grid:float32 small:centred:float32 small:grid:float16 vista3d132:grid:float32): open the
  session (load + preprocess), the first click, then each next click (clicks alone, the point
  head); the open, first-click and next-click times inside the measured run are reported too;
- `fresh VARIANT:WINDOWS`: `CasePredictor.segment` (predict.py without writing files: load,
  preprocess, every window, post-processing, inversion) with all the clicks as its prompt;
- `everything VARIANT` (`--everything`, default small): `CasePredictor.segment` without a prompt
  (all 97 classes).

Agreement: each session's labels equal its fresh run's on at least 99.9 % of the voxels, else the
script exits non-zero after writing the JSON. Prints the tables and writes them to `--table`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from common import (
    SHARED,
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
# The span of every side: the session's (open, then every click) and the fresh run's.
SPAN = "input file and clicks -> labels of the last click in memory"
# Least share of voxels where a session's labels equal the fresh run's with the same clicks: the
# session computes the same windows, only cached (float16 caches measured 100.000 % too).
THRESHOLD = 0.999


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
    import lightning
    import torch

    from ctseg.labels import label_names
    from ctseg.models.vista3d import VISTA3DModule

    torch.manual_seed(seed)
    module = VISTA3DModule(105, label_names("v1"), roi_size=ROI, **VARIANTS[variant])
    data = {"version": "v1", "spacing": SPACING, "intensity": "hu_window", "smooth_sigma": 0.0,
            "patch_size": list(ROI)}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "datamodule_hyper_parameters": data,
                "pytorch-lightning_version": lightning.__version__}, path)


def clicks(first: list[int], count: int) -> tuple[list[list[int]], list[int]]:
    """The first click and `count` next clicks a few voxels from it, and their labels."""
    points = [first] + [[c + o for c, o in zip(first, offset, strict=True)]
                        for offset, _ in NEXT[:count]]
    return points, [1] + [positive for _, positive in NEXT[:count]]


def worker(args: argparse.Namespace) -> dict:
    """One side under the protocol: a click session (open, first click, next clicks), a fresh
    predict run with all the clicks, or the everything mode; the labels of the last click."""
    import torch

    from ctseg.inference.click_session import ClickSession
    from ctseg.inference.inputs import Case
    from ctseg.inference.pipeline import CasePredictor, PredictOptions
    from ctseg.inference.prompts import parse_prompt
    from ctseg.models.loading import load_model

    torch.set_num_threads(int(args.threads))
    model = load_model(args.ckpt, {}, {})
    case = Case("ct", Path(args.ct), "nifti")
    affine = nib.load(args.ct).affine
    point_window = MODES[args.mode]
    points, labels = clicks([int(c) for c in args.first.split(",")], int(args.clicks))
    steps: dict = {}

    def session() -> np.ndarray:
        dtype = torch.float16 if args.cache == "float16" else torch.float32
        start = time.perf_counter()
        with ClickSession.open(model, case, device=args.device, point_window=point_window,
                               cache_dtype=dtype) as opened:
            steps["open_s"] = time.perf_counter() - start
            start = time.perf_counter()
            result = opened.click([points[0]])
            steps["first_s"] = time.perf_counter() - start
            steps["first_encoder_runs"] = opened.encoder_runs
            steps["next_s"], steps["next_encoder_runs"] = [], []
            for point, label in zip(points[1:], labels[1:], strict=True):
                start, runs = time.perf_counter(), opened.encoder_runs
                result = opened.click([point], [label])
                steps["next_s"].append(time.perf_counter() - start)
                steps["next_encoder_runs"].append(opened.encoder_runs - runs)
            steps["cache_bytes"] = opened.cache_bytes
            return result.copy()

    prompt = parse_prompt({"points": points, "point_labels": labels,
                           "point_window": point_window})
    kind = args.worker.split(" ", 1)[0]
    options = PredictOptions(device=args.device, prompt=prompt if kind == "fresh" else
                             parse_prompt(None))
    with CasePredictor(model, options) as predictor:
        span = session if kind == "session" else lambda: predictor.segment(case).labels

        def write(result: np.ndarray) -> None:
            nib.save(nib.Nifti1Image(result, affine),
                     Path(args.workdir) / f"{slug(args.worker)}.nii.gz")

        result = timed_span(span, write, lambda labels: labels,
                            Path(args.workdir) / f"{slug(args.worker)}_labels.npy")
    if kind == "everything":
        steps["classes"] = len(model.known_ids)
    return {**result, **steps}


def click_table(sides: dict[str, dict]) -> str:
    """The click sessions' steps (timed inside the measured run) as markdown."""
    lines = ["| session | open (s) | first click (s) | next clicks (s) | encoder runs first; next "
             "| cache MiB |", "|---|---:|---:|---|---|---:|"]
    for name, r in sides.items():
        if name.startswith("session"):
            lines.append(f"| {name.removeprefix('session ')} | {r['open_s']:.2f} | "
                         f"{r['first_s']:.2f} | {', '.join(f'{t:.2f}' for t in r['next_s'])} | "
                         f"{r['first_encoder_runs']}; "
                         f"{', '.join(map(str, r['next_encoder_runs']))} | "
                         f"{r['cache_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def main() -> None:
    """Parse arguments; run as the coordinator or, with --worker, as one side."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Smallest setting (seconds): --tile 1 --runs small:grid:float32 --everything "
        "--clicks 1 --repeats 1 --table result.md")
    parser.add_argument("--runs", nargs="+", type=run_spec, default=[run_spec(r) for r in RUNS],
                        help="sessions as VARIANT:WINDOWS:CACHE, e.g. small:grid:float16")
    parser.add_argument("--tile", type=int, default=12, help="copies of the crop along z")
    parser.add_argument("--clicks", type=int, default=3, choices=range(1, len(NEXT) + 1),
                        help="next clicks after the first")
    add_repeats_option(parser)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: "
                        "torch's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--everything", nargs="*", choices=tuple(VARIANTS), default=["small"],
                        help="variants whose everything mode is measured (none: skip it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table", type=Path, default=TABLE,
                        help="markdown file for the tables (default: vista3d.md beside this "
                        "script)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    add_worker_options(parser, "--ct", "--ckpt", "--mode", "--cache", "--first")
    args = parser.parse_args()
    if args.threads is None:
        import torch

        args.threads = torch.get_num_threads()
    if args.worker:
        serve_worker(worker, args)
        return
    configure_logging()
    with tempfile.TemporaryDirectory(prefix="ctseg_bench_vista3d_") as workdir:
        ct = str(Path(workdir) / "ct.nii.gz")
        make_ct(Path(ct), args.tile)
        shape = nib.load(ct).shape
        middle = shape[2] // args.tile * (args.tile // 2)
        first = ",".join(map(str, (FIRST[0], FIRST[1], FIRST[2] + middle)))
        ckpts = {}
        for variant in dict.fromkeys([v for v, _, _ in args.runs] + args.everything):
            ckpts[variant] = str(Path(workdir) / f"{variant}.ckpt")
            make_checkpoint(Path(ckpts[variant]), variant, args.seed)

        def options(variant: str, mode: str = "grid", cache: str = "float32") -> list[str]:
            return ["--ct", ct, "--ckpt", ckpts[variant], "--mode", mode, "--cache", cache,
                    "--clicks", str(args.clicks), "--threads", str(args.threads), "--first",
                    first, "--device", args.device]

        sides = {}
        for variant, mode, cache in args.runs:
            sides[f"session {variant}:{mode}:{cache}"] = options(variant, mode, cache)
            sides[f"fresh {variant}:{mode}"] = options(variant, mode)
        sides.update({f"everything {variant}": options(variant) for variant in args.everything})
        measured = run_sides(__file__, sides, workdir, args.repeats)
        checks = {f"{variant}:{mode}:{cache} session vs fresh": agreement(
            "share of voxels with labels equal to the fresh run's",
            voxel_agreement(measured[f"session {variant}:{mode}:{cache}"]["output"],
                            measured[f"fresh {variant}:{mode}"]["output"]), THRESHOLD)
            for variant, mode, cache in args.runs}
    setting = {"shape": list(shape), "spacing_mm": SPACING, "roi": list(ROI), "tile": args.tile,
               "clicks": 1 + args.clicks, "threads": args.threads, "device": args.device,
               "runs": [":".join(r) for r in args.runs], "everything": args.everything}
    report = payload("vista3d", SPAN, args.repeats, setting, measured, checks)
    base = f"fresh {args.runs[0][0]}:{args.runs[0][1]}"
    text = (report_text(report, base, f"CT {'x'.join(map(str, shape))} at {SPACING} mm (the "
                        f"shared crop tiled {args.tile}x), 128^3 windows, random-init weights, "
                        f"{1 + args.clicks} clicks, {args.threads} thread(s), {args.device}")
            + "\n\nSteps of the click sessions (inside the measured run):\n\n"
            + click_table(report["sides"]) + "\n")
    print(text)
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(f"# VISTA3D click sessions\n\n`python benchmarks/vista3d.py "
                          f"{' '.join(sys.argv[1:])}`\n\n{text}")
    finish(report, args.out)


if __name__ == "__main__":
    main()
