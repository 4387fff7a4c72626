"""S3: ``s3`` (the only boto3/smart-open user: one client per process, the retried read core,
conditional writes, uploads, counters) and ``store`` (artifacts under one prefix, uploaded with retries)."""
