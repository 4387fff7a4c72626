"""Catalog: splits, manifest, the ETag-keyed header index, bad input, and no patient identifiers."""

import io
import json
import logging
import os

import pydicom
import pytest

from brainseg.config import Hyperparameters
from brainseg.data.catalog import build_catalog
from brainseg.dicom import writer
from brainseg.io import s3
from tests.conftest import dicom_bytes, put, put_case, small_phantom


def _dataset(bucket: str, count: int, patient_of=lambda n: f"PID-{n}") -> str:
    root = f"s3://{bucket}/data"
    for number in range(count):
        phantom = small_phantom(seed=number, shape=(6, 32, 32))
        spec = writer.SeriesSpec(spacing=(2.0, 1.0, 1.0), patient_id=patient_of(number),
                                 patient_name=f"Doe^Jane{number}")
        put_case(root, f"case_{number:02d}", phantom.image, phantom.mask, spec=spec)
    return root + "/"


def _splits(catalog) -> dict:
    return {case.case_id: case.split for case in catalog.cases}


def test_seeded_patient_level_split(bucket):
    uri = _dataset(bucket, 10, patient_of=lambda n: "PID-shared" if n in (3, 7) else f"PID-{n}")
    first = build_catalog(uri, seed=5)
    assert [len(first.split(name)) for name in ("train", "val", "test")] == [5, 2, 3]
    assert first.cases[3].split == first.cases[7].split  # one patient, one split
    assert _splits(build_catalog(uri, seed=5, refresh_index=True)) == _splits(first)
    others = [_splits(build_catalog(uri, seed=seed)) for seed in (6, 7, 8)]
    assert any(split != _splits(first) for split in others)


def test_custom_fractions_are_checked(bucket):
    uri = _dataset(bucket, 4)
    assert len(build_catalog(uri, split_fractions=(0.5, 0.5, 0.0)).split("val")) == 2
    with pytest.raises(ValueError, match="summing to 1"):
        build_catalog(uri, split_fractions=(0.5, 0.2, 0.2))


def test_manifest_fixes_the_split(bucket):
    uri = _dataset(bucket, 4)
    put(uri + "manifest.csv", b"case_id,split\ncase_00,test\ncase_01,train\ncase_02,val\n")
    catalog = build_catalog(uri)
    assert _splits(catalog) == {"case_00": "test", "case_01": "train", "case_02": "val"}
    assert [(item.case_id, item.reason) for item in catalog.exclusions] == [("case_03", "not listed in manifest.csv")]


def test_malformed_manifest_says_where(bucket):
    uri = _dataset(bucket, 2)
    put(uri + "manifest.csv", b"case_id,split\ncase_00,training\n")
    with pytest.raises(ValueError, match=r"manifest\.csv line 2: \['case_00', 'training'\]; expected"):
        build_catalog(uri)


def test_index_is_reused_and_invalidated_by_etag(bucket):
    uri = _dataset(bucket, 3)
    first = build_catalog(uri)
    assert first.index_stats["headers_read"] == first.index_stats["objects"] == 36
    s3.reset_stats()
    second = build_catalog(uri)
    assert second.index_stats["headers_read"] == 0
    assert s3.stats()["get_requests"] == 2  # the index and its identity key; no header, no pixel read
    key_uri = f"{uri}case_01/image/IM_0001.dcm"
    dataset = pydicom.dcmread(io.BytesIO(s3.read_uri(key_uri)))
    dataset.PixelData = (dataset.pixel_array + 1).tobytes()  # same slice, new pixels, new ETag
    put(key_uri, dicom_bytes(dataset))
    third = build_catalog(uri)
    assert third.index_stats["headers_read"] == 1
    assert third.index_stats["cases_summarised"] == 1


def test_index_at_another_location_and_unwritable_location(bucket, caplog):
    uri = _dataset(bucket, 2)
    elsewhere = f"s3://{bucket}/indexes/run.json"
    build_catalog(uri, index_uri=elsewhere)
    assert s3.read_uri(elsewhere) is not None
    assert s3.read_uri(uri + ".brainseg/index.jsonl") is None
    with caplog.at_level(logging.WARNING):
        catalog = build_catalog(uri, index_uri="s3://no-such-bucket-here/index.json")
    assert len(catalog.cases) == 2
    assert "could not save the header index to s3://no-such-bucket-here/index.json" in caplog.text


def test_no_patient_identifiers_in_logs_or_index(bucket, caplog):
    uri = _dataset(bucket, 3)
    put(uri + "case_01/image/IM_0001.dcm", b"not dicom")
    with caplog.at_level(logging.DEBUG, logger="brainseg"):
        catalog = build_catalog(uri)
    assert [item.case_id for item in catalog.exclusions] == ["case_01"]
    index = s3.read_uri(uri + ".brainseg/index.jsonl").decode()
    for text in (caplog.text, index, json.dumps([item.reason for item in catalog.exclusions])):
        assert "Doe^Jane" not in text and "PID-" not in text and "19700101" not in text
    assert "case_01 excluded" in caplog.text


@pytest.mark.parametrize("uri, message", [
    ("/data/local/path", "expected an S3 URI like s3://bucket/prefix/"),
    ("s3:///prefix", "has no bucket name"),
])
def test_bad_uri(uri, message):
    with pytest.raises(ValueError, match=message):
        build_catalog(uri)


def test_empty_prefix(bucket):
    with pytest.raises(ValueError, match=rf"no case folders under s3://{bucket}/nothing/"):
        build_catalog(f"s3://{bucket}/nothing/")


def test_missing_bucket():
    with pytest.raises(s3.S3Error, match=r"LIST s3://missing-bucket-x/data/ failed: NoSuchBucket"):
        build_catalog("s3://missing-bucket-x/data/")


def test_trusted_index_starts_without_listing(bucket):
    uri = _dataset(bucket, 3)
    put(uri + "manifest.csv", b"case_id,split\ncase_00,train\ncase_01,val\ncase_02,test\n")
    listed = build_catalog(uri)
    s3.reset_stats()
    trusted = build_catalog(uri, trust_index=True)
    stats = s3.stats()
    assert stats["list_requests"] == 0
    assert stats["get_requests"] == 3  # the index, its identity key and the manifest
    assert _splits(trusted) == _splits(listed) == {"case_00": "train", "case_01": "val", "case_02": "test"}
    assert trusted.fingerprint == listed.fingerprint


def test_object_changed_after_indexing_fails_loudly(bucket):
    uri = _dataset(bucket, 2)
    catalog = build_catalog(uri, trust_index=True)
    key_uri = f"{uri}case_00/image/IM_0002.dcm"
    dataset = pydicom.dcmread(io.BytesIO(s3.read_uri(key_uri)))
    dataset.PixelData = (dataset.pixel_array // 2).tobytes()
    put(key_uri, dicom_bytes(dataset))
    with pytest.raises(s3.S3Error, match=r"IM_0002\.dcm changed since it was indexed .* --refresh-index"):
        catalog.cases[0].image.read_volume()


def test_identifiers_are_hashed_with_a_per_dataset_key(bucket, monkeypatch):
    uri = _dataset(bucket, 4, patient_of=lambda n: "PID-same" if n < 2 else f"PID-{n}")
    first = build_catalog(uri)
    key = s3.read_uri(uri + ".brainseg/index.jsonl.key")
    assert len(key) == 32
    assert first.cases[0].patient_group == first.cases[1].patient_group != first.cases[2].patient_group
    copy = f"s3://{bucket}/copy/"
    source_bucket, source_prefix = s3.parse_uri(uri)
    for info in s3.list_objects(source_bucket, source_prefix + "case_"):
        s3.client().copy_object(Bucket=bucket, Key="copy/" + info.key[len(source_prefix):],
                                  CopySource={"Bucket": bucket, "Key": info.key})
    second = build_catalog(copy)
    assert s3.read_uri(copy + ".brainseg/index.jsonl.key") != key  # another dataset, another key
    assert second.cases[0].patient_group != first.cases[0].patient_group  # so hashes cannot be compared across
    assert _splits(second) == _splits(first)  # while the split depends only on the cases and the seed
    monkeypatch.setenv("BRAINSEG_IDENTITY_KEY", "ab" * 32)
    s3.reset_stats()
    third = build_catalog(uri)
    assert third.index_stats["headers_read"] == third.index_stats["objects"] == 48  # an index hashed with another key is not reused
    monkeypatch.setenv("BRAINSEG_IDENTITY_KEY", "not hex")
    with pytest.raises(ValueError, match="BRAINSEG_IDENTITY_KEY must be at least 16 bytes written as hex"):
        build_catalog(uri)


def test_the_identity_key_can_live_apart_from_the_index(bucket, monkeypatch):
    uri = _dataset(bucket, 2)
    key_uri = f"s3://{bucket}/secrets/brain.key"
    first = build_catalog(uri, identity_key_uri=key_uri)
    key = s3.read_uri(key_uri)
    assert len(key) == 32 and s3.read_uri(uri + ".brainseg/index.jsonl.key") is None  # nothing beside the index
    s3.reset_stats()
    again = build_catalog(uri, identity_key_uri=key_uri)
    assert s3.read_uri(key_uri) == key and again.index_stats["headers_read"] == 0  # same key: the index is reused
    assert [case.patient_group for case in again.cases] == [case.patient_group for case in first.cases]
    monkeypatch.setenv("HOSPITAL_KEY", key.hex())
    from_secret = build_catalog(uri, identity_key_uri="env:HOSPITAL_KEY")
    assert from_secret.index_stats["headers_read"] == 0  # the same key from a secret store: the same hashes
    monkeypatch.delenv("HOSPITAL_KEY")
    with pytest.raises(ValueError, match="identity_key_uri env:HOSPITAL_KEY: the environment variable HOSPITAL_KEY "
                                         "is not set"):
        build_catalog(uri, identity_key_uri="env:HOSPITAL_KEY")
    with pytest.raises(ValueError, match=r"identity_key_uri s3://no-such-bucket-\w+/k: the key cannot be read or "
                                         r"created .*grant the job s3:GetObject and s3:PutObject on it"):
        build_catalog(uri, identity_key_uri=f"s3://no-such-bucket-{os.getpid()}/k")


@pytest.mark.parametrize("value, message", [
    ("s3://b/", "expected s3://bucket/key"), ("env:1X", "expected s3://bucket/key"), ("gs://b/k", "expected s3"),
    ("s3://scans/brain/case_01/key", "inside data_uri s3://scans/brain/ but not under its .brainseg/ folder"),
])
def test_an_identity_key_location_that_could_not_work_is_refused(value, message):
    with pytest.raises(ValueError, match=message):
        Hyperparameters(data_uri="s3://scans/brain/", output_uri="s3://out/runs/", identity_key_uri=value)


def test_the_index_never_overwrites_data(bucket):
    uri = _dataset(bucket, 2)
    with pytest.raises(ValueError, match=r"index_uri .*case_00/image/index\.jsonl is inside the dataset .* but not "
                                         r"under its \.brainseg/ folder"):
        build_catalog(uri, index_uri=uri + "case_00/image/index.jsonl")
    dicom = s3.read_uri(uri + "case_00/image/IM_0001.dcm")
    elsewhere = f"s3://{bucket}/not-an-index.dcm"
    put(elsewhere, dicom)
    for refresh in (False, True):
        with pytest.raises(ValueError, match="holds an object that is not a brainseg header index; it would be "
                                             "overwritten"):
            build_catalog(uri, index_uri=elsewhere, refresh_index=refresh)
    assert s3.read_uri(elsewhere) == dicom


@pytest.mark.parametrize("where, hint", [
    ("", r"cases seem to be one level down, under s3://{bucket}/nest/data/"),
    ("data/case_00/", r"s3://{bucket}/nest/data/case_00/ looks like a single case folder .* pass its parent "
                      r"s3://{bucket}/nest/data/"),
])
def test_a_prefix_one_level_off_gets_a_hint(bucket, where, hint):
    root = f"s3://{bucket}/nest/data"
    phantom = small_phantom(seed=1, shape=(6, 32, 32))
    put_case(root, "case_00", phantom.image, phantom.mask)
    with pytest.raises(ValueError, match="no case folders under .*" + hint.format(bucket=bucket)):
        build_catalog(f"s3://{bucket}/nest/{where}")


def test_manifest_names_match_in_any_unicode_normal_form(bucket):
    root = f"s3://{bucket}/accents"
    for number, name in enumerate(("Ame\u0301lie", "Zoe\u0308")):  # decomposed, as macOS writes file names
        phantom = small_phantom(seed=number, shape=(6, 32, 32))
        put_case(root, name, phantom.image, phantom.mask)
    put(root + "/manifest.csv", "case_id,split\nAm\u00e9lie,train\nZo\u00eb,val\n".encode())
    catalog = build_catalog(root + "/")
    assert [case.split for case in catalog.cases] == ["train", "val"] and not catalog.exclusions


def test_the_catalog_steps_run_alone(bucket):
    """build_catalog's named steps, one at a time, on four cases: one a copy of another patient's
    folder, one left out of the manifest."""
    from brainseg.data.catalog import (
        assemble_cases,
        check_cases,
        exclude_duplicates,
        index_objects,
        patient_groups,
        split_cases,
        summarise_cases,
    )
    from brainseg.data.index import HeaderIndex
    from brainseg.data.listing import list_cases

    uri = _dataset(bucket, 3)
    for info in s3.list_objects(bucket, "data/case_01/"):
        s3.put_bytes(f"s3://{bucket}/{info.key.replace('case_01', 'case_09')}", s3.get_object(bucket, info.key))
    s3.put_bytes(uri + "manifest.csv", b"case_id,split\ncase_00,train\ncase_01,val\ncase_09,test\n")
    empty = HeaderIndex("key", {}, {})

    listed = list_cases(uri, ("image",), empty)
    assert sorted(listed.grouped) == ["case_00", "case_01", "case_02", "case_09"] and listed.manifest is not None
    indexed = index_objects(listed, empty, b"k" * 32, 2**20)
    assert indexed.read == len(listed.objects) == len(indexed.objects)
    assembled = assemble_cases(listed, indexed.objects, zero_fill=False, require_masks=True)
    assert sorted(assembled.series) == ["case_00", "case_01", "case_02", "case_09"] and not assembled.reasons
    summaries, summarised, unreadable = summarise_cases(listed, assembled, empty)
    assert summarised == 4 and not unreadable and all(summary.tumour_voxels for _, summary in summaries.values())
    assert check_cases(assembled, summaries, {}, None, exclude_empty_masks=True) == {}
    duplicates = exclude_duplicates(assembled, {})
    assert duplicates == {"case_09": "image objects duplicate those of case case_01 (copied or mislabelled patient "
                                     "folder)"}
    groups = patient_groups(assembled)
    assert groups["case_09"] == groups["case_01"] != groups["case_00"]
    splits, unlisted = split_cases(listed, assembled, groups, duplicates, seed=0, split_fractions=(0.5, 0.2, 0.3))
    assert splits == {"case_00": "train", "case_01": "val"} and unlisted == {"case_02": "not listed in manifest.csv"}
