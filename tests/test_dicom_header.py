"""Header parsing from a prefix: located pixel data, growth requests, and clear refusals."""

import datetime
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest

from brainseg.dicom import HeaderError, NeedMoreBytes, parse_header, writer
from brainseg.dicom.pixels import decode_native_rows
from tests.conftest import dicom_bytes

SYNTAXES = sorted(writer.TRANSFER_SYNTAXES)
VOLUME = (np.arange(4 * 40 * 32).reshape(4, 40, 32) % 900).astype(np.int16) - 100


def _encoded(syntax: str, multiframe: bool) -> bytes:
    spec = writer.SeriesSpec(spacing=(2.5, 0.7, 0.6), origin=(1.0, 2.0, 3.0))
    dataset = writer.multiframe_dataset(VOLUME, spec) if multiframe else writer.slice_datasets(VOLUME, spec)[1]
    return writer.encode(dataset, syntax)


@pytest.mark.parametrize("multiframe", [False, True], ids=["single-frame", "multi-frame"])
@pytest.mark.parametrize("syntax", SYNTAXES)
def test_header_fields_and_pixel_location(syntax, multiframe):
    data = _encoded(syntax, multiframe)
    header = parse_header(data, len(data))
    reference = pydicom.dcmread(io.BytesIO(data))
    assert header.transfer_syntax == reference.file_meta.TransferSyntaxUID
    assert (header.rows, header.columns) == (40, 32)
    assert header.frames == (4 if multiframe else 1)
    assert header.pixel_signed and header.bits_allocated == 16
    assert header.pixel_spacing == (0.7, 0.6)
    expected_z = [3.0 + 2.5 * i for i in range(4)] if multiframe else [3.0 + 2.5]
    assert [p[2] for p in header.positions] == pytest.approx(expected_z)
    if header.encapsulated:
        assert header.pixel_length == -1
        assert len(header.frame_starts) == header.frames
        assert data[header.frame_starts[0]:header.frame_starts[0] + 4] == b"\xfe\xff\x00\xe0"  # an item tag
    else:
        assert data[header.pixel_offset:header.pixel_offset + header.pixel_length] == reference.PixelData


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_short_prefix_asks_for_more(syntax):
    data = _encoded(syntax, multiframe=True)
    with pytest.raises(NeedMoreBytes) as raised:
        parse_header(data[:300], len(data))
    assert 300 < raised.value.size <= len(data)


def test_growing_prefix_reaches_the_same_header():
    data = _encoded("explicit-le", multiframe=True)
    size = 128
    while True:
        try:
            header = parse_header(data[:size], len(data))
            break
        except NeedMoreBytes as more:
            size = more.size
    assert header == parse_header(data, len(data))
    assert size < len(data)


def test_not_dicom():
    data = b"case notes: nothing to see here\n" * 10
    with pytest.raises(HeaderError, match="not a DICOM file"):
        parse_header(data, len(data))


def test_an_image_object_without_pixel_data_is_a_truncated_one():
    dataset = writer.slice_datasets(VOLUME[:1], writer.SeriesSpec())[0]
    del dataset.PixelData
    data = dicom_bytes(dataset)
    with pytest.raises(HeaderError, match=r"without Pixel Data, but a MR Image Storage object carries pixel data"):
        parse_header(data, len(data))


def test_colour_image_is_refused():
    dataset = writer.slice_datasets(VOLUME[:1], writer.SeriesSpec())[0]
    dataset.SamplesPerPixel = 3
    dataset.PhotometricInterpretation = "RGB"
    dataset.PlanarConfiguration = 0
    dataset.PixelData = np.zeros((40, 32, 3), np.uint16).tobytes()
    data = dicom_bytes(dataset)
    with pytest.raises(HeaderError, match="3 samples per pixel"):
        parse_header(data, len(data))


def test_truncated_pixel_data_is_refused():
    data = _encoded("explicit-le", multiframe=True)
    header = parse_header(data, len(data))
    cut = data[:header.pixel_offset + 100]
    with pytest.raises(HeaderError, match=r"Pixel Data holds 100 of the 10240 bytes that 4 frame\(s\) of 40x32x16 "
                                          r"bits need \(truncated object\?\)"):
        parse_header(cut, len(cut))


def test_pydicoms_padded_file_is_read_as_pydicom_reads_it():
    path = Path(pydicom.__file__).parent / "data" / "test_files" / "MR_small_padded.dcm"
    data = path.read_bytes()
    header = parse_header(data, len(data))  # Pixel Data declares 8,320 bytes where 8,192 are needed
    assert (header.pixel_length, header.pixel_bytes, header.padding_bytes) == (8320, 8192, 128)
    raw = data[header.pixel_offset:header.pixel_offset + header.pixel_bytes]
    np.testing.assert_array_equal(decode_native_rows(raw, header, header.rows), pydicom.dcmread(path).pixel_array)


def test_padding_up_to_a_frame_is_accepted_and_a_frame_more_is_refused():
    dataset = writer.slice_datasets(VOLUME, writer.SeriesSpec())[1]
    pixels = dataset.PixelData
    dataset.PixelData = pixels + b"\0" * (len(pixels) - 2)
    data = dicom_bytes(dataset)
    assert parse_header(data, len(data)).padding_bytes == len(pixels) - 2
    dataset.PixelData = pixels * 2
    data = dicom_bytes(dataset)
    with pytest.raises(HeaderError, match=r"declares 5120 bytes, a frame or more beyond the 2560 bytes that 1 "
                                          r"frame\(s\) of 40x32x16 bits need: Rows, Columns"):
        parse_header(data, len(data))
    dataset.PixelData = pixels[:-2]
    data = dicom_bytes(dataset)
    with pytest.raises(HeaderError, match=r"the Pixel Data element declares 2558 of the 2560 bytes"):
        parse_header(data, len(data))


def test_how_a_series_was_acquired_is_recorded_and_a_damaged_value_reads_as_absent():
    spec = writer.SeriesSpec(spacing=(2.5, 0.7, 0.6), series_description="AX T2 FLAIR", protocol_name="t2_tirm_tra",
                             series_number=7, series_time="143015.5", repetition_time=9000.0, echo_time=85.0,
                             inversion_time=2500.0, acquisition_type="2D", contrast_agent="",
                             image_type=("ORIGINAL", "PRIMARY", "M", "ND"), frame_of_reference_uid="1.2.3",
                             study_uid="1.2.4", study_date="20250314")
    dataset = writer.slice_datasets(VOLUME, spec)[0]
    dataset.ScanningSequence = ["SE", "IR"]
    data = writer.encode(dataset)
    header = parse_header(data, len(data), b"k" * 32)
    assert (header.description, header.protocol, header.series_number, header.series_time) == (
        "AX T2 FLAIR", "t2_tirm_tra", 7, 14 * 3600 + 30 * 60 + 15.5)
    assert (header.repetition_time, header.echo_time, header.inversion_time) == (9000.0, 85.0, 2500.0)
    assert (header.acquisition_type, header.scanning_sequence, header.image_type) == ("2D", "SE\\IR", "ORIGINAL\\PRIMARY\\M\\ND")
    assert header.contrast_agent == "" and len(header.frame_hash) == len(header.study_hash) == 16
    assert header.frame_hash != header.study_hash
    assert header.series_day == datetime.date(2025, 3, 14).toordinal()
    # a damaged description of the acquisition reads as absent: the image stays usable
    dataset.SeriesTime = "99"
    dataset.SeriesDate = "20251345"  # no such month: the study's date is taken
    assert parse_header(dicom_bytes(dataset), len(dicom_bytes(dataset))).series_day == header.series_day
    dataset.StudyDate = "2025"
    dataset.SeriesDescription = "line\nbreak"
    data = dicom_bytes(dataset)
    at = data.index(b"\x18\x00\x81\x00DS")  # EchoTime "85": its two value bytes made letters
    data = data[:at + 8] + b"ab" + data[at + 10:]
    at = data.index(b"\x20\x00\x11\x00IS")  # SeriesNumber "7 ": the same
    data = data[:at + 8] + b"x " + data[at + 10:]
    header = parse_header(data, len(data))
    assert (header.echo_time, header.series_number, header.series_time, header.description) == (
        0.0, 0, -1.0, "line break")
    assert header.series_day == 0
    assert header.rows == 40


def test_a_legacy_converted_object_tells_how_it_was_acquired_as_its_slices_did():
    """highdicom's Legacy Converted Enhanced MR keeps the slices' MR timing, sequence name and
    acquisition type in UnassignedSharedConvertedAttributesSequence: read there as at the top level."""
    import highdicom

    spec = writer.SeriesSpec(spacing=(2.5, 0.7, 0.6), series_description="AX T2 FLAIR", protocol_name="t2_tirm_tra",
                             series_time="143015", repetition_time=9000.0, echo_time=85.0, inversion_time=2500.0,
                             acquisition_type="2D", sequence_name="*tir2d1", study_date="20250314")
    slices = [pydicom.dcmread(io.BytesIO(writer.encode(dataset))) for dataset in writer.slice_datasets(VOLUME, spec)]
    packed = highdicom.legacy.LegacyConvertedEnhancedMRImage(slices, series_instance_uid=pydicom.uid.generate_uid(),
                                                             series_number=1, sop_instance_uid=pydicom.uid.generate_uid(),
                                                             instance_number=1)
    assert "RepetitionTime" not in packed and "EchoTime" not in packed
    data = dicom_bytes(packed)
    header, first = parse_header(data, len(data)), parse_header(writer.encode(slices[0]), len(writer.encode(slices[0])))
    fields = ("repetition_time", "echo_time", "inversion_time", "sequence_name", "acquisition_type", "protocol",
              "series_time", "series_day")
    assert [getattr(header, name) for name in fields] == [getattr(first, name) for name in fields]
    assert header.repetition_time == 9000.0 and header.sequence_name == "*tir2d1" and header.frames == len(slices)
