"""S3: ``s3`` (the operations callers import: retried ranged reads, line streams, listings, and the
writes of ``s3_writes``) on ``s3_client`` (the per-process client and pools, counters, errors, the one
retry loop); ``store`` (artifacts under one prefix, uploaded with retries)."""
