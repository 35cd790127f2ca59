"""Label merging of the downloaded layout: expected labels, caching, locking and bad input."""

from __future__ import annotations

import gzip
import shutil
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctseg.atomic import TEMP_MARK
from ctseg.data.layout import DatasetError, read_meta
from ctseg.data.merge import default_prepared_dir, merge_subject, prepare
from ctseg.labels import class_names

V1 = class_names("v1")
V2 = class_names("v2")


def _label(dataset, image_id: str = "s0001") -> nib.Nifti1Image:
    """The merged label image of one subject."""
    record = next(r for r in dataset.records if r["image_id"] == image_id)
    return nib.load(record["label"])


def test_v1_merge_gives_expected_labels(shared_data: Path, tmp_path: Path) -> None:
    dataset = prepare(shared_data, out=tmp_path / "prep", version="v1")
    img = _label(dataset)
    ct = nib.load(shared_data / "s0001" / "ct.nii.gz")
    label = np.asanyarray(img.dataobj)
    assert img.get_data_dtype() == np.uint8
    assert label.shape == ct.shape == (122, 101, 30)
    np.testing.assert_array_equal(img.affine, ct.affine)
    assert img.header.get_zooms() == ct.header.get_zooms()
    masks = {i: np.asanyarray(nib.load(shared_data / "s0001" / "segmentations" /
                                       f"{n}.nii.gz").dataobj) > 0 for i, n in V1.items()}
    present = {i for i, m in masks.items() if m.any()}
    assert set(np.unique(label)) - {0} == present
    assert len(present) == 40
    # every voxel of a mask carries that class or a later (higher-index) one; outside all: 0
    for index, mask in masks.items():
        assert (label[mask] >= index).all()
    assert (label[~np.any(list(masks.values()), axis=0)] == 0).all()
    liver = next(i for i, n in V1.items() if n == "liver")
    assert (label == liver).sum() == masks[liver].sum()
    assert dataset.split_counts() == {"train": 0, "val": 0, "test": 1}
    assert dataset.voxel_totals()[liver] == masks[liver].sum()


def test_overlap_later_class_wins(mini_copy: Path, tmp_path: Path) -> None:
    seg = mini_copy / "s0001" / "segmentations"
    ref = nib.load(seg / "spleen.nii.gz")
    box = np.zeros(ref.shape, np.uint8)
    box[10:20, 10:20, 5:10] = 1
    for name in ("spleen", "liver"):  # spleen = 1, liver = 5 in v1
        nib.save(nib.Nifti1Image(box, ref.affine, ref.header), seg / f"{name}.nii.gz")
    label = np.asanyarray(_label(prepare(mini_copy, out=tmp_path / "p")).dataobj)
    assert (label[10:20, 10:20, 5:10] == 5).all()


def test_v2_masks_merge_back_to_totalsegmentator_label(shared_data: Path, tmp_path: Path) -> None:
    source = nib.load(shared_data / "s0001" / "label_totalseg_v2.nii.gz")
    reference = np.asanyarray(source.dataobj)
    root = tmp_path / "v2"
    seg = root / "s0001" / "segmentations"
    seg.mkdir(parents=True)
    shutil.copy(shared_data / "s0001" / "ct.nii.gz", root / "s0001" / "ct.nii.gz")
    (root / "meta.csv").write_text("image_id;split\ns0001;train\n")
    for index, name in V2.items():
        mask = (reference == index).astype(np.uint8)
        nib.save(nib.Nifti1Image(mask, source.affine, source.header), seg / f"{name}.nii.gz")
    img = _label(prepare(root, out=tmp_path / "prep", version="v2"))
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), reference)
    np.testing.assert_allclose(img.affine, source.affine, atol=1e-6)
    assert len(np.unique(reference)) == 42  # background + 41 structures


def test_second_run_is_a_no_op_and_changes_redo(mini_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "prep"
    first = prepare(mini_copy, out=out)
    label_path = Path(first.records[0]["label"])
    stamp = label_path.stat().st_mtime_ns
    manifest = (out / "v1" / "manifest.json").stat().st_mtime_ns
    prepare(mini_copy, out=out)
    assert label_path.stat().st_mtime_ns == stamp
    assert (out / "v1" / "manifest.json").stat().st_mtime_ns == manifest
    mask_path = mini_copy / "s0001" / "segmentations" / "spleen.nii.gz"
    mask = nib.load(mask_path)
    nib.save(nib.Nifti1Image(np.zeros(mask.shape, np.uint8), mask.affine, mask.header), mask_path)
    third = prepare(mini_copy, out=out)
    assert label_path.stat().st_mtime_ns != stamp
    assert third.voxel_totals()[1] == 0 and first.voxel_totals()[1] > 0


def test_versions_are_kept_apart(mini_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"thyroid_gland\.nii\.gz: mask of thyroid_gland"):
        prepare(mini_copy, out=tmp_path / "prep", version="v2")
    v1 = prepare(mini_copy, out=tmp_path / "prep", version="v1")
    v1_path = Path(v1.records[0]["label"])
    stamp = v1_path.stat().st_mtime_ns
    seg = mini_copy / "s0001" / "segmentations"
    ref = nib.load(seg / "spleen.nii.gz")
    for name in set(V2.values()) - set(V1.values()):
        nib.save(nib.Nifti1Image(np.zeros(ref.shape, np.uint8), ref.affine, ref.header),
                 seg / f"{name}.nii.gz")
    v2_path = Path(prepare(mini_copy, out=tmp_path / "prep", version="v2").records[0]["label"])
    assert (v1_path.parent.name, v2_path.parent.name) == ("v1", "v2")
    assert v1_path.stat().st_mtime_ns == stamp
    v1_label, v2_label = (np.asanyarray(nib.load(p).dataobj) for p in (v1_path, v2_path))
    assert v1_label.shape == v2_label.shape and (v1_label != v2_label).any()


def test_raw_dataset_is_byte_identical(mini_copy: Path, tmp_path: Path, tree_digest) -> None:
    before = tree_digest(mini_copy)
    prepare(mini_copy, out=tmp_path / "prep", workers=2)
    assert tree_digest(mini_copy) == before


def test_prepared_folder_inside_the_raw_dataset_is_refused(mini_copy: Path) -> None:
    with pytest.raises(DatasetError, match="must lie outside the raw dataset"):
        prepare(mini_copy, out=mini_copy / "prepared")


def test_default_prepared_dir_follows_ctseg_cache(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CTSEG_CACHE", str(tmp_path / "c"))
    first, second = default_prepared_dir(tmp_path / "a" / "ds"), default_prepared_dir(
        tmp_path / "b" / "ds")
    assert first.parent == tmp_path / "c" / "prepared"
    assert first.name.startswith("ds-") and first != second


def _corrupt(path: Path) -> None:
    path.write_bytes(b"this is not a nifti file")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _shift_affine(path: Path) -> None:
    img = nib.load(path)
    affine = img.affine.copy()
    affine[0, 3] += 5
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), affine, img.header), path)


def _crop(path: Path) -> None:
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[:-1], img.affine, img.header), path)


def _non_binary(path: Path) -> None:
    img = nib.load(path)
    data = np.asanyarray(img.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, img.affine, img.header), path)


def _zero_voxel_size(path: Path) -> None:
    img = nib.load(path)
    header = img.header.copy()
    header["srow_z"] = [0, 0, 0, header["srow_z"][3]]  # a broken sform: no extent along z
    header.set_qform(None, code=0)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), None, header), path)


def _four_d(path: Path) -> None:
    img = nib.load(path)
    data = np.stack([np.asanyarray(img.dataobj)] * 2, axis=-1)
    nib.save(nib.Nifti1Image(data, img.affine), path)


@pytest.mark.parametrize(
    ("target", "damage", "message"),
    [
        ("ct.nii.gz", Path.unlink, "ct.nii.gz: file not found"),
        ("ct.nii.gz", _corrupt, "ct.nii.gz: corrupt or truncated NIfTI"),
        ("ct.nii.gz", _truncate, "ct.nii.gz: corrupt or truncated NIfTI"),
        ("ct.nii.gz", _four_d, r"ct.nii.gz: expected a 3-D volume, found shape \(122, 101, 30, 2"),
        ("ct.nii.gz", _zero_voxel_size, r"ct.nii.gz: invalid voxel-to-world affine \(voxel sizes "
                                        r"\[3.0, 3.0, 0.0\] mm\)"),
        ("segmentations/liver.nii.gz", Path.unlink, "liver.nii.gz: mask of liver missing"),
        ("segmentations/liver.nii.gz", _corrupt, "liver.nii.gz: corrupt or truncated"),
        ("segmentations/liver.nii.gz", _truncate, "liver.nii.gz: corrupt or truncated"),
        ("segmentations/liver.nii.gz", _crop, r"liver.nii.gz: mask shape \(121, 101, 30\) differs"),
        ("segmentations/liver.nii.gz", _shift_affine, "liver.nii.gz: mask affine differs"),
        ("segmentations/liver.nii.gz", _non_binary, "liver.nii.gz: mask is not binary; values "
                                                    "found: 0, 1, 7"),
    ],
)
def test_bad_files_name_the_file_and_write_nothing(mini_copy: Path, tmp_path: Path, target: str,
                                                   damage, message: str) -> None:
    damage(mini_copy / "s0001" / target)
    out = tmp_path / "prep"
    with pytest.raises(DatasetError, match=message) as info:
        prepare(mini_copy, out=out)
    assert info.value.path == mini_copy.resolve() / "s0001" / target
    assert not list((out / "v1").glob("*.nii.gz")) and not list((out / "v1").glob(f"*{TEMP_MARK}*"))
    assert not (out / "v1" / "manifest.json").exists()


def test_truncated_gzip_stream_is_reported(mini_copy: Path, tmp_path: Path) -> None:
    path = mini_copy / "s0001" / "segmentations" / "spleen.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw)[:-20])
    with pytest.raises(DatasetError, match=r"spleen\.nii\.gz: corrupt or truncated"):
        prepare(mini_copy, out=tmp_path / "prep")


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        (None, "meta.csv not found"),
        ("", "meta.csv is empty"),
        ("image_id;gender\ns0001;f\n", "lacks column.s. split"),
        ("name;split\ns0001;train\n", "lacks column.s. image_id"),
        ("image_id;split\ns0001;training\n", "line 2: split 'training' of s0001 is not one of"),
        ("image_id;split\ns0001;train\ns0001;test\n", "line 3: image_id s0001 appears twice"),
        ("image_id;split\n", "meta.csv lists no subjects"),
    ],
)
def test_bad_meta_csv(mini_copy: Path, meta: str | None, message: str) -> None:
    path = mini_copy / "meta.csv"
    if meta is None:
        path.unlink()
    else:
        path.write_text(meta)
    with pytest.raises(DatasetError, match=message) as info:
        read_meta(mini_copy)
    assert info.value.path == path


def test_comma_separated_meta_is_accepted(mini_copy: Path) -> None:
    (mini_copy / "meta.csv").write_text("image_id,split,age\ns0001,val,60\n")
    assert [(s.image_id, s.split) for s in read_meta(mini_copy)] == [("s0001", "val")]


def test_unknown_version(mini_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown TotalSegmentator version 'v3'; choose one of"):
        prepare(mini_copy, out=tmp_path / "prep", version="v3")


def _synthetic_subject(root: Path, shape: tuple[int, int, int],
                       masks: dict[str, tuple[np.ndarray, type]]) -> None:
    """One subject `s0001` under `root`: a CT of `shape` and the masks given (name -> voxels,
    stored dtype), in Fortran order as nibabel reads them."""
    seg = root / "s0001" / "segmentations"
    seg.mkdir(parents=True)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    ct = np.zeros(shape, np.int16, order="F")
    nib.save(nib.Nifti1Image(ct, affine), root / "s0001" / "ct.nii.gz")
    for name, (voxels, dtype) in masks.items():
        nib.save(nib.Nifti1Image(voxels.astype(dtype), affine), seg / f"{name}.nii.gz")
    (root / "meta.csv").write_text("image_id;split\ns0001;train\n")


def test_masks_of_any_stored_type_merge_as_combine_masks(tmp_path: Path) -> None:
    shape = (20, 16, 12)
    rng = np.random.default_rng(0)
    drawn = {name: rng.random(shape) < 0.3 for name in ("spleen", "liver", "aorta", "brain")}
    stored = dict(zip(drawn, (np.uint8, np.int16, np.float32, np.float64), strict=True))
    _synthetic_subject(tmp_path / "raw", shape,
                       {name: (voxels, stored[name]) for name, voxels in drawn.items()})
    dataset = prepare(tmp_path / "raw", out=tmp_path / "prep", version="v2", masks=list(drawn))
    # TotalSegmentator's combine_masks: in class order, each mask's voxels > 0.5 set to its index
    reference = np.zeros(shape, np.uint8)
    for index, name in sorted(V2.items()):
        if name in drawn:
            reference[drawn[name] > 0.5] = index
    np.testing.assert_array_equal(np.asanyarray(_label(dataset).dataobj), reference)
    assert dataset.records[0]["voxels"] == np.bincount(reference.ravel(), minlength=118).tolist()


def test_merging_holds_at_most_a_few_bytes_per_voxel(tmp_path: Path) -> None:
    shape = (128, 128, 160)
    liver = np.zeros(shape, bool)
    liver[30:90, 20:100, 40:120] = True
    _synthetic_subject(tmp_path / "raw", shape, {"liver": (liver, np.uint8),
                                                 "spleen": (np.zeros(shape, bool), np.uint8)})
    subject = read_meta(tmp_path / "raw")[0]
    tracemalloc.start()
    try:
        voxels = merge_subject(subject, "v2", tmp_path / "label.nii.gz", masks=["liver", "spleen"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert voxels[next(i for i, n in V2.items() if n == "liver")] == liver.sum()
    # the CT (2 bytes per voxel), the label map (1) and one mask (1) at a time, plus the gzip
    # reader's copies of the file being read (~7 at its peak, reading the CT); a whole-volume
    # np.bincount alone widens the label map to 8 bytes per voxel
    assert peak / liver.size < 9
