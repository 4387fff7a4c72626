"""Segmenting new studies: ``options`` (predict.py's flags, no torch), ``predictor`` (ensembles,
mirroring, back to the native grid) and ``job`` (shards, read-ahead, DICOM SEG, volumes, markers)."""
