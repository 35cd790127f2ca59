"""A simulated TotalSegmentator download at a real CT's size and layout, for measuring the data
tools at scale: 512 x 512 x 200-800 voxels at 0.7-0.9 mm in-plane and 1.5-5 mm slices, axis
flips in the affine, every mask of the version (most empty), the v2 meta.csv, gzip as downloaded.

The phantoms' anatomy (`ANATOMY`) is drawn box by box (each structure only within the voxel box
its ellipsoid spans), in an elliptic body that runs the whole field of view; the organs span
`TRUNK_MM` along the body at a random height, so some subjects show only part of them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from rich.progress import track

from ctseg.data.layout import META
from ctseg.data.phantoms import (
    AIR_HU,
    ANATOMY,
    FAT_HU,
    HU_RANGE,
    MIN_SIDE,
    MUSCLE_HU,
    PHANTOM_STUDY,
    RECORD,
    TISSUE_HU,
    meta_text,
    open_download,
    phantom_record,
    record_bytes,
    split_assignment,
    write_bytes,
    write_subject,
)

logger = logging.getLogger(__name__)

WHOLEBODY_VERSION = "v2"
# The columns of the v2 download's meta.csv.
V2_META_COLUMNS = ("image_id", "age", "gender", "institute", "study_type", "split",
                   "manufacturer", "scanner_model", "kvp", "pathology", "pathology_location")
SCANNERS = (("SIEMENS", "SOMATOM Definition AS+"), ("GE MEDICAL SYSTEMS", "Revolution CT"),
            ("Philips", "iCT 256"), ("TOSHIBA", "Aquilion ONE"))
IN_PLANE_VOXELS = 512
SLICES = (200, 800)
IN_PLANE_MM = (0.7, 0.9)
SLICE_MM = (1.5, 5.0)
# Longest field of view along the body: fewer slices where they are thick (a 5 mm scan has <= 400).
MAX_EXTENT_MM = 2000.0
# Length along the body over which ANATOMY's t runs from -1 to 1 (at scale 1).
TRUNK_MM = 500.0
# Voxel-axis orientations: RAS and axis flips of it that scanners write (DICOM's LPS, LAS, RPS).
ORIENTATIONS = ("RAS", "LPS", "LAS", "RPS")
# Uniform integer noise of +-NOISE_HU_HALF_WIDTH HU: standard deviation 19.6 HU, as the phantoms'.
NOISE_HU_HALF_WIDTH = 34
# Slices per step of adding noise: bounds the temporary memory.
SLAB = 16


@dataclass(frozen=True)
class Geometry:
    """One subject's voxel counts and voxel sizes (mm) on the RAS grid it is drawn on, and the
    orientation its files are written in."""

    shape: tuple[int, int, int]
    zooms: tuple[float, float, float]
    orientation: str


def scaled(voxels: int, scale: float) -> int:
    """A voxel count times `scale`, at least MIN_SIDE."""
    return max(MIN_SIDE, round(voxels * scale))


def draw_geometry(rng: np.random.Generator, scale: float, orientation: str) -> Geometry:
    """A real CT's grid (512 x 512 x 200-800 times `scale`; 0.7-0.9 mm in-plane, 1.5-5 mm slices,
    at most MAX_EXTENT_MM along the body)."""
    in_plane = float(rng.uniform(*IN_PLANE_MM))
    thickness = float(rng.uniform(*SLICE_MM))
    slices = int(rng.integers(SLICES[0], min(SLICES[1], int(MAX_EXTENT_MM // thickness)) + 1))
    side = scaled(IN_PLANE_VOXELS, scale)
    return Geometry((side, side, scaled(slices, scale)), (in_plane, in_plane, thickness),
                    orientation)


def ras_affine(geometry: Geometry, rng: np.random.Generator) -> np.ndarray:
    """The RAS affine of the drawing grid, its centre at a random scanner position."""
    affine = np.diag([*geometry.zooms, 1.0])
    centre = np.array([rng.uniform(-20, 20), rng.uniform(-20, 20), rng.uniform(-600, 600)])
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.asarray(geometry.shape) - 1) / 2)
    return affine


def _span(coord: np.ndarray, centre: float, axis: float) -> slice | None:
    """The index range where `coord` lies within `axis` of `centre` (None when empty)."""
    inside = np.flatnonzero(np.abs(coord - centre) <= axis)
    return slice(int(inside[0]), int(inside[-1]) + 1) if inside.size else None


def stored_affine(geometry: Geometry, affine: np.ndarray) -> np.ndarray:
    """The affine of the RAS grid `affine` stored in the geometry's orientation (as nibabel's
    as_reoriented writes it; the orientations are axis flips)."""
    transform = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt(geometry.orientation))
    return affine @ nib.orientations.inv_ornt_aff(transform, geometry.shape)


def render_wholebody(geometry: Geometry, scale: float, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Draw one subject in its stored orientation: int16 HU and uint8 labels (1 + index in
    ANATOMY), in Fortran order (as NIfTI stores voxels, so nibabel writes them unreordered).

    The grid is centred on the field of view, so a flipped axis is the RAS axis negated."""
    shape, zooms = geometry.shape, geometry.zooms
    signs = [1.0 if code in "RAS" else -1.0 for code in geometry.orientation]
    x, y, z = ((np.arange(n) - (n - 1) / 2) * d * sign
               for n, d, sign in zip(shape, zooms, signs, strict=True))
    u = x / (shape[0] * zooms[0] / 2 * rng.uniform(0.78, 0.9))
    v = y / (shape[1] * zooms[1] / 2 * rng.uniform(0.55, 0.68))
    t = (z - rng.uniform(z.min(), z.max())) / (TRUNK_MM * scale / 2)
    radius = u[:, None] ** 2 + v[None, :] ** 2
    fat = rng.uniform(0.08, 0.16)
    plane = np.where(radius <= 1, FAT_HU, AIR_HU)
    plane[radius <= (1 - fat) ** 2] = MUSCLE_HU
    plane[radius <= (1 - fat - 0.05) ** 2] = TISSUE_HU
    inner = radius <= (1 - fat) ** 2
    hu = np.empty(shape, np.int16, order="F")
    hu[...] = plane.astype(np.int16)[:, :, None]
    labels = np.zeros(shape, np.uint8, order="F")
    for index, blob in enumerate(ANATOMY, start=1):
        centre = np.add(blob.center, rng.normal(0, 0.03, 3))
        axes = np.multiply(blob.axes, rng.uniform(0.85, 1.15, 3))
        offset = float(rng.normal(0, 8))
        if rng.random() < blob.absent_p:
            continue
        box = tuple(_span(c, float(m), float(a)) for c, m, a in zip((u, v, t), centre, axes,
                                                                  strict=True))
        if None in box:
            continue
        du, dv, dt = (((c[b] - m) / a).astype(np.float32) ** 2
                      for c, b, m, a in zip((u, v, t), box, centre, axes, strict=True))
        dist = du[:, None, None] + dv[None, :, None] + dt[None, None, :]
        inside = (dist <= 1) & inner[box[0], box[1]][:, :, None]
        labels[box][inside] = index
        hu_box = hu[box]
        hu_box[inside] = round(blob.hu + offset)
        if blob.shell_hu is not None:
            hu_box[inside & (dist > 0.55)] = round(blob.shell_hu + offset)
    for start in range(0, shape[2], SLAB):
        slab = hu[:, :, start:start + SLAB]
        noise = rng.integers(-NOISE_HU_HALF_WIDTH, NOISE_HU_HALF_WIDTH + 1, slab.shape, np.int16)
        np.clip(slab + noise, *HU_RANGE, out=slab)
    return hu, labels


def _meta_row(image_id: str, split: str, rng: np.random.Generator) -> dict[str, str]:
    """One meta.csv row of the v2 columns."""
    manufacturer, model = SCANNERS[int(rng.integers(len(SCANNERS)))]
    return {"image_id": image_id, "age": str(int(rng.integers(18, 95))),
            "gender": str(rng.choice(["m", "f"])), "institute": "ctseg",
            "study_type": PHANTOM_STUDY, "split": split, "manufacturer": manufacturer,
            "scanner_model": model, "kvp": str(int(rng.choice([100, 120, 140]))),
            "pathology": "no_pathology", "pathology_location": ""}


def wholebody_record(n: int | None, seed: int | None, version: str, scale: float
                     ) -> dict[str, object]:
    """The settings a simulated download depends on (n and seed None: the phantoms' defaults),
    checked."""
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 < scale <= 1:
        raise ValueError(f"scale must be a number in (0, 1] (1: a real CT's 512 x 512 x 200-800 "
                         f"voxels), got {scale!r}")
    base = phantom_record(n, seed, version)
    return {"n": base["n"], "seed": base["seed"], "version": version, "size": "wholebody",
            "scale": float(scale), "layout": "totalseg"}


def write_wholebody_phantoms(out: str | Path, n: int | None = None, seed: int | None = None,
                             version: str = WHOLEBODY_VERSION, scale: float = 1.0,
                             progress: bool = False) -> list[Path]:
    """Write a simulated download of n subjects `out/sXXXX/{ct.nii.gz,segmentations/*.nii.gz}`
    and its meta.csv (v2 columns), voxel counts times `scale`; returns the subject folders.

    As write_phantoms: meta.csv and RECORD are written last, subject i depends only on (seed, i,
    scale), the orientations cycle through a seeded permutation of ORIENTATIONS.
    """
    record = wholebody_record(n, seed, version, scale)
    n, seed = int(record["n"]), int(record["seed"])
    out = open_download(out)
    started = time.perf_counter()
    splits = split_assignment(n, np.random.default_rng([seed, n, 1_000_004]))
    cycle = np.random.default_rng([seed, 1_000_005]).permutation(ORIENTATIONS)
    rows: list[dict[str, str]] = []
    folders: list[Path] = []
    for i in track(range(n), description="Writing simulated subjects", disable=not progress):
        rng = np.random.default_rng([seed, i, 1_000_006])
        geometry = draw_geometry(rng, scale, str(cycle[i % len(cycle)]))
        affine = ras_affine(geometry, rng)
        hu, labels = render_wholebody(geometry, scale, rng)
        folders.append(out / f"s{i + 1:04d}")
        write_subject(folders[-1], version, hu, labels, stored_affine(geometry, affine))
        rows.append(_meta_row(folders[-1].name, splits[i], rng))
    write_bytes(out / RECORD, record_bytes(record))
    write_bytes(out / META, meta_text(rows, V2_META_COLUMNS).encode())
    logger.info("wrote %d simulated %s subjects (scale %g) to %s in %.1f s", n, version, scale,
                out, time.perf_counter() - started)
    return folders
