"""Data tools: synthetic studies, ingest of NIfTI/TIFF datasets to DICOM, upload, inspection and the
streaming demo."""
