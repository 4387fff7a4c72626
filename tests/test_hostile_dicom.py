"""Hostile and damaged DICOM: every bad byte is an exclusion (or a skip) with a true reason, never a
crash, never wrong numbers, never a header value in a log, a reason or the index."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info

from brainseg.config import Hyperparameters
from brainseg.data.catalog import build_catalog
from brainseg.data.index import read_header
from brainseg.data.stream import PatchStream, read_case_region
from brainseg.dicom import HeaderError, parse_header, writer
from brainseg.io import s3
from brainseg.model.networks import NetworkSpec, build_model
from brainseg.run.evaluate import aggregate, evaluate
from brainseg.stream_config import StreamConfig
from brainseg.tasks import task_of
from infra.data.profile import profile_catalog
from tests.conftest import console_script, dicom_bytes, put, put_case, small_phantom
from tests.support.fuzz import (
    MASK_KINDS,
    PHI,
    PHI_TOKENS,
    VOLUME,
    fuzz_headers,
    identified_slice,
    write_fuzzed_cases,
    write_fuzzed_masks,
)

ROOT = Path(__file__).resolve().parents[1]


def _with_meta(data: bytes, **changes) -> bytes:
    """The object with its file meta rewritten (no check that the values make sense)."""
    (meta_length,) = struct.unpack_from("<I", data, 140)
    meta = pydicom.dcmread(io.BytesIO(data)).file_meta
    for keyword, value in changes.items():
        setattr(meta, keyword, value)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta, enforce_standard=False)
    return data[:132] + buffer.getvalue() + data[144 + meta_length:]


def _unknown_vr(data: bytes, tag: bytes) -> bytes:
    position = data.index(tag + b"UI")
    return data[:position + 4] + b"ZZ" + data[position + 6:]


def _multiframe(**changes) -> bytes:
    dataset = pydicom.dcmread(io.BytesIO(writer.encode(writer.multiframe_dataset(VOLUME, writer.SeriesSpec()), "rle")))
    for keyword, value in changes.items():
        setattr(dataset, keyword, value)
    return dicom_bytes(dataset)


def _bad_offset_table() -> bytes:
    data = bytearray(_multiframe())
    header = parse_header(bytes(data), len(data))
    table = header.frame_starts[0] - 4 * 4  # the four offsets sit just before the first fragment
    struct.pack_into("<I", data, table + 8, 10**6)
    return bytes(data)


def _huge_private_element(length: int) -> bytes:
    """A slice with a private element whose declared length is ``length`` bytes."""
    dataset = identified_slice()
    dataset.add_new(0x00291010, "OB", b"\0" * 16)
    data = bytearray(dicom_bytes(dataset))
    struct.pack_into("<I", data, data.index(b"\x29\x00\x10\x10OB") + 8, length)
    return bytes(data)


def _undefined_pixel_length() -> bytes:
    data = bytearray(dicom_bytes(identified_slice()))
    struct.pack_into("<I", data, data.index(b"\xe0\x7f\x10\x00OW") + 8, 0xFFFFFFFF)
    return bytes(data)


HOSTILE = [
    ("transfer syntax is an SOP class", lambda: _with_meta(dicom_bytes(identified_slice()),
                                                           TransferSyntaxUID="1.2.840.10008.5.1.4.1.1.4"),
     r"TransferSyntaxUID \(0002,0010\) holds a MR Image Storage UID, not a transfer syntax"),
    ("transfer syntax is a private UID", lambda: _with_meta(dicom_bytes(identified_slice()), TransferSyntaxUID="1.2.3.4.5"),
     r"holds an unregistered UID, not a transfer syntax"),
    ("unknown VR in SOPInstanceUID", lambda: _unknown_vr(dicom_bytes(identified_slice()), b"\x08\x00\x18\x00"),
     r"SOPInstanceUID \(0008,0018\) cannot be decoded"),
    ("implicit declared, explicit written", lambda: _with_meta(dicom_bytes(identified_slice()),
                                                               TransferSyntaxUID="1.2.840.10008.1.2"),
     r"the file meta declares Implicit VR Little Endian but the data set is encoded as Explicit VR Little Endian"),
    ("explicit declared, implicit written", lambda: _with_meta(writer.encode(identified_slice(), "implicit-le"),
                                                               TransferSyntaxUID="1.2.840.10008.1.2.1"),
     r"declares Explicit VR Little Endian but the data set is encoded as Implicit VR Little Endian"),
    ("big endian declared, little written", lambda: _with_meta(dicom_bytes(identified_slice()),
                                                               TransferSyntaxUID="1.2.840.10008.1.2.2"),
     r"declares Explicit VR Big Endian but the data set is encoded as Explicit VR Little Endian"),
    ("little endian declared, big written", lambda: _with_meta(writer.encode(identified_slice(), "explicit-be"),
                                                               TransferSyntaxUID="1.2.840.10008.1.2.1"),
     r"declares Explicit VR Little Endian but the data set is encoded as Explicit VR Big Endian"),
    ("a 4 GB element in a small object", lambda: _huge_private_element(0xFFFFFFF0),
     r"^element \(0029,1010\) declares 4,294,967,280 bytes, past the end of the 1,6\d\d-byte object"),
    ("undefined-length native Pixel Data", _undefined_pixel_length,
     r"Pixel Data element has undefined length \(the encapsulated form\), but Explicit VR Little Endian is a "
     r"native transfer syntax: a defined length of the 512 bytes"),
    ("rescale slope beyond float32", lambda: dicom_bytes(identified_slice(RescaleSlope="1e39", RescaleIntercept="0")),
     r"RescaleSlope \(0028,1053\) takes 16-bit stored values to 3.28e\+43, beyond float32"),
    ("slope that overflows with the largest stored value", lambda: dicom_bytes(identified_slice(
        RescaleSlope="2e34", RescaleIntercept="0")), r"RescaleSlope \(0028,1053\) takes 16-bit stored values to 6.55e\+38"),
    ("rescale intercept beyond float32", lambda: dicom_bytes(identified_slice(RescaleSlope="1",
                                                                              RescaleIntercept="-4e38")),
     r"RescaleIntercept \(0028,1052\) takes 16-bit stored values to 4e\+38, beyond float32"),
    ("NaN rescale slope", lambda: dicom_bytes(identified_slice(RescaleSlope="NaN", RescaleIntercept="0")),
     r"RescaleSlope \(0028,1053\) holds a value that is not a finite number"),
    ("infinite intercept", lambda: dicom_bytes(identified_slice(RescaleSlope="1", RescaleIntercept="-inf")),
     r"RescaleIntercept \(0028,1052\) holds a value that is not a finite number"),
    ("zero rescale slope", lambda: dicom_bytes(identified_slice(RescaleSlope="0", RescaleIntercept="0")),
     r"RescaleSlope is 0"),
    ("infinite position", lambda: dicom_bytes(identified_slice(ImagePositionPatient=["0", "inf", "0"])),
     r"ImagePositionPatient \(0020,0032\) holds a value that is not a finite number"),
    ("NaN spacing", lambda: dicom_bytes(identified_slice(PixelSpacing=["nan", "1"])),
     r"PixelSpacing \(0028,0030\) holds a value that is not a finite number"),
    ("zero spacing", lambda: dicom_bytes(identified_slice(PixelSpacing=[0.0, 1.0])), r"PixelSpacing is not positive"),
    ("degenerate orientation", lambda: dicom_bytes(identified_slice(ImageOrientationPatient=[0, 0, 0, 0, 0, 0])),
     r"ImageOrientationPatient is not two orthogonal unit vectors"),
    ("orientation with 5 values", lambda: dicom_bytes(identified_slice(ImageOrientationPatient=[1, 0, 0, 0, 1])),
     r"ImageOrientationPatient \(0020,0037\) has 5 value\(s\); expected 6"),
    ("BitsStored above BitsAllocated", lambda: dicom_bytes(identified_slice(BitsStored=17)),
     r"BitsStored is 17; expected 1 to BitsAllocated \(16\)"),
    ("colour photometric", lambda: dicom_bytes(identified_slice(PhotometricInterpretation="PALETTE COLOR")),
     r"PhotometricInterpretation is not MONOCHROME1 or MONOCHROME2"),
    ("frames without positions", lambda: dicom_bytes(identified_slice(NumberOfFrames=3)),
     r"NumberOfFrames is 3 with one ImagePositionPatient and no per-frame positions"),
    ("frames without their functional groups", lambda: _multiframe(NumberOfFrames=6),
     r"NumberOfFrames is 6 but PerFrameFunctionalGroupsSequence has 4 item\(s\)"),
    ("offset table points outside", _bad_offset_table,
     r"the offset table of the encapsulated Pixel Data points outside the object or out of order"),
    ("payload cut", lambda: dicom_bytes(identified_slice())[:-100],
     r"Pixel Data holds 412 of the 512 bytes that 1 frame\(s\) of 16x16x16 bits need \(truncated object\?\)"),
    ("header cut", lambda: dicom_bytes(identified_slice())[:700],
     r"^element \(\w{4},\w{4}\) \w+ declares \d+ bytes, past the end of the 700-byte object \(a wrong length, or a "
     r"truncated object\)$"),
]


@pytest.mark.parametrize("make, reason", [(make, reason) for _, make, reason in HOSTILE],
                         ids=[name for name, _, _ in HOSTILE])
def test_a_damaged_image_header_is_refused_with_a_true_reason(make, reason):
    data = make()
    with pytest.raises(HeaderError, match=reason) as raised:
        parse_header(data, len(data))
    assert not any(token in str(raised.value) for token in PHI_TOKENS)


def test_an_element_declaring_gigabytes_is_refused_without_downloading_the_object(bucket):
    dataset = identified_slice()
    dataset.add_new(0x00291010, "OB", b"\0" * 16)  # a private element; its length is made huge below
    data = bytearray(dicom_bytes(dataset))
    position = data.index(b"\x29\x00\x10\x10OB")
    struct.pack_into("<I", data, position + 8, 3 * 2**30)
    data += b"\0" * (3 * 2**20)  # a 3 MiB object whose header claims 3 GiB
    put(f"s3://{bucket}/huge/IM_0001.dcm", bytes(data))
    s3.reset_stats()
    indexed = read_header(bucket, s3.ObjectInfo("huge/IM_0001.dcm", len(data), ""))
    assert indexed.header is None and not indexed.stray
    assert indexed.error.startswith("the header does not end within 1,048,576 bytes (element (0029,1010) declares "
                                    "3,221,225,472 bytes); larger headers are not read")
    assert s3.stats()["bytes_received"] == 2**20


def test_padded_pixel_data_is_read_like_unpadded_and_counted_in_the_profile(bucket):
    root = f"s3://{bucket}/padded"
    phantom = small_phantom(seed=5)
    put_case(root, "case_a", phantom.image, phantom.mask)
    put_case(root, "case_b", phantom.image, phantom.mask)
    for number, dataset in enumerate(writer.slice_datasets(phantom.image, writer.SeriesSpec(spacing=(2.0, 0.9, 0.8),
                                                                                            patient_id="PID-case_b")),
                                     start=1):
        dataset.PixelData += b"\0" * 64  # trailing padding, as some archives write it
        put(f"{root}/case_b/image/IM_{number:04d}.dcm", dicom_bytes(dataset))
    catalog = build_catalog(root + "/")
    assert [case.case_id for case in catalog.cases] == ["case_a", "case_b"] and not catalog.exclusions
    region = (0, phantom.image.shape[0], 0, phantom.image.shape[1], 0, phantom.image.shape[2])
    (plain,), _ = read_case_region(catalog.cases[0], region)
    (padded,), _ = read_case_region(catalog.cases[1], region)
    np.testing.assert_array_equal(plain, padded)
    assert profile_catalog(catalog)["padded_objects"] == phantom.image.shape[0]


def test_header_values_never_reach_logs_reasons_or_the_index(bucket, caplog, capfd):
    root = f"s3://{bucket}/phi"
    phantom = small_phantom(seed=3)
    spec = writer.SeriesSpec(spacing=(2.0, 0.9, 0.8), patient_id=PHI["PatientID"], patient_name=PHI["PatientName"])
    put_case(root, "case_a", phantom.image, phantom.mask, spec=spec)
    damaged = identified_slice(SOPInstanceUID="1.2.ACC998877.19700101.Doe^Jane", StudyInstanceUID="MRN12345")
    put(f"{root}/case_a/image/IM_0099.dcm", _unknown_vr(dicom_bytes(damaged), b"\x08\x00\x18\x00"))
    put(f"{root}/case_b/image/IM_0001.dcm", dicom_bytes(identified_slice(SeriesInstanceUID="1.2.St Elsewhere")))
    with caplog.at_level(logging.DEBUG):
        catalog = build_catalog(root + "/")
    assert not catalog.cases and [item.case_id for item in catalog.exclusions] == ["case_a", "case_b"]
    index = s3.read_uri(root + "/.brainseg/index.jsonl").decode()
    printed = capfd.readouterr()
    for text in (caplog.text, printed.out, printed.err, index, json.dumps([item.reason for item in catalog.exclusions])):
        assert not any(token in text for token in PHI_TOKENS), text
    assert "1.2.840.10008" not in index.replace("1.2.840.10008.1.2.1", "")  # no UID kept verbatim
    inspected = subprocess.run([console_script("brainseg-inspect"), root + "/", "--refresh-index"], cwd=ROOT,
                               capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert inspected.returncode == 0 and "case_a:" in inspected.stdout  # outside pytest's warning capture
    assert not any(token in inspected.stdout + inspected.stderr for token in PHI_TOKENS)


@pytest.mark.parametrize("count", [1500, pytest.param(40_000, marks=pytest.mark.slow)])
def test_fuzzed_headers_are_parsed_or_refused_never_crash_or_misread(count):
    result = fuzz_headers(count)
    assert result["mistakes"] == []
    assert result["parsed"] + result["excluded"] + result["skipped"] == count
    assert result["parsed"] > count // 10 and result["excluded"] > count // 10  # both paths exercised
    assert result["values_checked"] > result["parsed"] // 4


@pytest.mark.parametrize("cases", [24, pytest.param(300, marks=pytest.mark.slow)])
def test_fuzzed_cases_never_escape_build_catalog(bucket, cases):
    root = f"s3://{bucket}/fuzz/"
    write_fuzzed_cases(root, cases, seed=cases)
    catalog = build_catalog(root)
    assert len(catalog.cases) + len(catalog.exclusions) == cases
    for item in catalog.exclusions:
        assert item.reason and "unexpected" not in item.reason, item
        assert not any(token in item.reason for token in PHI_TOKENS)
    assert 0 < len(catalog.exclusions) < cases


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_fuzzed_structure_sets_and_segs_never_escape_build_catalog(bucket, kind):
    """Masks as hostile as the image headers above: a mutated RTSTRUCT (anywhere: it is all header)
    or SEG header costs its case with a reason, never the catalog. 1,000 of each: the reliability
    benchmark."""
    root = f"s3://{bucket}/fuzz-{kind}/"
    write_fuzzed_masks(root, kind, 24, seed=len(kind))
    catalog = build_catalog(root)
    assert len(catalog.cases) + len(catalog.exclusions) == 24
    for item in catalog.exclusions:
        assert item.reason and "unexpected" not in item.reason, item
        assert not any(token in item.reason for token in PHI_TOKENS), item.reason
    assert 0 < len(catalog.exclusions) < 24


def _corrupt_rle_frame(data: bytes) -> bytes:
    """An RLE slice whose frame header announces 7 segments (a 16-bit frame has 2): undecodable."""
    start = parse_header(data, len(data)).frame_starts[0] + 8  # past the item tag and length
    damaged = bytearray(data)
    struct.pack_into("<I", damaged, start, 7)
    return bytes(damaged)


@pytest.fixture(scope="module")
def damaged_frame_catalog():
    """Three RLE cases; case_1's fifth slice cannot be decoded, and the index (which reads 8 of
    12 slices per case) cannot see it."""
    s3.client().create_bucket(Bucket="damaged-frame")
    root = "s3://damaged-frame/data"
    for number in range(3):
        phantom = small_phantom(seed=40 + number, shape=(12, 32, 32))
        put_case(root, f"case_{number}", phantom.image, phantom.mask, transfer_syntax="rle")
    key = f"{root}/case_1/image/IM_0005.dcm"
    put(key, _corrupt_rle_frame(s3.read_uri(key)))
    catalog = build_catalog(root + "/", split_fractions=(1.0, 0.0, 0.0))
    assert len(catalog.cases) == 3 and not catalog.exclusions
    return catalog


def _samples(cases, count: int) -> list[dict]:
    config = StreamConfig(patch_size=(4, 16, 16), slab_margin=(0, 0), patches_per_slab=2, augment=False,
                          memory_budget_bytes=64 * 2**20, seed=3)
    stream = iter(PatchStream(cases, config))
    return [next(stream) for _ in range(count)]


def test_a_slab_that_cannot_be_decoded_is_replaced_the_same_way_every_time(damaged_frame_catalog, caplog):
    cases = damaged_frame_catalog.split("train")
    with caplog.at_level(logging.WARNING, logger="brainseg.data.stream"):
        first = _samples(cases, 80)
    assert "case case_1: a slab cannot be decoded (IM_0005.dcm: a compressed frame cannot be decoded" in caplog.text
    second = _samples(cases, 80)
    assert all(torch.equal(a["image"], b["image"]) and a["case_id"] == b["case_id"] for a, b in zip(first, second))
    from_damaged = [sample["origin"][0].item() for sample in first if sample["case_id"] == "case_1"]
    assert from_damaged and all(not z <= 4 < z + 4 for z in from_damaged)  # no patch covers the damaged slice


def test_a_case_that_cannot_be_decoded_is_left_out_of_the_evaluation(damaged_frame_catalog, caplog):
    hp = Hyperparameters(channels=(4, 8), patch_size=(4, 16, 16), res_units=1)
    with caplog.at_level(logging.WARNING, logger="brainseg.run.evaluate"):
        results = evaluate(build_model(NetworkSpec.of(hp, 2)), damaged_frame_catalog.cases, hp, task_of(hp),
                           torch.device("cpu"))
    assert [result.row().get("error", "") != "" for result in results] == [False, True, False]
    assert aggregate(results)["cases"] == 2 and aggregate(results)["unreadable"] == 1
    assert "case case_1 left out of the evaluation" in caplog.text
