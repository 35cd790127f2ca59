"""LoadedModel: a network ready to predict with its classes, preprocessing and window (what
prediction, export and native evaluation run), from a module, a checkpoint or an export folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ctseg.data.transforms import PipelineConfig


@dataclass(frozen=True)
class LoadedModel:
    """The network in eval mode (None for an export folder), its class names, preprocessing and
    default window size; `export_dir` holds exported files (`export.json`) when loaded from one."""

    net: nn.Module | None
    label_names: list[str]
    pipeline: PipelineConfig
    roi_size: tuple[int, int, int]
    kind: str = "segresnet"
    known_ids: list[int] = field(default_factory=list)
    export_dir: Path | None = None
    formats: dict[str, str] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)  # format -> SHA-256 of its file
    # format -> most windows per forward pass its file accepts (TensorRT engines' max_batch)
    batch_limits: dict[str, int] = field(default_factory=dict)
    # VISTA3D: the training steps whose prompts held clicks (None: not recorded, e.g. model.pt)
    click_steps: int | None = None

    @property
    def num_classes(self) -> int:
        """Number of output channels (background included)."""
        return len(self.label_names)
