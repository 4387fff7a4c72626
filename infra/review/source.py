"""Where the review reads from: an ``s3://`` URI or a local folder (the demo's ``demo-output/<run>``, a
run copied down with ``aws s3 sync``). Both answer the same three questions: an object's bytes from an
offset, whether it exists, and the folders under a prefix."""

from __future__ import annotations

from pathlib import Path

from brainseg.io import s3


def is_local(uri: str) -> bool:
    return not uri.startswith("s3://")


def check(uri: str) -> None:
    """ValueError naming ``uri`` when it is neither an S3 URI nor an existing folder."""
    if not is_local(uri):
        s3.parse_uri(uri)
    elif not Path(uri).is_dir():
        raise ValueError(f"{uri}: not an s3:// URI and no such local folder")


def read_from(uri: str, start: int = 0) -> s3.Tail | None:
    """The bytes of ``uri`` from ``start`` to its end with its size and modification time; ``None``
    when it does not exist. Raises s3.S3Error for an S3 object that cannot be read."""
    if not is_local(uri):
        return s3.read_from(uri, start)
    path = Path(uri)
    if not path.is_file():
        return None
    with path.open("rb") as file:
        file.seek(start)
        data = file.read()
    stat = path.stat()
    return s3.Tail(data=data, size=stat.st_size, modified=stat.st_mtime)


def read(uri: str) -> bytes | None:
    """The whole object at ``uri``, or ``None`` when it does not exist."""
    tail = read_from(uri)
    return None if tail is None else tail.data


def list_folders(uri: str) -> list[str]:
    """The folders directly under ``uri`` whose names start with its last part when ``uri`` does not
    end in "/" (as an S3 prefix does), each as a URI ending in "/"."""
    if not is_local(uri):
        bucket, prefix = s3.parse_uri(uri)
        folders, _ = s3.list_folders(bucket, prefix)
        return [f"s3://{bucket}/{folder}" for folder in folders]
    parent, start = (Path(uri), "") if uri.endswith("/") else (Path(uri).parent, Path(uri).name)
    if not parent.is_dir():
        return []
    return [f"{path}/" for path in sorted(parent.iterdir()) if path.is_dir() and path.name.startswith(start)]
