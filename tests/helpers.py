"""Helpers and paths shared by the tests (imported by name: tests/ is on pytest's path)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import torch
from monai.data.utils import compute_importance_map
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

# NIfTI (RAS) to DICOM (LPS) world coordinates.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CTSEG_SHARED_DATA", REPO.parent / "shared" / "data"))


def truncate(path: Path) -> None:
    """Cut a file to half its size, as an interrupted download leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def wandb_records(run_dir: Path) -> list:
    """The records of the one offline W&B run under `run_dir`/wandb (its `run-*.wandb` file:
    LevelDB-log blocks of 32 KiB holding protobuf `Record`s, after a 7-byte header)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    data, pos, block, pending, records = files[0].read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last part of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(run_dir: Path, wait_s: float = 30.0):
    """The RunRecord (id, name, group, job type, tags) of the offline W&B run under `run_dir`,
    waiting up to `wait_s` for it: W&B's service process writes the file asynchronously, and a
    resumed run's record was missing right after training in one of three full-suite runs."""
    deadline = time.monotonic() + wait_s
    while True:
        records = wandb_records(run_dir)
        runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        if runs or time.monotonic() > deadline:
            assert runs, (f"no run record in the W&B file under {run_dir} after {wait_s} s; "
                          f"records: {[r.WhichOneof('record_type') for r in records]}")
            return runs[0]
        time.sleep(0.5)


def write_dicom_series(img: nib.Nifti1Image, folder: Path, modality: str = "CT",
                       description: str = "ctseg test", series_uid: str | None = None,
                       edit: Callable[[int, pydicom.Dataset], None] | None = None) -> str:
    """Write a NIfTI volume as one DICOM series (one slice per file along the third axis);
    `edit(k, ds)` changes the instance of slice k before it is saved."""
    folder.mkdir(parents=True, exist_ok=True)
    data = np.asanyarray(img.dataobj).astype(np.int16)
    affine = img.affine
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    row_dir = RAS_TO_LPS @ affine[:3, 0] / spacing[0]  # along DICOM columns = NIfTI axis 0
    col_dir = RAS_TO_LPS @ affine[:3, 1] / spacing[1]  # along DICOM rows = NIfTI axis 1
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesDescription = modality, description
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID, ds.PatientID = frame_uid, "ctseg-test"
        ds.InstanceNumber = k + 1
        position = RAS_TO_LPS @ (affine @ np.array([0.0, 0.0, k, 1.0]))[:3]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = np.ascontiguousarray(data[:, :, k].T).tobytes()
        if edit is not None:
            edit(k, ds)
        ds.save_as(folder / f"slice_{series_uid[-6:]}_{k:03d}.dcm", enforce_file_format=True)
    return series_uid


def blend_windows(image: torch.Tensor, predictor: Callable[..., torch.Tensor],
                  starts: Sequence[Sequence[int]], roi: Sequence[int], mode: str = "gaussian"
                  ) -> torch.Tensor:
    """Reference (C, D, H, W) blend of `predictor(patch, [slices])` (MONAI's `with_coord` call)
    over only the windows at `starts` with MONAI's importance map; NaN where no window reaches."""
    weight = compute_importance_map(tuple(roi), mode=mode, sigma_scale=0.125)
    values, weights = torch.empty(0), torch.zeros(image.shape[2:])
    for start in starts:
        window = tuple(slice(a, a + r) for a, r in zip(start, roi, strict=True))
        patch_coords = (slice(None), slice(None), *window)
        with torch.no_grad():
            logits = predictor(image[patch_coords], [patch_coords])[0].float()
        if not values.numel():
            values = torch.zeros((logits.shape[0], *image.shape[2:]))
        values[(slice(None), *window)] += logits * weight
        weights[window] += weight
    return values / weights


def column(rows: list[dict[str, str]], name: str) -> list[tuple[int, float]]:
    """(epoch, value) of every row of `metric_rows` where `name` was logged."""
    return [(int(r["epoch"]), float(r[name])) for r in rows if r.get(name)]


def metric_rows(run: Path, version: int = 0) -> list[dict[str, str]]:
    """Rows of the CSV logger's metrics file of `version` in a run folder."""
    with (run / "csv" / f"version_{version}" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def save_checkpoint(module: torch.nn.Module, path: Path, data_hparams: dict) -> Path:
    """Write `module` as Lightning's Trainer.save_checkpoint would for inference: its state dict,
    module and datamodule hyper-parameters, the Lightning version and the module's own additions."""
    import lightning

    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "datamodule_hyper_parameters": data_hparams,
                  "pytorch-lightning_version": lightning.__version__}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def compose_in(tmp_path: Path, *overrides: str, config_name: str = "train"):
    """`conf/<config_name>.yaml` composed with overrides, every path pointed into tmp_path (the
    run folder is tmp_path/run), set as the current Hydra config."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from ctseg.config import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name=config_name, return_hydra_config=True, overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.root_dir = str(REPO)
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.log_dir = str(tmp_path / "outputs")
        cfg.paths.data_dir = str(tmp_path / "data")
        cfg.paths.shared_data_dir = str(SHARED_DATA)
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


def scanner_ct(shared_ct: Path, path: Path) -> Path:
    """The shared crop (3 mm) inside a 500 mm field of view of air (-1024 HU) with a patient table
    (-150 HU foam) below it, as a scanner writes a CT: LPS-like flipped axes, 3 mm voxels."""
    crop = nib.load(shared_ct)
    data = np.asarray(crop.dataobj, dtype=np.int16)
    fov = np.full((167, 167, data.shape[2]), -1024, dtype=np.int16)
    x0, y0 = (167 - data.shape[0]) // 2, 30
    fov[x0:x0 + data.shape[0], y0:y0 + data.shape[1]] = data
    fov[:, y0 - 6:y0 - 2] = -150  # the table, across the whole field of view
    affine = crop.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.array([x0, y0, 0])
    nib.save(nib.Nifti1Image(fov[::-1], affine @ np.diag([-1, 1, 1, 1]) @ np.array(
        [[1, 0, 0, -(fov.shape[0] - 1)], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])), path)
    return path


def raised_short_of_memory(setup: str, calls: Sequence[str], headroom_mib: int = 32
                           ) -> list[str]:
    """`<type>: <message>` of what each Python statement of `calls` raises ("returned" when it
    raises nothing), run one after the other in a fresh process whose address space is capped
    (RLIMIT_AS) at its size after running `setup` plus `headroom_mib`: a load that needs more
    memory than that runs out."""
    lines = ["import re, resource", "from pathlib import Path", setup,
             "size = int(re.search(r'VmSize:\\s+(\\d+) kB', "
             "Path('/proc/self/status').read_text())[1])",
             f"resource.setrlimit(resource.RLIMIT_AS, (size * 1024 + {headroom_mib} * 2**20,) * 2)"]
    for call in calls:
        lines += ["try:", f"    {call}", "    print('returned')", "except BaseException as err:",
                  "    print(f'{type(err).__name__}: {err}'.replace(chr(10), ' '))"]
    result = subprocess.run([sys.executable, "-c", "\n".join(lines)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-len(calls):]
