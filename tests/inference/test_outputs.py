"""Case folders appear whole (`swapped_folder`); colour tables and label JSON list every
class."""

from __future__ import annotations

import json
import os
import stat

import pytest

from ctseg.atomic import swapped_folder, write_atomic
from ctseg.colours import label_colours
from ctseg.inference.outputs import itksnap_table, label_json, slicer_table
from ctseg.labels import label_map_dtype, label_names


def test_failed_write_leaves_no_folder_and_no_temp(tmp_path) -> None:
    target = tmp_path / "case"
    with pytest.raises(RuntimeError, match="disk full"), \
            swapped_folder(target, replace=False) as tmp:
        (tmp / "labels.nii.gz").write_bytes(b"partial")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_and_refuses_without_it(tmp_path) -> None:
    target = tmp_path / "case"
    with swapped_folder(target, replace=False) as tmp:
        (tmp / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite=true"), \
            swapped_folder(target, replace=False):
        pass
    with swapped_folder(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case"]


def test_atomic_outputs_get_the_permissions_of_a_plain_write(tmp_path) -> None:
    umask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.json", lambda tmp: tmp.write_text("{}"))
        with swapped_folder(tmp_path / "case", replace=False) as tmp:
            (tmp / "labels.txt").write_text("1")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644  # not mkstemp's 0600
    assert stat.S_IMODE((tmp_path / "case").stat().st_mode) == 0o755  # not mkdtemp's 0700


def test_tables_cover_every_class_with_distinct_colours() -> None:
    names = label_names("v2")
    colours = label_colours(names)
    assert colours[0] == (0, 0, 0) and len(set(colours)) == len(names)
    assert json.loads(label_json(names))["117"] == "costal_cartilages"
    slicer = [line.split() for line in slicer_table(names).splitlines() if line[0] != "#"]
    assert [int(row[0]) for row in slicer] == list(range(len(names)))
    assert slicer[117][1] == "costal_cartilages" and slicer[117][2:5] == list(
        map(str, colours[117]))
    snap = [line for line in itksnap_table(names).splitlines() if line[0] != "#"]
    assert snap[0].split()[:5] == ["0", "0", "0", "0", "0"]
    assert snap[117].split()[:4] == ["117", *map(str, colours[117])]
    assert snap[117].endswith('"costal_cartilages"')
    assert label_map_dtype(118).__name__ == "uint8" and label_map_dtype(300).__name__ == "uint16"
