"""ctseg: whole-body CT segmentation on TotalSegmentator with Lightning, MONAI and Hydra."""

import logging
import warnings

__version__ = "0.1.0"

# MONAI >= 1.5 builds its nvImageCodec DICOM reader inside every LoadImage and, where that optional
# GPU codec is absent, says so twice per transform; ctseg never uses that reader (NIfTI goes
# through nibabel, DICOM through PydicomReader), so the lines are only noise in every run's log.
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin")
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
