"""DICOM SEG labels: objects written by highdicom (binary and fractional, several segments, empty
frames left out) read by the project's reader, by byte ranges, voxel for voxel onto the image grid."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from brainseg.data.catalog import build_catalog
from brainseg.data.segmentation import SegmentationMask
from brainseg.data.stream import PatchStream
from brainseg.dicom import writer
from brainseg.io import s3
from brainseg.labels import parse_scheme
from brainseg.stream_config import StreamConfig
from tests.conftest import put_series

SHAPE = (9, 37, 35)  # 1295 pixels a frame: 1-bit frames do not start on byte boundaries
NAMES = ("necrosis", "oedema", "enhancing")


def _labels(seed: int) -> np.ndarray:
    """Segment numbers 1..3 in nested blobs, with empty planes at both ends."""
    rng = np.random.default_rng(seed)
    grids = np.ogrid[tuple(slice(0, n) for n in SHAPE)]
    centre = np.asarray(SHAPE) / 2 + rng.normal(0, 1.0, 3) * (0.3, 1.5, 1.5)
    radius = np.sqrt(sum(((g - c) / s) ** 2 for g, c, s in zip(grids, centre, (3.0, 12.0, 11.0))))
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[radius < 1.0] = 2
    labels[radius < 0.6] = 3
    labels[radius < 0.3] = 1
    labels[:2] = 0
    return labels


def seg_bytes(sources, labels: np.ndarray, fractional: bool = False) -> bytes:
    """A DICOM SEG (highdicom) on the series ``sources``: segment n where ``labels`` is n, for n = 1..len(NAMES)."""
    descriptions = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=name, segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for number, name in enumerate(NAMES, start=1)]
    planes = np.stack([labels == number for number in range(1, len(NAMES) + 1)], axis=-1)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=planes.astype(np.float32) * 0.9 if fractional else planes.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL if fractional else hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=7, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="brainseg tests", manufacturer_model_name="synthetic", software_versions="1",
        device_serial_number="0")
    buffer = io.BytesIO()
    seg.save_as(buffer)
    return buffer.getvalue()


def _put_case(root: str, case_id: str, labels: np.ndarray, fractional: bool = False, seg_origin=None) -> np.ndarray:
    image = (np.random.default_rng(1).random(SHAPE) * 1000).astype(np.uint16)
    spec = writer.SeriesSpec(spacing=(2.5, 0.9, 0.8), origin=(-10.0, 4.0, 7.0), patient_id=f"PID-{case_id}",
                             patient_name=f"Doe^{case_id}")
    datasets = writer.slice_datasets(image, spec)
    put_series(f"{root}/{case_id}", "image", datasets)
    sources = datasets
    if seg_origin is not None:
        sources = writer.slice_datasets(image, writer.SeriesSpec(spacing=spec.spacing, origin=seg_origin,
                                                                 patient_name=spec.patient_name,
                                                                 study_uid=spec.study_uid,
                                                                 frame_of_reference_uid=spec.frame_of_reference_uid))
    s3.put_bytes(f"{root}/{case_id}/mask/seg.dcm", seg_bytes(sources, labels, fractional))
    return image


@pytest.mark.parametrize("fractional", [False, True])
def test_a_seg_object_reads_back_voxel_for_voxel_by_ranges(bucket, fractional):
    root = f"s3://{bucket}/seg"
    labels = _labels(3)
    _put_case(root, "a", labels, fractional)
    catalog = build_catalog(root, split_fractions=(1.0, 0.0, 0.0),
                            labels=parse_scheme("ncr=1,ed=2,et=3"))
    (case,) = catalog.cases
    assert isinstance(case.mask, SegmentationMask)
    header = case.mask.header
    assert header.frames < 3 * SHAPE[0]  # empty frames were left out by the writer
    assert header.fractional_max == (255 if fractional else 0)
    np.testing.assert_array_equal(case.mask.read_volume(), labels)
    np.testing.assert_array_equal(case.mask.read_region(3, 7, 5, 30, 4, 33), labels[3:7, 5:30, 4:33])
    assert dict(case.summary.label_counts) == {v: int((labels == v).sum()) for v in (1, 2, 3)}
    fullest = max(range(SHAPE[0]), key=lambda z: len(case.mask.planes[z]))
    assert len(case.mask.planes[fullest]) == 3
    s3.reset_stats()
    np.testing.assert_array_equal(case.mask.read_region(fullest, fullest + 1, 17, 19, 0, SHAPE[2]),
                                  labels[fullest:fullest + 1, 17:19])
    assert 0 < s3.stats()["bytes_received"] < header.pixel_bytes  # ranges of the plane's frames, not the object

    stream = PatchStream(catalog.cases, StreamConfig(patch_size=(4, 16, 16), augment=False, foreground_fraction=1.0,
                                                     memory_budget_bytes=2**26))
    for sample, _ in zip(stream, range(4)):
        z, y, x = sample["origin"].tolist()
        np.testing.assert_array_equal(sample["label"][0].numpy(), labels[z:z + 4, y:y + 16, x:x + 16])


def test_a_seg_of_another_grid_excludes_the_case_with_the_reason(bucket):
    root = f"s3://{bucket}/seg"
    _put_case(root, "shifted", _labels(4), seg_origin=(-10.0, 4.0, 8.0))  # 1 mm along the normal: 0.4 slice
    catalog = build_catalog(root, split_fractions=(1.0, 0.0, 0.0))
    (exclusion,) = catalog.exclusions
    assert exclusion.reason.startswith("mask (DICOM SEG seg.dcm) does not lie on the image grid: ")
    assert "off its planes" in exclusion.reason


def test_a_seg_beside_other_mask_objects_is_refused(bucket):
    root = f"s3://{bucket}/seg"
    image = _put_case(root, "both", _labels(5))
    put_series(f"{root}/both", "mask", writer.slice_datasets(np.zeros_like(image), writer.SeriesSpec()))
    catalog = build_catalog(root, split_fractions=(1.0, 0.0, 0.0))
    (exclusion,) = catalog.exclusions
    assert exclusion.reason.startswith(f"mask/ holds a DICOM SEG (seg.dcm) and {SHAPE[0]} other image object(s)")


def test_a_seg_whose_header_outgrows_the_image_bound_is_read(bucket):
    """A segmentation's header grows with its frames (a functional-group item each): it has its own
    bound (64 MiB), not --max-header-mb's 1 MiB for image headers. Here 1.5 MB of private data stand
    in for the items of thousands of frames."""
    root = f"s3://{bucket}/seg-large-header"
    labels = _labels(5)
    _put_case(root, "a", labels)
    dataset = pydicom.dcmread(io.BytesIO(s3.get_object(bucket, "seg-large-header/a/mask/seg.dcm")))
    dataset.private_block(0x0009, "brainseg tests", create=True).add_new(0x10, "OB", bytes(1_500_000))
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    s3.put_bytes(f"{root}/a/mask/seg.dcm", buffer.getvalue())
    catalog = build_catalog(root, split_fractions=(1.0, 0.0, 0.0), labels=parse_scheme("ncr=1,ed=2,et=3"))
    assert not catalog.exclusions, catalog.exclusions
    np.testing.assert_array_equal(catalog.cases[0].mask.read_volume(), labels)
