"""The data settings: every key checked once on construction, before any file is read; the
settings of each data config; frozen; what the checkpoint records re-validates to the same."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ctseg.data.datamodule import PhantomDataModule, SegmentationDataModule
from ctseg.data.settings import DataSettings, PhantomSourceSettings
from ctseg.errors import ConfigError

# (key, bad value, error, what the message says): one per check of conf/data/totalseg_v1.yaml's
# keys, all met with a root that does not exist (nothing may be read before they pass).
BAD = [
    ("version", "v3", ValueError, "v1, v2"),
    ("cache", "ram", ValueError, "choose one of disk, memory, none"),
    ("cache_rate", 0.0, ValueError, r"cache_rate must be in \(0, 1\]"),
    ("cache_image_dtype", "float64", ConfigError, "data.cache_image_dtype='float64'"),
    ("batch_size", 0, ValueError, "need batch_size >= 1"),
    ("num_workers", -1, ValueError, "num_workers >= 0"),
    ("prepare_workers", 0, ValueError, "prepare_workers >= 1"),
    ("root", [], ValueError, "root must name at least one dataset folder"),
    ("spacing", [1.5, 1.5], ConfigError, r"data\.spacing"),
    ("patch_size", 0, ConfigError, r"data\.patch_size"),
    ("intensity", "ct", ValueError, "segresnet, hu_window"),
    ("hu_window", [100, -100], ValueError, "low < high"),
    ("smooth_sigma", -1.0, ValueError, "smooth_sigma must be >= 0"),
    ("sampler", "uniform", ValueError, "unknown patch sampler 'uniform'"),
    ("val_fraction", 1.0, ValueError, r"val_fraction must be in \[0, 1\)"),
    ("fold", 0, ConfigError, "data.fold=0 needs data.num_folds=K"),
    ("num_folds", 5, ConfigError, "data.fold is not set"),
    ("datasets", [{"name": "b"}], ConfigError, r"data\.datasets\[0\]: root missing"),
    ("extra_classes", ["liver"], ValueError, "liver"),
    ("dataset_weights", {"btcv": 1}, ConfigError, "'btcv' is not a dataset"),
]


@pytest.mark.parametrize(("key", "value", "error", "message"), BAD, ids=[b[0] for b in BAD])
def test_each_bad_key_fails_before_any_file_is_read(tmp_path: Path, key, value, error,
                                                    message) -> None:
    settings = {"root": str(tmp_path / "absent"), key: value}
    with pytest.raises(error, match=message):
        DataSettings(**settings)
    with pytest.raises(error, match=message):  # the DataModule checks through the same class
        SegmentationDataModule(**settings)
    assert not (tmp_path / "absent").exists() and not list(tmp_path.iterdir())


def test_every_key_of_the_data_configs_is_a_setting(compose_cfg) -> None:
    base = {f.name for f in dataclasses.fields(DataSettings) if f.init}
    phantom = base | {f.name for f in dataclasses.fields(PhantomSourceSettings)}
    seen: set[str] = set()
    for data in ("totalseg_v1", "totalseg_v2", "phantoms"):
        for cache in ("disk", "memory", "none"):
            cfg = OmegaConf.to_container(compose_cfg(f"data={data}", f"data/cache={cache}").data,
                                         resolve=False)
            assert cfg.pop("_target_").endswith("PhantomDataModule" if data == "phantoms"
                                                else "SegmentationDataModule")
            assert set(cfg) <= (phantom if data == "phantoms" else base), (data, cache)
            seen |= set(cfg)
    assert seen == phantom  # and each setting is a key of some data config


def test_settings_are_normalised_frozen_and_recorded_as_they_validate(tmp_path: Path) -> None:
    listed = OmegaConf.create({"datasets": [{"name": "btcv", "root": str(tmp_path / "b")}],
                               "spacing": [2, 2, 3], "dataset_weights": {"btcv": 1, "a": 3}})
    settings = DataSettings(root=str(tmp_path / "a"), datasets=listed.datasets,
                            spacing=listed.spacing, dataset_weights=listed.dataset_weights,
                            intensity="hu_window")
    assert settings.datasets == [{"name": "btcv", "root": str(tmp_path / "b"), "layout": None,
                                  "rename": {}, "masks": None, "phantoms": None}]
    assert settings.spacing == [2, 2, 3] and settings.pipeline.spacing == (2.0, 2.0, 3.0)
    assert settings.dataset_weights == {"btcv": 1.0, "a": 3.0}
    assert settings.smooth_sigma == 0.0  # hu_window's default, resolved: predict reads it
    assert settings.roots == [str(tmp_path / "a")] and settings.space.num_classes == 105
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.batch_size = 0  # type: ignore[misc]
    module = SegmentationDataModule(**settings.hparams())
    assert dict(module.hparams) == settings.hparams()
    assert DataSettings(**dict(module.hparams)) == settings


def test_phantom_settings_resolve_the_phantom_config_defaults(tmp_path: Path) -> None:
    # conf/data/phantoms.yaml: 20 phantoms, seed 0, 64 x 64 x 48 voxels of 3 mm
    phantoms = PhantomSourceSettings(root=tmp_path / "phantoms", extra_repeat=2)
    assert (phantoms.n_phantoms, phantoms.phantom_seed, phantoms.phantom_shape,
            phantoms.phantom_spacing) == (20, 0, [64, 64, 48], 3.0)
    assert phantoms.roots == [str(tmp_path / "phantoms")]
    module = PhantomDataModule(root=str(tmp_path / "phantoms"), extra_repeat=2, cache="none")
    assert {k: module.hparams[k] for k in phantoms.hparams()} == phantoms.hparams()
    assert "root" not in module.hparams and module.roots == phantoms.roots
    with pytest.raises(ConfigError, match=r"data\.extra_roots: .*absent is not a folder"):
        PhantomSourceSettings(root=str(tmp_path / "phantoms"), extra_roots=[tmp_path / "absent"])
    with pytest.raises(ValueError, match="extra_repeat must be >= 1, got 0"):
        PhantomDataModule(root=str(tmp_path / "phantoms"), extra_repeat=0)
    assert not list(tmp_path.iterdir())
