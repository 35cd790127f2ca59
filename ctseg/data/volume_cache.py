"""The disk cache of preprocessed volumes, built for patches: each volume is stored once as
uncompressed arrays and read through memory maps, so a training patch reads only its own voxels
and throughput does not depend on the size of the volume.

An entry is a folder `<cache root>/<key>/` holding `image.npy` ((1, D, H, W), stored as one of
`IMAGE_DTYPES`, read back as float32), `label.npy` (uint8), `locations.npz` (for each class
present, up to `MAX_INDICES_PER_CLASS` voxel indices drawn with a fixed seed: patch centres for
the `classes` sampler) and `meta.json`, written last with the entry's format version, the image's
dtype, the byte size of every file and the box of the image's own voxels (the volume is padded to
whole patches for training; evaluation reads the box only, as prediction sees the image). An
entry of another format or image dtype is rebuilt, so a cache serves only the dtype asked for.
The key hashes the record's paths and the size and modification time of its CT and label map;
the cache root is named by the pipeline's fingerprint, so a change of any preprocessing setting
or of a file never serves stale data.

Entries are built in a private temporary folder and renamed into place: two processes (DDP ranks,
DataLoader workers, concurrent runs) building the same entry with the same image dtype both
succeed and one result stays.
An entry whose files do not match its `meta.json` (a truncated copy, an interrupted disk) is moved
aside and rebuilt. No room to write an entry (disk full, quota, file-size limit) is an OutputError
naming the cache folder, the cause and the setting that moves it; the entry's temporary folder
goes, finished entries stay, and the next run builds only the missing ones.

A float16 image: both intensity schemes end in [-1, 1] (segresnet) or [0, 1] (hu_window), where
float16 rounds by at most 2**-12 (half its spacing just below 1), about 0.5 HU of the hu_window
scheme's 2,017 HU window; 3 bytes per voxel with the label instead of 5 (docs/dataset.md says why
float32 stays the default).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import uuid
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from monai.transforms.utils import generate_spatial_bounding_box
from torch.utils.data import Dataset

from ctseg.atomic import OutputExists, remove_leftovers, swapped_folder, temp_prefix
from ctseg.data.file_stamp import file_stamp
from ctseg.data.transforms import (
    ANNOTATED,
    IMAGE,
    LABEL,
    MAX_INDICES_PER_CLASS,
    VALID,
    PipelineConfig,
    volume_transforms,
)
from ctseg.errors import ConfigError, NoRoomError, blamed_on

log = logging.getLogger(__name__)

# Bump when the layout of an entry changes (3: the image's dtype is a setting, in meta.json).
CACHE_FORMAT = 3
# The dtypes the image array may be stored in (the label is always uint8), and the default.
IMAGE_DTYPES = ("float16", "float32")
DEFAULT_IMAGE_DTYPE = "float32"
IMAGE_FILE, LABEL_FILE, LOCATIONS_FILE, META_FILE = (
    "image.npy", "label.npy", "locations.npz", "meta.json")


def image_dtype(name: str) -> np.dtype:
    """The numpy dtype of cache image dtype `name`; ConfigError naming data.cache_image_dtype
    when it is not one of IMAGE_DTYPES."""
    if name not in IMAGE_DTYPES:
        raise ConfigError(f"data.cache_image_dtype={name!r}: the disk cache stores images as "
                          f"{' or '.join(IMAGE_DTYPES)}; choose one of those")
    return np.dtype(name)


def record_key(record: dict[str, Any]) -> str:
    """Cache key of a record: its CT and label paths with their size and modification time."""
    return file_stamp({str(record[key]): Path(record[key]) for key in (IMAGE, LABEL)})[:24]


class _Stream:
    """A file seen by numpy as a plain stream (only `write`), so np.save writes through Python's
    file object and a failed write raises the kernel's error (ENOSPC, EDQUOT, EFBIG); numpy's
    own writer (`tofile`) reports a short write as an OSError without its errno."""

    def __init__(self, file: BinaryIO) -> None:
        """Wrap `file`, open for writing."""
        self.write = file.write


def save_array(path: Path, array: np.ndarray) -> None:
    """np.save `array` to `path` (.npy), a failed write raising the kernel's error."""
    with open(path, "wb") as file:
        np.save(_Stream(file), array)


def class_locations(label: np.ndarray, num_classes: int, seed: int = 0,
                    limit: int = MAX_INDICES_PER_CLASS) -> dict[int, np.ndarray]:
    """For every class present in `label`, up to `limit` of its flat voxel indices (sorted),
    sampled with a fixed seed when the class has more."""
    flat = label.reshape(-1)
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=num_classes)
    rng = np.random.default_rng(seed)
    locations, start = {}, 0
    for c, count in enumerate(counts):
        if count:
            indices = order[start:start + count]
            if count > limit:
                indices = np.sort(rng.choice(indices, size=limit, replace=False))
            locations[c] = indices.astype(np.int64)
        start += count
    return locations


@dataclass(frozen=True)
class CachedVolume:
    """One cache entry: memory-mapped image and label, class locations, shape and the box
    (start, size) of the image's own voxels within it."""

    folder: Path
    shape: tuple[int, int, int]
    valid: tuple[tuple[int, ...], tuple[int, ...]]

    def image(self) -> np.ndarray:
        """The (1, D, H, W) image as stored (float16 or float32), memory-mapped read-only."""
        return np.load(self.folder / IMAGE_FILE, mmap_mode="r")

    def label(self) -> np.ndarray:
        """The (1, D, H, W) uint8 label map, memory-mapped read-only."""
        return np.load(self.folder / LABEL_FILE, mmap_mode="r")

    @cached_property
    def locations(self) -> dict[int, np.ndarray]:
        """Class -> sampled flat voxel indices of that class."""
        with np.load(self.folder / LOCATIONS_FILE) as data:
            return {int(k[1:]): data[k] for k in data.files}

    def read(self, start: Sequence[int] | None = None, size: Sequence[int] | None = None
             ) -> dict[str, torch.Tensor]:
        """Image (float32, whatever the stored dtype) and label of the box `start` + `size` (the
        whole volume by default), copied out of the memory maps as tensors."""
        start = start or (0, 0, 0)
        size = size or self.shape
        box = (slice(None), *(slice(int(a), int(a) + int(s)) for a, s in zip(start, size,
                                                                             strict=True)))
        return {IMAGE: torch.from_numpy(np.array(self.image()[box], dtype=np.float32)),
                LABEL: torch.from_numpy(np.array(self.label()[box]))}


class VolumeCache:
    """Preprocessed volumes of one pipeline under `root/<fingerprint>/`, built on first use."""

    def __init__(self, root: str | os.PathLike[str], pipeline: PipelineConfig,
                 dtype: str = DEFAULT_IMAGE_DTYPE) -> None:
        """Entries of `pipeline` under `root/<fingerprint>` with images stored as `dtype` (one
        of IMAGE_DTYPES); the patch sampler is not part of an entry (every entry stores the class
        locations), so both samplers share it."""
        if pipeline.num_classes is None:
            raise ValueError("the volume cache needs the pipeline's num_classes (class locations)")
        self.pipeline = pipeline
        self.dtype = image_dtype(dtype)
        # Built without MONAI's per-class index lists: the entry keeps its own locations.
        self._volumes = dataclasses.replace(pipeline, sampler="random")
        self.root = Path(root) / pipeline.fingerprint()

    def entry(self, record: dict[str, Any]) -> CachedVolume:
        """The cache entry of `record`, built (or rebuilt, when damaged) if needed."""
        folder = self.root / record_key(record)
        volume = self._inspect(folder)
        if not isinstance(volume, CachedVolume):
            if folder.exists():
                log.warning("%s: cache entry of %s %s; rebuilding it", folder, record[IMAGE],
                            volume)
                self._discard(folder)
            self._build(record, folder)
            volume = self._valid(folder)
            if volume is None:
                raise RuntimeError(f"{folder}: cache entry still invalid after rebuilding it")
        return volume

    def warm(self, records: Sequence[dict[str, Any]], workers: int = 1,
             progress: bool = False) -> None:
        """Build the missing entries of `records` (in `workers` processes), so that DataLoader
        workers only ever read; a record that cannot be preprocessed is a DatasetError."""
        remove_leftovers(self.root)
        todo = [r for r in records if self._valid(self.root / record_key(r)) is None]
        if not todo:
            return
        log.info("caching %d preprocessed volume(s) in %s", len(todo), self.root)
        from rich.progress import track

        description = f"caching {len(todo)} volumes"
        if workers > 1 and len(todo) > 1:
            # spawn, not fork: a forked child of a process whose torch threads already ran can
            # deadlock in the first torch operation.
            with ProcessPoolExecutor(max_workers=min(workers, len(todo)),
                                     mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(self._entry_folder, r) for r in todo]
                try:
                    for future in track(futures, description=description, disable=not progress):
                        future.result()
                finally:
                    for future in futures:
                        future.cancel()
            return
        for record in track(todo, description=description, disable=not progress):
            self._entry_folder(record)

    def _entry_folder(self, record: dict[str, Any]) -> str:
        """Build (if needed) the entry of `record`, naming its CT in any error; its folder."""
        with blamed_on(record[IMAGE], "cannot preprocess this subject into the cache"):
            return str(self.entry(record).folder)

    def size_on_disk(self) -> int:
        """Bytes held by the complete entries of this pipeline."""
        return sum(p.stat().st_size for p in self.root.glob("*/*") if p.is_file()
                   and not p.parent.name.startswith("."))

    def _valid(self, folder: Path) -> CachedVolume | None:
        """The entry in `folder` if it serves this cache (`_inspect`), else None."""
        volume = self._inspect(folder)
        return volume if isinstance(volume, CachedVolume) else None

    def _inspect(self, folder: Path) -> CachedVolume | str:
        """The entry in `folder` if its meta.json is readable, of this format and image dtype,
        and every file has its recorded size; else why not (for the log)."""
        try:
            meta = json.loads((folder / META_FILE).read_text())
            if meta.get("format") != CACHE_FORMAT:
                return f"is of cache format {meta.get('format')}, not {CACHE_FORMAT}"
            if meta["dtype"] != self.dtype.name:
                return f"holds {meta['dtype']} images, not {self.dtype.name}"
            for name, size in meta["bytes"].items():
                if (folder / name).stat().st_size != size:
                    return "is incomplete or damaged"
        except (OSError, ValueError, KeyError):
            return "is incomplete or damaged"
        start, size = meta["valid"]
        return CachedVolume(folder, tuple(meta["shape"]), (tuple(start), tuple(size)))

    def _discard(self, folder: Path) -> None:
        """Move a damaged entry aside (atomically), then delete it."""
        trash = self.root / f"{temp_prefix(folder.name)}trash-{uuid.uuid4().hex}"
        try:
            folder.rename(trash)
        except OSError:
            return  # another process moved or replaced it first
        shutil.rmtree(trash, ignore_errors=True)

    def _build(self, record: dict[str, Any], folder: Path) -> None:
        """Preprocess `record` into a private temporary folder that becomes `folder` whole
        (`swapped_folder`; a concurrent builder's finished entry is kept)."""
        data = volume_transforms(self._volumes)({IMAGE: record[IMAGE], LABEL: record[LABEL]})
        start, stop = generate_spatial_bounding_box(data[VALID])
        image = np.ascontiguousarray(data[IMAGE].numpy(), dtype=self.dtype)
        label = np.ascontiguousarray(data[LABEL].numpy(), dtype=np.uint8)
        locations = class_locations(label[0], self.pipeline.num_classes)
        try:
            with swapped_folder(folder, replace=False) as tmp:
                save_array(tmp / IMAGE_FILE, image)
                save_array(tmp / LABEL_FILE, label)
                np.savez(tmp / LOCATIONS_FILE, **{f"c{c}": v for c, v in locations.items()})
                sizes = {name: (tmp / name).stat().st_size
                         for name in (IMAGE_FILE, LABEL_FILE, LOCATIONS_FILE)}
                meta = {"format": CACHE_FORMAT, "dtype": self.dtype.name,
                        "shape": list(image.shape[1:]), "bytes": sizes,
                        "valid": [list(start), [b - a for a, b in zip(start, stop, strict=True)]],
                        "image": str(record[IMAGE]), "label": str(record[LABEL]),
                        "affine": np.asarray(data[IMAGE].affine).tolist()}
                (tmp / META_FILE).write_text(json.dumps(meta))
        except OutputExists:
            if self._valid(folder) is None:
                raise  # not a concurrent builder's finished entry: a real failure
        except NoRoomError as err:
            raise NoRoomError(
                f"{self.root}: no room to write the volume cache ({err.reason}); free space "
                "there or raise the file-size limit, or set data.cache_dir (or CTSEG_CACHE) to a "
                "folder with room; a rerun keeps the finished entries and builds the rest",
                err.reason) from err


def patch_start(volume: CachedVolume, size: Sequence[int], sampler: str) -> tuple[int, ...]:
    """A random patch corner: uniform (`random`), or centred on a voxel of a class drawn
    uniformly among those present, background included (`classes`), shifted inside the volume.
    Uses torch's global generator (seeded per DataLoader worker by Lightning)."""
    limits = [max(d - s, 0) for d, s in zip(volume.shape, size, strict=True)]
    if sampler == "random":
        return tuple(int(torch.randint(limit + 1, ())) for limit in limits)
    classes = sorted(volume.locations)
    chosen = volume.locations[classes[int(torch.randint(len(classes), ()))]]
    centre = np.unravel_index(int(chosen[int(torch.randint(len(chosen), ()))]), volume.shape)
    return tuple(int(min(max(c - s // 2, 0), limit))
                 for c, s, limit in zip(centre, size, limits, strict=True))


class CachedPatches(Dataset):
    """Training items from the volume cache: `samples_per_volume` patches of one volume each (a
    list of {"image", "label"} dicts, with the record's "annotated" flags when it has them,
    collated by MONAI's list_data_collate)."""

    def __init__(self, cache: VolumeCache, records: Sequence[dict[str, Any]]) -> None:
        """Patches of `records`, with the cache's pipeline (patch size, samples, sampler)."""
        self.cache, self.records = cache, list(records)

    def __len__(self) -> int:
        """Number of volumes."""
        return len(self.records)

    def __getitem__(self, index: int) -> list[dict[str, torch.Tensor]]:
        """The random patches of volume `index`."""
        record = self.records[index]
        volume = self.cache.entry(record)
        cfg = self.cache.pipeline
        flags = {ANNOTATED: record[ANNOTATED]} if ANNOTATED in record else {}
        return [{**volume.read(patch_start(volume, cfg.patch_size, cfg.sampler), cfg.patch_size),
                 **flags} for _ in range(cfg.samples_per_volume)]


class CachedVolumes(Dataset):
    """Evaluation items from the volume cache: the image's own voxels of each volume (without the
    padding up to whole patches), or the central `center_crop` of the padded volume (as
    `eval_transforms` gives them)."""

    def __init__(self, cache: VolumeCache, records: Sequence[dict[str, Any]],
                 center_crop: Sequence[int] | None = None) -> None:
        """Volumes of `records`, optionally centre-cropped (as CenterSpatialCrop does)."""
        self.cache, self.records = cache, list(records)
        self.center_crop = None if center_crop is None else tuple(int(c) for c in center_crop)

    def __len__(self) -> int:
        """Number of volumes."""
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Image and label of volume `index` (cropped when asked) and the record's other keys."""
        record = self.records[index]
        volume = self.cache.entry(record)
        if self.center_crop is None:
            item = volume.read(*volume.valid)
        else:
            size = [min(c, d) for c, d in zip(self.center_crop, volume.shape, strict=True)]
            start = [d // 2 - s // 2 for d, s in zip(volume.shape, size, strict=True)]
            item = volume.read(start, size)
        return {**{k: v for k, v in record.items() if k not in (IMAGE, LABEL)}, **item}
