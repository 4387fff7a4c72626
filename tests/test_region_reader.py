"""The region reader against pydicom's full decode, and what it costs in requests and bytes."""

import io

import numpy as np
import pydicom
import pytest

from brainseg.data.catalog import build_catalog
from brainseg.data.series import coalesce
from brainseg.dicom import writer
from brainseg.io import s3
from tests.conftest import put_case, put_series, small_phantom

SYNTAXES = sorted(writer.TRANSFER_SYNTAXES)


def pydicom_volume(objects: dict[str, bytes]) -> np.ndarray:
    """Full decode by pydicom, in modality units, slices sorted along the normal."""
    planes = []
    for data in objects.values():
        dataset = pydicom.dcmread(io.BytesIO(data))
        pixels = dataset.pixel_array.astype(np.float64)
        if "NumberOfFrames" in dataset and int(dataset.NumberOfFrames) > 1:
            shared = dataset.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
            slope, intercept = float(shared.RescaleSlope), float(shared.RescaleIntercept)
            positions = [item.PlanePositionSequence[0].ImagePositionPatient for item in
                         dataset.PerFrameFunctionalGroupsSequence]
            orientation = dataset.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
            frames = list(pixels)
        else:
            slope = float(dataset.get("RescaleSlope", 1.0))
            intercept = float(dataset.get("RescaleIntercept", 0.0))
            positions, orientation, frames = [dataset.ImagePositionPatient], dataset.ImageOrientationPatient, [pixels]
        normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
        for position, frame in zip(positions, frames):
            planes.append((float(np.dot(np.asarray(position, float), normal)), frame * slope + intercept))
    planes.sort(key=lambda item: item[0])
    return np.stack([frame for _, frame in planes]).astype(np.float32)


@pytest.mark.parametrize("multiframe", [False, True], ids=["single-frame", "multi-frame"])
@pytest.mark.parametrize("syntax", SYNTAXES)
def test_region_equals_pydicom_full_decode(bucket, syntax, multiframe):
    phantom = small_phantom(seed=3)
    image = (phantom.image.astype(np.int32) - 300).astype(np.int16)  # signed values
    spec = writer.SeriesSpec(spacing=(2.0, 0.9, 0.8), rescale_slope=0.5, rescale_intercept=-12.0)
    written = put_case(f"s3://{bucket}/data", "case_a", image, phantom.mask,
                       transfer_syntax=syntax, multiframe=multiframe, spec=spec)
    case = build_catalog(f"s3://{bucket}/data/").cases[0]
    expected = pydicom_volume(written["image"])
    assert case.image.shape == expected.shape
    np.testing.assert_array_equal(case.image.read_volume(), expected)
    np.testing.assert_array_equal(case.image.read_region(2, 9, 5, 31, 3, 30), expected[2:9, 5:31, 3:30])
    np.testing.assert_array_equal(case.mask.read_volume(), pydicom_volume(written["mask"]))


def test_slices_sorted_along_the_normal_not_by_name(bucket):
    """A sagittal series whose file names run against the slice order."""
    phantom = small_phantom(seed=4)
    spec = writer.SeriesSpec(spacing=(1.5, 1.0, 1.0), orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
    datasets = writer.slice_datasets(phantom.image, spec)
    names = [f"IM_{number:04d}.dcm" for number in range(len(datasets), 0, -1)]
    put_series(f"s3://{bucket}/data/case_s", "image", datasets, names=names)
    put_series(f"s3://{bucket}/data/case_s", "mask", writer.slice_datasets(
        phantom.mask, writer.SeriesSpec(spacing=spec.spacing, orientation=spec.orientation)), names=names)
    case = build_catalog(f"s3://{bucket}/data/").cases[0]
    np.testing.assert_array_equal(case.image.read_volume(), phantom.image.astype(np.float32))


def test_native_single_frame_region_fetches_only_the_band(bucket):
    depth, rows, columns = 10, 64, 96
    image = np.random.default_rng(0).integers(0, 4000, (depth, rows, columns), dtype=np.uint16)
    mask = np.zeros_like(image, dtype=np.uint8)
    mask[4, 30, 40] = 1
    put_case(f"s3://{bucket}/data", "case_b", image, mask)
    case = build_catalog(f"s3://{bucket}/data/").cases[0]
    s3.reset_stats()
    region = case.image.read_region(2, 8, 10, 30, 20, 50)
    stats = s3.stats()
    np.testing.assert_array_equal(region, image[2:8, 10:30, 20:50])
    assert stats["get_requests"] == 6  # one per slice
    assert stats["bytes_received"] == 6 * 20 * columns * 2  # exactly the rows, full width
    object_bytes = sum(case.image.sizes[case.image.planes[z][0]] for z in range(2, 8))
    assert stats["bytes_received"] < 0.35 * object_bytes


def test_native_multiframe_region_is_coalesced(bucket):
    depth, rows, columns = 40, 64, 64
    image = np.random.default_rng(1).integers(0, 4000, (depth, rows, columns), dtype=np.uint16)
    mask = (image > 3990).astype(np.uint8)
    put_case(f"s3://{bucket}/data", "case_c", image, mask, multiframe=True)
    case = build_catalog(f"s3://{bucket}/data/").cases[0]
    s3.reset_stats()
    region = case.image.read_region(5, 37, 8, 40, 0, 64)
    stats = s3.stats()
    np.testing.assert_array_equal(region, image[5:37, 8:40])
    assert stats["get_requests"] <= 2, stats  # 32 frames, a few coalesced requests
    frame_bytes = rows * columns * 2
    assert stats["bytes_received"] == 31 * frame_bytes + 32 * columns * 2  # first band to last band


def test_compressed_multiframe_fetches_only_needed_frames(bucket):
    phantom = small_phantom(seed=5, shape=(30, 32, 32))
    put_case(f"s3://{bucket}/data", "case_d", phantom.image, phantom.mask, transfer_syntax="rle",
             multiframe=True)
    case = build_catalog(f"s3://{bucket}/data/").cases[0]
    s3.reset_stats()
    region = case.image.read_region(10, 13, 0, 32, 0, 32)
    stats = s3.stats()
    np.testing.assert_array_equal(region, phantom.image[10:13].astype(np.float32))
    assert stats["get_requests"] == 1
    assert stats["bytes_received"] < case.image.sizes[0] / 5


def test_region_outside_the_volume_is_refused(bucket):
    phantom = small_phantom()
    put_case(f"s3://{bucket}/data", "case_e", phantom.image, phantom.mask)
    case = build_catalog(f"s3://{bucket}/data/").cases[0]
    with pytest.raises(ValueError, match=r"outside the series of shape \(12, 40, 36\)"):
        case.image.read_region(0, 13, 0, 4, 0, 4)


@pytest.mark.parametrize("ranges, gap, limit, expected", [
    ([(0, 10), (10, 20)], 0, 100, [(0, 20, [0, 1])]),
    ([(30, 40), (0, 10)], 5, 100, [(0, 10, [1]), (30, 40, [0])]),
    ([(0, 10), (15, 20)], 5, 100, [(0, 20, [0, 1])]),
    ([(0, 10), (15, 20), (25, 60)], 5, 30, [(0, 20, [0, 1]), (25, 60, [2])]),
    ([(0, 50)], 0, 10, [(0, 50, [0])]),
])
def test_coalesce(ranges, gap, limit, expected):
    assert coalesce(ranges, gap, limit) == expected
