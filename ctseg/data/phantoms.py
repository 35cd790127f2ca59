"""Synthetic CT phantoms in the TotalSegmentator download layout, for tests and smoke runs."""

from __future__ import annotations

import csv
import functools
import gzip
import io
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import yaml
from filelock import FileLock
from rich.progress import track

from ctseg.atomic import write_atomic
from ctseg.config import CONFIG_DIR
from ctseg.data.layout import DATASET_JSON, META
from ctseg.labels import check_version, class_names

logger = logging.getLogger(__name__)

# Value of meta.csv's study_type column that marks a folder as written by write_phantoms.
PHANTOM_STUDY = "synthetic phantom"
META_COLUMNS = ("image_id", "age", "gender", "institute", "study_type", "split")
# Voxel-axis orientations of the phantoms (nibabel axcodes); RAS and LPS dominate real data.
ORIENTATIONS = ("RAS", "LPS", "LAS", "RPS", "RAI", "PLS", "ARS", "LPI")
AIR_HU, FAT_HU, MUSCLE_HU, TISSUE_HU = -1000.0, -100.0, 50.0, 20.0
NOISE_HU = 20.0
HU_RANGE = (-1024, 3071)
GZIP_LEVEL = 1
MIN_SIDE = 16
# Folder layouts a dataset can have: the TotalSegmentator download, nnU-Net v2 raw.
LAYOUTS = ("totalseg", "nnunet")
# The one home of the phantom writers' defaults (write_phantoms, `python -m ctseg.data phantoms`,
# the DataModules, data.datasets entries): its n_phantoms, phantom_seed, phantom_shape and
# phantom_spacing.
DEFAULTS_CONFIG = CONFIG_DIR / "data" / "phantoms.yaml"
# The settings a phantom folder was written with, beside its meta.csv or dataset.json.
RECORD = "phantoms.json"


@dataclass(frozen=True)
class PhantomSettings:
    """How many phantoms, from which seed, on how many voxels, around which spacing (mm)."""

    n: int
    seed: int
    shape: Sequence[int]
    spacing: float


@functools.cache
def phantom_defaults() -> PhantomSettings:
    """The defaults of every phantom writer, as DEFAULTS_CONFIG sets them."""
    cfg = yaml.safe_load(DEFAULTS_CONFIG.read_text())
    return PhantomSettings(int(cfg["n_phantoms"]), int(cfg["phantom_seed"]),
                           tuple(int(s) for s in cfg["phantom_shape"]),
                           float(cfg["phantom_spacing"]))


def phantom_settings(n: int | None = None, seed: int | None = None,
                     shape: Sequence[int] | None = None, spacing: float | None = None
                     ) -> PhantomSettings:
    """The settings given, `phantom_defaults()`' for those left None (unchecked)."""
    default = phantom_defaults()
    return PhantomSettings(default.n if n is None else n, default.seed if seed is None else seed,
                           default.shape if shape is None else shape,
                           default.spacing if spacing is None else spacing)


@dataclass(frozen=True)
class Blob:
    """An ellipsoid (or, with infinite `axes[2]`, an elliptic tube along z) in body coordinates.

    Body coordinates: u across the body (+1 = the subject's right skin), v front-back (+1 = anterior
    skin), t along the field of view (-1 inferior edge, +1 superior edge).
    """

    name: str
    center: tuple[float, float, float]
    axes: tuple[float, float, float]
    hu: float
    shell_hu: float | None = None
    absent_p: float = 0.0


_VERTEBRAE = ("vertebrae_T11", "vertebrae_T12", "vertebrae_L1", "vertebrae_L2", "vertebrae_L3")
_TUBE = float("inf")
# Drawing order matters: a later structure overwrites an earlier one where they touch.
ANATOMY: tuple[Blob, ...] = (
    Blob("lung_lower_lobe_right", (0.42, -0.05, 0.95), (0.36, 0.55, 0.6), -850.0),
    Blob("lung_lower_lobe_left", (-0.42, -0.05, 0.95), (0.34, 0.55, 0.55), -850.0),
    Blob("autochthon_right", (0.2, -0.8, 0.0), (0.13, 0.13, _TUBE), 50.0),
    Blob("autochthon_left", (-0.2, -0.8, 0.0), (0.13, 0.13, _TUBE), 50.0),
    Blob("liver", (0.4, 0.1, 0.3), (0.42, 0.5, 0.5), 90.0),
    Blob("spleen", (-0.58, -0.25, 0.3), (0.17, 0.25, 0.28), 100.0),
    Blob("stomach", (-0.28, 0.38, 0.35), (0.24, 0.24, 0.3), 25.0),
    Blob("kidney_right", (0.38, -0.45, -0.35), (0.13, 0.16, 0.3), 150.0),
    Blob("kidney_left", (-0.38, -0.45, -0.25), (0.13, 0.16, 0.3), 150.0),
    Blob("pancreas", (-0.05, 0.15, -0.1), (0.3, 0.08, 0.09), 80.0),
    Blob("gallbladder", (0.33, 0.48, -0.05), (0.09, 0.12, 0.15), 10.0, absent_p=0.25),
    Blob("inferior_vena_cava", (0.14, -0.2, 0.0), (0.07, 0.1, _TUBE), 140.0),
    Blob("aorta", (-0.08, -0.22, 0.0), (0.08, 0.12, _TUBE), 180.0),
    *(Blob(name, (0.0, -0.55, 0.8 - 0.4 * i), (0.13, 0.17, 0.16), 300.0, shell_hu=700.0)
      for i, name in enumerate(_VERTEBRAE)),
)
PHANTOM_STRUCTURES: tuple[str, ...] = tuple(blob.name for blob in ANATOMY)
# Lesions no TotalSegmentator version has, each inside an organ, drawn only into phantom sets
# that label them (a class to add to a trained model with data.extra_classes); label values
# follow PHANTOM_STRUCTURES'.
_LESIONS: tuple[tuple[Blob, str], ...] = (
    (Blob("liver_tumour", (0.42, 0.1, 0.3), (0.2, 0.24, 0.26), 30.0), "liver"),
)
LESIONS: tuple[str, ...] = tuple(blob.name for blob, _ in _LESIONS)


def _check_args(n: int, shape: tuple[int, int, int], spacing: float, version: str) -> None:
    """Raise ValueError for arguments write_phantoms cannot honour."""
    check_version(version)
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"number of phantoms must be an integer >= 1, got {n!r}")
    if (not isinstance(shape, tuple | list) or len(shape) != 3
            or any(isinstance(s, bool) or not isinstance(s, int | np.integer) or s < MIN_SIDE
                   for s in shape)):
        raise ValueError(f"phantom shape must be 3 integers >= {MIN_SIDE}, got {shape!r}")
    if isinstance(spacing, bool) or not isinstance(spacing, int | float) or not spacing > 0:
        raise ValueError(f"phantom spacing must be a number > 0 (millimetres), got {spacing!r}")
    missing = sorted(set(PHANTOM_STRUCTURES) - set(class_names(version).values()))
    if missing:
        raise ValueError(f"phantom structures {missing} are not TotalSegmentator {version} classes")


def phantom_record(n: int | None = None, seed: int | None = None, version: str = "v1",
                   shape: Sequence[int] | None = None, spacing: float | None = None,
                   layout: str = "totalseg", structures: Sequence[str] | None = None
                   ) -> dict[str, Any]:
    """Everything the files of a phantom folder depend on (None: `phantom_defaults()`'), checked:
    what write_phantoms records in RECORD and phantoms_current compares."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    settings = phantom_settings(n, seed, shape, spacing)
    _check_args(settings.n, settings.shape, settings.spacing, version)
    chosen = None if layout == "totalseg" else [
        str(name) for name in (PHANTOM_STRUCTURES if structures is None else structures)]
    return {"n": int(settings.n), "seed": int(settings.seed), "version": version,
            "shape": [int(v) for v in settings.shape], "spacing": float(settings.spacing),
            "layout": layout, "structures": chosen}


def record_bytes(record: dict[str, Any]) -> bytes:
    """The RECORD file's content."""
    return json.dumps(record, indent=1).encode()


def open_download(out: str | Path) -> Path:
    """`out` ready for a phantom download: refused when its meta.csv was not written by
    write_phantoms, created, its meta.csv and record removed (both are written last)."""
    out = Path(out)
    meta = out / META
    if meta.is_file():
        text = meta.read_text(encoding="utf-8-sig", errors="replace")
        rows = list(csv.DictReader(text.splitlines(), delimiter=";"))
        if not rows or any(row.get("study_type") != PHANTOM_STUDY for row in rows):
            raise ValueError(f"{meta}: this folder holds a dataset not written by "
                             "write_phantoms (study_type is not 'synthetic phantom'); refusing "
                             "to overwrite it, choose an empty output folder")
    out.mkdir(parents=True, exist_ok=True)
    meta.unlink(missing_ok=True)
    (out / RECORD).unlink(missing_ok=True)
    return out


def split_assignment(n: int, rng: np.random.Generator) -> list[str]:
    """Splits for n subjects: about 70/15/15 train/val/test, each non-empty when n >= 3."""
    if n < 3:
        return ["train", "val"][:n]
    n_val = n_test = max(1, round(0.15 * n))
    splits = ["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test
    return [splits[i] for i in rng.permutation(n)]


def random_affine(shape: tuple[int, int, int], spacing: float, orientation: str,
                  rng: np.random.Generator) -> np.ndarray:
    """An axis-aligned affine in `orientation`, spacing jittered (anisotropic) around `spacing`."""
    ornt = nib.orientations.axcodes2ornt(orientation)
    in_plane = spacing * rng.uniform(0.85, 1.15)
    along_z = spacing * rng.uniform(0.85, 1.3)
    affine = np.eye(4)
    for axis, (world, sign) in enumerate(ornt.astype(int)):
        affine[world, axis] = sign * (along_z if world == 2 else in_plane)
    center = np.array([rng.uniform(-20, 20), rng.uniform(-20, 20), rng.uniform(-300, 300)])
    affine[:3, 3] = center - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


def _body_coords(shape: tuple[int, int, int], affine: np.ndarray,
                 ) -> tuple[list[np.ndarray], np.ndarray]:
    """World x, y, z relative to the FOV centre, broadcastable to `shape`, and FOV half-extents."""
    coords: list[np.ndarray] = [np.empty(0)] * 3
    half = np.zeros(3)
    for axis, size in enumerate(shape):
        world = int(np.argmax(np.abs(affine[:3, axis])))
        step = affine[world, axis]
        line = affine[world, 3] + step * np.arange(size, dtype=np.float64)
        line -= line.mean()
        view = [1, 1, 1]
        view[axis] = size
        coords[world] = line.reshape(view).astype(np.float32)
        half[world] = abs(step) * size / 2
    return coords, half


def _smooth(volume: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur along every axis (edges replicated)."""
    for axis in range(volume.ndim):
        padded = np.concatenate([volume.take([0], axis), volume, volume.take([-1], axis)], axis)
        size = volume.shape[axis]
        volume = (padded.take(range(size), axis) + 2 * padded.take(range(1, size + 1), axis)
                  + padded.take(range(2, size + 2), axis)) / 4
    return volume


def render_subject(shape: tuple[int, int, int], affine: np.ndarray, rng: np.random.Generator,
                   lesions: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Draw one phantom on (shape, affine): int16 HU and labels (1 + index in PHANTOM_STRUCTURES
    + LESIONS); `lesions` (of LESIONS) are drawn into their organs, the rest as without them."""
    (x, y, z), half = _body_coords(shape, affine)
    body_u = float(half[0] * rng.uniform(0.78, 0.9))
    body_v = float(half[1] * rng.uniform(0.55, 0.68))
    u, v = x / body_u, y / body_v
    t = z / float(half[2]) - float(rng.uniform(-0.15, 0.15))
    radius = np.broadcast_to(u * u + v * v, shape)
    fat = rng.uniform(0.08, 0.16)
    hu = np.where(radius <= 1, FAT_HU, AIR_HU).astype(np.float32)
    hu[radius <= (1 - fat) ** 2] = MUSCLE_HU
    hu[radius <= (1 - fat - 0.05) ** 2] = TISSUE_HU
    labels = np.zeros(shape, np.uint8)
    for index, blob in enumerate(ANATOMY, start=1):
        jitter = rng.normal(0, 0.03, 3)
        scale = rng.uniform(0.85, 1.15, 3)
        offset = float(rng.normal(0, 8))
        if rng.random() < blob.absent_p:
            continue
        cu, cv, ct = (float(c) for c in np.add(blob.center, jitter))
        au, av, at = (float(a) for a in np.multiply(blob.axes, scale))
        dist = ((u - cu) / au) ** 2 + ((v - cv) / av) ** 2 + ((t - ct) / at) ** 2
        inside = (dist <= 1) & (radius <= (1 - fat) ** 2)
        labels[inside] = index
        hu[inside] = blob.hu + offset
        if blob.shell_hu is not None:
            hu[inside & (dist > 0.55)] = blob.shell_hu + offset
    for index, (blob, organ) in enumerate(_LESIONS, start=len(ANATOMY) + 1):
        if blob.name not in lesions:
            continue
        cu, cv, ct = (float(c) for c in np.add(blob.center, rng.normal(0, 0.05, 3)))
        au, av, at = (float(a) for a in np.multiply(blob.axes, rng.uniform(0.7, 1.2, 3)))
        dist = ((u - cu) / au) ** 2 + ((v - cv) / av) ** 2 + ((t - ct) / at) ** 2
        inside = (dist <= 1) & (labels == 1 + PHANTOM_STRUCTURES.index(organ))
        labels[inside] = index
        hu[inside] = blob.hu + float(rng.normal(0, 8))
    hu = _smooth(hu) + rng.normal(0, NOISE_HU, shape).astype(np.float32)
    return np.clip(np.rint(hu), *HU_RANGE).astype(np.int16), labels


def nifti_gz(data: np.ndarray, affine: np.ndarray) -> bytes:
    """Gzipped NIfTI-1 bytes of `data` on `affine`, byte-identical for identical input (mtime 0)."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    return gzip.compress(img.to_bytes(), compresslevel=GZIP_LEVEL, mtime=0)


def write_bytes(path: Path, blob: bytes) -> None:
    """Write `blob` to `path` atomically."""
    write_atomic(path, partial(Path.write_bytes, data=blob))


def write_subject(folder: Path, version: str, hu: np.ndarray, labels: np.ndarray,
                  affine: np.ndarray) -> None:
    """Write ct.nii.gz and one mask per structure of `version` (empty where not drawn)."""
    write_bytes(folder / "ct.nii.gz", nifti_gz(hu, affine))
    seg = folder / "segmentations"
    empty = nifti_gz(np.zeros(labels.shape, np.uint8), affine)
    drawn = {name: index for index, name in enumerate(PHANTOM_STRUCTURES, start=1)}
    for name in class_names(version).values():
        index = drawn.get(name)
        mask = None if index is None else (labels == index)
        blob = empty if mask is None or not mask.any() else nifti_gz(mask.astype(np.uint8), affine)
        write_bytes(seg / f"{name}.nii.gz", blob)


def meta_text(rows: list[dict[str, str]], columns: Sequence[str] = META_COLUMNS) -> str:
    """meta.csv content with `columns`, `;`-separated like the TotalSegmentator download."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, delimiter=";", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_phantoms(out: str | Path, n: int | None = None, seed: int | None = None,
                   version: str = "v1", shape: Sequence[int] | None = None,
                   spacing: float | None = None, progress: bool = False, layout: str = "totalseg",
                   structures: Sequence[str] | None = None) -> list[Path]:
    """Write n synthetic CT subjects `out/sXXXX/{ct.nii.gz,segmentations/*.nii.gz}` and meta.csv
    (`layout="nnunet"`: write_nnunet_phantoms, labelling `structures`); n, seed, shape and
    spacing left None are `phantom_defaults()`'.

    Always rewrites: meta.csv and RECORD (the settings) are removed first and written last
    (atomically), so a folder holding meta.csv is complete. Subject i depends only on (seed, i,
    shape, spacing); splits depend on n. Returns the subject folders in meta.csv order.
    """
    if layout == "nnunet":
        return write_nnunet_phantoms(out, n, seed, version, shape, spacing, progress, structures)
    record = phantom_record(n, seed, version, shape, spacing, layout)
    if structures is not None:
        raise ValueError("structures: a TotalSegmentator-layout phantom has every mask; label a "
                         "subset with layout nnunet")
    n, seed, spacing = record["n"], record["seed"], record["spacing"]
    shape = (record["shape"][0], record["shape"][1], record["shape"][2])
    out = open_download(out)
    started = time.perf_counter()
    splits = split_assignment(n, np.random.default_rng([seed, n, 1_000_004]))
    rows: list[dict[str, str]] = []
    folders: list[Path] = []
    for i, (hu, labels, affine, rng) in enumerate(_subjects(n, seed, shape, spacing, progress)):
        image_id = f"s{i + 1:04d}"
        write_subject(out / image_id, version, hu, labels, affine)
        folders.append(out / image_id)
        rows.append({"image_id": image_id, "age": str(int(rng.integers(25, 90))),
                     "gender": str(rng.choice(["m", "f"])), "institute": "ctseg",
                     "study_type": PHANTOM_STUDY, "split": splits[i]})
    write_bytes(out / RECORD, record_bytes(record))
    write_bytes(out / META, meta_text(rows).encode())
    logger.info("wrote %d %s phantoms of shape %s to %s in %.1f s", n, version, shape, out,
                time.perf_counter() - started)
    return folders


def _subjects(n: int, seed: int, shape: tuple[int, int, int], spacing: float, progress: bool,
              lesions: Sequence[str] = ()
              ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.random.Generator]]:
    """HU, labels (render_subject's), affine and the generator that drew them (for the meta.csv
    columns) of phantom 0..n-1."""
    orientations = np.random.default_rng([seed, 1_000_003]).permutation(ORIENTATIONS)
    for i in track(range(n), description="Writing phantoms", disable=not progress):
        rng = np.random.default_rng([seed, i])
        orientation = str(orientations[i % len(orientations)])
        affine = random_affine(shape, float(spacing), orientation, rng)
        yield (*render_subject(shape, affine, rng, lesions), affine, rng)


def write_nnunet_phantoms(out: str | Path, n: int | None = None, seed: int | None = None,
                          version: str = "v1", shape: Sequence[int] | None = None,
                          spacing: float | None = None, progress: bool = False,
                          structures: Sequence[str] | None = None) -> list[Path]:
    """The phantoms of write_phantoms (same seed: same CTs, unless `structures` names LESIONS,
    which are then drawn too) as an nnU-Net raw dataset labelling `structures` only (default all
    of PHANTOM_STRUCTURES; the others are background): train and val subjects in imagesTr /
    labelsTr, test subjects in imagesTs / labelsTs, RECORD and dataset.json written last.
    Returns the CT paths."""
    record = phantom_record(n, seed, version, shape, spacing, "nnunet", structures)
    n, seed, spacing, chosen = record["n"], record["seed"], record["spacing"], record["structures"]
    shape = (record["shape"][0], record["shape"][1], record["shape"][2])
    drawn = (*PHANTOM_STRUCTURES, *LESIONS)
    unknown = sorted(set(chosen) - set(drawn))
    if unknown or not chosen:
        raise ValueError(f"structures must be phantom structures ({', '.join(drawn)}); got "
                         f"{unknown or 'none'}")
    out = Path(out)
    description = out / DATASET_JSON
    if description.is_file() and PHANTOM_STUDY not in description.read_text(errors="replace"):
        raise ValueError(f"{description}: this folder holds a dataset not written by "
                         "write_phantoms; refusing to overwrite it, choose an empty output folder")
    out.mkdir(parents=True, exist_ok=True)
    description.unlink(missing_ok=True)
    (out / RECORD).unlink(missing_ok=True)
    splits = split_assignment(n, np.random.default_rng([seed, n, 1_000_004]))
    values = {name: chosen.index(name) + 1 for name in chosen}
    lut = np.array([0, *(values.get(name, 0) for name in drawn)], np.uint8)
    lesions = [name for name in chosen if name in LESIONS]
    images: list[Path] = []
    for i, (hu, labels, affine, _) in enumerate(_subjects(n, seed, shape, spacing, progress,
                                                          lesions)):
        part = "Ts" if splits[i] == "test" else "Tr"
        case = f"phantom_{i + 1:04d}"
        images.append(out / f"images{part}" / f"{case}_0000.nii.gz")
        write_bytes(images[-1], nifti_gz(hu, affine))
        write_bytes(out / f"labels{part}" / f"{case}.nii.gz", nifti_gz(lut[labels], affine))
    dataset = {"name": "phantoms", "description": PHANTOM_STUDY, "channel_names": {"0": "CT"},
               "labels": {"background": 0, **values}, "file_ending": ".nii.gz",
               "numTraining": sum(split != "test" for split in splits)}
    write_bytes(out / RECORD, record_bytes(record))
    write_bytes(description, json.dumps(dataset, indent=1).encode())
    logger.info("wrote %d phantoms (nnU-Net layout, %d structures) to %s", n, len(chosen), out)
    return images


def phantoms_current(root: str | Path, record: dict[str, Any]) -> bool:
    """Whether `root` holds phantoms written by write_phantoms with the settings of `record`
    (`phantom_record`'s): its RECORD equals it, beside the meta.csv / dataset.json written last."""
    root = Path(root)
    done = root / (DATASET_JSON if record["layout"] == "nnunet" else META)
    try:
        written = json.loads((root / RECORD).read_text())
    except (OSError, ValueError):
        return False
    return done.is_file() and written == record


def ensure_phantoms(root: str | os.PathLike[str], layout: str, version: str,
                    n: int | None = None, seed: int | None = None,
                    shape: Sequence[int] | None = None, structures: Sequence[str] | None = None,
                    spacing: float | None = None) -> bool:
    """Write phantoms into `root` unless it holds phantoms written with the same settings (every
    one that changes their files: `phantom_record`; None: the defaults); whether it wrote them.
    A file lock beside `root` lets the nodes of a multi-node job (one shared filesystem) prepare
    at the same time."""
    record = phantom_record(n, seed, version, shape, spacing, layout, structures)
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{root.name}.lock")):
        if phantoms_current(root, record):
            return False
        write_phantoms(root, n, seed=seed, version=version, shape=shape, spacing=spacing,
                       layout=layout, structures=structures)
        return True
