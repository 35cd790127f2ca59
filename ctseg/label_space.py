"""One label space for several datasets: a TotalSegmentator version's classes plus extra classes,
and the mapping of each dataset's own label names onto it by structure name.

Names are compared by a key that ignores case, separators (`_`, `-`, spaces), text in brackets and
the place of the side (`Right Kidney`, `kidney-right` and `kidney_right` are one structure); where
public datasets spell a structure differently, `ALIASES` (docs/dataset.md) names the
TotalSegmentator class; a dataset's `rename` maps any other name explicitly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

from ctseg.errors import ConfigError
from ctseg.labels import BACKGROUND, check_version, label_names

SIDES = ("left", "right")
# Spellings of public datasets (BTCV, AMOS, FLARE, MSD, WORD, VISTA3D) -> TotalSegmentator class.
ALIASES = {
    "bladder": "urinary_bladder",
    "gall_bladder": "gallbladder",
    "postcava": "inferior_vena_cava",
    "ivc": "inferior_vena_cava",
    "oesophagus": "esophagus",
    "portal_vein_splenic_vein": "portal_vein_and_splenic_vein",
    "portal_and_splenic_vein": "portal_vein_and_splenic_vein",
    "small_intestine": "small_bowel",
    "intestine": "small_bowel",
    "large_bowel": "colon",
    "left_adrenal": "adrenal_gland_left",
    "right_adrenal": "adrenal_gland_right",
    "left_upper_lobe": "lung_upper_lobe_left",
    "left_lower_lobe": "lung_lower_lobe_left",
    "right_upper_lobe": "lung_upper_lobe_right",
    "right_middle_lobe": "lung_middle_lobe_right",
    "right_lower_lobe": "lung_lower_lobe_right",
    "left_femoral_head": "femur_left",
    "right_femoral_head": "femur_right",
}


def name_key(name: str) -> str:
    """The comparison key of a structure name: lower case, bracketed text dropped, words joined
    by `_`, a side word (left/right) first."""
    words = re.findall(r"[a-z0-9]+", re.sub(r"\([^)]*\)", " ", name.lower()))
    side = [w for w in words if w in SIDES]
    return "_".join(side + [w for w in words if w not in SIDES])


@dataclass(frozen=True)
class LabelSpace:
    """Background, the classes of TotalSegmentator `version` in their official order, then
    `extra` classes in the order given: the output channels of a model trained on it."""

    version: str = "v1"
    extra: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Check the version, and that no extra class repeats a class of the space."""
        check_version(self.version)
        seen = {name_key(n) for n in label_names(self.version)}
        for name in self.extra:
            if name_key(name) in seen or name_key(name) in ALIASES:
                raise ConfigError(f"data.extra_classes: {name!r} is already a class of "
                                  f"TotalSegmentator {self.version} (or listed twice); remove it")
            seen.add(name_key(name))

    @classmethod
    def of(cls, version: str, extra_classes: Sequence[str] | None = ()) -> LabelSpace:
        """The space of config values: `extra_classes` any sequence of names (or None)."""
        return cls(version, tuple(str(c) for c in extra_classes or ()))

    @cached_property
    def names(self) -> list[str]:
        """Class names in channel order, background first."""
        return [*label_names(self.version), *self.extra]

    @property
    def num_classes(self) -> int:
        """Output channels, background included."""
        return len(self.names)

    @cached_property
    def _by_key(self) -> dict[str, int]:
        """Channel of each name key, aliases included."""
        by_key = {name_key(n): i for i, n in enumerate(self.names)}
        by_key.update((alias, by_key[name_key(target)]) for alias, target in ALIASES.items()
                      if name_key(target) in by_key)
        return by_key

    def index(self, name: str, dataset: str, rename: Mapping[str, str] | None = None) -> int:
        """The channel of a dataset's label `name` (after the dataset's `rename`); ConfigError
        naming the dataset and the label when the space has no such structure."""
        target = (rename or {}).get(name, name)
        channel = self._by_key.get(name_key(target))
        if channel is None:
            raise ConfigError(
                f"data.datasets.{dataset}: label {name!r} is not a TotalSegmentator "
                f"{self.version} class, an alias of one (docs/dataset.md) or in "
                f"data.extra_classes; map it with data.datasets.{dataset}.rename="
                f"{{{name}: <class>}} or add it to data.extra_classes")
        return channel

    def mapping(self, labels: Mapping[str, int], dataset: str,
                rename: Mapping[str, str] | None = None) -> dict[int, int]:
        """Label value in the dataset's files -> channel, for every label but background; two
        labels of one dataset on one channel are merged (e.g. a tumour renamed to its organ)."""
        unknown = sorted(set(rename or {}) - set(labels))
        if unknown:
            raise ConfigError(f"data.datasets.{dataset}.rename: {unknown[0]!r} is not a label of "
                              f"the dataset (its labels: {', '.join(labels)})")
        return {int(value): self.index(name, dataset, rename) for name, value in labels.items()
                if name_key(name) != BACKGROUND}

    def annotated(self, channels: Sequence[int]) -> list[bool]:
        """Per channel, whether it is among `channels`; background always is."""
        wanted = {0, *channels}
        return [c in wanted for c in range(self.num_classes)]


def annotated_channels(flags: Sequence[bool]) -> list[int]:
    """The channels a sample's annotated flags (`LabelSpace.annotated`'s form) mark."""
    return [c for c, on in enumerate(flags) if on]
