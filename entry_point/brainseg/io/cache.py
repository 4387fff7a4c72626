"""A bounded cache of fetched S3 bytes on the local disk, shared by every process of one host.

Reads are cached in aligned blocks of :data:`BLOCK_BYTES` of each object version (bucket, key and
ETag), so a row band, a slab or a compressed frame read once is on disk for every later read of
any range it covers: from the second epoch a training case costs no GETs. Missing blocks of one
object that follow each other are fetched in one ranged GET.

Safe under concurrent workers and after a crash: a block is written to a temporary file and
renamed into place (readers see a whole file or none), and each file carries its length and a
CRC-32 that a reader checks before using it (a file that fails is deleted and fetched again).
What a host computes from fetched bytes and reads again every epoch (a series resampled onto
another grid) is kept the same way (:meth:`RangeCache.derived`). The
bound is held by least-recently-used eviction: a hit touches its file's mtime (when it is older
than a minute), and a process that
has written a sixteenth of the bound since its last look lists the folder and deletes the oldest
files until the cache is back under nine tenths of the bound.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

from brainseg.io import s3

logger = logging.getLogger(__name__)

BLOCK_BYTES = 256 * 1024  # a slice of 240x240 16-bit pixels is ~113 KiB: one block holds it whole
_HEADER = struct.Struct("<4sQI")  # magic, payload length, CRC-32 of the payload
_MAGIC = b"BSC1"
_SCAN_FRACTION = 16  # look at the folder's size after writing max_bytes / 16
EVICT_TO = 0.9  # evict down to this fraction of the bound
_COUNTERS = ("cache_hits", "cache_misses", "cache_bytes_read", "cache_bytes_written", "cache_evictions")
_TOUCH_AFTER_S = 60.0  # a hit marks its file used again once it was last marked this long ago


class RangeCache:
    """Blocks of S3 objects under ``directory``, at most ``max_bytes`` in all (see the module)."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int):
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._written_since_scan = self.max_bytes  # the first write looks at the folder
        self._counters = dict.fromkeys(_COUNTERS, 0)

    # ------------------------------------------------------------------ reads
    def get_ranges(self, requests: Sequence[tuple]) -> list[bytes]:
        """The bytes of each ``(bucket, key, start, stop, etag)`` request, in order: from the
        cache where every block it covers is there, else fetched (with the object's other
        missing blocks) and stored."""
        wanted = [blocks_of(request) for request in requests]
        blocks: dict[tuple, bytes | None] = {}
        for block in (block for covered in wanted for block in covered):
            if block not in blocks:
                blocks[block] = self._load(block)
        missing = [block for block, data in blocks.items() if data is None]
        hits = sum(all(blocks[block] is not None for block in covered) for covered in wanted)
        self._count(cache_hits=hits, cache_misses=len(requests) - hits)
        if missing:
            blocks.update(self._fetch(missing))
        out = []
        for (bucket, key, start, stop, *_), covered in zip(requests, wanted):
            offset = start - covered[0][3] * BLOCK_BYTES
            piece = b"".join(blocks[block] for block in covered)[offset:offset + stop - start]
            if len(piece) != stop - start:
                raise s3.S3Error(f"s3://{bucket}/{key} is shorter than byte {stop - 1} (got {len(piece)} of the "
                                 f"{stop - start} bytes from {start}); it changed since it was indexed")
            out.append(piece)
        return out

    def _fetch(self, missing: list[tuple]) -> dict[tuple, bytes]:
        """Fetch the missing blocks, runs of consecutive blocks of one object in one GET each."""
        runs = block_runs(missing)
        bodies = s3.get_ranges([(run[0][0], run[0][1], run[0][3] * BLOCK_BYTES,
                                        (run[-1][3] + 1) * BLOCK_BYTES, run[0][2] or None) for run in runs],
                               to_end=True)
        fetched = {}
        for run, body in zip(runs, bodies):
            for index, block in enumerate(run):
                data = body[index * BLOCK_BYTES:(index + 1) * BLOCK_BYTES]
                fetched[block] = data
                self._store(block, data)
        return fetched

    # ------------------------------------------------------------------ files
    def _path(self, block: tuple) -> Path:
        bucket, key, etag, number = block
        digest = hashlib.sha256(f"{bucket}\0{key}\0{etag}\0{number}".encode()).hexdigest()
        return self.directory / digest[:2] / digest[2:40]

    def holds(self, block: tuple) -> bool:
        """Whether ``(bucket, key, etag, number)`` is on disk (unchecked: a read checks it)."""
        return self._path(block).is_file()

    def _load(self, block: tuple) -> bytes | None:
        path = self._path(block)
        try:
            with open(path, "rb") as file:
                raw = file.read()
                used = os.fstat(file.fileno()).st_mtime
        except OSError:
            return None
        if len(raw) >= _HEADER.size:
            magic, length, crc = _HEADER.unpack_from(raw)
            payload = raw[_HEADER.size:]
            if magic == _MAGIC and length == len(payload) and zlib.crc32(payload) == crc:
                if time.time() - used > _TOUCH_AFTER_S:
                    try:
                        os.utime(path)  # most recently used (to the minute: a touch per hit would cost more)
                    except OSError:
                        pass  # evicted meanwhile: the bytes in hand are still good
                self._count(cache_bytes_read=len(payload))
                return payload
        logger.warning("local cache: %s failed its length or checksum check; fetching it again", path.name)
        _remove(path)
        return None

    def _store(self, block: tuple, data: bytes) -> None:
        path = self._path(block)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        except OSError as err:
            logger.warning("local cache: cannot write under %s (%s); this read is not cached", self.directory, err)
            return
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(_HEADER.pack(_MAGIC, len(data), zlib.crc32(data)))
                file.write(data)
            os.replace(temporary, path)
        except OSError as err:  # a full disk, say: the half-written file goes too
            _remove(Path(temporary))
            logger.warning("local cache: cannot write under %s (%s); this read is not cached", self.directory, err)
            return
        self._count(cache_bytes_written=len(data))
        with self._locked():
            self._written_since_scan += len(data) + _HEADER.size
            due = self._written_since_scan * _SCAN_FRACTION >= self.max_bytes
            if due:
                self._written_since_scan = 0
        if due:
            self.evict()

    def _files(self) -> list[tuple[float, int, str]]:
        """``(mtime, size, path)`` of every file in the cache now (one another process removes
        meanwhile is left out)."""
        files = []
        for folder in _scandir(self.directory):
            if folder.is_dir():
                for entry in _scandir(folder.path):
                    try:
                        stat = entry.stat()
                    except OSError:
                        continue
                    files.append((stat.st_mtime, stat.st_size, entry.path))
        return files

    def evict(self) -> None:
        """Delete the least recently used files until the cache is under nine tenths of its bound."""
        files = self._files()
        total = sum(size for _, size, _ in files)
        if total <= self.max_bytes:
            return
        removed = 0
        for _, size, path in sorted(files):
            if total <= self.max_bytes * EVICT_TO:
                break
            if _remove(Path(path)):
                total -= size
                removed += 1
        self._count(cache_evictions=removed)

    def size_bytes(self) -> int:
        """The bytes the cache's files take now."""
        return sum(size for _, size, _ in self._files())

    # ------------------------------------------------------------------ derived data
    def derived(self, name: str, number: int, compute: Callable[[], bytes]) -> bytes:
        """Bytes this host computes rather than fetches (piece ``number`` of ``name``, e.g. a tile of a
        series resampled onto another grid): from the cache when there (checked like any block),
        else computed and stored, under the same bound and eviction as fetched blocks."""
        block = ("derived", name, "", number)
        data = self._load(block)
        if data is None:
            data = compute()
            self._store(block, data)
        return data

    # ------------------------------------------------------------------ counters
    def _locked(self) -> threading.Lock:
        """This process's lock: a DataLoader worker forked while another thread held the parent's
        gets a fresh one."""
        if self._pid != os.getpid():
            self._pid, self._lock = os.getpid(), threading.Lock()
        return self._lock

    def _count(self, **increments: int) -> None:
        with self._locked():
            for name, value in increments.items():
                self._counters[name] += value

    def stats(self) -> dict:
        with self._locked():
            return dict(self._counters)


def blocks_of(request: tuple) -> list[tuple]:
    """The ``(bucket, key, etag, block number)`` of every block a ``(bucket, key, start, stop[, etag])`` covers."""
    bucket, key, start, stop, *rest = request
    etag = rest[0] if rest else ""
    return [(bucket, key, etag, number) for number in range(start // BLOCK_BYTES, (stop - 1) // BLOCK_BYTES + 1)]


def block_runs(blocks) -> list[list[tuple]]:
    """``blocks`` sorted into runs of consecutive blocks of one object version: one GET each."""
    runs: list[list[tuple]] = []
    for block in sorted(blocks):
        if runs and runs[-1][-1][:3] == block[:3] and runs[-1][-1][3] + 1 == block[3]:
            runs[-1].append(block)
        else:
            runs.append([block])
    return runs


def _scandir(path) -> list:
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except OSError:
        return []


def _remove(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except OSError:
        return False


_active: dict = {"cache": None}


def configure(directory: str | os.PathLike | None, max_gb: float) -> RangeCache | None:
    """Cache this process's (and its forked workers') reads under ``directory``, up to ``max_gb``
    GB; ``max_gb`` 0 turns caching off. A folder that cannot be written, or whose disk has less
    free space than the bound, is a warning and reads stay uncached. Returns the cache in use."""
    _active["cache"] = None
    if max_gb <= 0:
        return None
    max_bytes = int(max_gb * 1e9)
    folder = Path(directory) if directory else Path(tempfile.gettempdir()) / f"brainseg-cache-{os.getuid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as err:
        logger.warning("local cache: %s is not writable (%s); reads are not cached (set --cache-dir to a "
                       "writable folder, or --cache-gb 0 to silence this)", folder, err)
        return None
    cache = RangeCache(folder, max_bytes)
    available = shutil.disk_usage(folder).free + cache.size_bytes()
    if available < max_bytes:
        logger.warning("local cache: %s has %.1f GB free, less than --cache-gb %g; reads are not cached (lower "
                       "--cache-gb or free space)", folder, available / 1e9, max_gb)
        return None
    _active["cache"] = cache
    logger.info("local cache: %s, up to %g GB (%.1f GB there now)", folder, max_gb, cache.size_bytes() / 1e9)
    return cache


def active() -> RangeCache | None:
    """The cache :func:`configure` set up, if any."""
    return _active["cache"]


def get_ranges(requests: Sequence[tuple]) -> list[bytes]:
    """:meth:`RangeCache.get_ranges` when a cache is configured, else :func:`brainseg.io.s3.get_ranges`."""
    cache = _active["cache"]
    return cache.get_ranges(requests) if cache is not None else s3.get_ranges(requests)


def derived(name: str, number: int, compute: Callable[[], bytes]) -> bytes:
    """:meth:`RangeCache.derived` when a cache is configured, else ``compute()``."""
    cache = _active["cache"]
    return cache.derived(name, number, compute) if cache is not None else compute()


def disable() -> None:
    """Stop caching in this process (the files stay for the next run on this host)."""
    _active["cache"] = None


IO_FIELDS = ("gets", "bytes", "cache_hits", "cache_misses")


def io_counters() -> list[int]:
    """This process's reads so far, in :data:`IO_FIELDS` order: GET requests and bytes received
    from S3, and range requests the cache served whole or had to fetch."""
    transfers, cached = s3.stats(), stats()
    return [transfers["get_requests"], transfers["bytes_received"], cached["cache_hits"], cached["cache_misses"]]


def stats() -> dict:
    """This process's cache counters (zeros when no cache is configured)."""
    cache = _active["cache"]
    return cache.stats() if cache is not None else dict.fromkeys(_COUNTERS, 0)
