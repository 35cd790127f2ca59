"""Helpers and paths shared by the tests (imported by name: tests/ is on pytest's path)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from monai.data.utils import compute_importance_map

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


def wandb_run(run_dir: Path):
    """The RunRecord (id, name, group, job type, tags) of the offline W&B run under `run_dir`."""
    return next(r.run for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "run")


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
