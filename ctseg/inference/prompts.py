"""VISTA3D prompts of predict.py (`prompt.labels`, `prompt.points`, `prompt.point_labels`,
`prompt.point_window`, and the values that restore the vista3d bundle's behaviour where ctseg
differs: `prompt.bundle_grid`, `prompt.outside_value`, `prompt.special_ids`), checked before any
case is read so that a bad prompt costs nothing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ctseg.errors import ConfigError
from ctseg.vista3d_labels import LAST_SUPPORTED, vista3d_labels

# The value and name of a structure clicked without a label id (the bundle writes 1 as well).
CLICKED = 1
CLICKED_NAME = "clicked structure"
# Name of `prompt.outside_value` (voxels no click window reached; the bundle writes 255 there).
OUTSIDE_NAME = "not computed"
# The vista3d bundle's special ids (VistaPreTransformd's `special_index`).
BUNDLE_SPECIAL_IDS = (25, 26, 27, 28, 29, 117)


@dataclass(frozen=True)
class Prompt:
    """What to segment: class ids, clicks (input-file voxel coordinates) or neither; and how:
    windows centred on the clicks or the grid (`bundle_grid`: as the bundle computes that grid),
    the value where no window reached, the ids whose clicks are labelled 2/3 (None: ctseg's)."""

    labels: tuple[int, ...] = ()
    points: tuple[tuple[float, float, float], ...] = ()
    point_labels: tuple[int, ...] = ()
    point_window: bool = True
    bundle_grid: bool = False
    outside_value: int = 0
    special_ids: tuple[int, ...] | None = None

    @property
    def has_points(self) -> bool:
        """Whether the prompt has clicks."""
        return bool(self.points)

    @property
    def label(self) -> int | None:
        """The one label id that goes with clicks, if any."""
        return self.labels[0] if self.has_points and self.labels else None


def _ints(value: Any, what: str) -> tuple[int, ...]:
    """A list of integers from the config, or ConfigError naming `what`."""
    if value is None:
        return ()
    items = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    try:
        numbers = [float(v) for v in items]
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{what} must be a list of integers, got {value!r}") from err
    if any(n != int(n) for n in numbers):
        raise ConfigError(f"{what} must be a list of integers, got {value!r}")
    return tuple(int(n) for n in numbers)


def _check_labels(labels: tuple[int, ...], with_points: bool) -> None:
    """Refuse ids VISTA3D cannot segment in this prompt."""
    table = vista3d_labels()
    for label in labels:
        if label in table.unsupported:
            raise ConfigError(f"prompt.labels: {label} ({table.names.get(label, '?')}) is not "
                              "supported by VISTA3D (unsupported ids: "
                              f"{sorted(table.unsupported)})")
        if not (1 <= label <= LAST_SUPPORTED or table.is_zero_shot(label)):
            low, high = table.zero_shot
            raise ConfigError(f"prompt.labels: {label} is not a VISTA3D id (1..{LAST_SUPPORTED}, "
                              f"or {low}..{high} zero-shot with points; 0 is the background)")
        if table.is_zero_shot(label) and not with_points:
            raise ConfigError(f"prompt.labels: {label} is a zero-shot id; it needs clicks "
                              "(prompt.points and prompt.point_labels)")
    if with_points:
        if len(labels) > 1:
            raise ConfigError(f"prompt.labels: clicks go with at most one label id, got "
                              f"{list(labels)}; segment several structures without points")
        parents = [label for label in labels if label in table.subclass]
        if parents:
            subs = table.subclass[parents[0]]
            raise ConfigError(f"prompt.labels: {parents[0]} ({table.names[parents[0]]}) groups "
                              f"sub-classes ({', '.join(map(str, subs[:5]))}...); clicks need "
                              "one of them")


def parse_prompt(spec: Mapping[str, Any] | None) -> Prompt:
    """The `prompt` config section as a checked Prompt (ConfigError naming the problem)."""
    spec = dict(spec or {})
    labels = _ints(spec.get("labels"), "prompt.labels")
    raw_points = spec.get("points") or []
    point_labels = _ints(spec.get("point_labels"), "prompt.point_labels")
    points = []
    for point in raw_points:
        if not isinstance(point, Sequence) or isinstance(point, str) or len(point) != 3:
            raise ConfigError(f"prompt.points: each click is [x, y, z] (voxel indices of the "
                              f"input file), got {point!r}")
        try:
            points.append(tuple(float(c) for c in point))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"prompt.points: {point!r} is not three numbers") from err
    if len(points) != len(point_labels):
        raise ConfigError(f"prompt.points has {len(points)} clicks but prompt.point_labels "
                          f"{len(point_labels)} labels; give one label (1 positive, 0 negative) "
                          "per click")
    if any(label not in (0, 1) for label in point_labels):
        raise ConfigError(f"prompt.point_labels must be 1 (positive) or 0 (negative), got "
                          f"{list(point_labels)}")
    if points and 1 not in point_labels:
        raise ConfigError("prompt.point_labels: at least one click must be positive (1)")
    _check_labels(labels, with_points=bool(points))
    outside = _ints(spec.get("outside_value", 0), "prompt.outside_value")
    last_id = vista3d_labels().zero_shot[1]
    if len(outside) != 1 or not (outside[0] == 0 or outside[0] > last_id):
        raise ConfigError(f"prompt.outside_value must be 0 (background) or above the VISTA3D ids "
                          f"(> {last_id}; the bundle writes 255), got "
                          f"{spec.get('outside_value')!r}")
    special = spec.get("special_ids")
    return Prompt(labels=labels, points=tuple(points), point_labels=point_labels,  # type: ignore[arg-type]
                  point_window=bool(spec.get("point_window", True)),
                  bundle_grid=bool(spec.get("bundle_grid", False)), outside_value=outside[0],
                  special_ids=None if special is None else _ints(special, "prompt.special_ids"))


def check_points_inside(prompt: Prompt, shape: Sequence[int], source: object) -> None:
    """ConfigError when a click lies outside an input of `shape` (voxels)."""
    for point in prompt.points:
        if any(not 0 <= c <= s - 1 for c, s in zip(point, shape, strict=True)):
            raise ConfigError(f"{source}: click {list(point)} lies outside the image of "
                              f"{list(shape)} voxels (coordinates are voxel indices 0..size-1 of "
                              "the input file)")


def prompt_ids(prompt: Prompt, known: Sequence[int]) -> list[int]:
    """The class ids the automatic mode segments: the prompt's labels with sub-classes expanded,
    or `known` (everything the model was trained on) when the prompt has none."""
    return vista3d_labels().expand(prompt.labels) if prompt.labels else list(known)


def output_names(ids: Sequence[int], clicked: bool = False) -> dict[int, str]:
    """`{0: "background", id: VISTA3D name, ...}` for the written label map; `clicked` names the
    structure of clicks without a label id (value `CLICKED`)."""
    table = vista3d_labels()
    if clicked:
        return {0: table.names[0], CLICKED: CLICKED_NAME}
    return {0: table.names[0], **{label: table.name(label) for label in ids}}
