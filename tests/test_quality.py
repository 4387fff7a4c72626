"""Every quality check excludes its case with a reason a person understands; good cases stay."""

import re

import numpy as np
import pytest
from pydicom.uid import generate_uid

from brainseg.data.catalog import build_catalog
from brainseg.dicom import writer
from brainseg.io import s3
from tests.conftest import dicom_bytes, put, put_case, put_series, small_phantom

SPACING = (2.0, 0.9, 0.8)


def _spec(case_id, **changes):
    fields = dict(spacing=SPACING, patient_id=f"PID-{case_id}", patient_name=f"Doe^{case_id}")
    fields.update(changes)
    return writer.SeriesSpec(**fields)


def _write(root, case_id, image_datasets, mask_volume, mask_spec=None, extra=None):
    base = f"{root}/{case_id}"
    put_series(base, "image", image_datasets)
    if mask_volume is not None:
        put_series(base, "mask", writer.slice_datasets(mask_volume, mask_spec or _spec(case_id)))
    for name, data in (extra or {}).items():
        put(f"{base}/image/{name}", data)


def _report() -> bytes:
    """A structured report: a DICOM object of the patient with no image (exports put them beside slices)."""
    report = writer.slice_datasets(np.zeros((1, 4, 4), np.uint16), _spec("report"))[0]
    for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                    "SamplesPerPixel", "PhotometricInterpretation"):
        delattr(report, keyword)
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    report.Modality = "SR"
    return dicom_bytes(report)


STRAYS = {"notes.txt": b"reader notes, not an image\n" * 20, ".DS_Store": b"\x00\x00\x00\x01Bud1" * 10,
          "DICOMDIR": b"\x00" * 128 + b"DICM" + b"\x00" * 64, "report.dcm": _report()}


@pytest.fixture(scope="module")
def catalog():
    bucket = "quality-checks"
    s3.client().create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/data"
    phantom = small_phantom(seed=1)
    image, mask = phantom.image, phantom.mask

    written = {}
    for number in range(4):
        good = small_phantom(seed=10 + number)
        written[number] = put_case(root, f"good_{number}", good.image, good.mask, spec=_spec(f"good_{number}"))
    for folder, objects in written[0].items():  # the same patient's objects filed under another case
        for name, data in objects.items():
            put(f"{root}/zz_copy_of_good_0/{folder}/{name}", data)

    slices = writer.slice_datasets(image, _spec("missing"))
    _write(root, "missing_slice", slices[:5] + slices[6:], mask)

    slices = writer.slice_datasets(image, _spec("dup"))
    copy = writer.slice_datasets(image[3:4], _spec("dup"))[0]
    copy.ImagePositionPatient = slices[3].ImagePositionPatient
    copy.SeriesInstanceUID = slices[0].SeriesInstanceUID
    _write(root, "duplicated_slice", slices + [copy], mask)

    slices = writer.slice_datasets(image, _spec("uneven"))
    for dataset in slices[6:]:
        dataset.ImagePositionPatient = [0.0, 0.0, float(dataset.ImagePositionPatient[2]) + 0.5]
    _write(root, "uneven_spacing", slices, mask)

    slices = writer.slice_datasets(image, _spec("orient"))
    slices[4].ImageOrientationPatient = [0.9998, 0.02, 0.0, -0.02, 0.9998, 0.0]
    _write(root, "mixed_orientation", slices, mask)

    slices = writer.slice_datasets(image, _spec("mixed"))
    slices[2].SeriesInstanceUID = generate_uid()
    _write(root, "mixed_series", slices, mask)

    slices = writer.slice_datasets(image, _spec("tilt"))
    for index, dataset in enumerate(slices):
        dataset.ImagePositionPatient = [0.6 * index, 0.0, float(dataset.ImagePositionPatient[2])]
    _write(root, "gantry_tilt", slices, mask)

    _write(root, "mask_shape", writer.slice_datasets(image, _spec("shape")), mask[:, :-2, :])
    _write(root, "mask_origin", writer.slice_datasets(image, _spec("origin")), mask,
           mask_spec=_spec("origin", origin=(0.0, 5.0, 0.0)))
    _write(root, "stray_objects", writer.slice_datasets(image, _spec("stray")), mask, extra=STRAYS)
    _write(root, "only_strays", [], mask, extra={"notes.txt": STRAYS["notes.txt"]})
    _write(root, "damaged_slice", writer.slice_datasets(image, _spec("damaged"))[1:], mask,
           extra={"IM_0001.dcm": b"garbage where a slice should be"})
    header_only = writer.slice_datasets(image[:1], _spec("cut"))[0]
    del header_only.PixelData
    _write(root, "truncated_header", writer.slice_datasets(image, _spec("cut"))[1:], mask,
           extra={"IM_0001.dcm": dicom_bytes(header_only)})
    truncated = writer.encode(writer.slice_datasets(image[:1], _spec("trunc"))[0])
    slices = writer.slice_datasets(image, _spec("trunc"))
    _write(root, "truncated_object", slices[1:], mask, extra={"IM_0001.dcm": truncated[:-500]})
    _write(root, "empty_mask", writer.slice_datasets(image, _spec("empty")), np.zeros_like(mask))
    _write(root, "missing_mask", writer.slice_datasets(image, _spec("nomask")), None)
    return build_catalog(root + "/", exclude_empty_masks=True)


EXPECTED = [
    ("missing_slice", r"missing slice\(s\): a gap of 4\.00 mm after slice 4 where the spacing is 2\.00 mm"),
    ("duplicated_slice", r"duplicated slice position"),
    ("uneven_spacing", r"uneven slice spacing: from 2\.000 to 2\.500 mm"),
    ("mixed_orientation", r"mixed orientations in image/: IM_0005\.dcm"),
    ("mixed_series", r"image/ mixes 2 series"),
    ("gantry_tilt", r"not stacked along the slice normal"),
    ("mask_shape", r"mask geometry does not match image: mask shape \(12, 38, 36\), image shape \(12, 40, 36\)"),
    ("mask_origin", r"mask geometry does not match image: mask origin is 5\.00 mm from the image origin"),
    ("only_strays", r"no image objects: expected a DICOM series under image/ \(1 non-image object\(s\) skipped: "
                    r"notes\.txt\)"),
    ("damaged_slice", r"1 image object\(s\) unusable: IM_0001\.dcm \(not a DICOM file"),
    ("truncated_header", r"IM_0001\.dcm \(the header ends at byte \d+ of \d+ without Pixel Data, but a MR Image "
                         r"Storage object carries pixel data \(truncated object\?\)\)"),
    ("truncated_object", r"IM_0001\.dcm \(Pixel Data holds 2380 of the 2880 bytes that 1 frame\(s\) of 40x36x16 "
                         r"bits need \(truncated object\?\)\)"),
    ("empty_mask", r"mask is empty \(no tumour voxels\)"),
    ("missing_mask", r"no mask objects: expected a DICOM series under mask/"),
    ("zz_copy_of_good_0", r"image objects duplicate those of case good_0"),
]


@pytest.mark.parametrize("case_id, reason", EXPECTED, ids=[case for case, _ in EXPECTED])
def test_failing_case_is_excluded_with_its_reason(catalog, case_id, reason):
    assert case_id not in {case.case_id for case in catalog.cases}
    exclusion = next(item for item in catalog.exclusions if item.case_id == case_id)
    assert re.search(reason, exclusion.reason), exclusion.reason


def test_good_cases_survive_and_are_split(catalog):
    good = [case for case in catalog.cases if case.case_id.startswith("good_") or case.case_id == "stray_objects"]
    assert len(good) == 5 and all(case.split in ("train", "val", "test") for case in good)
    assert {case.case_id for case in catalog.cases} == {c.case_id for c in good}


def test_stray_objects_are_skipped_with_a_warning_not_a_reason_to_drop_the_case(catalog):
    case = next(case for case in catalog.cases if case.case_id == "stray_objects")
    assert case.image.shape == (12, 40, 36)
    assert sorted(case.skipped) == [
        "image/.DS_Store: hidden file (e.g. .DS_Store), not part of a series",
        "image/DICOMDIR: DICOMDIR (a media directory), not part of a series",
        "image/notes.txt: not a DICOM file (no 'DICM' marker after the 128-byte preamble)",
        "image/report.dcm: no pixel data: a Basic Text SR Storage object"]


def test_reasons_never_name_the_patient(catalog):
    for item in catalog.exclusions:
        for text in [item.reason, *item.skipped]:
            assert "Doe" not in text and "PID-" not in text
