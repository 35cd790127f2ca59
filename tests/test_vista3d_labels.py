"""The VISTA3D label table: special classes, sub-classes, and TotalSegmentator names as ids."""

from __future__ import annotations

import pytest
from monai.apps.vista3d.sampler import SPECIAL_INDEX
from monai.networks.nets.vista3d import VISTA3D

from ctseg.labels import label_names, vista3d_table
from ctseg.vista3d_labels import special_ids, vista3d_ids, vista3d_labels, vista3d_name


def test_special_classes_derived_from_the_dictionary_are_the_ones_the_network_was_trained_with():
    table = vista3d_labels()
    assert table.special == tuple(SPECIAL_INDEX)
    default = VISTA3D.convert_point_label.__defaults__[-1]
    assert table.special == tuple(default)
    # MONAI's VistaPreTransformd list names lung lobes and a kidney cyst, not ambiguous structures.
    assert {table.names[i] for i in (28, 29, 117)} == {"left lung upper lobe",
                                                       "left lung lower lobe", "right kidney cyst"}
    assert special_ids({1: "liver", 2: "liver tumor", 3: "trachea"}) == (2,)


def test_everything_labels_are_117_supported_ids_without_subclass_parents():
    table = vista3d_labels()
    assert len(table.everything) == 117
    assert not set(table.everything) & (table.unsupported | set(table.subclass))
    assert table.unsupported == {16, 18, 129, 130, 131}
    assert table.zero_shot == (133, 254)


def test_subclass_expansion():
    table = vista3d_labels()
    assert table.expand([2]) == [14, 5]
    assert table.expand([1, 20, 1]) == [1, 28, 29, 30, 31, 32]
    bones = table.expand([21])
    assert len(bones) == 62 and 33 in bones and 122 in bones and 21 not in bones


@pytest.mark.parametrize(("totalseg", "vista"), [
    ("kidney_right", "right kidney"), ("rib_left_1", "left rib 1"),
    ("lung_upper_lobe_left", "left lung upper lobe"), ("vertebrae_L5", "vertebrae L5"),
    ("urinary_bladder", "bladder"), ("portal_vein_and_splenic_vein",
                                     "portal vein and splenic vein"),
])
def test_totalsegmentator_names_in_vista3d_spelling(totalseg: str, vista: str):
    assert vista3d_name(totalseg) == vista


def test_v2_classes_reach_exactly_the_resource_ids_by_name():
    ids = vista3d_ids(label_names("v2"))
    assert ids[0] == 0 and None not in ids
    resource = {v for _, v in vista3d_table()["totalseg_v2_to_vista3d"]}
    assert set(ids[1:]) == resource and len(ids[1:]) == 117
    names = vista3d_labels().names
    assert names[ids[label_names("v2").index("pancreas")]] == "pancreas"
    assert names[ids[label_names("v2").index("kidney_left")]] == "left kidney"


def test_v1_classes_without_a_vista3d_id():
    names = label_names("v1")
    missing = [n for n, i in zip(names, vista3d_ids(names), strict=True) if i is None]
    assert missing == ["heart_myocardium", "heart_atrium_left", "heart_ventricle_left",
                       "heart_atrium_right", "heart_ventricle_right", "pulmonary_artery", "face"]
