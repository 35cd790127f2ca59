"""Bring your own dataset: nnU-Net raw / Decathlon folders read, their label names mapped onto
the TotalSegmentator classes (aliases, renames, extra classes) and their label maps rewritten."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctseg.data.__main__ import main
from ctseg.data.layout import detect_layout
from ctseg.data.merge import prepare
from ctseg.data.nnunet import prepare_nnunet, read_cases, read_dataset_json
from ctseg.data.phantoms import PHANTOM_STRUCTURES, write_phantoms
from ctseg.errors import ConfigError, DatasetError
from ctseg.label_space import LabelSpace, name_key
from ctseg.labels import label_names

V1 = label_names("v1")
# Label names as public datasets spell them (BTCV, AMOS, FLARE22) -> TotalSegmentator v1 class.
PUBLIC = {
    "Right Kidney": "kidney_right", "left kidney": "kidney_left", "Gall Bladder": "gallbladder",
    "postcava": "inferior_vena_cava", "Inferior Vena Cava (IVC)": "inferior_vena_cava",
    "Right Adrenal Gland (RAG)": "adrenal_gland_right", "bladder": "urinary_bladder",
    "portal vein and splenic vein": "portal_vein_and_splenic_vein", "Liver": "liver",
    "esophagus": "esophagus", "left upper lobe": "lung_upper_lobe_left",
}
HALF = ("liver", "spleen", "kidney_right", "aorta")


def test_names_are_compared_by_structure_not_spelling():
    assert name_key("Right Kidney") == name_key("kidney_right") == name_key("kidney-right")
    assert name_key("Inferior Vena Cava (IVC)") == "inferior_vena_cava"
    space = LabelSpace("v1")
    for public, ours in PUBLIC.items():
        assert space.names[space.index(public, "btcv")] == ours, public


def test_an_unknown_label_is_one_error_naming_the_dataset_and_the_label():
    with pytest.raises(ConfigError, match=r"data\.datasets\.amos: label 'uterus' is not a "
                                          r"TotalSegmentator v1 class.*rename=\{uterus: <class>\}"):
        LabelSpace("v1").mapping({"background": 0, "liver": 1, "uterus": 2}, "amos")


def test_rename_and_extra_classes_extend_the_space():
    space = LabelSpace("v1", extra=("liver_tumour",))
    assert space.num_classes == len(V1) + 1 and space.names[-1] == "liver_tumour"
    mapping = space.mapping({"background": 0, "liver": 1, "cancer": 2, "Tumour of liver": 3},
                            "msd", rename={"cancer": "liver", "Tumour of liver": "liver tumour"})
    assert mapping == {1: V1.index("liver"), 2: V1.index("liver"), 3: len(V1)}
    assert space.annotated(mapping.values()) == [i in (0, V1.index("liver"), len(V1))
                                                 for i in range(len(V1) + 1)]
    with pytest.raises(ConfigError, match=r"data\.extra_classes: 'Bladder' is already a class"):
        LabelSpace("v1", extra=("Bladder",))
    with pytest.raises(ConfigError, match=r"rename: 'tumor' is not a label of the dataset"):
        space.mapping({"liver": 1}, "msd", rename={"tumor": "liver"})


def write_json(root: Path, data: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(data))


def test_dataset_json_of_nnunet_v2_and_of_the_decathlon(tmp_path: Path):
    write_json(tmp_path / "v2", {"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                 "labels": {"background": 0, "liver": 1, "spleen": 2}})
    write_json(tmp_path / "msd", {"modality": {"0": "CT"}, "labels": {"0": "background",
                                                                      "1": "liver", "2": "cancer"}})
    assert read_dataset_json(tmp_path / "v2").labels == {"background": 0, "liver": 1, "spleen": 2}
    assert read_dataset_json(tmp_path / "msd").labels == {"background": 0, "liver": 1,
                                                          "cancer": 2}
    write_json(tmp_path / "regions", {"labels": {"background": 0, "kidney": [1, 2]}})
    with pytest.raises(DatasetError, match="label 'kidney' is a region"):
        read_dataset_json(tmp_path / "regions")
    write_json(tmp_path / "mri", {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"a": 1}})
    with pytest.raises(DatasetError, match=r"lists 2 input channels .*one CT channel"):
        read_dataset_json(tmp_path / "mri")
    with pytest.raises(DatasetError, match=r"dataset\.json not found"):
        read_dataset_json(tmp_path)


@pytest.fixture(scope="module")
def both_layouts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same five phantoms as a TotalSegmentator download and as an nnU-Net dataset
    labelling `HALF`."""
    root = tmp_path_factory.mktemp("layouts")
    write_phantoms(root / "totalseg", 5, seed=4, shape=(32, 32, 24))
    write_phantoms(root / "nnunet", 5, seed=4, shape=(32, 32, 24), layout="nnunet",
                   structures=HALF)
    return root / "totalseg", root / "nnunet"


def test_layout_is_recognised_by_its_files(both_layouts, tmp_path: Path):
    assert [detect_layout(r) for r in both_layouts] == ["totalseg", "nnunet"]
    with pytest.raises(DatasetError, match=r"neither dataset\.json nor meta\.csv"):
        detect_layout(tmp_path)


def test_remapped_labels_equal_the_downloads_merged_labels_on_the_annotated_classes(
        both_layouts, tmp_path: Path):
    totalseg, nnunet = both_layouts
    merged = {r["image_id"]: r for r in prepare(totalseg, out=tmp_path / "a").records}
    dataset = prepare_nnunet(nnunet, LabelSpace("v1"), "half", out=tmp_path / "b")
    annotated = [V1.index(name) for name in HALF]
    assert len(dataset.records) == 5 and {r["split"] for r in dataset.records} >= {"train",
                                                                                   "test"}
    for record in dataset.records:
        assert record["annotated"] == [c in (0, *annotated) for c in range(len(V1))]
        full = np.asarray(nib.load(merged[f"s{record['image_id'][-4:]}"]["label"]).dataobj)
        ours = np.asarray(nib.load(record["label"]).dataobj)
        assert np.array_equal(ours, np.where(np.isin(full, annotated), full, 0))
        assert record["voxels"] == np.bincount(ours.ravel(), minlength=len(V1)).tolist()
    stamps = [os.stat(r["label"]).st_mtime_ns for r in dataset.records]
    again = prepare_nnunet(nnunet, LabelSpace("v1"), "half", out=tmp_path / "b")
    assert [os.stat(r["label"]).st_mtime_ns for r in again.records] == stamps  # nothing redone
    assert set(PHANTOM_STRUCTURES) >= set(HALF)


def copy_dataset(source: Path, target: Path) -> Path:
    """A writable copy of an nnU-Net folder."""
    for path in source.rglob("*"):
        if path.is_file():
            (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            (target / path.relative_to(source)).write_bytes(path.read_bytes())
    return target


def test_bad_cases_are_named(both_layouts, tmp_path: Path):
    root = copy_dataset(both_layouts[1], tmp_path / "copy")
    first = read_cases(read_dataset_json(root))[0]
    label = nib.load(first.label)
    data = np.asarray(label.dataobj).copy()
    data[0, 0, 0] = 9
    nib.save(nib.Nifti1Image(data, label.affine), first.label)
    with pytest.raises(DatasetError, match=rf"{first.label}: label value 9 is not in "
                                           r"dataset.json's labels"):
        prepare_nnunet(root, LabelSpace("v1"), "half", out=tmp_path / "p")
    first.image.unlink()
    with pytest.raises(DatasetError, match=rf"{first.label}: no CT for this label map"):
        read_cases(read_dataset_json(root))


def test_check_and_phantoms_commands_on_the_nnunet_layout(both_layouts, tmp_path: Path, capsys):
    assert main(["phantoms", str(tmp_path / "nn"), "--n", "3", "--shape", "24", "24", "16",
                 "--layout", "nnunet", "--structures", "liver", "aorta"]) == 0
    assert json.loads((tmp_path / "nn" / "dataset.json").read_text())["labels"] == {
        "background": 0, "liver": 1, "aorta": 2}
    assert main(["check", str(tmp_path / "nn")]) == 0
    assert "3 subject(s) in" in capsys.readouterr().out
    root = copy_dataset(both_layouts[1], tmp_path / "copy")
    description = json.loads((root / "dataset.json").read_text())
    description["labels"]["uterus"] = 9
    (root / "dataset.json").write_text(json.dumps(description))
    next((root / "labelsTr").iterdir()).write_bytes(b"garbage")
    assert main(["check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "label 'uterus' is not a TotalSegmentator v1 class" in out
    assert "corrupt or truncated NIfTI file" in out and "2 problem(s) in 5 subject(s)" in out
