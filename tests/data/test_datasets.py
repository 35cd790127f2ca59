"""Several datasets in one DataModule: a TotalSegmentator download and an nnU-Net dataset that
annotates some classes, their labels on one label space and the annotated flags in the batches."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from helpers import REPO
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning import Trainer
from omegaconf import OmegaConf

from ctseg.config import CONFIG_DIR, register_resolvers
from ctseg.data.datamodule import PhantomDataModule, SegmentationDataModule
from ctseg.data.phantoms import write_phantoms
from ctseg.data.transforms import ANNOTATED, DATASET, LABEL
from ctseg.errors import ConfigError
from ctseg.labels import label_names
from ctseg.models.segresnet import SegResNetModule

V1 = label_names("v1")
HALF = ("liver", "spleen", "kidney_right", "aorta")
FAST = {"spacing": 6.0, "patch_size": 16, "num_workers": 0, "prepare_workers": 1,
        "batch_size": 8}


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Six phantoms as a download, five others (another seed) as an nnU-Net dataset of HALF."""
    root = tmp_path_factory.mktemp("datasets")
    write_phantoms(root / "download", 6, seed=1, shape=(32, 32, 24))
    write_phantoms(root / "half", 5, seed=2, shape=(32, 32, 24), layout="nnunet",
                   structures=HALF)
    return root / "download", root / "half"


def module(roots: tuple[Path, Path], tmp_path: Path, cache: str, **kwargs
           ) -> SegmentationDataModule:
    """The download plus the nnU-Net dataset, named `half`."""
    return SegmentationDataModule(
        root=str(roots[0]), datasets=[{"name": "half", "root": str(roots[1])}], cache=cache,
        prepared_dir=str(tmp_path / "prepared"), cache_dir=str(tmp_path / "tensors"),
        **{**FAST, **kwargs})


@pytest.mark.parametrize("cache", ["disk", "memory"])
def test_mixed_layouts_train_with_the_classes_each_sample_annotates(roots, tmp_path, cache):
    dm = module(roots, tmp_path, cache)
    dm.prepare_data()
    dm.setup("fit")
    by_dataset = {name: [r for r in dm.records["train"] if r[DATASET] == name]
                  for name in ("download", "half")}
    assert len(by_dataset["download"]) == 4 and len(by_dataset["half"]) == 3
    assert [r[DATASET] for r in dm.records["val"]].count("half") == 1  # its own val subject
    half = [V1.index(n) for n in HALF]
    for record in dm.records["train"]:
        expected = (torch.ones(len(V1), dtype=torch.bool) if record[DATASET] == "download"
                    else torch.tensor([c in (0, *half) for c in range(len(V1))]))
        assert torch.equal(record[ANNOTATED], expected)
        present = set(np.unique(np.asarray(nib.load(record[LABEL]).dataobj)).tolist())
        if record[DATASET] == "half":
            assert present <= {0, *half} and len(present) > 2
    batch = next(iter(dm.train_dataloader()))
    assert batch[ANNOTATED].shape == (batch["image"].shape[0], len(V1))
    assert batch[ANNOTATED].dtype == torch.bool
    rows = {tuple(row.tolist()) for row in batch[ANNOTATED]}
    assert rows <= {tuple([True] * len(V1)), tuple(c in (0, *half) for c in range(len(V1)))}
    for row, label in zip(batch[ANNOTATED], batch[LABEL], strict=True):
        assert row[label.unique().long()].all()  # a sample's labels are classes it annotates


def test_fully_labelled_datasets_add_no_flags_and_extra_classes_extend_the_space(roots, tmp_path):
    def datamodule(*extra_classes: str) -> SegmentationDataModule:
        dm = SegmentationDataModule(
            root=str(roots[0]), datasets=[{"name": "again", "root": str(roots[0]),
                                           "layout": "totalseg"}],
            cache="none", prepared_dir=str(tmp_path / "p"), cache_dir=str(tmp_path / "t"),
            **FAST, extra_classes=list(extra_classes))
        dm.setup("fit")
        return dm

    dm = datamodule()
    assert not any(ANNOTATED in r for r in dm.records["train"])
    assert dm.hparams.datasets == [{"name": "again", "root": str(roots[0]),
                                    "layout": "totalseg", "rename": {}, "masks": None,
                                    "phantoms": None}]
    # A TotalSegmentator download annotates its version's classes, not those added to it.
    dm = datamodule("liver_tumour")
    assert dm.num_classes == len(V1) + 1 and dm.label_names[-1] == "liver_tumour"
    assert all(r[ANNOTATED].tolist() == [True] * len(V1) + [False]
               for r in dm.records["train"])


def test_dataset_weights_set_each_datasets_share_of_the_draws(roots, tmp_path):
    dm = module(roots, tmp_path, "none", dataset_weights={"download": 3, "half": 1})
    dm.setup("fit")
    names = [r[DATASET] for r in dm.records["train"]]
    assert names.count("download") != 3 * names.count("half")  # not the sizes' ratio already
    sampler = dm.train_dataloader().sampler
    draws = []
    for epoch in range(200):
        sampler.set_epoch(epoch)
        draws += [names[i] for i in sampler]
    assert len(draws) == 200 * len(names)
    assert draws.count("half") / len(draws) == pytest.approx(0.25, abs=0.02)
    sampler.set_epoch(3)
    again = module(roots, tmp_path, "none", dataset_weights={"download": 3, "half": 1})
    again.setup("fit")
    repeat = again.train_dataloader().sampler
    repeat.set_epoch(3)
    assert list(sampler) == list(repeat)  # seeded: the same draws in the same epoch


@pytest.mark.parametrize(("weights", "message"), [
    ({"donwload": 1}, r"data\.dataset_weights: 'donwload' is not a dataset \(the datasets: "
                      r"download, half\)"),
    ({"download": -1, "half": 1}, r"data\.dataset_weights: weights must be >= 0"),
    ({"download": "many"}, r"data\.dataset_weights: weights must be numbers"),
])
def test_bad_dataset_weights_are_one_error(roots, tmp_path, weights, message):
    with pytest.raises(ConfigError, match=message):
        module(roots, tmp_path, "none", dataset_weights=weights)


@pytest.mark.parametrize(("entry", "message"), [
    ({"root": "/x"}, r"data\.datasets\[0\]: name missing"),
    ({"name": "a", "root": "/x", "labels": {}}, r"data\.datasets\[0\]: unknown key 'labels'"),
    ({"name": "download", "root": "/x"}, r"name 'download' is taken"),
    ({"name": "a", "root": "/x", "layout": "msd"}, r"data\.datasets\.a\.layout=msd: choose one"),
])
def test_a_bad_dataset_entry_is_one_error_naming_it(roots, entry, message):
    with pytest.raises(ConfigError, match=message):
        SegmentationDataModule(root=str(roots[0]), datasets=[entry], **FAST)


def test_the_model_gets_the_extra_classes_from_the_config():
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name="train", overrides=["data.extra_classes=[liver_tumour]"])
    assert cfg.model.num_classes == len(V1) + 1
    assert list(cfg.model.label_names)[-1] == "liver_tumour"


class Oracle(SegResNetModule):
    """A SegResNet whose 'prediction' is a fixed label map, to check what the scoring counts."""

    answer: torch.Tensor

    def predict_labels(self, image: torch.Tensor) -> torch.Tensor:
        """The fixed answer."""
        return self.answer


def test_a_class_the_dataset_does_not_annotate_is_not_scored():
    model = Oracle(num_classes=4, init_filters=8, roi_size=(8, 8, 8))
    label = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    label[..., :2] = 1
    model.answer = label[0, 0].clone()
    model.answer[..., 3] = 2  # class 2 predicted where the ground truth has background
    batch = {"image": torch.zeros(1, 1, 4, 4, 4), "label": label}
    model._evaluate({**batch, ANNOTATED: torch.tensor([[True, True, False, True]])}, "val")
    assert model.val_dice.compute()[1] == 1 and model.val_dice.pred_count[2] == 0
    model.val_dice.reset()
    model._evaluate(batch, "val")  # fully labelled: class 2 is a false positive
    assert model.val_dice.pred_count[2] == 16


def test_validation_reports_each_dataset(roots, tmp_path):
    dm = module(roots, tmp_path, "memory")
    model = SegResNetModule(num_classes=len(V1), label_names=V1, init_filters=8,
                            roi_size=(16, 16, 16), sw_batch_size=1)
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
    assert {"val/download/mean_dice", "val/half/mean_dice", "val/mean_dice"} <= set(metrics)
    assert all(0 <= metrics[k] <= 1 for k in metrics if k.endswith("mean_dice"))


def test_a_download_with_some_masks_annotates_those(roots, tmp_path):
    shutil.copytree(roots[0], tmp_path / "organs")
    for mask in (tmp_path / "organs").glob("s*/segmentations/*.nii.gz"):
        if mask.name.split(".")[0] not in HALF:
            mask.unlink()  # a download that holds only the HALF masks
    dm = SegmentationDataModule(
        root=str(roots[0]), datasets=[{"name": "organs", "root": str(tmp_path / "organs"),
                                       "masks": list(HALF)}],
        cache="none", prepared_dir=str(tmp_path / "p"), cache_dir=str(tmp_path / "t"), **FAST)
    dm.setup("fit")
    half = [V1.index(n) for n in HALF]
    organs = [r for r in dm.records["train"] + dm.records["val"] if r[DATASET] == "organs"]
    assert organs and all(torch.equal(r[ANNOTATED], torch.tensor(
        [c in (0, *half) for c in range(len(V1))])) for r in organs)
    full = {r["subject"]: r for r in dm.records["train"] + dm.records["val"]
            if r[DATASET] == "download"}
    for record in organs:
        ours = np.asarray(nib.load(record[LABEL]).dataobj)
        theirs = np.asarray(nib.load(full[record["subject"]][LABEL]).dataobj) \
            if record["subject"] in full else None
        assert set(np.unique(ours).tolist()) <= {0, *half}
        if theirs is not None:
            assert np.array_equal(ours, np.where(np.isin(theirs, half), theirs, 0))
    with pytest.raises(ConfigError, match="masks: livr is not a TotalSegmentator v1 structure"):
        SegmentationDataModule(
            root=str(roots[0]), datasets=[{"name": "organs", "root": str(tmp_path / "organs"),
                                           "masks": ["livr"]}], cache="none",
            prepared_dir=str(tmp_path / "p"), cache_dir=str(tmp_path / "t"), **FAST).setup("fit")


def test_the_documented_two_dataset_config_trains_as_written(roots, tmp_path):
    text = (REPO / "docs" / "training.md").read_text()
    block = re.search(r"```yaml\n(# conf/experiment/my_partial\.yaml.*?)```", text, re.S)[1]
    assert len(block.strip().splitlines()) < 20
    doc = yaml.safe_load(block)
    organs, ours = doc["data"]["datasets"]
    organs["root"], ours["root"] = str(tmp_path / "organs"), str(tmp_path / "ours")
    shutil.copytree(roots[0], organs["root"])
    write_phantoms(ours["root"], 4, seed=5, shape=(32, 32, 24), layout="nnunet",
                   structures=["aorta"])
    description = json.loads((tmp_path / "ours" / "dataset.json").read_text())
    description["labels"] = {"background": 0, "tumor": 1}
    (tmp_path / "ours" / "dataset.json").write_text(json.dumps(description))
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name="train", overrides=["data=totalseg_v1"])
    here = {"root": str(roots[0]), "prepared_dir": str(tmp_path / "p"), "cache": "none",
            "cache_dir": str(tmp_path / "t"), "spacing": 6.0, "patch_size": [16, 16, 16],
            "num_workers": 0, "prepare_workers": 1}
    cfg = OmegaConf.merge(cfg, {"model": doc["model"], "data": {**doc["data"], **here}})
    assert cfg.model.num_classes == len(V1) + 1 and cfg.model.loss == "marginal"
    dm = instantiate(cfg.data)
    dm.setup("fit")
    assert dm.dataset_names == [roots[0].name, "organs", "ours"]
    tumour = [r for r in dm.records["train"] if r[DATASET] == "ours"]
    assert tumour and all(torch.equal(torch.nonzero(r[ANNOTATED]).flatten(),
                                      torch.tensor([0, len(V1)])) for r in tumour)


def test_phantom_datasets_of_both_layouts_are_written_on_first_use(tmp_path):
    organs = ["liver", "spleen"]
    dm = PhantomDataModule(
        root=str(tmp_path / "phantoms"), n_phantoms=6, phantom_shape=(24, 24, 16), masks=organs,
        extra_roots=[], extra_repeat=5,
        datasets=[{"name": "spine", "root": str(tmp_path / "spine"), "layout": "nnunet",
                   "phantoms": {"n": 5, "seed": 1, "shape": [24, 24, 16],
                                "structures": ["vertebrae_L1", "aorta"]}}],
        cache="none", prepared_dir=str(tmp_path / "p"), cache_dir=str(tmp_path / "t"), **FAST)
    dm.prepare_data()
    assert json.loads((tmp_path / "spine" / "dataset.json").read_text())["labels"] == {
        "background": 0, "vertebrae_L1": 1, "aorta": 2}
    stamp = (tmp_path / "spine" / "dataset.json").stat().st_mtime_ns
    dm.setup("fit")
    flags = {r[DATASET]: torch.nonzero(r[ANNOTATED]).flatten().tolist()
             for r in dm.records["train"]}
    assert flags == {"phantoms": [0, *sorted(V1.index(n) for n in organs)],
                     "spine": [0, *sorted(V1.index(n) for n in ("vertebrae_L1", "aorta"))]}
    spine = [r for r in dm.records["train"] if r[DATASET] == "spine"]
    assert len(spine) == len({r["subject"] for r in spine})  # extra_repeat: extra roots only
    dm.prepare_data()  # the same phantoms are not written again
    assert (tmp_path / "spine" / "dataset.json").stat().st_mtime_ns == stamp


def test_a_lesion_phantom_set_labels_a_tumour_inside_each_liver(tmp_path):
    write_phantoms(tmp_path / "tumour", 4, seed=5, shape=(32, 32, 24), layout="nnunet",
                   structures=["liver_tumour"])
    write_phantoms(tmp_path / "plain", 4, seed=5, shape=(32, 32, 24))
    assert json.loads((tmp_path / "tumour" / "dataset.json").read_text())["labels"] == {
        "background": 0, "liver_tumour": 1}
    labels = sorted((tmp_path / "tumour").glob("labels*/*.nii.gz"), key=lambda p: p.name)
    livers = sorted((tmp_path / "plain").glob("s*/segmentations/liver.nii.gz"))
    assert len(labels) == len(livers) == 4
    for label, liver in zip(labels, livers, strict=True):
        tumour = np.asanyarray(nib.load(label).dataobj) == 1
        assert 20 < tumour.sum() < np.asanyarray(nib.load(liver).dataobj).sum()
        # the anatomy is drawn as without the lesion: the tumour lies in the liver
        assert not (tumour & (np.asanyarray(nib.load(liver).dataobj) == 0)).any()
    # A phantom root written with other structures is written again.
    dm = PhantomDataModule(
        root=str(tmp_path / "phantoms"), n_phantoms=4, phantom_shape=(32, 32, 24),
        extra_roots=[], datasets=[{"name": "tumour", "root": str(tmp_path / "tumour"),
                                   "layout": "nnunet",
                                   "phantoms": {"n": 4, "seed": 5, "shape": [32, 32, 24],
                                                "structures": ["liver"]}}],
        cache="none", prepared_dir=str(tmp_path / "p"), cache_dir=str(tmp_path / "t"), **FAST)
    dm.prepare_data()
    assert json.loads((tmp_path / "tumour" / "dataset.json").read_text())["labels"] == {
        "background": 0, "liver": 1}
