"""Upload a local case tree to S3 in parallel, keeping relative paths as keys.

    brainseg-upload DIR s3://bucket/prefix/ [--threads 16]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from brainseg.io import s3

logger = logging.getLogger("upload")


def upload_tree(folder: str | Path, uri: str, threads: int = 16) -> tuple[int, int]:
    """Upload every file under ``folder`` to ``uri``, except hidden ones (``.DS_Store``, ``._*``,
    anything under a folder whose name starts with a dot); returns ``(files, bytes)``."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{folder!r} is not a folder; expected a case tree <case_id>/image/..., <case_id>/mask/...")
    bucket, prefix = s3.parse_uri(uri)
    base = f"s3://{bucket}/{prefix.rstrip('/') + '/' if prefix else ''}"
    files = sorted(path for path in root.rglob("*") if path.is_file()
                   and not any(part.startswith(".") for part in path.relative_to(root).parts))

    def send(path: Path) -> int:
        data = path.read_bytes()
        s3.put_bytes(base + path.relative_to(root).as_posix(), data)
        return len(data)

    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(send, files))
    return len(files), total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("uri")
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    started = time.perf_counter()
    try:
        count, total = upload_tree(args.folder, args.uri, args.threads)
    except (ValueError, s3.S3Error) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logger.info("uploaded %d file(s), %.1f MB, to %s in %.1f s", count, total / 1e6, args.uri,
                time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
