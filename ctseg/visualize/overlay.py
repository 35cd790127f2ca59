"""Overlays of label maps on CT: axial, coronal and sagittal slices through the centre of the
labelled structures, in the colours of predict.py's Slicer / ITK-SNAP tables, with a legend.

Arrays are in RAS+ voxel order (nibabel's `as_closest_canonical`, MONAI's `Orientation("RAS")`):
axis 0 runs to the patient's right, 1 to anterior, 2 to superior. Slices are shown in the
radiological convention: the patient's right on the viewer's left in axial and coronal views,
anterior up in axial, superior up in coronal and sagittal, anterior on the left in sagittal; the
pixel aspect follows the voxel spacing, so thick slices are not squashed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.gridspec import GridSpec
from matplotlib.patches import Patch
from nibabel.orientations import apply_orientation, io_orientation

from ctseg.colours import label_colours
from ctseg.data.layout import same_grid, stored_labels
from ctseg.errors import ConfigError, DatasetError, MissingFileError, blamed_on
from ctseg.labels import Names, label_table

PLANES = ("axial", "coronal", "sagittal")
# Axis of the RAS volume each plane cuts across, and the (row, column) axes it shows.
CUT_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
SHOWN_AXES = {"axial": (1, 0), "coronal": (2, 0), "sagittal": (2, 1)}
# Orientation letters at the (left, right, top) edges of each plane as displayed.
EDGES = {"axial": ("R", "L", "A"), "coronal": ("R", "L", "S"), "sagittal": ("A", "P", "S")}
# CT windows as (width, level) in HU; "auto": the 0.5-99.5 percentiles of the shown slices (for
# images that are not in HU, such as the training pipeline's normalised volumes).
WINDOWS: dict[str, tuple[float, float] | None] = {
    "abdomen": (400.0, 40.0), "lung": (1500.0, -600.0), "bone": (1800.0, 400.0),
    "wide": (2000.0, 0.0), "auto": None,
}
DEFAULT_WINDOW = "abdomen"
DEFAULT_ALPHA = 0.5
# Legend entries: the structures with most pixels in the shown slices, then "+k more".
MAX_LEGEND = 20
PANEL_INCHES = 3.2
LEGEND_INCHES = 2.6
LEGEND_ENTRY_INCHES = 0.2

Slices = tuple[int, int, int]
IntensityWindow = str | Sequence[float] | None


def window_bounds(window: IntensityWindow) -> tuple[float, float] | None:
    """(low, high) intensities of a window given as a preset name (WINDOWS), [width, level] in
    HU, or None/"auto" (None: percentiles of the image)."""
    if window is None or isinstance(window, str):
        name = window or "auto"
        if name not in WINDOWS:
            raise ConfigError(f"window={name}: unknown preset; choose one of "
                              f"{', '.join(WINDOWS)} or give [width, level] in HU")
        preset = WINDOWS[name]
        if preset is None:
            return None
        window = preset
    values = [float(v) for v in window]
    if len(values) != 2 or values[0] <= 0:
        raise ConfigError(f"window={list(window)}: give [width, level] in HU with width > 0, "
                          "e.g. [400, 40], or a preset name")
    width, level = values
    return level - width / 2, level + width / 2


def centre_slices(labels: np.ndarray) -> Slices | None:
    """(i, j, k) through the centre of mass of all labelled (non-zero) voxels, each moved to the
    nearest plane that holds labelled voxels; None for a map without any."""
    foreground = labels != 0
    indices = []
    for axis in range(3):
        profile = foreground.sum(axis=tuple(a for a in range(3) if a != axis))
        total = profile.sum()
        if total == 0:
            return None
        centre = float((np.arange(len(profile)) * profile).sum() / total)
        filled = np.flatnonzero(profile)
        indices.append(int(filled[np.argmin(np.abs(filled - centre))]))
    return indices[0], indices[1], indices[2]


def slice_indices(labels: np.ndarray) -> Slices:
    """`centre_slices` of `labels`, or the centre of the volume when nothing is labelled."""
    centre = centre_slices(labels)
    return centre if centre is not None else (labels.shape[0] // 2, labels.shape[1] // 2,
                                              labels.shape[2] // 2)


def volume_planes(volume: np.ndarray, slices: Slices) -> list[np.ndarray]:
    """The axial, coronal and sagittal planes of a RAS volume at `slices` (i, j, k), in voxel
    order (display flips come later)."""
    return [np.take(volume, slices[CUT_AXIS[p]], axis=CUT_AXIS[p]) for p in PLANES]


def _display(plane: np.ndarray) -> np.ndarray:
    """A plane in voxel order (its first axis becomes the columns; trailing channels kept) as
    rows and columns on screen: higher RAS coordinates first, i.e. right on the left, anterior /
    superior at the top."""
    return np.swapaxes(np.asarray(plane), 0, 1)[::-1, ::-1]


def _grey(planes: Sequence[np.ndarray], window: IntensityWindow) -> list[np.ndarray]:
    """Planes scaled to [0, 1] by the window (auto: percentiles over all planes)."""
    bounds = window_bounds(window)
    if bounds is None:
        values = np.concatenate([np.asarray(p, dtype=np.float32).ravel() for p in planes])
        bounds = tuple(float(v) for v in np.percentile(values, (0.5, 99.5)))
    low, high = bounds
    scale = high - low if high > low else 1.0
    return [np.clip((np.asarray(p, dtype=np.float32) - low) / scale, 0.0, 1.0) for p in planes]


def blend(grey: np.ndarray, labels: np.ndarray, colours: np.ndarray, alpha: float) -> np.ndarray:
    """RGB image: the grey plane, with labelled pixels mixed with their colour (0..1 rows of
    `colours`, indexed by label) at opacity `alpha`."""
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    mask = labels != 0
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * colours[labels[mask]]
    return rgb


def _spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    """Three positive voxel sizes (mm), else ValueError."""
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or min(values) <= 0:
        raise ValueError(f"spacing must be three positive voxel sizes in mm, got {spacing!r}")
    return values[0], values[1], values[2]


def render_planes(
    ct: Sequence[np.ndarray],
    labels: Mapping[str, Sequence[np.ndarray]],
    spacing: Sequence[float],
    names: Names,
    slices: Slices,
    window: IntensityWindow = DEFAULT_WINDOW,
    alpha: float = DEFAULT_ALPHA,
    max_legend: int = MAX_LEGEND,
    title: str | None = None,
) -> Figure:
    """A figure of the three CT planes (`volume_planes` order) with one row per label map, and a
    legend of the structures visible in the shown planes (the `max_legend` largest)."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha={alpha}: give an opacity between 0 and 1")
    if max_legend < 1:
        raise ConfigError(f"max_legend={max_legend}: show at least one legend entry")
    sizes = _spacing(spacing)
    rows = {row: [np.asarray(p).astype(np.int64, copy=False) for p in planes]
            for row, planes in labels.items()}
    table = label_table(names)
    top = max([max(table, default=0)] + [int(p.max(initial=0)) for ps in rows.values()
                                         for p in ps])
    colours = np.asarray(label_colours(table, top + 1), dtype=np.float32) / 255
    grey = _grey(ct, window)

    extents = [(sizes[SHOWN_AXES[p][0]] * g.shape[1], sizes[SHOWN_AXES[p][1]] * g.shape[0])
               for p, g in zip(PLANES, grey, strict=True)]  # (height, width) in mm
    scale = PANEL_INCHES / max(h for h, _ in extents)
    widths = [max(w * scale, 1.0) for _, w in extents] + [LEGEND_INCHES]
    counts: dict[int, int] = {}
    for planes in rows.values():
        for lab in planes:
            values, numbers = np.unique(lab[lab != 0], return_counts=True)
            for v, n in zip(values.tolist(), numbers.tolist(), strict=True):
                counts[v] = counts.get(v, 0) + n
    entries = min(len(counts), max_legend) + (len(counts) > max_legend)
    height = max(PANEL_INCHES * len(rows), LEGEND_ENTRY_INCHES * entries) + 0.6
    figure = Figure(figsize=(sum(widths), height))
    grid = GridSpec(len(rows), 4, figure=figure, width_ratios=widths)
    for r, (row, planes) in enumerate(rows.items()):
        for c, (plane, g, lab) in enumerate(zip(PLANES, grey, planes, strict=True)):
            rows_mm, cols_mm = (sizes[a] for a in SHOWN_AXES[plane])
            axes = figure.add_subplot(grid[r, c])
            axes.imshow(_display(blend(g, lab, colours, alpha)), aspect=rows_mm / cols_mm,
                        interpolation="nearest")
            axes.set_xticks([])
            axes.set_yticks([])
            left, right, up = EDGES[plane]
            for x, y, letter in ((0.02, 0.5, left), (0.98, 0.5, right), (0.5, 0.98, up)):
                axes.text(x, y, letter, transform=axes.transAxes, color="yellow", fontsize=8,
                          ha="center", va="center")
            if r == 0:
                axis = "xyz"[CUT_AXIS[plane]]
                axes.set_title(f"{plane} ({axis}={slices[CUT_AXIS[plane]]})", fontsize=9)
            if c == 0 and len(rows) > 1:
                axes.set_ylabel(row)
    _legend(figure.add_subplot(grid[:, 3]), counts, table, colours, max_legend)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def _legend(axes: Axes, counts: Mapping[int, int], table: Mapping[int, str],
            colours: np.ndarray, max_legend: int) -> None:
    """Colour patches and names of the `max_legend` structures with most shown pixels."""
    axes.axis("off")
    if not counts:
        axes.text(0.0, 1.0, "no labelled structure\nin these slices", va="top", fontsize=9)
        return
    largest = sorted(counts, key=lambda v: (-counts[v], v))
    handles = [Patch(facecolor=colours[v], edgecolor="none", label=table.get(v, f"label {v}"))
               for v in largest[:max_legend]]
    if len(largest) > max_legend:
        handles.append(Patch(facecolor="none", edgecolor="none",
                             label=f"+{len(largest) - max_legend} more"))
    axes.legend(handles=handles, loc="upper left", fontsize=8, frameon=False,
                borderaxespad=0.0)


def render_overlay(
    ct: np.ndarray,
    labels: Mapping[str, np.ndarray],
    spacing: Sequence[float],
    names: Names,
    slices: Slices | None = None,
    window: IntensityWindow = DEFAULT_WINDOW,
    alpha: float = DEFAULT_ALPHA,
    max_legend: int = MAX_LEGEND,
    title: str | None = None,
) -> Figure:
    """`render_planes` of RAS arrays: a CT volume and label maps of its grid (one figure row each),
    cut at `slices` (default: the centre of all the maps' labelled voxels)."""
    for row, volume in labels.items():
        if volume.shape != ct.shape:
            raise ValueError(f"label map {row!r} has shape {volume.shape}, the CT {ct.shape}")
    if slices is None:
        union = np.zeros(ct.shape, dtype=bool)
        for volume in labels.values():
            union |= volume != 0
        slices = slice_indices(union)
    return render_planes(volume_planes(ct, slices),
                         {row: volume_planes(v, slices) for row, v in labels.items()},
                         spacing, names, slices, window, alpha, max_legend, title)


def _load(path: Path, what: str) -> nib.Nifti1Image:
    """A 3D NIfTI image, or an error naming `what` and the file."""
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file (the {what})")
    with blamed_on(path, f"cannot read the {what} as NIfTI"):
        img = nib.load(path)
    if len(img.shape) != 3:
        raise DatasetError(path, f"the {what} has shape {img.shape}; expected a 3D volume")
    return img


def canonical_slab(img: nib.Nifti1Image, axis: int, index: int) -> np.ndarray:
    """The plane at `index` across RAS axis `axis` of `img`, as `as_closest_canonical(img)` would
    give it, reading only that plane from the file."""
    ornt = io_orientation(img.affine)
    source = int(np.flatnonzero(ornt[:, 0] == axis)[0])
    size = img.shape[source]
    stored = index if ornt[source, 1] > 0 else size - 1 - index
    picker = [slice(None)] * 3
    picker[source] = slice(stored, stored + 1)
    slab = apply_orientation(np.asanyarray(img.dataobj[tuple(picker)]), ornt)
    return np.take(slab, 0, axis=axis)


def canonical_labels(img: nib.Nifti1Image, path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """The label map in RAS voxel order (as `as_closest_canonical`) and its voxel sizes (mm)."""
    ornt = io_orientation(img.affine)
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    spacing = [0.0] * 3
    for source, (target, _) in enumerate(ornt):
        spacing[int(target)] = zooms[source]
    return apply_orientation(stored_labels(img, path), ornt), tuple(spacing)


def _grid(img: nib.Nifti1Image) -> str:
    """Shape and voxel sizes of an image, for messages."""
    return f"{img.shape} of {np.round(img.header.get_zooms()[:3], 3).tolist()} mm voxels"


def check_same_grid(ct: nib.Nifti1Image, labels: nib.Nifti1Image, ct_path: Path,
                    labels_path: Path) -> None:
    """DatasetError naming both files unless CT and label map share shape and affine."""
    if not same_grid(ct, labels):
        raise DatasetError(labels_path, f"grid {_grid(labels)} differs from the CT {ct_path} "
                           f"of grid {_grid(ct)} in shape or affine; give the label map predicted "
                           "for (or drawn on) this CT")


def overlay_figure(ct_path: Path, labels_path: Path, names: Names,
                   window: IntensityWindow = DEFAULT_WINDOW, alpha: float = DEFAULT_ALPHA,
                   max_legend: int = MAX_LEGEND) -> tuple[Figure, list[int]]:
    """The overlay figure of a CT and label map file of one grid, and the label values shown
    (checked against `names`)."""
    ct, lab = _load(ct_path, "CT"), _load(labels_path, "label map")
    check_same_grid(ct, lab, ct_path, labels_path)
    labels, spacing = canonical_labels(lab, labels_path)
    table = label_table(names)
    top = int(labels.max(initial=0))
    if top > max(table, default=0):
        raise DatasetError(labels_path, f"label value {top} has no name (the names go up to "
                           f"{max(table, default=0)}); a TotalSegmentator v2 map needs version=v2")
    slices = slice_indices(labels)
    with blamed_on(ct_path, "cannot read the CT's voxels"):
        ct_planes = [canonical_slab(ct, CUT_AXIS[p], slices[CUT_AXIS[p]]) for p in PLANES]
    label_planes = volume_planes(labels, slices)
    shown = sorted(set().union(*(np.unique(p).tolist() for p in label_planes)) - {0})
    figure = render_planes(ct_planes, {"labels": label_planes}, spacing, names, slices, window,
                           alpha, max_legend, title=f"{ct_path.name} + {labels_path.name}")
    return figure, shown


def figure_rgb(figure: Figure) -> np.ndarray:
    """The figure drawn as an (H, W, 3) uint8 array, laid out as `save_png` lays it out."""
    figure.tight_layout()
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
