"""The local cache of fetched bytes against the moto server: hits cost no GETs, runs of missing
blocks are one GET, torn or corrupt files are never read as data, the bound holds with the least
recently used evicted, concurrent processes share one folder, a rewritten object is never served
from its old bytes, bad folders are a warning; and a training run reports what its reads cost."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
from pathlib import Path

import pytest

from brainseg.commands import train
from brainseg.data.catalog import build_catalog
from brainseg.io import cache, s3
from brainseg.io.cache import BLOCK_BYTES, RangeCache
from brainseg.run.requests import cache_fit, cache_fit_text
from tests.conftest import synthetic_dataset


def _object(bucket: str, key: str, size: int, seed: int = 0) -> tuple[bytes, str]:
    data = bytes((seed + index * 7919) % 251 for index in range(size))
    s3.put_bytes(f"s3://{bucket}/{key}", data)
    return data, next(s3.list_objects(bucket, key)).etag


def _gets() -> int:
    return s3.stats()["get_requests"]


def test_a_range_read_again_costs_no_get_and_runs_of_blocks_are_one_get(bucket, tmp_path):
    data, etag = _object(bucket, "a.dcm", 3 * BLOCK_BYTES + 1000)
    store = RangeCache(tmp_path, 10 * 2**20)
    before = _gets()
    spans = [(10, 5000), (BLOCK_BYTES - 3, 3 * BLOCK_BYTES + 7)]  # the second crosses three blocks
    assert store.get_ranges([(bucket, "a.dcm", a, b, etag) for a, b in spans]) == [data[a:b] for a, b in spans]
    assert _gets() - before == 1  # blocks 0-3 of one object: one GET, clipped at the object's end
    before = _gets()
    tail = (3 * BLOCK_BYTES + 10, len(data))  # the last, partial block
    assert store.get_ranges([(bucket, "a.dcm", *tail, etag), (bucket, "a.dcm", 7, 9, etag)]) == [data[slice(*tail)],
                                                                                               data[7:9]]
    assert _gets() == before
    assert store.stats()["cache_hits"] == 2 and store.stats()["cache_misses"] == 2


def test_a_torn_or_corrupt_file_is_fetched_again_never_read_as_data(bucket, tmp_path, caplog):
    data, etag = _object(bucket, "b.dcm", 1000)
    store = RangeCache(tmp_path, 10 * 2**20)
    store.get_ranges([(bucket, "b.dcm", 0, 1000, etag)])
    (path,) = [p for p in tmp_path.rglob("*") if p.is_file()]
    whole = path.read_bytes()
    for damaged in (whole[:len(whole) // 2], whole[:-1] + bytes([whole[-1] ^ 1]), b""):
        path.write_bytes(damaged)
        before = _gets()
        with caplog.at_level(logging.WARNING, logger="brainseg.io.cache"):
            assert store.get_ranges([(bucket, "b.dcm", 100, 200, etag)]) == [data[100:200]]
        assert _gets() - before == 1 and path.read_bytes() == whole
    assert "failed its length or checksum check" in caplog.text
    (path.parent / ".part-left-by-a-killed-worker").write_bytes(b"half a blo")
    before = _gets()
    assert store.get_ranges([(bucket, "b.dcm", 0, 10, etag)]) == [data[:10]] and _gets() == before


def test_the_bound_holds_and_the_least_recently_used_go_first(bucket, tmp_path):
    file_bytes = BLOCK_BYTES + 16  # a block and its header
    store = RangeCache(tmp_path, 10 * file_bytes)
    objects = [_object(bucket, f"c{number}.dcm", BLOCK_BYTES, seed=number) for number in range(12)]

    def read(number: int) -> None:
        store.get_ranges([(bucket, f"c{number}.dcm", 0, 10, objects[number][1])])

    def path(number: int) -> Path:
        return store._path((bucket, f"c{number}.dcm", objects[number][1], 0))

    for number in range(10):
        read(number)
    assert store.size_bytes() == 10 * file_bytes and store.stats()["cache_evictions"] == 0
    for number in range(10):
        os.utime(path(number), (1000 + number, 1000 + number))
    read(0)  # a hit makes c0 the most recently used
    assert path(0).stat().st_mtime > 10**9
    read(10)  # 11 files: over the bound, evicted down to nine tenths of it, oldest first
    assert [number for number in range(11) if not path(number).exists()] == [1, 2]
    assert store.size_bytes() == 9 * file_bytes and store.stats()["cache_evictions"] == 2
    read(11)  # back at the bound exactly: nothing more goes
    assert store.size_bytes() == 10 * file_bytes and path(3).exists() and store.stats()["cache_evictions"] == 2


def _read_all(args) -> list:
    bucket, directory, requests = args
    s3.reset_client()
    store = RangeCache(directory, 64 * 2**20)
    return [store.get_ranges([request])[0] for request in requests]


def test_processes_share_one_folder_safely(bucket, tmp_path):
    objects = [_object(bucket, f"d{number}.dcm", 2 * BLOCK_BYTES + 17 * number, seed=number) for number in range(6)]
    requests = [(bucket, f"d{number}.dcm", start, min(start + 5000, len(data)), etag)
                for number, (data, etag) in enumerate(objects) for start in (0, BLOCK_BYTES - 100, 2 * BLOCK_BYTES - 50)]
    expected = [objects[int(r[1][1])][0][r[2]:r[3]] for r in requests]
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.map(_read_all, [(bucket, tmp_path, requests[offset:] + requests[:offset])
                                       for offset in (0, 5, 9, 13)])
    for offset, result in zip((0, 5, 9, 13), results):
        assert result == expected[offset:] + expected[:offset]
    before = _gets()
    assert [RangeCache(tmp_path, 64 * 2**20).get_ranges([r])[0] for r in requests] == expected
    assert _gets() == before  # every block is on disk, whole and checked


def test_a_rewritten_object_is_read_anew(bucket, tmp_path):
    old, old_etag = _object(bucket, "e.dcm", 4000, seed=1)
    store = RangeCache(tmp_path, 10 * 2**20)
    assert store.get_ranges([(bucket, "e.dcm", 0, 100, old_etag)]) == [old[:100]]
    new, new_etag = _object(bucket, "e.dcm", 4000, seed=2)
    assert new_etag != old_etag
    assert store.get_ranges([(bucket, "e.dcm", 0, 100, new_etag)]) == [new[:100]]


def test_a_folder_that_cannot_be_written_or_is_too_small_is_a_warning(bucket, tmp_path, caplog):
    (tmp_path / "a-file").write_text("")
    with caplog.at_level(logging.WARNING, logger="brainseg.io.cache"):
        assert cache.configure(tmp_path / "a-file" / "cache", 1) is None
        assert "is not writable" in caplog.text
        assert cache.configure(tmp_path / "cache", 10**9) is None  # an exabyte
        assert "less than --cache-gb" in caplog.text
    data, etag = _object(bucket, "f.dcm", 300)
    assert cache.active() is None and cache.get_ranges([(bucket, "f.dcm", 3, 9, etag)]) == [data[3:9]]
    assert cache.configure(tmp_path / "cache", 0) is None


def _history(output: str, run: str) -> list[dict]:
    return [json.loads(line) for line in s3.read_uri(f"{output}/{run}/metrics/metrics.jsonl").splitlines()]


def test_the_training_cases_are_weighed_against_the_cache_before_the_first_read():
    data = synthetic_dataset("cache-fit", 4, shape=(8, 32, 32))
    bucket, prefix = data[len("s3://"):].split("/", 1)
    catalog = build_catalog(data, split_fractions=(1.0, 0.0, 0.0))
    stored = sum(info.size for info in s3.list_tree(bucket, prefix) if "/.brainseg/" not in info.key)
    fit = cache_fit(catalog.cases, 1.0)
    assert fit == {"dataset_gb": round(stored / 1e9, 4), "cache_gb": 1.0, "expected_hit_fraction": 1.0}
    assert "within the 1 GB cache" in cache_fit_text(fit)
    small = cache_fit(catalog.cases, stored / 4e9)
    assert small["expected_hit_fraction"] == pytest.approx(0.25, abs=1e-3)
    assert re.search(r"more than the [0-9.e-]+ GB cache: at least 75% of reads will keep missing", cache_fit_text(small))
    assert cache_fit(catalog.cases, 0.0)["expected_hit_fraction"] == 0.0


def test_a_run_reports_its_reads_and_resumed_on_the_same_host_reads_from_the_cache(tmp_path, capfd):
    data = synthetic_dataset("cache-data", 6)
    output = "s3://" + data[len("s3://"):].split("/")[0] + "/cache-runs"
    common = ["--data-uri", data, "--output-uri", output, "--run-name", "cached", "--channels", "8,16",
              "--patch-size", "16,32,32", "--batch-size", "2", "--num-workers", "1", "--steps-per-epoch", "6",
              "--res-units", "1", "--log-every", "1000", "--cache-dir", str(tmp_path / "cache"), "--cache-gb", "1",
              "--get-price-per-1000", "0.5"]
    assert train.main([*common, "--epochs", "2"]) == 0
    assert re.search(r"epoch_metrics epoch=2 .* gets_per_patch=[0-9.]+ mib_per_patch=[0-9.]+ val_gets=\d+ gets=\d+ "
                     r"cache_hit_fraction=[0-9.]+ request_cost_usd=[0-9.]+", capfd.readouterr().out)
    assert cache.active() is None and os.listdir(tmp_path / "cache")  # caching off after the run, files kept
    first, again = _history(output, "cached")
    # A worker forked after the catalog's reads counts its own reads only (it used to start from the
    # parent's count and report negative GETs).
    assert first["gets_per_patch"] > 0 and first["gets"] == pytest.approx(first["gets_per_patch"] * 12
                                                                           + first["val_gets"])
    assert first["request_cost_usd"] == pytest.approx(first["gets"] * 0.5 / 1000)
    assert again["val_gets"] == 0  # validation reads the same cases again: every block is cached
    assert train.main([*common, "--epochs", "3"]) == 0  # a new process resumes the finished run for one more epoch
    assert "resumed from step-00000012.pt" in capfd.readouterr().out
    resumed = _history(output, "cached")[2]
    assert resumed["gets"] < first["gets"] / 3 and resumed["cache_hit_fraction"] > 0.5 and resumed["val_gets"] == 0
    requests = json.loads(s3.read_uri(f"{output}/cached/summary.json"))["s3_requests"]
    assert requests["gets"] == sum(line["gets"] for line in _history(output, "cached"))
    assert requests["request_cost_usd"] == pytest.approx(requests["gets"] * 0.5 / 1000)
    assert requests["gets_per_patch_last_epoch"] == resumed["gets_per_patch"]
    assert requests["cache_gb"] == 1 and requests["expected_hit_fraction"] == 1.0 and requests["dataset_gb"] > 0
