"""Every config in conf/ (experiments too) composes, resolves and (where cheap) instantiates."""

from __future__ import annotations

import functools
import inspect
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import REPO
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from ctseg.config import CONFIG_DIR, instantiate_group, plain
from ctseg.errors import ConfigError
from ctseg.training import build_trainer

EXPERIMENTS = CONFIG_DIR / "experiment"
# Groups that train.yaml does not use, and the test that composes them.
COMPOSED_ELSEWHERE = {"parity": "test_export_thresholds_are_the_documented_defaults",
                      "export_settings": "test_export_thresholds_are_the_documented_defaults"}


def _group_options() -> list[str]:
    """`group=option` for every YAML file under conf/ of a group of train.yaml (experiments are
    composed on their own)."""
    overrides = []
    for path in sorted(CONFIG_DIR.rglob("*.yaml")):
        rel = path.relative_to(CONFIG_DIR)
        if rel.parts[0] in ("experiment", *COMPOSED_ELSEWHERE) or len(rel.parts) == 1:
            continue
        overrides.append(f"{rel.parent.as_posix()}={rel.stem}")
    return overrides


GROUP_OPTIONS = _group_options()
EXPERIMENT_NAMES = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))


def test_every_file_is_covered() -> None:
    files = [p for p in CONFIG_DIR.rglob("*.yaml") if "experiment" not in p.relative_to(
        CONFIG_DIR).parts]
    primary = sorted(p.name for p in files if p.parent == CONFIG_DIR)
    # predict.yaml: tests/inference; export.yaml, evaluate.yaml and visualize.yaml: below and in
    # their tests
    assert primary == ["evaluate.yaml", "export.yaml", "interactive.yaml", "predict.yaml",
                       "train.yaml", "visualize.yaml"]
    elsewhere = [p for p in files if p.relative_to(CONFIG_DIR).parts[0] in COMPOSED_ELSEWHERE]
    assert len(GROUP_OPTIONS) + len(primary) + len(elsewhere) == len(files)
    assert all(name in globals() for name in COMPOSED_ELSEWHERE.values())
    assert {"phantom_quick", "wholebody_highres", "wholebody_lowres"} <= set(EXPERIMENT_NAMES)
    assert not [p for p in CONFIG_DIR.rglob("*") if p.is_symlink()]  # checkouts without links


@pytest.mark.parametrize("override", GROUP_OPTIONS)
def test_group_option_composes_and_resolves(compose_cfg, override: str) -> None:
    cfg = compose_cfg(override)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["model"]["num_classes"] in (105, 118)
    assert resolved["data"]["version"] in ("v1", "v2")


# Experiments with a key the command line must give (ctseg.required), set to null here to
# instantiate the rest.
REQUIRED = {"add_class_quick": "model.pretrained"}


@pytest.mark.parametrize("name", EXPERIMENT_NAMES)
def test_experiment_composes_and_instantiates(compose_cfg, name: str) -> None:
    required = (f"{REQUIRED[name]}=null",) if name in REQUIRED else ()
    if required:
        with pytest.raises(InterpolationResolutionError,
                           match=rf"{REQUIRED[name]} is required here: give "):
            OmegaConf.to_container(compose_cfg(f"experiment={name}"), resolve=True)
    cfg = compose_cfg(f"experiment={name}", "trainer=cpu", "trainer.precision=32", *required)
    assert cfg.task_name == name
    OmegaConf.to_container(cfg, resolve=True)
    datamodule = instantiate(cfg.data)
    assert isinstance(datamodule, L.LightningDataModule)
    model = instantiate(cfg.model)
    assert model.hparams.num_classes == datamodule.num_classes
    callbacks = instantiate_group(cfg.callbacks)
    loggers = instantiate_group(cfg.logger)
    trainer = build_trainer(cfg.trainer, model, callbacks, loggers)
    assert isinstance(trainer, L.Trainer)


@pytest.mark.parametrize("trainer", ["ddp", "ddp_cpu"])
def test_the_ddp_wait_limit_reaches_the_strategy(compose_cfg, trainer: str) -> None:
    model = instantiate(compose_cfg().model)
    cpu = ("trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32")
    default = build_trainer(compose_cfg(f"trainer={trainer}", *cpu).trainer, model)
    assert default.strategy._timeout == timedelta(minutes=30)  # Lightning's default_pg_timeout
    built = build_trainer(compose_cfg(f"trainer={trainer}", *cpu,
                                      "trainer.ddp_timeout_min=240").trainer, model)
    assert isinstance(built.strategy, DDPStrategy)
    assert built.strategy._timeout == timedelta(hours=4)
    assert built.strategy._start_method == {"ddp": "popen", "ddp_cpu": "spawn"}[trainer]
    for bad in (0, "4h"):
        with pytest.raises(ConfigError, match=rf"trainer.ddp_timeout_min={bad}: give the "):
            build_trainer(compose_cfg(f"trainer={trainer}", *cpu,
                                      f"trainer.ddp_timeout_min={bad}").trainer, model)


def test_bundle_recipes_match_the_bundle(compose_cfg) -> None:
    for name, spacing in (("wholebody_highres", 1.5), ("wholebody_lowres", 3.0)):
        cfg = compose_cfg(f"experiment={name}")
        assert cfg.data.spacing == spacing
        assert list(cfg.data.patch_size) == [96, 96, 96]
        assert cfg.model.num_classes == 105
        assert (cfg.model.init_filters, cfg.model.dropout_prob) == (32, 0.2)
        assert list(cfg.model.blocks_down) == [1, 2, 2, 4]
        assert list(cfg.model.blocks_up) == [1, 1, 1]
        assert cfg.model.optimizer.lr == 1e-4
        assert cfg.model.sw_overlap == 0.25 and cfg.model.sw_mode == "gaussian"
        assert cfg.callbacks.native_evaluation.tolerance_mm == 3.0


def test_vista3d_recipe_matches_the_bundle(compose_cfg) -> None:
    # models/vista3d configs/train.json (+ train_continual.json) and inference.json
    cfg = compose_cfg("experiment=vista3d_totalseg")
    assert cfg.data.spacing == 1.5 and list(cfg.data.patch_size) == [128, 128, 128]
    assert cfg.data.intensity == "hu_window"
    assert list(cfg.data.hu_window) == [-963.8247715525971, 1053.678477684517]
    assert cfg.data.batch_size == 1 and cfg.trainer.precision == "16-mixed"
    m = cfg.model
    assert (m.encoder_embed_dim, list(m.blocks_down)) == (48, [1, 2, 2, 4, 4])
    assert (m.optimizer.lr, m.optimizer.weight_decay) == (1e-4, 1e-5)
    assert (m.max_point, m.drop_label_prob, m.drop_point_prob) == (5, 0.25, 0.25)
    assert m.scheduler == {"_target_": "ctseg.models.schedules.warmup_cosine", "_partial_": True,
                           "warmup_epochs": 3, "warmup_multiplier": 0.1}
    assert m.max_prompt is None and m.max_backprompt == 1 and m.sw_overlap == 0.625


def test_the_hu_window_is_the_same_in_every_data_config_and_in_code(compose_cfg) -> None:
    from ctseg.data.transforms import HU_WINDOW, PipelineConfig

    for data in ("phantoms", "totalseg_v1", "totalseg_v2"):
        assert tuple(compose_cfg(f"data={data}").data.hu_window) == HU_WINDOW
    assert PipelineConfig().hu_window == HU_WINDOW


def test_the_disk_caches_image_dtype_is_the_codes_default(compose_cfg) -> None:
    from ctseg.data.volume_cache import DEFAULT_IMAGE_DTYPE

    for overrides in (("data=totalseg_v1",), ("data=totalseg_v2",), ("data/cache=disk",)):
        assert compose_cfg(*overrides).data.cache_image_dtype == DEFAULT_IMAGE_DTYPE


def test_v2_data_gives_118_channels(compose_cfg) -> None:
    cfg = compose_cfg("data=totalseg_v2")
    assert cfg.model.num_classes == 118
    assert cfg.model.label_names[117] == "costal_cartilages"


def test_instantiated_defaults(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg("logger=many")
    loggers = instantiate_group(cfg.logger)
    assert [type(lg).__name__ for lg in loggers] == ["CSVLogger", "TensorBoardLogger",
                                                     "WandbLogger"]
    callbacks = instantiate_group(cfg.callbacks)
    best, last = (c for c in callbacks if type(c).__name__ == "ModelCheckpoint")
    assert (best.monitor, best.mode, best.save_top_k) == ("val/mean_dice", "max", 1)
    assert last.monitor is None and last.save_on_exception and last.filename == "last"
    assert Path(best.dirpath) == Path(last.dirpath) == tmp_path / "run" / "checkpoints"
    assert {"EarlyStopping", "LearningRateMonitor", "RichModelSummary", "RichProgressBar",
            "ValidationOverlays"} <= {type(c).__name__ for c in callbacks}


@pytest.mark.parametrize(
    ("override", "error", "message", "cause"),
    [
        ("data=nope", MissingConfigException, "Could not find 'data/nope'", None),
        ("trainer=tpu_pod", MissingConfigException, "Could not find 'trainer/tpu_pod'", None),
        ("seed=abc", ConfigCompositionException, "override seed=abc", "could not be converted"),
        ("train=maybe", ConfigCompositionException, "override train=maybe", "not a valid bool"),
    ],
)
def test_bad_overrides_fail_at_composition(compose_cfg, override: str, error: type,
                                           message: str, cause: str | None) -> None:
    with pytest.raises(error, match=message) as info:
        compose_cfg(override)
    if cause:
        assert cause in str(info.value.__cause__)


def test_export_thresholds_are_the_documented_defaults(compose_cfg) -> None:
    from dataclasses import asdict

    from ctseg.export.formats import DEFAULT_FORMATS, DEFAULT_MAX_BATCH, DEFAULT_OPSET
    from ctseg.export.parity import DEFAULT_THRESHOLDS

    expected = {fmt: asdict(t) for fmt, t in DEFAULT_THRESHOLDS.items()}
    callback = compose_cfg("callbacks=export").callbacks.export
    assert OmegaConf.to_container(callback.parity) == expected
    assert list(callback.formats) == ["torchscript", "onnx"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        exporter = compose("export", overrides=["ckpt=a.ckpt", "output=out"])
    assert OmegaConf.to_container(exporter.parity) == expected
    assert exporter.model.num_classes == 105
    written = (list(DEFAULT_FORMATS), DEFAULT_OPSET, DEFAULT_MAX_BATCH)
    assert (list(exporter.formats), exporter.opset, exporter.max_batch) == written
    assert (list(callback.formats), callback.opset, callback.max_batch) == written


def test_common_trainer_arguments_override_without_plus(compose_cfg) -> None:
    overrides = {"max_steps": 100, "limit_train_batches": 0.25, "limit_val_batches": 2,
                 "limit_test_batches": 1, "val_check_interval": 0.5,
                 "accumulate_grad_batches": 4, "gradient_clip_val": 1.0}
    for trainer in ("cpu", "gpu", "ddp", "ddp_cpu"):
        cfg = compose_cfg(f"trainer={trainer}", *(f"trainer.{k}={v}" for k, v in overrides.items()))
        assert {k: cfg.trainer[k] for k in overrides} == overrides
    cfg = compose_cfg("trainer.max_steps=3", "trainer.accumulate_grad_batches=2",
                      "trainer.gradient_clip_val=0.5")
    trainer = build_trainer(cfg.trainer, instantiate(cfg.model))
    assert (trainer.max_steps, trainer.accumulate_grad_batches, trainer.gradient_clip_val) == (
        3, 2, 0.5)


def test_evaluate_config_composes_with_its_defaults() -> None:

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("evaluate", overrides=["pred=p", "gt=g"])
    assert (cfg.version, cfg.split, cfg.tolerance_mm, cfg.output) == ("v1", None, 3.0,
                                                                       "p/evaluation")


def test_interactive_config_composes_with_its_defaults() -> None:
    from ctseg.evaluate.interactive import interactive_config

    GlobalHydra.instance().clear()
    cfg = interactive_config("ckpt=a.ckpt", "gt=g")
    assert (cfg.clicks, list(cfg.report_at), cfg.next_click, cfg.with_id, cfg.point_window,
            cfg.output, cfg.clicks_from) == (10, [1, 3, 5, 10], "random", False, True,
                                             "interactive_evaluation", None)
    assert list(cfg.structures) == ["liver", "spleen", "kidney_left", "kidney_right", "stomach"]


def test_visualize_config_composes_with_its_defaults() -> None:

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("visualize", overrides=["ct=c.nii.gz", "labels=l.nii.gz", "out=o.png"])
    assert (cfg.version, cfg.window, cfg.alpha, cfg.max_legend) == (None, "abdomen", 0.5, 20)


def test_predict_options_defaults_are_predict_yamls():
    """conf/predict.yaml and PredictOptions (the Python API's defaults) say the same thing, and
    options_from fills a key the config leaves out with that default."""
    from ctseg.inference.pipeline import PredictOptions
    from ctseg.inference.runner import options_from

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("predict", overrides=["ckpt=a.ckpt", "input=ct.nii.gz", "output=out"])
    from_yaml = options_from(cfg)
    defaults = PredictOptions()
    for name in ("roi_size", "overlap", "mode", "padding_mode", "sw_batch_size", "slab_axis",
                 "accum_dtype", "device", "amp", "gpu_preprocessing", "cpu_bf16", "backend",
                 "channels_last", "masks", "series_uid", "dicom_seg"):
        assert getattr(from_yaml, name) == getattr(defaults, name), name
    assert list(from_yaml.probabilities) == list(defaults.probabilities)
    assert options_from({}) == defaults


def test_validation_windows_are_predict_pys(compose_cfg):
    """Validation and test in training slide their windows as predict.py does (conf/sw), in the
    configs and in the modules' Python defaults."""
    from ctseg.inference.pipeline import PredictOptions
    from ctseg.models.segresnet import SegResNetModule
    from ctseg.models.vista3d import VISTA3DModule

    options = PredictOptions()
    expected = (options.sw_batch_size, options.overlap, options.mode)
    for model in ("segresnet", "segresnet_small", "vista3d", "vista3d_small"):
        m = compose_cfg(f"model={model}").model
        assert (m.sw_batch_size, m.sw_overlap, m.sw_mode) == expected, model
    m = compose_cfg("sw.batch_size=4").model
    assert m.sw_batch_size == 4  # one key sets both
    for module in (SegResNetModule, VISTA3DModule):
        defaults = inspect.signature(module).parameters
        assert tuple(defaults[k].default for k in ("sw_batch_size", "sw_overlap", "sw_mode")) \
            == expected, module


def test_an_experiment_folder_outside_the_clone_joins_through_the_search_path(tmp_path):
    (tmp_path / "my_conf" / "experiment").mkdir(parents=True)
    (tmp_path / "my_conf" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: segresnet\nseed: 7\n")
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"),
         f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "experiment=mine", "--cfg", "job"],
        cwd=tmp_path, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    cfg = OmegaConf.create(result.stdout)
    assert cfg.seed == 7 and cfg.model.init_filters == 32  # the recipe and its group choice


def test_plain_turns_configs_partials_paths_and_tuples_into_builtins():
    cfg = OmegaConf.create({"size": [96, 96, 96], "ref": "${size}", "root": "data"})
    value = {"cfg": cfg, "path": Path("a/b.nii.gz"), "spacing": (1.5, 1.5, 1.5),
             "optimizer": functools.partial(torch.optim.AdamW, lr=1e-4), "n": 3, "off": None}
    assert plain(value) == {
        "cfg": {"size": [96, 96, 96], "ref": [96, 96, 96], "root": "data"},
        "path": "a/b.nii.gz", "spacing": [1.5, 1.5, 1.5],
        "optimizer": {"_target_": "torch.optim.adamw.AdamW", "_partial_": True, "lr": 1e-4},
        "n": 3, "off": None}
    with pytest.raises(ValueError, match="keyword arguments only"):
        plain(functools.partial(torch.optim.AdamW, []))
