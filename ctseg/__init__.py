"""ctseg: whole-body CT segmentation on TotalSegmentator with Lightning, MONAI and Hydra."""

__version__ = "0.1.0"
