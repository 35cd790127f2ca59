"""Checkpoints written as every ctseg output is: a temp file beside the target, flushed, renamed.

Lightning's own save goes through an fsspec transaction, which for local paths writes to the
system temp folder and moves the file over (a copy across file systems, so a kill can leave a
truncated `last.ckpt`), without flushing it to disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from ctseg.atomic import write_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local saves are atomic and durable (`write_atomic`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path,
                        storage_options: Any | None = None) -> None:
        """Save `checkpoint` to `path` atomically; remote URLs go through Lightning's save."""
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        write_atomic(path, lambda tmp: torch.save(checkpoint, tmp), suffix=".ckpt")
