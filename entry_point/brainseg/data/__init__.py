"""The data plane: the header index and quality checks (``index``, ``quality``, ``catalog``), the
region reader (``series``, ``segmentation``), resampling, and the patch stream with its sampling,
normalisation and augmentation (``stream``, ``sampling``, ``transforms``, ``augment``)."""
