"""Upload a local case tree to S3 in parallel, keeping relative paths as keys.

    brainseg-upload DIR s3://bucket/prefix/ [--threads 16]

Large files go up as multipart uploads (s3transfer); a file whose object is already there with the
same size is skipped, so an interrupted upload is finished by running the command again. Against
a local endpoint (``AWS_ENDPOINT_URL`` on this machine, such as ``brainseg-s3server``) the bucket is
created when missing; on AWS a missing bucket is an error (create it with your own settings:
region, encryption, retention).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from brainseg.io import s3

logger = logging.getLogger("upload")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def local_endpoint() -> bool:
    """Whether S3 is an endpoint on this machine (the embedded server, MinIO), not AWS."""
    return urlsplit(os.environ.get("AWS_ENDPOINT_URL", "")).hostname in LOCAL_HOSTS


def upload_tree(folder: str | Path, uri: str, threads: int = 16) -> tuple[int, int, int]:
    """Upload every file under ``folder`` to ``uri``, except hidden ones (``.DS_Store``, ``._*``,
    anything under a folder whose name starts with a dot) and those already there with the same
    size; returns ``(files uploaded, bytes uploaded, files skipped)``."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{folder!r} is not a folder; expected a case tree <case_id>/image/..., <case_id>/mask/...")
    bucket, prefix = s3.parse_uri(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    if local_endpoint():
        s3.create_bucket(bucket)
    s3.check_bucket(uri)
    present = {info.key: info.size for info in s3.list_objects(bucket, prefix)}
    files = sorted(path for path in root.rglob("*") if path.is_file()
                   and not any(part.startswith(".") for part in path.relative_to(root).parts))
    todo = [path for path in files if present.get(prefix + path.relative_to(root).as_posix()) != path.stat().st_size]

    def send(path: Path) -> int:
        s3.upload_file(path, f"s3://{bucket}/{prefix}{path.relative_to(root).as_posix()}")
        return path.stat().st_size

    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(send, todo))
    return len(todo), total, len(files) - len(todo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="the local case tree: <case_id>/<sequence>/*.dcm and <case_id>/mask/")
    parser.add_argument("uri", help="s3://bucket/prefix/ to upload under")
    parser.add_argument("--threads", type=int, default=16, help="files uploaded at once (16)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    started = time.perf_counter()
    try:
        count, total, skipped = upload_tree(args.folder, args.uri, args.threads)
    except (ValueError, s3.S3Error) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logger.info("uploaded %d file(s), %.1f MB, to %s in %.1f s; %d already there with the same size", count,
                total / 1e6, args.uri, time.perf_counter() - started, skipped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
