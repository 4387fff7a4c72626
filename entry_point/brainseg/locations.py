"""Where a run may read and write: run names as S3 folders, and which locations lie inside a
dataset (outputs never may; the header index and the identity key only under its ``.brainseg/``).

Free of torch: the launcher checks a job's locations on a laptop.
"""

from __future__ import annotations

import re

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_run_name(name: str, what: str = "run_name") -> None:
    """A run name becomes an S3 folder: letters, digits, '.', '_' or '-', at most 128.

    Raises:
        ValueError: the name says which field it came from and what is allowed.
    """
    if not RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"{what} {name!r}: expected 1-128 letters, digits, '.', '_' or '-', starting with a letter "
                         "or digit")


def _prefix(uri: str) -> str:
    return uri.rstrip("/") + "/"


def inside(uri: str, prefix: str) -> bool:
    """Whether the S3 location ``uri`` lies under (or is) the prefix ``prefix``."""
    return _prefix(uri).startswith(_prefix(prefix))


def in_case_folders(uri: str, data_uri: str) -> bool:
    """Whether ``uri`` lies inside the dataset ``data_uri`` anywhere but its ``.brainseg/`` folder."""
    return bool(data_uri) and inside(uri, data_uri) and not inside(uri, _prefix(data_uri) + ".brainseg/")


def check_identity_key_uri(uri: str, data_uri: str) -> None:
    """``""``, ``env:NAME`` or an ``s3://`` object outside the dataset's case folders."""
    if not uri or re.fullmatch(r"env:[A-Za-z_][A-Za-z0-9_]*", uri):
        return
    if not uri.startswith("s3://") or uri.endswith("/") or "/" not in uri[5:]:
        raise ValueError(f"identity_key_uri {uri!r}: expected s3://bucket/key (an object) or env:NAME")
    if in_case_folders(uri, data_uri):
        raise ValueError(f"identity_key_uri {uri} is inside data_uri {data_uri} but not under its .brainseg/ folder; "
                         "keep the key outside the dataset, in a location with its own grants")
