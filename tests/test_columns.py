"""A series' per-object state as columns (brainseg.data.columns): each column reads exactly as the
tuple it replaces, for real headers written by pydicom and parsed by the project's reader, and a
catalog of single-frame series holds its objects that way."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest

from brainseg.data.catalog import build_catalog
from brainseg.data.columns import Headers, Numbers, Rows, Texts, plane_rows
from brainseg.dicom import parse_header, writer
from tests.conftest import put_case, small_phantom


def _same(column, values: tuple) -> None:
    """``column`` behaves as ``values`` does: items, negative indices, slices, iteration, equality,
    hashing and a pickle round trip."""
    assert len(column) == len(values) and tuple(column) == values and list(column) == list(values)
    assert all(column[index] == values[index] for index in range(-len(values), len(values)))
    assert column[1:-1] == values[1:-1] and column == values and hash(column) == hash(values)
    assert pickle.loads(pickle.dumps(column)) == values
    with pytest.raises(IndexError):
        column[len(values)]


@pytest.mark.parametrize("values", [
    ("brats/case_0001/t1c/IM_0001.dcm", "brats/case_0001/t1c/IM_0002.dcm", "brats/case_0001/t1c/IM_0010.dcm"),
    ('"5d41402abc4b2a76b9719d911017c592"', '"7d793037a0760186574b0282f2f435e7"', '"5d41402abc4b2a76b9719d911017c593"'),
    ('"5d41402abc4b2a76b9719d911017c592-3"', '"9e1"', '"x"'),  # multipart ETags, other stores' ETags
    ("DICOM/PA0/ST0/SE3/IM12", "DICOM/PA0/ST0/SE3/IM1", "DICOM/PA0/ST0/SE3/IM9A", "dicom/Ärzte/ß"),
    ("same", "same", "same"), ("ab", "ab", "Ab"), ("0a", "0b", "0c"), ("", "x", ""),
])
def test_texts_read_back_every_string(values):
    _same(Texts(values), values)


def test_hex_texts_keep_two_hex_digits_in_a_byte():
    etags = tuple(f'"{index:032x}"' for index in range(1000))
    assert Texts(etags)._width == 16 and len(Texts(etags)._body) == 16_000
    _same(Texts(etags), etags)


@pytest.mark.parametrize("values", [(7, 7, 7), (1, 2, 2**40, -5), (1.0, 1.0), (0.5, 1.25, -3.0), (1, 2.5)])
def test_numbers_read_back_every_value_with_its_type(values):
    column = Numbers(values)
    _same(column, values)
    kinds = {type(value) for value in column}
    assert kinds == ({float} if any(isinstance(value, float) for value in values) else {int})


def test_planes_read_back_as_pairs_of_ints():
    planes = tuple((obj, frame) for obj in range(4) for frame in range(3))
    _same(plane_rows(planes), planes)
    assert all(type(value) is int for plane in plane_rows(planes) for value in plane)


def _headers(slopes=(1.0,), syntax: str = "explicit-le") -> tuple:
    volume = small_phantom(shape=(6, 20, 18)).image.astype(np.int16)
    spec = writer.SeriesSpec(spacing=(2.0, 0.9, 0.8), origin=(-90.5, -120.25, 33.0))
    headers = []
    for index, dataset in enumerate(writer.slice_datasets(volume, spec)):
        dataset.RescaleSlope = slopes[index % len(slopes)]
        if index == 3:
            dataset.ImageComments = "a longer header: this slice's pixels start further in"
        data = writer.encode(dataset, syntax)
        headers.append(parse_header(data, len(data), b"key"))
    return tuple(headers)


@pytest.mark.parametrize("syntax,slopes", [("explicit-le", (1.0,)), ("implicit-le", (1.0, 2.0)), ("rle", (1.0,))])
def test_a_series_headers_become_columns_and_read_back_as_parsed(syntax, slopes):
    headers = _headers(slopes, syntax)
    column = Headers.of(headers)
    assert isinstance(column, Headers)
    assert len({header.pixel_offset for header in headers}) > 1  # the longer header: a column value
    _same(column, headers)


def test_headers_that_differ_in_a_shared_field_stay_a_tuple():
    headers = _headers()
    mixed = (*headers[:2], dataclasses.replace(headers[2], rows=headers[2].rows + 1), *headers[3:])
    assert Headers.of(mixed) == mixed and isinstance(Headers.of(mixed), tuple)
    several = (dataclasses.replace(headers[0], frames=2, positions=headers[0].positions * 2),)
    assert isinstance(Headers.of(several), tuple)


@pytest.mark.parametrize("syntax", ["explicit-le", "rle"])
def test_a_multi_frame_objects_per_frame_values_become_columns(syntax):
    volume = small_phantom(shape=(7, 20, 18)).image.astype(np.int16)
    data = writer.encode(writer.multiframe_dataset(volume, writer.SeriesSpec(origin=(-90.5, -120.25, 33.0))), syntax)
    header = parse_header(data, len(data), b"key")
    [framewise] = Headers.of((header,))
    assert framewise == header and hash(framewise) == hash(header)
    assert isinstance(framewise.positions, Rows) and len(framewise.positions) == 7
    _same(framewise.positions, header.positions)
    _same(framewise.frame_starts, header.frame_starts)


def test_a_catalogs_single_frame_series_hold_their_objects_as_columns(bucket):
    root = f"s3://{bucket}/columns"
    phantom = small_phantom()
    image, mask = phantom.image, phantom.mask
    put_case(root, "case_000", image, mask)
    [case] = build_catalog(root + "/", split_fractions=(1.0, 0.0, 0.0)).cases
    for series in (case.image, case.mask):
        assert isinstance(series.keys, Texts) and isinstance(series.etags, Texts)
        assert isinstance(series.headers, Headers) and isinstance(series.planes, Rows)
        assert all(key.startswith("columns/case_000/") for key in series.keys)
    np.testing.assert_array_equal(case.mask.read_volume(), mask)
    assert np.abs(case.image.read_region(2, 9, 3, 30, 4, 20) - image[2:9, 3:30, 4:20]).max() < 1e-3
