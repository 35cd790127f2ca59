"""Overlays of label maps on CT (`python -m ctseg.visualize`) for the CLI and the training loop."""
