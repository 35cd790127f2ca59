"""Label colours keyed by structure name, the one source of predict.py's Slicer / ITK-SNAP tables,
its DICOM SEG and the overlays: a structure has one colour in TotalSegmentator v1, v2 and
VISTA3D's spelling (`kidney_right`, "right kidney").

The palette is Glasbey's (Glasbey et al. 2007, "Colour displays for categorical images"): from a
grid of sRGB colours, each next colour is the one farthest in CIELAB (CIE76 distance, scikit-image's
`rgb2lab`) from all colours before it, starting from black, white and grey (the background and the
CT's own greys) and leaving out colours too dark, too light or too grey to show over a CT. The
known structure names (v1, then the v2 names v1 lacks, then VISTA3D's names of no TotalSegmentator
structure) take its colours in that order; any other name of a table (an added class, a label
value without a name) the next ones, in value order.
"""

from __future__ import annotations

from functools import cache
from itertools import count as counting

import numpy as np
from skimage.color import rgb2lab

from ctseg.labels import BACKGROUND, Names, class_names, label_table
from ctseg.vista3d_labels import vista3d_labels, vista3d_name

RGB = tuple[int, int, int]
# The sRGB grid the palette is drawn from: every channel a multiple of 17 (#000, #111, ... #FFF).
LEVELS = 16
# Colours the palette keeps away from: the background and the greys of a CT.
AVOIDED = ((0, 0, 0), (255, 255, 255), (128, 128, 128))
# Lightness and chroma (CIELAB) of the colours kept: visible over a CT, light or dark.
LIGHTNESS = (35.0, 90.0)
MIN_CHROMA = 30.0


@cache
def palette(size: int) -> tuple[RGB, ...]:
    """The first `size` colours in Glasbey's order (each the farthest from those before it; every
    kept colour of the grid at most, after which they repeat)."""
    grid = np.linspace(0, 255, LEVELS)
    rgb = np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), axis=-1).reshape(-1, 3)
    lab = rgb2lab(rgb[None] / 255)[0]
    kept = ((lab[:, 0] >= LIGHTNESS[0]) & (lab[:, 0] <= LIGHTNESS[1])
            & (np.hypot(lab[:, 1], lab[:, 2]) >= MIN_CHROMA))
    rgb, lab = rgb[kept], lab[kept]
    avoided = rgb2lab(np.asarray(AVOIDED, dtype=float)[None] / 255)[0]
    distance = np.linalg.norm(lab[:, None] - avoided[None], axis=-1).min(axis=1)
    order: list[int] = []
    for _ in range(min(size, len(rgb))):
        order.append(int(distance.argmax()))
        distance = np.minimum(distance, np.linalg.norm(lab - lab[order[-1]], axis=1))
        distance[order[-1]] = -1.0
    picked = [tuple(int(c) for c in np.rint(rgb[i])) for i in order]
    return tuple(picked[i % len(picked)] for i in range(size))


@cache
def known_names() -> dict[str, int]:
    """Structure name (lower case, TotalSegmentator and VISTA3D spellings) -> its palette index."""
    index: dict[str, int] = {}
    for version in ("v1", "v2"):
        for name in class_names(version).values():
            index.setdefault(name.lower(), len(index))
    for name in list(index):
        index.setdefault(vista3d_name(name).lower(), index[name])
    for name in vista3d_labels().names.values():
        if name != BACKGROUND:
            index.setdefault(name.lower(), max(index.values()) + 1)
    return index


def label_colours(names: Names, count: int = 0) -> list[RGB]:
    """The RGB colour of every label value 0..max(max value of `names`, count - 1): background
    black, a known structure its name's colour, any other label the palette's next colours."""
    table = label_table(names)
    known = known_names()
    values = range(1, max(max(table, default=0) + 1, count))
    unknown = [v for v in values if table.get(v, "").lower() not in known]
    spare = dict(zip(unknown, counting(max(known.values()) + 1), strict=False))
    colours = palette(max(known.values()) + 1 + len(unknown))
    return [(0, 0, 0)] + [colours[spare[v] if v in spare else known[table[v].lower()]]
                          for v in values]
