"""Benchmark start-up at the download's size: the seconds from `python train.py data=totalseg_v2
data.root=<root>` to its first training step on an already prepared and cached root of the v2
download's 1,228 subjects, and where they go.

    python benchmarks/startup.py [--subjects 1228] [--download DIR] [--repeats 3] [--out s.json]

The root is simulated cheaply (`linked_root`): one subject of `python -m ctseg.data phantoms
--size wholebody --scale 0.0625` (a CT and its 117 v2 masks), the other subjects hard links to
its files (a meta.csv of `--subjects` rows, about v2's split shares). It is prepared and cached
once: `ctseg.data.merge.prepare` merges the one subject and the volume cache builds its entry
(`VolumeCache.entry`), and the other subjects' label maps, manifest entries and cache entries
are links to (or copies of) those, as identical inputs give identical outputs; what start-up
reads of them (meta.csv, the manifest, a stat of each of the ~145,000 files, each cache entry's
meta.json) is what a real prepared root holds. Sides, each in its own process, median of
`--repeats` interleaved rounds after an untimed warm-up round (file system caches warm):
- `command`: the whole `python train.py ...` process with one training step (no validation,
  test, checkpoint or logger work), from its start to its exit, with the NIfTI files it
  opened (an audit hook);
- `stages`: the same config's DataModule in one process: importing ctseg and composing the
  config, `prepare_data` (meta.csv, the manifest, the fingerprints' file stats),
  `setup("fit")` (splits, shards, cache entry checks) and the first training batch.
Agreement: the command opens no NIfTI file (start-up needs none on a cached root).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    add_repeats_option,
    add_worker_options,
    agreement,
    configure_logging,
    finish,
    payload,
    report_text,
    run_sides,
    serve_worker,
)

from ctseg.data.merge import PREPARED_MANIFEST, default_prepared_dir, prepare
from ctseg.data.simulated_download import WHOLEBODY_VERSION

REPO = Path(__file__).resolve().parents[1]
SPAN = ("train.py start to exit after one training step (command), or to the first batch "
        "(stages), on a prepared and cached root")
DOWNLOAD_SUBJECTS = 1228
# Every 14th subject is a test subject, every 20th of the others a val subject (about v2's
# shares: 89 test, 57 val of 1,228).
TEST_EVERY, VAL_EVERY = 14, 20
# What the runs train: small patches and network, one step (the step is not start-up).
OVERRIDES = ("data=totalseg_v2", "data.patch_size=[32,32,32]", "model.init_filters=8",
             "trainer.max_steps=1", "trainer.limit_val_batches=0", "test=false",
             "callbacks=none", "logger=csv")
# Counts the NIfTI files the process opens, written at exit to the file named by the variable.
COUNT_OPENS = """
import atexit, json, os, runpy, sys
opened = []
def hook(event, args):
    if event == "open" and str(args[0]).endswith((".nii", ".nii.gz")):
        opened.append(str(args[0]))
sys.addaudithook(hook)
atexit.register(lambda: open(os.environ["OPENED"], "w").write(json.dumps(opened)))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def split_of(index: int) -> str:
    """The meta.csv split of subject `index` (1-based)."""
    return "test" if index % TEST_EVERY == 0 else "val" if index % VAL_EVERY == 0 else "train"


def linked_root(one: Path, root: Path, subjects: int) -> list[str]:
    """Write `root`: `subjects` subjects whose files are hard links to those of the one subject
    of download `one`, and a meta.csv of them (the one subject's row with each id and split);
    the subject ids."""
    header, row = (one / "meta.csv").read_text().splitlines()[:2]
    source = one / row.split(";")[0]
    columns = header.split(";")
    lines, ids = [header], []
    for index in range(1, subjects + 1):
        image_id = f"s{index:04d}"
        for path in source.rglob("*.nii.gz"):
            target = root / image_id / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
        values = row.split(";")
        values[columns.index("image_id")] = image_id
        values[columns.index("split")] = split_of(index)
        lines.append(";".join(values))
        ids.append(image_id)
    (root / "meta.csv").write_text("\n".join(lines) + "\n")
    return ids


def linked_prepared(one: Path, root: Path, ids: list[str]) -> Path:
    """Prepare download `one` (its one subject merged by `prepare`), then give `root` the
    prepared folder (the default one, under $CTSEG_CACHE) that `prepare` would write: the label
    map linked once per subject, the manifest entry repeated; that folder."""
    done = prepare(one, out=one.parent / "prepared-one", version=WHOLEBODY_VERSION)
    (record,) = done.records
    folder = Path(record["label"]).parent
    manifest = json.loads((folder / PREPARED_MANIFEST).read_text())
    (entry,) = manifest["subjects"].values()
    target = default_prepared_dir(root) / WHOLEBODY_VERSION
    target.mkdir(parents=True)
    for image_id in ids:
        os.link(record["label"], target / f"{image_id}.nii.gz")
    manifest.update(root=str(root.resolve()), subjects=dict.fromkeys(ids, entry))
    (target / PREPARED_MANIFEST).write_text(json.dumps(manifest, indent=1))
    return target


def datamodule(root: Path):
    """The DataModule of the command's config (OVERRIDES, data.root=`root`)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ctseg.config import CONFIG_DIR, register_resolvers

    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name="train", overrides=[*OVERRIDES, f"data.root={root}"])
    return instantiate(cfg.data)


def linked_cache(root: Path) -> Path:
    """Cache the first record of `root` (`VolumeCache.entry`), then give every other subject an
    entry of its own key holding links to that entry's arrays (and a copy of its meta.json); the
    cache folder."""
    from ctseg.data.volume_cache import META_FILE, record_key

    dm = datamodule(root)
    dm.prepare_data()
    records = [r for split in dm._split_records().values() for r in split]
    cache = dm.volume_cache
    first = cache.entry(records[0]).folder
    for record in records[1:]:
        folder = cache.root / record_key(record)
        if folder.exists():
            continue
        folder.mkdir()
        for path in first.iterdir():
            if path.name == META_FILE:
                shutil.copy2(path, folder / path.name)
            else:
                os.link(path, folder / path.name)
    return cache.root


def simulated(args: argparse.Namespace, workdir: Path) -> Path:
    """The prepared and cached root of `--subjects` under `--download` (or `workdir`), written
    unless a finished one is there."""
    base = args.download or workdir
    root = base / "root"
    if (base / "done").is_file():
        return root
    shutil.rmtree(base / "one", ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "ctseg.data", "phantoms", str(base / "one"), "--n",
                    "1", "--size", "wholebody", "--scale", "0.0625"], check=True, cwd=REPO)
    ids = linked_root(base / "one", root, args.subjects)
    linked_prepared(base / "one", root, ids)
    linked_cache(root)
    (base / "done").write_text("")
    return root


def command(args: argparse.Namespace) -> dict:
    """Worker: the whole train.py process (its seconds and the NIfTI files it opened)."""
    opened = Path(args.workdir) / "opened.json"
    env = {**os.environ, "OPENED": str(opened), "WANDB_MODE": "offline"}
    run = Path(tempfile.mkdtemp(dir=args.workdir))
    argv = [sys.executable, "-c", COUNT_OPENS, "train.py", *OVERRIDES,
            f"data.root={args.root}", f"hydra.run.dir={run}", f"paths.log_dir={run}"]
    start = time.perf_counter()
    subprocess.run(argv, cwd=REPO, env=env, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "nifti_opened": len(json.loads(opened.read_text())),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def stages(args: argparse.Namespace) -> dict:
    """Worker: the DataModule's start-up stages in this process, seconds each."""
    times = {}
    start = time.perf_counter()
    dm = datamodule(args.root)
    times["imports, config, DataModule"] = time.perf_counter() - start
    start = time.perf_counter()
    dm.prepare_data()
    times["prepare_data"] = time.perf_counter() - start
    start = time.perf_counter()
    dm.setup("fit")
    times["setup"] = time.perf_counter() - start
    start = time.perf_counter()
    next(iter(dm.train_dataloader()))
    times["first batch"] = time.perf_counter() - start
    return {"seconds": sum(times.values()), "stages": times}


WORKERS = {"command": command, "stages": stages}


def main() -> None:
    """Simulate the root, time both sides, print the table and check that no NIfTI was read."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=DOWNLOAD_SUBJECTS,
                        help=f"simulated subjects (default {DOWNLOAD_SUBJECTS}, the v2 download)")
    parser.add_argument("--download", type=Path, default=None,
                        help="folder for the simulated root (kept; reused when complete)")
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    add_repeats_option(parser)
    add_worker_options(parser)
    args = parser.parse_args()
    configure_logging()
    if args.worker:
        serve_worker(WORKERS[args.worker], args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        os.environ["CTSEG_CACHE"] = str((args.download or workdir) / "cache")
        root = simulated(args, workdir)
        sides = run_sides(__file__, {name: ["--root", str(root)] for name in WORKERS},
                          str(workdir), args.repeats, warmup_round=True)
    opened = sides["command"]["nifti_opened"]
    report = payload("startup", SPAN, args.repeats, {"subjects": args.subjects}, sides,
                     {"command": agreement("no NIfTI file opened by the command (1 = none)",
                                           float(opened == 0), 1.0)})
    print(report_text(report, "command", f"Start-up on {args.subjects} prepared, cached "
                                         "subjects"))
    print("\nstages (s): " + ", ".join(f"{name} {seconds:.2f}" for name, seconds
                                       in sides["stages"]["stages"].items()))
    finish(report, args.out)


if __name__ == "__main__":
    main()
