"""Train a segmentation model: `python train.py [group=option ...] [key=value ...]` (see --help)."""

from ctseg.commands import train_cli

if __name__ == "__main__":
    train_cli()
