"""Where a run keeps its checkpoints, and how it finds the newest one it can trust.

Layout under the run folder (and the same in a local mirror, ``<checkpoint dir>/<run name>/``,
which SageMaker syncs with S3 across spot interruptions)::

    checkpoints/step-00000500.pt     the training state (bytes; see brainseg.run.engine)
    checkpoints/step-00000500.json   its record: name, step, epoch, size, SHA-256, run URI
    checkpoints/latest.json          the newest record again (what a person or tool looks at)

A record is written only after its checkpoint is complete, so a record never names a partial
upload. On resume every checkpoint with a record is a candidate, newest first: one whose record is
unreadable, whose bytes are missing, of another size or SHA-256, or that does not load is skipped
with the reason logged, and the next older one is tried. Torch-free: the caller passes the
function that loads a checkpoint's bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from brainseg.io import s3
from brainseg.io.store import Store
from brainseg.layout import RunLayout

logger = logging.getLogger(__name__)

POINTER = "latest.json"  # in RunLayout.CHECKPOINTS
CHECKPOINT_NAME = re.compile(r"step-(\d{8})\.pt")
RECORD_FIELDS = {"checkpoint": str, "step": int, "epoch": int, "bytes": int, "sha256": str}
Loaded = TypeVar("Loaded")


class CheckpointError(RuntimeError):
    """Checkpoints exist but none can be used; the message lists why each was refused."""


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def _check_record(record, where: str) -> dict:
    """The record if it has every field with the right type and a well-formed name, else ValueError."""
    if not isinstance(record, dict):
        raise ValueError(f"{where} is not a JSON object")
    for name, kind in RECORD_FIELDS.items():
        if not isinstance(record.get(name), kind) or isinstance(record.get(name), bool):
            raise ValueError(f"{where} has no valid {name!r} field")
    if not CHECKPOINT_NAME.fullmatch(record["checkpoint"]) or not re.fullmatch(r"[0-9a-f]{64}", record["sha256"]):
        raise ValueError(f"{where} names {record['checkpoint']!r} with SHA-256 {record['sha256']!r}; expected "
                         "step-NNNNNNNN.pt and 64 hex digits")
    return record


@dataclass(frozen=True)
class _Candidate:
    step: int
    source: str  # "local" or "s3"
    name: str  # the checkpoint's file name
    record: Callable[[], dict]
    data: Callable[[str], bytes | None]


class CheckpointStore:
    """The checkpoints of one run in S3 and in its local mirror (if any)."""

    def __init__(self, store: Store, local_dir: str | None = None):
        self.store = store
        self.local = Path(local_dir) / store.name if local_dir else None

    def save(self, data: bytes, step: int, epoch: int, keep: int) -> str:
        """Store a checkpoint, then its record and the pointer; prune all but the newest ``keep``.

        If an upload fails the earlier records stay as they were and :class:`s3.S3Error`
        propagates. Returns the checkpoint's name.
        """
        name = f"step-{step:08d}.pt"
        record = {"checkpoint": name, "step": step, "epoch": epoch, "bytes": len(data),
                  "sha256": hashlib.sha256(data).hexdigest(), "written": time.time(), "run": self.store.uri}
        record_bytes = json.dumps(record, indent=1).encode()
        if self.local is not None:
            _atomic_write(self.local / name, data)
            _atomic_write(self.local / _record_name(name), record_bytes)
            _atomic_write(self.local / POINTER, record_bytes)
        self.store.put(RunLayout.checkpoint(name), data)
        self.store.put(RunLayout.checkpoint(_record_name(name)), record_bytes, "application/json")
        self.store.put(RunLayout.checkpoint(POINTER), record_bytes, "application/json")
        self._prune(keep)
        return name

    def _prune(self, keep: int) -> None:
        names = sorted(name for name in self._s3_names() if CHECKPOINT_NAME.fullmatch(name))
        for name in names[:-keep]:
            s3.delete(self.store.url(RunLayout.checkpoint(_record_name(name))))
            s3.delete(self.store.url(RunLayout.checkpoint(name)))
        if self.local is not None:
            for path in sorted(self.local.glob("step-*.pt"))[:-keep]:
                (self.local / _record_name(path.name)).unlink(missing_ok=True)
                path.unlink(missing_ok=True)

    def _s3_names(self) -> list[str]:
        bucket, key = s3.parse_uri(self.store.url(RunLayout.CHECKPOINTS))
        return [info.key.rsplit("/", 1)[1] for info in s3.list_objects(bucket, key)]

    def _candidates(self, problems: list[str]) -> list[_Candidate]:
        """Every checkpoint that has a record (or is named by a pointer), newest first; local
        copies before S3 ones of the same step (no download)."""
        sources = [("s3", self._s3_names(), lambda name: s3.read_uri(self.store.url(RunLayout.checkpoint(name))))]
        if self.local is not None and self.local.is_dir():
            sources.insert(0, ("local", [path.name for path in self.local.iterdir()],
                               lambda name: (self.local / name).read_bytes() if (self.local / name).is_file() else None))
        found: dict[tuple[str, str], _Candidate] = {}
        for source, names, read in sources:
            for name in names:
                match = CHECKPOINT_NAME.fullmatch(name.removesuffix(".json") + ".pt")
                if name.endswith(".json") and name != POINTER and match:
                    checkpoint = name.removesuffix(".json") + ".pt"
                    found[(source, checkpoint)] = _Candidate(int(match.group(1)), source, checkpoint,
                                                             _reader(read, name, source), read)
            if POINTER in names:
                try:
                    pointer = _reader(read, POINTER, source)()
                except ValueError as err:
                    problems.append(str(err))
                    continue
                key = (source, pointer["checkpoint"])
                found.setdefault(key, _Candidate(pointer["step"], source, pointer["checkpoint"], lambda p=pointer: p,
                                                 read))
        order = {"local": 0, "s3": 1}
        return sorted(found.values(), key=lambda c: (-c.step, order[c.source]))

    def newest(self, load: Callable[[bytes], Loaded]) -> tuple[Loaded, dict] | None:
        """The newest checkpoint that is complete, matches its record and loads.

        Args:
            load: turns a checkpoint's bytes into the training state; raises ``ValueError`` (or
                ``RuntimeError``, ``EOFError``...) when they are not a usable checkpoint.

        Returns:
            ``(loaded state, record with its "source")``, or ``None`` when the run has no checkpoint.

        Raises:
            CheckpointError: checkpoints exist and none is usable (each reason listed).
            s3.S3Error: S3 could not be listed or read after retries.
        """
        problems: list[str] = []
        for candidate in self._candidates(problems):
            where = f"{candidate.source} {candidate.name}"
            try:
                record = candidate.record()
                if candidate.source == "local" and record.get("run", self.store.uri) != self.store.uri:
                    raise ValueError(f"{where} belongs to another run ({record['run']})")
                data = candidate.data(record["checkpoint"])
                if data is None:
                    raise ValueError(f"{where} is missing")
                if len(data) != record["bytes"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
                    raise ValueError(f"{where} does not match its record ({len(data)} bytes, expected "
                                     f"{record['bytes']}; SHA-256 differs)")
                loaded = load(data)
            except s3.S3Error:
                raise
            except (ValueError, RuntimeError, EOFError, OSError, KeyError, TypeError) as err:
                problems.append(str(err) if isinstance(err, ValueError) else f"{where} does not load: "
                                f"{type(err).__name__}: {err}")
                continue
            if problems:
                logger.warning("resuming from %s %s (step %d), passing over what cannot be used: %s",
                               candidate.source, candidate.name, record["step"], "; ".join(problems))
            return loaded, dict(record, source=candidate.source)
        if problems:
            raise CheckpointError(f"no usable checkpoint for {self.store.uri}: {'; '.join(problems)}; restore a "
                                  "checkpoint, or start a new run (another --run-name)")
        return None


def _record_name(checkpoint: str) -> str:
    return checkpoint.removesuffix(".pt") + ".json"


def _reader(read: Callable[[str], bytes | None], name: str, source: str) -> Callable[[], dict]:
    """A function that reads and checks the record ``name``; ValueError says what is wrong."""
    def record() -> dict:
        data = read(name)
        if data is None:
            raise ValueError(f"{source} {name} is missing")
        try:
            value = json.loads(data)
        except ValueError as err:
            raise ValueError(f"{source} {name} is not valid JSON ({err.__class__.__name__})") from None
        return _check_record(value, f"{source} {name}")
    return record
