"""Synthetic phantoms: TotalSegmentator layout, grids, HU plausibility, determinism and errors."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctseg.atomic import TEMP_MARK
from ctseg.data.__main__ import build_parser
from ctseg.data.datamodule import PhantomDataModule
from ctseg.data.layout import by_split, read_meta, subject_problems
from ctseg.data.phantoms import (
    PHANTOM_STRUCTURES,
    ensure_phantoms,
    split_assignment,
    write_phantoms,
)
from ctseg.labels import VERSIONS, class_names

SHAPE = (48, 48, 32)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """Five v1 phantoms shared by the read-only tests of this module."""
    root = tmp_path_factory.mktemp("phantoms")
    return root, write_phantoms(root, 5, seed=3, shape=SHAPE)


def _array(path: Path) -> np.ndarray:
    """Voxels of a NIfTI file in their stored dtype."""
    return np.asanyarray(nib.load(path).dataobj)


@pytest.mark.parametrize("version", VERSIONS)
def test_layout_holds_every_mask_of_the_version(tmp_path: Path, version: str) -> None:
    folders = write_phantoms(tmp_path, 2, version=version, shape=(16, 16, 16))
    subjects = read_meta(tmp_path)
    assert [s.folder for s in subjects] == folders
    expected = {f"{name}.nii.gz" for name in class_names(version).values()}
    for subject in subjects:
        assert subject.ct.is_file()
        assert {p.name for p in (subject.folder / "segmentations").iterdir()} == expected
        assert subject_problems(subject, version) == []
    assert set(PHANTOM_STRUCTURES) <= set(class_names(version).values())


def test_meta_csv_columns_and_splits(phantoms: tuple[Path, list[Path]]) -> None:
    root, folders = phantoms
    lines = (root / "meta.csv").read_text().splitlines()
    rows = list(csv.DictReader(lines, delimiter=";"))
    assert lines[0].split(";")[0] == "image_id" and "split" in lines[0].split(";")
    assert [r["image_id"] for r in rows] == [f.name for f in folders] == [
        "s0001", "s0002", "s0003", "s0004", "s0005"]
    groups = by_split(read_meta(root))
    assert {k: len(v) for k, v in groups.items()} == {"train": 3, "val": 1, "test": 1}


@pytest.mark.parametrize(("n", "counts"), [
    (1, (1, 0, 0)), (2, (1, 1, 0)), (3, (1, 1, 1)), (5, (3, 1, 1)), (20, (14, 3, 3)),
    (100, (70, 15, 15)),
])
def test_split_assignment_counts(n: int, counts: tuple[int, int, int]) -> None:
    splits = split_assignment(n, np.random.default_rng(0))
    assert len(splits) == n
    assert tuple(splits.count(s) for s in ("train", "val", "test")) == counts


def test_masks_are_binary_disjoint_and_on_the_ct_grid(phantoms: tuple[Path, list[Path]]) -> None:
    _, folders = phantoms
    for folder in folders[:2]:
        ct = nib.load(folder / "ct.nii.gz")
        assert ct.shape == SHAPE and ct.get_data_dtype() == np.int16
        total = np.zeros(SHAPE, np.int32)
        for name in class_names("v1").values():
            mask = nib.load(folder / "segmentations" / f"{name}.nii.gz")
            data = np.asanyarray(mask.dataobj)
            assert mask.get_data_dtype() == np.uint8
            assert mask.shape == ct.shape and np.array_equal(mask.affine, ct.affine)
            assert set(np.unique(data)) <= {0, 1}
            if name not in PHANTOM_STRUCTURES:
                assert not data.any(), name
            total += data
        assert total.max() == 1
        for name in ("liver", "aorta", "lung_lower_lobe_left", "vertebrae_L1"):
            assert _array(folder / "segmentations" / f"{name}.nii.gz").sum() > 20, name


def test_hounsfield_units_are_plausible(phantoms: tuple[Path, list[Path]]) -> None:
    _, folders = phantoms
    for folder in folders:
        hu = _array(folder / "ct.nii.gz").astype(np.float64)

        def mean_in(name: str, hu: np.ndarray = hu, folder: Path = folder) -> float:
            return float(hu[_array(folder / "segmentations" / f"{name}.nii.gz") > 0].mean())

        assert 0 < mean_in("liver") < 120
        assert mean_in("lung_lower_lobe_left") < -500
        assert mean_in("lung_lower_lobe_right") < -500
        assert min(mean_in(f"vertebrae_{v}") for v in ("T12", "L1", "L2")) > 200
        assert mean_in("aorta") > mean_in("liver")
        assert hu[0, 0, :].mean() < -900
        assert hu.min() >= -1024 and hu.max() <= 3071


def test_orientation_and_spacing_vary(phantoms: tuple[Path, list[Path]]) -> None:
    _, folders = phantoms
    images = [nib.load(f / "ct.nii.gz") for f in folders]
    codes = {nib.aff2axcodes(img.affine) for img in images}
    assert len(codes) > 1 and codes != {("R", "A", "S")}
    zooms = [img.header.get_zooms() for img in images]
    assert len(set(zooms)) == len(zooms)
    assert any(z[0] != z[2] for z in zooms)
    assert all(2.0 < v < 4.5 for z in zooms for v in z)


def test_same_seed_same_files_other_seed_other_volumes(tmp_path: Path) -> None:
    first = write_phantoms(tmp_path / "a", 2, seed=7, shape=SHAPE)
    second = write_phantoms(tmp_path / "b", 2, seed=7, shape=SHAPE)
    other = write_phantoms(tmp_path / "c", 2, seed=8, shape=SHAPE)
    for a, b, c in zip(first, second, other, strict=True):
        for rel in ["ct.nii.gz", *(f"segmentations/{n}.nii.gz" for n in PHANTOM_STRUCTURES)]:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
        assert np.array_equal(nib.load(a / "ct.nii.gz").affine, nib.load(b / "ct.nii.gz").affine)
        assert not np.array_equal(_array(a / "ct.nii.gz"), _array(c / "ct.nii.gz"))
    assert (tmp_path / "a/meta.csv").read_text() == (tmp_path / "b/meta.csv").read_text()


def test_rewrite_replaces_meta_and_subject_does_not_depend_on_n(tmp_path: Path) -> None:
    write_phantoms(tmp_path / "big", 3, seed=1, shape=(16, 16, 16))
    folders = write_phantoms(tmp_path / "big", 1, seed=1, shape=(16, 16, 16), progress=True)
    assert [s.image_id for s in read_meta(tmp_path / "big")] == ["s0001"]
    assert read_meta(tmp_path / "big")[0].split == "train"
    alone = write_phantoms(tmp_path / "one", 1, seed=1, shape=(16, 16, 16))
    assert np.array_equal(_array(folders[0] / "ct.nii.gz"), _array(alone[0] / "ct.nii.gz"))
    assert not list(tmp_path.rglob(f"*{TEMP_MARK}*"))


def test_refuses_to_overwrite_a_real_dataset(mini_copy: Path, tree_digest) -> None:
    before = tree_digest(mini_copy)
    with pytest.raises(ValueError, match=r"meta\.csv.*not written by write_phantoms"):
        write_phantoms(mini_copy, 1, shape=(16, 16, 16))
    assert tree_digest(mini_copy) == before


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n": 0}, "number of phantoms"),
    ({"n": 2.5}, "number of phantoms"),
    ({"shape": (48, 48)}, "shape must be 3 integers"),
    ({"shape": (48, 48, 8)}, "shape must be 3 integers"),
    ({"shape": (48.0, 48, 32)}, "shape must be 3 integers"),
    ({"spacing": 0}, "spacing must be a number > 0"),
    ({"spacing": -1.5}, "spacing must be a number > 0"),
    ({"version": "v3"}, "unknown TotalSegmentator version 'v3'"),
])
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"n": 1, "shape": (16, 16, 16), **kwargs}
    with pytest.raises(ValueError, match=message):
        write_phantoms(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


# Settings of a small phantom folder, and changes of each one that changes its files.
SMALL = {"layout": "totalseg", "version": "v1", "n": 2, "seed": 0, "shape": (16, 16, 16)}
CHANGES = ({"seed": 1}, {"n": 3}, {"shape": (16, 16, 24)}, {"version": "v2"}, {"spacing": 2.0},
           {"layout": "nnunet", "structures": ["liver"]}, {"structures": ["spleen"]})


def test_a_phantom_folder_is_kept_for_its_settings_and_rewritten_for_others(
        tmp_path: Path, tree_digest) -> None:
    root, settings = tmp_path / "root", dict(SMALL)
    assert ensure_phantoms(root, **settings)
    digest = tree_digest(root)
    assert not ensure_phantoms(root, **settings)
    assert tree_digest(root) == digest, "phantoms of the same settings must not be rewritten"
    for change in CHANGES:
        settings.update(change)
        assert ensure_phantoms(root, **settings), f"{change}: the old phantoms were kept"
        assert not ensure_phantoms(root, **settings), change
        if change == {"seed": 1}:  # the files are those of the new settings
            write_phantoms(tmp_path / "reference", **settings)
            files = [p.relative_to(tmp_path / "reference")
                     for p in (tmp_path / "reference").rglob("*") if p.is_file()]
            assert len(files) > settings["n"]
            for rel in files:
                assert (root / rel).read_bytes() == (tmp_path / "reference" / rel).read_bytes()


def test_every_phantom_default_is_the_data_configs(compose_cfg, tmp_path: Path) -> None:
    data = compose_cfg().data
    expected = (data.n_phantoms, data.phantom_seed, list(data.phantom_shape))
    cli = build_parser().parse_args(["phantoms", str(tmp_path / "cli")])
    assert (cli.n, cli.seed, list(cli.shape)) == expected
    module = PhantomDataModule(root=str(tmp_path / "module")).hparams
    assert (module.n_phantoms, module.phantom_seed, module.phantom_shape) == expected
    assert cli.spacing == module.phantom_spacing == data.phantom_spacing
    from ctseg.data.phantoms import phantom_record  # what write_phantoms writes by default

    assert phantom_record() == {"n": data.n_phantoms, "seed": data.phantom_seed, "version": "v1",
                                "shape": list(data.phantom_shape),
                                "spacing": data.phantom_spacing, "layout": "totalseg",
                                "structures": None}
