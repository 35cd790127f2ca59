"""Segment CT volumes: `python predict.py ckpt=<.ckpt|model.pt> input=<path> output=<dir>`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ctseg.config import CONFIG_DIR
from ctseg.errors import run_cli


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    """Predict every input case; exit non-zero when any case failed."""
    # Imported once Hydra has read the command line: --help answers without loading torch.
    from ctseg.inference.runner import run

    run(cfg)


if __name__ == "__main__":
    run_cli(main, "predict.py")
