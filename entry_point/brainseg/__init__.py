"""brainseg: 3D brain-tumour segmentation trained on DICOM streamed from S3 with ranged reads."""

__version__ = "0.1.0"
