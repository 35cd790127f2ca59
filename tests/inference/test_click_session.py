"""ClickSession on the shared crop with a small random VISTA3D: every click's labels equal a fresh
predict run of the clicks so far, the encoder runs once per new window (a forward hook on the real
encoder), the cache holds the windows touched only, a float16 cache agrees, and the click session
of docs/vista3d.md runs as printed."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import REPO, save_checkpoint
from omegaconf import OmegaConf

from ctseg.errors import ConfigError
from ctseg.inference.click_session import ClickSession, WindowCache
from ctseg.inference.runner import run
from ctseg.labels import label_names
from ctseg.models.loaded_model import LoadedModel
from ctseg.models.loading import load_model
from ctseg.models.vista3d import VISTA3DModule

# vista3d_quick's grid and window: the crop is 61 x 50 x 15 voxels at 6 mm (padded to 24 in z),
# six windows of the sliding-window grid.
PIPELINE = {"version": "v1", "spacing": 6.0, "intensity": "hu_window", "smooth_sigma": 0.0,
            "patch_size": [32, 32, 24]}
LIVER_CLICK, NEAR, AWAY, OUTSIDE_LIVER = [91, 51, 20], [85, 55, 18], [30, 80, 5], [70, 40, 20]
# A liver click the random network's output holds at its rounded model-grid voxel (with and
# without point windows).
HELD_CLICK = [90, 50, 18]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight VISTA3D checkpoint (8 channels, 3 levels) for 32 x 32 x 24 windows."""
    torch.manual_seed(0)
    module = VISTA3DModule(105, label_names("v1"), encoder_embed_dim=8, blocks_down=(1, 1, 1),
                           roi_size=PIPELINE["patch_size"]).eval()
    path = tmp_path_factory.mktemp("click_session") / "vista3d.ckpt"
    save_checkpoint(module, path, PIPELINE)
    return path


@pytest.fixture
def model(ckpt: Path) -> LoadedModel:
    """The checkpoint loaded (a fresh network per test, so hooks stay in their test)."""
    return load_model(ckpt, {}, {})


class EncoderCalls:
    """A forward hook counting the real image encoder's runs."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        self.count = 0
        self.handle = encoder.register_forward_hook(self.hook)

    def hook(self, *args: object) -> None:
        self.count += 1


@pytest.fixture
def encoder_calls(model: LoadedModel) -> Iterator[EncoderCalls]:
    """Counts the runs of `model`'s image encoder."""
    calls = EncoderCalls(model.net.image_encoder)
    yield calls
    calls.handle.remove()


def _windows_run(session: ClickSession) -> list[tuple[int, ...]]:
    """Records the start of every window the session's network runs (cached or not)."""
    starts: list[tuple[int, ...]] = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        starts.append(tuple(int(s.start) for s in kwargs["patch_coords"][0][2:]))

    session.net.register_forward_pre_hook(record, with_kwargs=True)
    return starts


def _predict(ckpt: Path, image: Path, out: Path, point_window: bool, label: int | None,
             points: list, point_labels: list) -> np.ndarray:
    """A fresh predict.py run's labels for these clicks."""
    cfg = OmegaConf.create({
        "ckpt": str(ckpt), "input": str(image), "output": str(out), "device": "cpu",
        "progress": False, "masks": False, "overwrite": True,
        "prompt": {"labels": None if label is None else [label], "points": points,
                   "point_labels": point_labels, "point_window": point_window},
    })
    assert run(cfg) == 0
    return np.asarray(nib.load(out / "ct" / "labels.nii.gz").dataobj)


@pytest.mark.parametrize("label", [None, 1, 140])  # clicks alone, with liver, with a zero-shot id
@pytest.mark.parametrize("point_window", [True, False])
def test_each_click_equals_a_fresh_predict_run_of_the_clicks_so_far(
        ckpt, model, shared_ct, tmp_path, point_window, label):
    points, point_labels, results = [], [], []
    with ClickSession.open(model, shared_ct, point_window=point_window) as session:
        for click, positive in ((HELD_CLICK, 1), (OUTSIDE_LIVER, 0)):
            labels = session.click([click], [positive], label=label)
            points.append(click)
            point_labels.append(positive)
            fresh = _predict(ckpt, shared_ct, tmp_path, point_window, label, points, point_labels)
            assert labels.shape == nib.load(shared_ct).shape
            assert np.array_equal(labels, fresh), f"agreement {(labels == fresh).mean():.5f}"
            results.append(labels)
        assert 0 < (results[0] > 0).mean() < 1  # the positive click found something
        assert session.points == tuple(tuple(float(c) for c in p) for p in points)


def test_the_encoder_runs_once_per_new_window(model, shared_ct, encoder_calls):
    with ClickSession.open(model, shared_ct, point_window=False) as session:
        windows = _windows_run(session)
        session.click([LIVER_CLICK])
        first = set(windows)
        assert encoder_calls.count == len(first) == session.cached_windows > 1
        size = session.cache_bytes
        windows.clear()
        session.click([NEAR])  # in the same windows: the heads only
        assert set(windows) == first and encoder_calls.count == len(first)
        assert session.cache_bytes == size and session.cached_windows == len(first)
        windows.clear()
        session.click([AWAY])  # one more window: encoded once, the others not run again
        new = set(windows) - first
        assert len(new) == 1 and encoder_calls.count == len(first) + 1
        assert session.cached_windows == len(first) + 1 and session.cache_bytes > size
        assert session.encoder_runs == encoder_calls.count


def test_point_windows_encode_only_the_new_click_window(model, shared_ct, encoder_calls):
    with ClickSession.open(model, shared_ct, point_window=True) as session:
        for k, click in enumerate((LIVER_CLICK, AWAY, NEAR), start=1):
            session.click([click])
            assert encoder_calls.count == session.cached_windows == k


def test_cache_holds_features_an_eighth_of_the_encoder_output(model, shared_ct):
    with ClickSession.open(model, shared_ct, point_window=True) as session:
        session.click([LIVER_CLICK])
        (entry,) = session.cache.entries.values()
        shape, dtype = entry.source
        assert dtype == entry.features.dtype == torch.float32
        assert entry.features.numel() * 8 == torch.Size(shape).numel()
        window = torch.Size(PIPELINE["patch_size"]).numel() * 4  # the window's float32 output
        assert session.cache_bytes == entry.features.numel() * 4 + window


def test_class_logits_are_reused_and_the_class_head_not_rerun(model, shared_ct):
    calls = []
    model.net.class_head.register_forward_hook(lambda *args: calls.append(1))
    with ClickSession.open(model, shared_ct, point_window=False) as session:
        session.click([LIVER_CLICK], label=1)
        grid = session.cached_windows
        assert len(calls) == grid == 6  # a class prompt runs the whole grid
        session.click([NEAR], label=1)
        assert len(calls) == grid


def test_float16_cache_agrees_and_halves_the_features(model, shared_ct):
    clicks = ([LIVER_CLICK], [NEAR], [OUTSIDE_LIVER])
    sessions = [ClickSession.open(model, shared_ct, point_window=False, cache_dtype=dtype)
                for dtype in (torch.float32, torch.float16)]
    for labels in (1, 1, 0):
        results = [s.click(clicks[len(s.points)], [labels]) for s in sessions]
        assert (results[0] == results[1]).mean() >= 0.999
    full, half = (s.cache.entries[next(iter(s.cache.entries))] for s in sessions)
    assert half.features.dtype == torch.float16
    assert half.features.numel() == full.features.numel()
    assert sessions[1].cache_bytes < sessions[0].cache_bytes
    for session in sessions:
        session.close()


def test_the_cache_stores_at_most_its_width_and_never_widens():
    assert WindowCache(torch.float16).store(torch.ones(2)).dtype == torch.float16
    kept = WindowCache(torch.float32).store(torch.ones(2, dtype=torch.float16))
    assert kept.dtype == torch.float16  # float16 features under CUDA autocast stay float16


def test_a_cache_limit_drops_old_windows_and_keeps_the_labels(model, shared_ct, encoder_calls):
    with ClickSession.open(model, shared_ct, point_window=False) as unbounded:
        expected = [unbounded.click([c]) for c in (LIVER_CLICK, AWAY, NEAR)]
        runs = encoder_calls.count
    with ClickSession.open(model, shared_ct, point_window=False, max_cache_mb=0.1) as bounded:
        for click, labels in zip((LIVER_CLICK, AWAY, NEAR), expected, strict=True):
            assert np.array_equal(bounded.click([click]), labels)
            assert bounded.cache_bytes <= 0.1 * 2**20
        assert encoder_calls.count - runs > runs  # evicted windows were encoded again


def test_reset_segments_another_structure_and_save_writes_the_input_geometry(
        model, shared_ct, tmp_path):
    with ClickSession.open(model, shared_ct) as session:
        with pytest.raises(ConfigError, match="nothing to save"):
            session.save(tmp_path / "none")
        session.click([LIVER_CLICK], label=1)
        with pytest.raises(ConfigError, match=r"call reset\(\)"):
            session.click([NEAR], label=3)
        session.reset()
        spleen = session.click([NEAR], label=3)
        assert set(np.unique(spleen)) <= {0, 3} and session.names[3] == "spleen"
        folder = session.save(tmp_path / "click")
    saved, source = nib.load(folder / "labels.nii.gz"), nib.load(shared_ct)
    assert np.allclose(saved.affine, source.affine)
    assert np.array_equal(np.asarray(saved.dataobj), spleen)


@pytest.mark.parametrize(("click", "message"), [
    (dict(points=[[5, 5, 500]]), "outside the image"),
    (dict(points=[[5, 5, 5]], point_labels=[0]), "at least one click must be positive"),
    (dict(points=[[5, 5, 5]], label=2), "groups sub-classes"),
    (dict(points=[[5, 5]]), "each click is"),
])
def test_bad_clicks_raise_and_change_nothing(model, shared_ct, click, message):
    with ClickSession.open(model, shared_ct) as session:
        with pytest.raises(ConfigError, match=message):
            session.click(**click)
        assert session.points == () and session.cached_windows == 0


def test_open_refuses_what_a_session_cannot_do(tiny_ckpt, ckpt, shared_ct, tmp_path):
    with pytest.raises(ConfigError, match="needs a VISTA3D checkpoint"):
        ClickSession.open(tiny_ckpt, shared_ct)
    with pytest.raises(ConfigError, match="cannot be set"):
        ClickSession.open(ckpt, shared_ct, backend="onnxruntime")
    with pytest.raises(ConfigError, match="floating dtype"):
        ClickSession.open(ckpt, shared_ct, cache_dtype=torch.int8)
    for name in ("a.nii.gz", "b.nii.gz"):
        (tmp_path / name).symlink_to(shared_ct)
    with pytest.raises(ConfigError, match="opens one image"):
        ClickSession.open(ckpt, tmp_path)


def test_documented_click_session_runs_as_printed(ckpt, shared_ct, tmp_path, monkeypatch, caplog):
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "vista3d.md").read_text(), re.S)
    (snippet,) = [b for b in blocks if "ClickSession" in b]
    assert len([line for line in snippet.splitlines() if line.strip()]) <= 5
    monkeypatch.chdir(tmp_path)
    code = snippet.replace('"run/checkpoints/last.ckpt"', repr(str(ckpt))).replace(
        '"ct.nii.gz"', repr(str(shared_ct)))
    caplog.set_level(logging.DEBUG, logger="ctseg.inference.click_session")
    exec(compile(code, "docs/vista3d.md", "exec"), {})
    first, second = (r.getMessage() for r in caplog.records if r.getMessage().startswith("click"))
    assert ", 4 encoder runs" in first and ", 0 encoder runs" in second  # the second: heads only
    saved = nib.load(tmp_path / "pred_click" / "labels.nii.gz")
    assert saved.shape == nib.load(shared_ct).shape
