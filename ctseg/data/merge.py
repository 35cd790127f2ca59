"""Merge per-structure masks into one label map per subject, cached in a prepared folder."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from filelock import FileLock, Timeout

from ctseg.atomic import make_folder, remove_leftovers, save_nifti_atomic, write_atomic
from ctseg.data.file_stamp import file_stamp
from ctseg.data.layout import Subject, check_binary, check_grid, load_nifti, read_meta
from ctseg.errors import (
    ConfigError,
    CtsegError,
    DatasetError,
    NoRoomError,
    blamed_on,
)
from ctseg.labels import check_version, class_names, label_map_dtype, num_classes

log = logging.getLogger(__name__)

PREPARED_MANIFEST = "manifest.json"
# Subfolders of a prepared folder: one record per label map written since the manifest was last
# written (folded into it at the end of a run), and one lock file per subject, the claim held
# by the process writing its label map.
RECORDS = ".records"
CLAIMS = ".claims"
# Seconds between two looks at the claims of subjects other processes are writing.
CLAIM_POLL_S = 0.1
# Bump when the merged output changes for the same inputs, so old prepared folders are redone.
MERGE_FORMAT = 1


@dataclass
class PreparedDataset:
    """A dataset root with its merged label maps: one record per subject of meta.csv."""

    root: Path
    version: str
    out_dir: Path
    records: list[dict[str, Any]] = field(default_factory=list)

    def by_split(self) -> dict[str, list[dict[str, Any]]]:
        """Records grouped by split ("train", "val", "test"), every split present."""
        groups: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
        for record in self.records:
            groups[record["split"]].append(record)
        return groups

    def split_counts(self) -> dict[str, int]:
        """Number of subjects per split."""
        return {split: len(records) for split, records in self.by_split().items()}

    def voxel_totals(self) -> np.ndarray:
        """Voxels per class index (0 = background) summed over all subjects."""
        size = max([num_classes(self.version), *(len(r["voxels"]) for r in self.records)])
        totals = np.zeros(size, dtype=np.int64)
        for record in self.records:
            totals[:len(record["voxels"])] += np.asarray(record["voxels"], dtype=np.int64)
        return totals


def cache_root() -> Path:
    """ctseg's cache folder: `$CTSEG_CACHE`, or ~/.cache/ctseg when it is unset."""
    return Path(os.environ.get("CTSEG_CACHE") or Path.home() / ".cache" / "ctseg")


def default_prepared_dir(root: str | Path) -> Path:
    """`<cache_root()>/prepared/<root name>-<hash of its path>`."""
    root = Path(root).resolve()
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    return cache_root() / "prepared" / f"{root.name}-{digest}"


def fingerprint(subject: Subject, version: str, masks: Sequence[str] | None = None) -> str:
    """Hash of the size and modification time of a subject's CT and masks (all of the version's,
    or `masks`), and the merge format."""
    names = class_names(version).values() if masks is None else masks
    # Plain strings, not Paths: at 117 masks x 1,228 subjects, building Path objects took most
    # of a prepared download's start-up.
    masks_folder = str(subject.masks_folder)
    files = {"ct.nii.gz": str(subject.ct),
             **{f"{n}.nii.gz": os.path.join(masks_folder, f"{n}.nii.gz") for n in names}}
    header = (f"format={MERGE_FORMAT}", f"version={version}")
    return file_stamp(files,
                      header=header if masks is None else (*header, f"masks={sorted(masks)}"))


def merge_subject(subject: Subject, version: str, out_path: Path,
                  masks: Sequence[str] | None = None) -> list[int]:
    """Merge a subject's masks (all of the version's, or `masks`) into `out_path` (later class
    wins); return voxels per class."""
    ct = load_nifti(subject.ct)
    dtype = label_map_dtype(num_classes(version))
    # NIfTI's (Fortran) voxel order, as nibabel reads the masks: merging and writing stay in
    # memory order instead of striding across the volume.
    label = np.zeros(ct.shape, dtype=dtype, order="F")
    for index, name in sorted(class_names(version).items()):
        if masks is not None and name not in masks:
            continue
        path = subject.mask(name)
        if not path.is_file():
            raise DatasetError(path, f"mask of {name} missing (required by TotalSegmentator "
                                     f"{version}); re-download the subject or choose the other "
                                     "version")
        mask = load_nifti(path)
        check_grid(ct, mask, path)
        data = np.asanyarray(mask.dataobj)
        check_binary(data, path)
        if data.any():
            np.copyto(label, index, where=mask_voxels(data))
    img = nib.Nifti1Image(label, ct.affine, ct.header)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1, 0)
    img.header["descrip"] = f"ctseg TotalSegmentator {version} label map".encode()[:80]
    save_nifti_atomic(img, out_path)
    return class_voxels(label, num_classes(version))


def mask_voxels(data: np.ndarray) -> np.ndarray:
    """The voxels set in a binary mask (values 0 and 1) as booleans: a view of a one-byte
    integer mask (its bytes are valid booleans), else `data > 0`."""
    if data.dtype in (np.uint8, np.int8):
        return data.view(np.bool_)
    return data > 0


def class_voxels(label: np.ndarray, classes: int, chunk: int = 1 << 20) -> list[int]:
    """Voxels per class index of a label map (at least `classes` entries), counted `chunk`
    voxels at a time (np.bincount widens its input to 8-byte integers)."""
    flat = label.reshape(-1, order="A")
    counts = np.zeros(max(classes, int(flat.max(initial=0)) + 1), dtype=np.int64)
    for start in range(0, flat.size, chunk):
        counts += np.bincount(flat[start:start + chunk], minlength=len(counts))
    return counts.tolist()


@dataclass(frozen=True)
class LabelJob:
    """Writing one subject's label map: `build(out)` returns its voxels per class; `blame` is the
    file or folder an error names; `fingerprint` changes whenever the inputs do."""

    image_id: str
    fingerprint: str
    out: Path
    blame: Path
    build: Callable[[Path], list[int]]


def record_path(label: Path) -> Path:
    """Where the record of label map `label` (its fingerprint and voxels per class) is written
    right after it, until the manifest takes it in."""
    return label.parent / RECORDS / f"{label.name.removesuffix('.nii.gz')}.json"


def _run_job(job: LabelJob) -> list[int]:
    """Process-pool entry point of a job: write its label map, then its record, so a kill
    between the two only redoes this subject; any failure becomes a DatasetError naming the
    job's subject, so the parent process reports it as the single-process path does."""
    with blamed_on(job.blame, "cannot write this subject's label map"):
        voxels = job.build(job.out)
        record = {"fingerprint": job.fingerprint, "voxels": voxels}
        write_atomic(record_path(job.out), lambda tmp: tmp.write_text(json.dumps(record)))
        return voxels


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest's subject entries, or {} when missing or unreadable (everything is redone)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data.get("subjects", {}) if data.get("format") == MERGE_FORMAT else {}


def prepare(
    root: str | Path,
    out: str | Path | None = None,
    version: str = "v1",
    workers: int = 1,
    progress: bool = False,
    masks: Sequence[str] | None = None,
) -> PreparedDataset:
    """Merge every subject of `root` for `version` into `<out>/<version>/`; a no-op when done.

    `masks` names the structures a download that is not complete annotates (the others are
    then not annotated rather than missing; records carry the "annotated" flags), merged into
    `<out>/<version>-<hash of the names>/`. Subjects whose inputs are unchanged since the
    manifest was written are skipped; processes preparing the same folder at once share the
    subjects (`run_label_jobs`). The raw dataset is only read.
    """
    check_version(version)
    root = Path(root).resolve()
    subjects = read_meta(root)
    out = Path(out).resolve() if out is not None else default_prepared_dir(root)
    folder = out / version
    annotated: dict[str, Any] = {}
    if masks is not None:
        masks = sorted(set(masks))
        index = {name: i for i, name in class_names(version).items()}
        unknown = [m for m in masks if m not in index]
        if unknown or not masks:
            raise ConfigError(f"masks: {unknown[0] if unknown else 'none'} is not a "
                              f"TotalSegmentator {version} structure; name the masks the "
                              f"download holds ({root})")
        digest = hashlib.sha256(",".join(masks).encode()).hexdigest()[:8]
        folder = out / f"{version}-{digest}"
        annotated["annotated"] = [i == 0 or i in {index[m] for m in masks}
                                  for i in range(num_classes(version))]
    jobs = [LabelJob(s.image_id, fingerprint(s, version, masks), Path(), s.folder,
                     partial(merge_subject, s, version, masks=masks)) for s in subjects]
    try:
        labels = run_label_jobs(root, folder, jobs, workers, progress)
    except NoRoomError as err:
        raise NoRoomError(
            f"{folder}: no room to write the prepared label maps ({err.reason}); free space "
            "there or raise the file-size limit, or write them to a folder with room (--out of "
            "`python -m ctseg.data prepare`, data.prepared_dir of train.py, or CTSEG_CACHE for "
            "the default folder), then run the same command again", err.reason) from err
    records = [{"image_id": s.image_id, "split": s.split, "image": str(s.ct),
                "label": str(labels[s.image_id][0]), "voxels": labels[s.image_id][1],
                **annotated} for s in subjects]
    return PreparedDataset(root=root, version=version, out_dir=out, records=records)


def check_outside(root: Path, out: Path) -> None:
    """DatasetError unless the prepared folder `out` lies outside the raw dataset `root`."""
    if out == root or root in out.parents:
        raise DatasetError(out, f"the prepared folder must lie outside the raw dataset {root} "
                                "(ctseg never writes into a download); choose another --out")


class _Finished:
    """Which label maps of a prepared folder are complete for their inputs: a subject's record,
    else its manifest entry (the manifest read again whenever it was replaced)."""

    def __init__(self, folder: Path) -> None:
        """Read `folder`'s manifest."""
        self.path = folder / PREPARED_MANIFEST
        self.stamp: tuple[int, int] | None = None
        self.entries: dict[str, Any] = {}
        self._refresh()

    def _refresh(self) -> None:
        """Read the manifest again if it was replaced since the last read."""
        try:
            stat = self.path.stat()
            stamp = (stat.st_ino, stat.st_mtime_ns)
        except OSError:
            stamp = None
        if stamp != self.stamp:
            self.stamp, self.entries = stamp, _read_manifest(self.path)

    def voxels(self, job: LabelJob, fresh: bool = False) -> list[int] | None:
        """Voxels per class of `job`'s label map when it is complete for `job`'s inputs, else
        None; `fresh`: also look at records and manifest written since the start (the record
        first: a manifest is written before the records it takes in are deleted)."""
        if not job.out.is_file():
            return None
        if fresh:
            try:
                record = json.loads(record_path(job.out).read_text())
            except (OSError, ValueError):
                record = None
            if record and record.get("fingerprint") == job.fingerprint:
                return record["voxels"]
            self._refresh()
        entry = self.entries.get(job.image_id)
        if entry and entry.get("fingerprint") == job.fingerprint and "voxels" in entry:
            return entry["voxels"]
        return None if fresh else self.voxels(job, fresh=True)


def run_label_jobs(root: Path, folder: Path, jobs: list[LabelJob], workers: int,
                   progress: bool) -> dict[str, tuple[Path, list[int]]]:
    """Write the label map of every job whose inputs changed since `folder`'s manifest into
    `folder/<image_id>.nii.gz` (a no-op when none did); label path and voxels per class by
    subject.

    Each label map is followed by its record, so a killed run's finished subjects are kept by
    the next. Processes preparing one folder at once (DDP ranks, nodes on a shared file system)
    share the work: each subject is claimed with a non-blocking lock by the one that writes it;
    the others move on, then poll the subjects claimed elsewhere (at most one subject's merge;
    a claim dies with its process, and the next to take it then writes that subject) and read
    them. The records are folded into the manifest at the end, so a prepared folder is one
    read at start-up."""
    check_outside(root, folder.parent)
    folder = make_folder(folder)
    for leftovers in (folder, folder / RECORDS):
        remove_leftovers(leftovers)
    finished = _Finished(folder)
    done: dict[str, list[int]] = {}
    todo: list[LabelJob] = []
    for job in jobs:
        job = dataclasses.replace(job, out=folder / f"{job.image_id}.nii.gz")
        voxels = finished.voxels(job)
        if voxels is None:
            todo.append(job)
        else:
            done[job.image_id] = voxels
    failures: list[DatasetError] = []
    if todo:
        log.info("%d of %d label maps of %s to write into %s (shared with any other process "
                 "preparing it)", len(todo), len(jobs), root, folder)
        make_folder(folder / CLAIMS)
        make_folder(folder / RECORDS)
        merged, read, failures = _run(todo, folder / CLAIMS, finished, workers, progress)
        log.info("wrote %d label maps into %s; %d were written by other processes", len(merged),
                 folder, len(read))
        done |= merged | read
    if todo or finished.entries.keys() != {job.image_id for job in jobs}:
        _fold(root, folder, jobs, done)
    if failures:
        first = failures[0]
        more = (f" (and {len(failures) - 1} more subject(s); `python -m ctseg.data check "
                f"{root}` lists every problem)") if len(failures) > 1 else ""
        raise DatasetError(first.path, first.problem + more)
    return {job.image_id: (folder / f"{job.image_id}.nii.gz", done[job.image_id])
            for job in jobs}


def _fold(root: Path, folder: Path, jobs: list[LabelJob], done: dict[str, list[int]]) -> None:
    """Write the manifest of `jobs` whose label maps are `done` (unless it holds just that),
    then delete their records; failed or removed subjects are left out, so the next run redoes
    them."""
    manifest = {"format": MERGE_FORMAT, "root": str(root), "subjects": {
        job.image_id: {"fingerprint": job.fingerprint, "voxels": done[job.image_id]}
        for job in jobs if job.image_id in done}}
    path = folder / PREPARED_MANIFEST
    with FileLock(str(folder / ".lock")):
        if _read_manifest(path) != manifest["subjects"]:
            write_atomic(path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
    for image_id in done:
        record_path(folder / f"{image_id}.nii.gz").unlink(missing_ok=True)


def _run(todo: list[LabelJob], claims: Path, finished: _Finished, workers: int, progress: bool
         ) -> tuple[dict[str, list[int]], dict[str, list[int]], list[DatasetError]]:
    """Write the label maps of `todo` not claimed by another process (in a process pool when
    workers > 1), then poll the claims of those that were until each is free, and read them
    (or write them when their claim ended without one); voxel counts of the subjects written
    here and of those read, by id, and the errors of the others. A process never waits for a
    claim while holding one, so two processes never wait for each other."""
    from rich.progress import Progress

    merged: dict[str, list[int]] = {}
    read: dict[str, list[int]] = {}
    failures: list[DatasetError] = []
    running: dict[Future, tuple[LabelJob, FileLock]] = {}
    pool = ProcessPoolExecutor(max_workers=min(workers, len(todo))) \
        if workers > 1 and len(todo) > 1 else None

    def collect(block: bool) -> None:
        """Harvest finished jobs (wait for one when `block`), releasing their claims."""
        if not running:
            return
        ready, _ = wait(running, timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for future in ready:
            job, claim = running.pop(future)
            try:
                merged[job.image_id] = future.result()
                log.info("%s: label map written", job.out)
            except DatasetError as err:
                failures.append(err)
            except BrokenProcessPool as err:
                raise CtsegError(f"a worker writing label maps died (killed, or out of memory) "
                                 f"after {len(merged)} of {len(todo)} subjects; rerun with fewer"
                                 " workers (--workers 1 / data.prepare_workers=1)") from err
            finally:
                claim.release()
            bar.advance(task)

    def start(job: LabelJob) -> bool:
        """Claim `job` and write it (read it when it was finished meanwhile); False when another
        process holds its claim."""
        claim = FileLock(str(claims / f"{job.image_id}.lock"), thread_local=False)
        try:
            claim.acquire(blocking=False)
        except Timeout:
            return False
        voxels = finished.voxels(job, fresh=True)
        if voxels is not None:
            claim.release()
            read[job.image_id] = voxels
            bar.advance(task)
            return True
        future: Future = Future()
        if pool is None:
            try:
                future.set_result(_run_job(job))
            except DatasetError as err:
                future.set_exception(err)
        else:
            future = pool.submit(_run_job, job)
        running[future] = (job, claim)
        while len(running) >= max(workers, 1):
            collect(block=True)
        return True

    with Progress(disable=not progress) as bar:
        task = bar.add_task(f"writing {len(todo)} label maps", total=len(todo))
        try:
            elsewhere = [job for job in todo if not start(job)]
            while elsewhere:
                time.sleep(CLAIM_POLL_S)
                collect(block=False)
                elsewhere = [job for job in elsewhere if not start(job)]
            while running:
                collect(block=True)
        finally:
            for future, (_, claim) in running.items():
                future.cancel()
                claim.release()
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    return merged, read, failures
