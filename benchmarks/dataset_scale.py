"""Benchmark the data tools at the download's size: `check`, `prepare` and the disk cache on a
simulated full-size TotalSegmentator v2 download, extrapolated to the real one.

    python benchmarks/dataset_scale.py [--subjects 10] [--scale 1] [--spacings 1.5 3]
                                       [--download DIR] [--repeats 1] [--out scale.json]

`--subjects` subjects of `python -m ctseg.data phantoms DIR --size wholebody` (written into
`--download` unless it already holds them, else into a temporary folder) go through each stage
in one worker process, the way a user's command runs them with one worker: `check` (every
file of every subject validated, `ctseg.data.layout.subject_problems`), `prepare` (the masks
merged into label maps, `ctseg.data.merge.prepare`, into a fresh folder) and the disk cache at
each of `--spacings` (`VolumeCache.warm` of `data=totalseg_v2`'s pipeline, from a fresh cache
folder). Per stage, under the common protocol (its own process per run, median of `--repeats`
interleaved rounds; no warm-up run: a second pass of a stage would find its work done): seconds
per subject per worker, the worker's peak RSS and the bytes it wrote per voxel (the raw grid's
voxels for `prepare`, the cached volume's for the cache). Then the projection for the v2
download's 1,228 subjects: each stage's seconds per CT voxel times the mean voxels of the
simulated distribution (so that a few subjects, larger or smaller than the mean, do not skew
it), on 2, 16 and 64 cores (one worker per core, perfect scaling, memory permitting: cores x
peak RSS), the total size written, and issue 38's goals: prepare + cache at 1.5 mm within 2
hours on one 16-core node; the cache <= 3 bytes per voxel.

Agreement: every subject passes `check`; the smallest subject's label map equals its masks
merged as TotalSegmentator's `combine_masks` does (later class wins); per cache, the smallest
subject's cached voxels per class equal those of its label map resampled by MONAI's own
`Orientationd` + `Spacingd` (nearest).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
from common import (
    add_repeats_option,
    add_worker_options,
    agreement,
    configure_logging,
    finish,
    payload,
    run_sides,
    serve_worker,
)

from ctseg.data.layout import read_meta, subject_problems
from ctseg.data.merge import PreparedDataset, prepare
from ctseg.data.phantoms import RECORD
from ctseg.data.simulated_download import (
    WHOLEBODY_VERSION,
    draw_geometry,
    wholebody_record,
    write_wholebody_phantoms,
)
from ctseg.data.transforms import PipelineConfig
from ctseg.data.volume_cache import VolumeCache
from ctseg.labels import label_names, num_classes

SPAN = "raw files -> checked, prepared or cached on disk (writing included), one worker"
# The v2 download's subjects, the node sizes projected, issue 38's goals.
DOWNLOAD_SUBJECTS = 1228
CORES = (2, 16, 64)
GOAL_HOURS, GOAL_CORES, GOAL_SPACING, GOAL_BYTES_PER_VOXEL = 2.0, 16, 1.5, 3.0
VERSION = WHOLEBODY_VERSION
THRESHOLD = 1.0


def cache_side(spacing: float) -> str:
    """The name of the cache stage at `spacing` mm."""
    return f"cache {spacing:g} mm"


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def raw_voxels(root: Path) -> list[int]:
    """Voxels of each subject's CT (from its header)."""
    return [int(np.prod(nib.load(s.ct).shape)) for s in read_meta(root)]


def prepared_once(workdir: Path, root: Path) -> PreparedDataset:
    """The prepared folder the cache stages read: the first prepare run's (or prepared now)."""
    return prepare(root, out=workdir / "prepared" / "run-0", version=VERSION)


def worker(args: argparse.Namespace) -> dict:
    """One stage over every subject: its seconds, bytes written, and what the agreement needs."""
    root, workdir = Path(args.download), Path(args.workdir)
    subjects = read_meta(root)
    smallest = int(args.smallest)
    if args.worker == "check":
        start = time.perf_counter()
        problems = [len(subject_problems(s, VERSION)) for s in subjects]
        return {"seconds": time.perf_counter() - start, "write_seconds": None,
                "subjects_without_problems": sum(p == 0 for p in problems)}
    if args.worker == "prepare":
        runs = workdir / "prepared"
        out = runs / f"run-{len(list(runs.glob('run-*'))) if runs.is_dir() else 0}"
        start = time.perf_counter()
        dataset = prepare(root, out=out, version=VERSION)
        seconds = time.perf_counter() - start
        written = folder_bytes(out / VERSION)
        label = np.asanyarray(nib.load(dataset.records[smallest]["label"]).dataobj)
        np.save(workdir / "prepared_label.npy", label)
        if out.name != "run-0":
            shutil.rmtree(out)
        return {"seconds": seconds, "write_seconds": None, "bytes": written,
                "voxels": int(sum(raw_voxels(root)))}
    dataset = prepared_once(workdir, root)
    pipeline = PipelineConfig(spacing=float(args.spacing), num_classes=num_classes(VERSION))
    cache = VolumeCache(workdir / "cache" / uuid.uuid4().hex, pipeline)
    start = time.perf_counter()
    cache.warm(dataset.records)
    seconds = time.perf_counter() - start
    entries = [cache.entry(r) for r in dataset.records]
    label = np.asarray(entries[smallest].label())
    result = {"seconds": seconds, "write_seconds": None, "bytes": cache.size_on_disk(),
              "voxels": int(sum(np.prod(e.shape) for e in entries)),
              "class_voxels": np.bincount(label.ravel(), minlength=num_classes(VERSION)).tolist()}
    shutil.rmtree(cache.root.parent)
    return result


def combined_masks(folder: Path) -> np.ndarray:
    """A subject's masks merged as TotalSegmentator's `combine_masks_to_multilabel_file` does:
    in class order, each mask's voxels > 0.5 set to its index (a later class wins)."""
    label = None
    for index, name in enumerate(label_names(VERSION)[1:], start=1):
        mask = np.asanyarray(nib.load(folder / "segmentations" / f"{name}.nii.gz").dataobj)
        label = np.zeros(mask.shape, np.uint8) if label is None else label
        label[mask > 0.5] = index
    return label


def resampled_class_voxels(label_file: Path, spacing: float) -> list[int]:
    """Voxels per class of a label map oriented to RAS and resampled to `spacing` mm (nearest)
    by MONAI's own transforms."""
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation, Spacing

    label = Compose([LoadImage(image_only=True, dtype=np.uint8), EnsureChannelFirst(),
                     Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
                     Spacing(pixdim=[spacing] * 3, mode="nearest")]
                    )(str(label_file))
    return np.bincount(np.asarray(label, dtype=np.int64).ravel(),
                       minlength=num_classes(VERSION)).tolist()


def class_agreement(found: list[int], reference: list[int]) -> float:
    """Share of the reference's labelled voxels (classes >= 1) matched per class."""
    found_, ref = np.asarray(found[1:]), np.asarray(reference[1:])
    return float(np.minimum(found_, ref).sum() / max(ref.sum(), 1)) * float(
        np.array_equal(found_ > 0, ref > 0))


def simulated_download(args: argparse.Namespace, workdir: Path) -> Path:
    """The simulated download: `--download` when it holds these settings, else written."""
    root = Path(args.download) if args.download else workdir / "download"
    record = wholebody_record(args.subjects, args.seed, VERSION, args.scale)
    try:
        current = (json.loads((root / RECORD).read_text()) == record
                   and (root / "meta.csv").is_file())
    except (OSError, ValueError):
        current = False
    if not current:
        write_wholebody_phantoms(root, args.subjects, args.seed, VERSION, args.scale, progress=True)
    return root


def expected_voxels(scale: float, draws: int = 10_000) -> float:
    """Mean CT voxels per subject of the simulated download (its grids' distribution, `draws`
    seeded draws): what the projection scales the measured rates to."""
    rng = np.random.default_rng(0)
    return float(np.mean([np.prod(draw_geometry(rng, scale, "RAS").shape)
                          for _ in range(draws)]))


def projection(sides: dict[str, dict], setting: dict, spacings: list[float]) -> dict:
    """Per stage, the seconds per CT voxel measured scaled to the simulated download's mean
    subject, then hours for the download's subjects on each of CORES (one worker per core) with
    the memory they need, and the bytes it writes; the goals met or not."""
    subjects, expected = setting["subjects"], setting["expected_voxels"]
    voxels = setting["mean_voxels"] * subjects
    stages = {}
    for name, side in sides.items():
        projected = side["seconds"] / voxels * expected
        stage = {"seconds_per_subject": side["seconds"] / subjects,
                 "projected_seconds_per_subject": projected,
                 "peak_rss_gib": side["peak_rss_mb"] / 1024,
                 "hours": {str(c): projected * DOWNLOAD_SUBJECTS / c / 3600 for c in CORES},
                 "memory_gib": {str(c): c * side["peak_rss_mb"] / 1024 for c in CORES}}
        if "bytes" in side:
            stage["bytes_per_voxel"] = side["bytes"] / side["voxels"]
            stage["total_gb"] = side["bytes"] / voxels * expected * DOWNLOAD_SUBJECTS / 1e9
        stages[name] = stage
    goal_cache = cache_side(GOAL_SPACING) if GOAL_SPACING in spacings else cache_side(spacings[0])
    hours = sum(stages[name]["hours"][str(GOAL_CORES)] for name in ("prepare", goal_cache))
    worst = max(stages[cache_side(s)]["bytes_per_voxel"] for s in spacings)
    goals = {
        f"prepare + {goal_cache} of {DOWNLOAD_SUBJECTS} subjects within {GOAL_HOURS:g} h on one "
        f"{GOAL_CORES}-core node": {"figure": f"{hours:.2f} h", "met": hours <= GOAL_HOURS},
        f"cache <= {GOAL_BYTES_PER_VOXEL:g} bytes per voxel":
            {"figure": f"{worst:.2f} bytes per voxel", "met": worst <= GOAL_BYTES_PER_VOXEL},
    }
    return {"stages": stages, "goals": goals}


def tables(report: dict) -> str:
    """The measured stages, the projection and the goals as markdown."""
    setting, stages = report["setting"], report["projection"]["stages"]
    lines = [f"{setting['subjects']} simulated subjects (scale {setting['scale']:g}, "
             f"{setting['mean_voxels'] / 1e6:.0f} M voxels and {setting['raw_mb_per_subject']:.0f}"
             f" MB gzipped per subject on average); {report['span']}, median of "
             f"{report['repeats']}", "",
             "| stage | s per subject per worker | s per mean subject | peak RSS per worker "
             "(GiB) | bytes on disk per voxel |", "|---|---:|---:|---:|---:|"]
    for name, stage in stages.items():
        per_voxel = f"{stage['bytes_per_voxel']:.3f}" if "bytes_per_voxel" in stage else "-"
        lines.append(f"| {name} | {stage['seconds_per_subject']:.1f} | "
                     f"{stage['projected_seconds_per_subject']:.1f} | "
                     f"{stage['peak_rss_gib']:.2f} | {per_voxel} |")
    lines += ["", f"Projected for {DOWNLOAD_SUBJECTS} subjects of "
              f"{setting['expected_voxels'] / 1e6:.0f} M voxels on average (the simulated "
              "distribution; one worker per core, perfect scaling; memory = cores x peak RSS):",
              "",
              "| stage | " + " | ".join(f"{c} cores: h (GiB)" for c in CORES) + " | on disk (GB) |",
              "|---|" + "---:|" * (len(CORES) + 1)]
    for name, stage in stages.items():
        disk = f"{stage['total_gb']:.0f}" if "total_gb" in stage else "-"
        lines.append(f"| {name} | " + " | ".join(
            f"{stage['hours'][str(c)]:.2f} ({stage['memory_gib'][str(c)]:.0f})" for c in CORES)
            + f" | {disk} |")
    lines += ["", "| goal (issue 38) | figure | met |", "|---|---|---|"]
    lines += [f"| {goal} | {g['figure']} | {'yes' if g['met'] else 'no'} |"
              for goal, g in report["projection"]["goals"].items()]
    lines += ["", "| check | measure | value | threshold | passed |", "|---|---|---:|---:|---|"]
    lines += [f"| {name} | {c['measure']} | {c['value']:.6f} | {c['threshold']:.6f} | "
              f"{'yes' if c['passed'] else 'NO'} |" for name, c in report["agreement"].items()]
    return "\n".join(lines)


def main() -> None:
    """Parse arguments; run as the coordinator or, with --worker, as one stage."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Smallest setting (seconds): --subjects 2 --scale 0.0625 --repeats 1")
    parser.add_argument("--subjects", type=int, default=10, help="simulated subjects (default 10)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="voxel counts of the simulated CTs times SCALE (default 1: 512 x "
                        "512 x 200-800)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spacings", type=float, nargs="+", default=[1.5, 3.0],
                        help="cache spacings in mm (default 1.5 3)")
    parser.add_argument("--download", type=Path, default=None,
                        help="keep the simulated download here (reused when it holds these "
                        "settings; default: a temporary folder)")
    add_repeats_option(parser, default=1)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    add_worker_options(parser, "--spacing", "--smallest")
    args = parser.parse_args()
    if args.worker:
        serve_worker(worker, args)
        return
    configure_logging()
    with tempfile.TemporaryDirectory(prefix="ctseg_scale_") as workdir:
        root = simulated_download(args, Path(workdir))
        voxels = raw_voxels(root)
        smallest = int(np.argmin(voxels))
        common = ["--download", str(root), "--smallest", str(smallest)]
        sides = {"check": common, "prepare": common,
                 **{cache_side(s): [*common, "--spacing", str(s)] for s in args.spacings}}
        measured = run_sides(__file__, sides, workdir, args.repeats)
        subject = read_meta(root)[smallest]
        prepared = Path(workdir) / "prepared" / "run-0" / VERSION / f"{subject.image_id}.nii.gz"
        reference = combined_masks(subject.folder)
        checks = {
            "check": agreement("share of subjects without a problem",
                               measured["check"]["subjects_without_problems"] / len(voxels),
                               THRESHOLD),
            "prepare": agreement("share of voxels equal to TotalSegmentator's combine_masks "
                                 "(smallest subject)",
                                 float((np.load(Path(workdir) / "prepared_label.npy")
                                        == reference).mean()), THRESHOLD)}
        for s in args.spacings:
            name = cache_side(s)
            checks[name] = agreement(
                "share of labelled voxels per class equal to MONAI's Orientation + Spacing "
                "(nearest) of the label map (smallest subject)",
                class_agreement(measured[name]["class_voxels"],
                                resampled_class_voxels(prepared, s)), THRESHOLD)
        raw_mb = folder_bytes(root) / len(voxels) / 1e6
    for side in measured.values():
        side.pop("class_voxels", None)
    setting = {"subjects": len(voxels), "scale": args.scale, "seed": args.seed,
               "version": VERSION, "spacings_mm": args.spacings,
               "mean_voxels": float(np.mean(voxels)),
               "expected_voxels": expected_voxels(args.scale), "raw_mb_per_subject": raw_mb,
               "download_subjects": DOWNLOAD_SUBJECTS}
    report = payload("dataset_scale", SPAN, args.repeats, setting, measured, checks)
    report["projection"] = projection(measured, setting, args.spacings)
    print(tables(report))
    finish(report, args.out)


if __name__ == "__main__":
    main()
