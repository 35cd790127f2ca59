"""Segment CT volumes: `python predict.py ckpt=<.ckpt|model.pt> input=<path> output=<dir>`."""

from ctseg.commands import predict_cli

if __name__ == "__main__":
    predict_cli()
