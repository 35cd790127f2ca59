"""Merge per-structure masks into one label map per subject, cached in a prepared folder."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from filelock import FileLock

from ctseg.atomic import make_folder, remove_leftovers, save_nifti_atomic, write_atomic
from ctseg.data.file_stamp import file_stamp
from ctseg.data.layout import Subject, check_binary, check_grid, load_nifti, read_meta
from ctseg.errors import (
    ConfigError,
    CtsegError,
    DatasetError,
    NoRoomError,
    blamed_on,
    no_room_error,
)
from ctseg.labels import check_version, class_names, label_map_dtype, num_classes

log = logging.getLogger(__name__)

PREPARED_MANIFEST = "manifest.json"
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
    label = np.zeros(ct.shape, dtype=dtype)
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
        label[data > 0] = index
    img = nib.Nifti1Image(label, ct.affine, ct.header)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1, 0)
    img.header["descrip"] = f"ctseg TotalSegmentator {version} label map".encode()[:80]
    save_nifti_atomic(img, out_path)
    return np.bincount(label.ravel(), minlength=num_classes(version)).tolist()


@dataclass(frozen=True)
class LabelJob:
    """Writing one subject's label map: `build(out)` returns its voxels per class; `blame` is the
    file or folder an error names; `fingerprint` changes whenever the inputs do."""

    image_id: str
    fingerprint: str
    out: Path
    blame: Path
    build: Callable[[Path], list[int]]


def _run_job(job: LabelJob) -> list[int]:
    """Process-pool entry point of a job; any failure becomes a DatasetError naming the job's
    subject, so the parent process reports it as the single-process path does."""
    with blamed_on(job.blame, "cannot write this subject's label map"):
        return job.build(job.out)


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
    manifest was written are skipped. Two processes preparing the same folder serialise on a file
    lock. The raw dataset is only read.
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
        raise no_room_error(
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


def run_label_jobs(root: Path, folder: Path, jobs: list[LabelJob], workers: int,
                   progress: bool) -> dict[str, tuple[Path, list[int]]]:
    """Write the label map of every job whose inputs changed since `folder`'s manifest into
    `folder/<image_id>.nii.gz` (a no-op when none did); label path and voxels per class by
    subject. Two processes preparing one folder serialise on a file lock."""
    check_outside(root, folder.parent)
    folder = make_folder(folder)
    remove_leftovers(folder)
    manifest_path = folder / PREPARED_MANIFEST
    with FileLock(str(folder / ".lock")):
        done = _read_manifest(manifest_path)
        entries: dict[str, dict[str, Any]] = {}
        todo: list[LabelJob] = []
        for job in jobs:
            out = folder / f"{job.image_id}.nii.gz"
            entry = done.get(job.image_id)
            if entry and entry.get("fingerprint") == job.fingerprint and out.is_file():
                entries[job.image_id] = entry
            else:
                todo.append(dataclasses.replace(job, out=out))
                entries[job.image_id] = {"fingerprint": job.fingerprint}
        if todo:
            log.info("writing %d of %d label maps of %s into %s", len(todo), len(jobs), root,
                     folder)
        merged, failures = _run(todo, workers, progress)
        for image_id in {job.image_id for job in todo} - set(merged):
            del entries[image_id]  # failed: left out of the manifest, redone by the next run
        for image_id, voxels in merged.items():
            entries[image_id]["voxels"] = voxels
        if merged or set(done) != set(entries):
            manifest = {"format": MERGE_FORMAT, "root": str(root), "subjects": entries}
            write_atomic(manifest_path,
                         lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
    if failures:
        first = failures[0]
        more = (f" (and {len(failures) - 1} more subject(s); `python -m ctseg.data check "
                f"{root}` lists every problem)") if len(failures) > 1 else ""
        raise DatasetError(first.path, first.problem + more)
    return {job.image_id: (folder / f"{job.image_id}.nii.gz", entries[job.image_id]["voxels"])
            for job in jobs}


def _run(todo: list[LabelJob], workers: int, progress: bool
         ) -> tuple[dict[str, list[int]], list[DatasetError]]:
    """Run the jobs in `todo` (in a process pool when workers > 1) with a progress bar; voxel
    counts of the written subjects by id, and the errors of the others."""
    from rich.progress import track

    merged: dict[str, list[int]] = {}
    failures: list[DatasetError] = []
    if not todo:
        return merged, failures
    description = f"writing {len(todo)} label maps"
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            futures: list[Future] = [pool.submit(_run_job, job) for job in todo]
            try:
                for job, future in track(zip(todo, futures, strict=True), total=len(todo),
                                         description=description, disable=not progress):
                    try:
                        merged[job.image_id] = future.result()
                    except DatasetError as err:
                        failures.append(err)
            except BrokenProcessPool as err:
                raise CtsegError(f"a worker writing label maps died (killed, or out of memory) "
                                 f"after {len(merged)} of {len(todo)} subjects; rerun with "
                                 "fewer workers (--workers 1 / data.prepare_workers=1)") from err
            finally:
                for future in futures:
                    future.cancel()
        return merged, failures
    for job in track(todo, description=description, disable=not progress):
        try:
            merged[job.image_id] = _run_job(job)
        except DatasetError as err:
            failures.append(err)
    return merged, failures
