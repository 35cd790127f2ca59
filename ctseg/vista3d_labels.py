"""The VISTA3D label table: ids and names, everything labels, sub-classes, unsupported ids, the
zero-shot range, the special (point-ambiguous) classes, and TotalSegmentator classes as VISTA3D ids.

Everything comes from `ctseg/resources/vista3d_labels.json` (Project-MONAI model-zoo `vista3d` and
Project-MONAI/VISTA). Two choices are ctseg's:

- **TotalSegmentator -> VISTA3D by structure name.** The resource's `totalseg_v2_to_vista3d` pairs
  index TotalSegmentator v2 classes in VISTA's own dataset order, not TotalSegmentator's official
  v2 order (its index 7 is VISTA's aorta; the official v2 class 7 is pancreas). ctseg maps names
  instead (`kidney_right` -> "right kidney", `urinary_bladder` -> "bladder"); a test checks that
  the 117 v2 names reach exactly the 117 VISTA3D ids of the resource's pairs. Seven v1 classes
  have no VISTA3D id (the heart chambers, myocardium, pulmonary artery, face).
- **Special classes** (point labels 2/3 instead of 0/1): MONAI's prompt sampler and the network use
  (23, 24, 25, 26, 27, 57, 128), its `VistaPreTransformd` (25..29, 117). The label dictionary shows
  which is right: 23..27 and 128 are tumours, lesions and vessels inside an organ (a click there is
  ambiguous), 57 trachea lies inside 132 airway; 28/29 are left lung lobes and 117 a kidney cyst.
  `SPECIAL_WORDS` and `NESTED_IN` derive the first list from the dictionary.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache

from ctseg.labels import BACKGROUND, vista3d_table

# Ids above this one are zero-shot for the point head (the network's `last_supported`).
LAST_SUPPORTED = 132
# Name fragments of structures that lie inside an organ, so a click on them is ambiguous.
SPECIAL_WORDS = ("tumor", "cancer", "lesion", "vessel")
# Structures contained in another label (MONAI merges trachea into airway).
NESTED_IN = {"trachea": "airway"}
# TotalSegmentator names whose VISTA3D name is not the word-order rule's result.
NAME_ALIASES = {"urinary bladder": "bladder"}
SIDES = ("left", "right")


@dataclass(frozen=True)
class Vista3DLabels:
    """VISTA3D's label dictionary and the lists that govern prompts."""

    names: dict[int, str]
    everything: tuple[int, ...]
    subclass: dict[int, tuple[int, ...]]
    unsupported: frozenset[int]
    zero_shot: tuple[int, int]
    special: tuple[int, ...]

    def is_zero_shot(self, label: int) -> bool:
        """Whether `label` is in the zero-shot range (133..254)."""
        return self.zero_shot[0] <= label <= self.zero_shot[1]

    def name(self, label: int) -> str:
        """The name of a VISTA3D id; zero-shot ids are called `zero_shot_<id>`."""
        if label in self.names:
            return self.names[label]
        if self.is_zero_shot(label):
            return f"zero_shot_{label}"
        raise ValueError(f"{label} is not a VISTA3D label id")

    def expand(self, labels: Iterable[int]) -> list[int]:
        """`labels` with every sub-class parent (2 kidney, 20 lung, 21 bone) replaced by its
        sub-classes, in order and without repeats."""
        out: list[int] = []
        for label in labels:
            for item in self.subclass.get(int(label), (int(label),)):
                if item not in out:
                    out.append(item)
        return out


def special_ids(names: dict[int, str]) -> tuple[int, ...]:
    """Ids whose points are ambiguous: names with a `SPECIAL_WORDS` fragment, and structures
    `NESTED_IN` another label of the dictionary."""
    nested = {n for n, outer in NESTED_IN.items() if outer in names.values()}
    return tuple(sorted(i for i, n in names.items()
                        if any(w in n for w in SPECIAL_WORDS) or n in nested))


@cache
def vista3d_labels() -> Vista3DLabels:
    """The VISTA3D label table from ctseg/resources/vista3d_labels.json."""
    table = vista3d_table()
    names = {int(k): v for k, v in table["label_dict"].items()}
    unsupported = frozenset(int(i) for i in table["unsupported_labels"])
    low, high = (int(v) for v in table["zero_shot_label_range"])
    return Vista3DLabels(
        names=names,
        everything=tuple(int(i) for i in table["everything_labels"]),
        subclass={int(k): tuple(int(i) for i in v) for k, v in table["subclass"].items()},
        unsupported=unsupported,
        zero_shot=(low, high),
        special=tuple(i for i in special_ids(names) if i not in unsupported),
    )


def vista3d_name(totalseg_name: str) -> str:
    """The VISTA3D spelling of a TotalSegmentator structure name: words separated by spaces, the
    side first (`rib_left_1` -> "left rib 1", `kidney_right` -> "right kidney")."""
    words = totalseg_name.split("_")
    side = [w for w in words if w.lower() in SIDES]
    name = " ".join(side + [w for w in words if w.lower() not in SIDES])
    return NAME_ALIASES.get(name, name)


def vista3d_ids(label_names: Sequence[str]) -> list[int | None]:
    """VISTA3D id of each class of a TotalSegmentator label list (index 0, the background, is 0);
    None for a structure VISTA3D does not know."""
    by_name = {n.lower(): i for i, n in vista3d_labels().names.items()}
    ids: list[int | None] = []
    for index, name in enumerate(label_names):
        if index == 0 or name == BACKGROUND:
            ids.append(0)
        else:
            ids.append(by_name.get(vista3d_name(name).lower()))
    return ids
