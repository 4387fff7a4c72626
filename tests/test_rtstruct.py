"""RTSTRUCT masks: structure sets written by a library (rt-utils, from masks, through OpenCV's
contours) read back onto the image grid voxel for voxel, in the label values --roi-labels gives; a
structure set that references another series, another frame of reference or lies off the planes
excludes its case with the reason."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest

from brainseg.commands import train
from brainseg.config import Hyperparameters
from brainseg.data.catalog import build_catalog
from brainseg.data.contours import _fill
from brainseg.data.geometry import Aligned, voxel_to_patient
from brainseg.dicom import HeaderError, writer
from brainseg.dicom.rtstruct import parse_structure_set
from brainseg.io import cache, s3
from brainseg.labels import parse_roi_labels
from infra.data.profile import format_profile, profile_catalog
from tests.conftest import console_script, dicom_bytes, put

sys.path.append(str(Path(sys.prefix) / "rt-utils"))  # installed apart by the Makefile (see there)
from rt_utils import RTStructBuilder

SHAPE = (12, 40, 36)
SPACING = (2.5, 0.9, 0.9)  # square pixels: rt-utils 1.2.7 swaps PixelSpacing's two values (qurit/rt-utils#92)
ROIS = "Edema=2,Enhancing=4,Necrosis=1"


def _ball(centre, radius) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    return ((z - centre[0]) * SPACING[0]) ** 2 + ((y - centre[1]) * SPACING[1]) ** 2 \
        + ((x - centre[2]) * SPACING[2]) ** 2 <= radius ** 2


def _structures() -> dict:
    edema = _ball((6, 20, 18), 11.0)
    enhancing = _ball((6, 20, 18), 7.0) & ~_ball((6, 20, 18), 4.0)  # a rim: its slices have holes
    necrosis = _ball((6, 20, 18), 3.0)
    return {"Edema": edema, "Enhancing": enhancing, "Necrosis": necrosis, "Brain": _ball((6, 20, 18), 15.0)}


def _case(root: str, case_id: str, tmp_path: Path, change=None, spacing=SPACING) -> dict:
    """A case whose mask/ is an RTSTRUCT rt-utils made from :func:`_structures` on the image slices."""
    image = (np.random.default_rng(1).normal(400, 50, SHAPE)).astype(np.int16)
    spec = writer.SeriesSpec(spacing=spacing, patient_id=f"PID-{case_id}", patient_name=f"Doe^{case_id}")
    folder = tmp_path / case_id
    folder.mkdir()
    for number, dataset in enumerate(writer.slice_datasets(image, spec), start=1):
        data = writer.encode(dataset, "explicit-le")
        (folder / f"IM_{number:04d}.dcm").write_bytes(data)
        put(f"{root}/{case_id}/image/IM_{number:04d}.dcm", data)
    builder = RTStructBuilder.create_new(dicom_series_path=str(folder))
    structures = _structures()
    for name, mask in structures.items():
        builder.add_roi(mask=np.ascontiguousarray(mask.transpose(1, 2, 0)), name=name)  # rt-utils: (rows, columns, slices)
    dataset = builder.ds
    if change is not None:
        change(dataset)
    put(f"{root}/{case_id}/mask/RS.dcm", dicom_bytes(dataset))
    return structures


def _painted(structures: dict, mapping: str) -> np.ndarray:
    out = np.zeros(SHAPE, dtype=np.float32)
    for name, value in parse_roi_labels(mapping):
        out[structures[name]] = value
    return out


def test_a_library_written_structure_set_reads_back_voxel_for_voxel(bucket, tmp_path):
    root = f"s3://{bucket}/rtstruct"
    structures = _case(root, "case_a", tmp_path)
    catalog = build_catalog(root + "/", roi_labels=parse_roi_labels(ROIS), split_fractions=(1.0, 0.0, 0.0))
    [case] = catalog.cases
    assert not catalog.exclusions and not case.skipped  # the structure set is the mask, not a skipped object
    np.testing.assert_array_equal(case.mask.read_volume(), _painted(structures, ROIS))  # holes and all
    np.testing.assert_array_equal(case.mask.read_region(3, 9, 5, 30, 7, 33), _painted(structures, ROIS)[3:9, 5:30, 7:33])
    assert dict(case.summary.label_counts) == {int(v): int((_painted(structures, ROIS) == v).sum())
                                              for v in (1, 2, 4)}
    binary = build_catalog(root + "/", roi_labels=parse_roi_labels("Brain=1"), split_fractions=(1.0, 0.0, 0.0))
    np.testing.assert_array_equal(binary.cases[0].mask.read_volume(), structures["Brain"].astype(np.float32))
    assert binary.cases[0].summary.tumour_voxels == int(structures["Brain"].sum())  # not the saved summary


def _drawn_on_flair(root: str, t1c, t1c_shape: tuple, flair, folder: Path, flat: bool = False) -> dict:
    """A case of a t1c (``t1c_shape``) and a flair (:data:`SHAPE`) series, and the structure set rt-utils
    draws from :func:`_structures` on the flair: in ``case/<sequence>/`` and ``case/mask/``, or ``flat``
    (objects named by their SOP instance UIDs). Returns the structures."""
    rng = np.random.default_rng(2)
    for name, spec, shape in (("t1c", t1c, t1c_shape), ("flair", flair, SHAPE)):
        for number, dataset in enumerate(writer.slice_datasets(rng.normal(400, 50, shape).astype(np.int16), spec), 1):
            data = writer.encode(dataset, "explicit-le")
            put(f"{root}/{dataset.SOPInstanceUID}" if flat else f"{root}/case/{name}/IM_{number:04d}.dcm", data)
            if name == "flair":
                (folder / f"IM_{number:04d}.dcm").write_bytes(data)
    builder = RTStructBuilder.create_new(dicom_series_path=str(folder))
    structures = _structures()
    for name, mask in structures.items():
        builder.add_roi(mask=np.ascontiguousarray(mask.transpose(1, 2, 0)), name=name)
    put(f"{root}/{builder.ds.SOPInstanceUID}" if flat else f"{root}/case/mask/RS.dcm", dicom_bytes(builder.ds))
    return structures


@pytest.mark.parametrize("layout", ["folders", "studies"])
def test_a_structure_set_drawn_on_another_sequence_is_read_through_its_geometry(bucket, tmp_path, layout):
    """The t1c axial at 3x1x1 mm, the flair an oblique stack (tilted 15 degrees) with the structure set
    rt-utils drew on it: each t1c voxel takes the ROI value of the flair voxel nearest its position. In
    the studies layout (objects named by UIDs, flat) the structure set is matched to its study by the
    series it references."""
    root = f"s3://{bucket}/rtstruct-flair"
    angle = np.radians(15.0)
    flair = writer.SeriesSpec(spacing=SPACING, origin=(-16.0, -18.0, -15.0),
                              orientation=(1.0, 0.0, 0.0, 0.0, float(np.cos(angle)), float(np.sin(angle))),
                              patient_id="PID-x", patient_name="Doe^X", series_description="AX T2 FLAIR")
    t1c = writer.SeriesSpec(spacing=(3.0, 1.0, 1.0), origin=(-14.0, -14.0, -12.0), patient_id="PID-x",
                            patient_name="Doe^X", study_uid=flair.study_uid, frame_of_reference_uid=flair.frame_of_reference_uid,
                            series_description="AX T1 +C", contrast_agent="gadobutrol")
    structures = _drawn_on_flair(root, t1c, (10, 36, 36), flair, tmp_path, flat=layout == "studies")

    inverse = np.linalg.inv(voxel_to_patient((flair.spacing, flair.origin, flair.orientation)))
    reference = voxel_to_patient((t1c.spacing, t1c.origin, t1c.orientation))
    z, y, x = np.meshgrid(*(np.arange(n) for n in (10, 36, 36)), indexing="ij")
    points = np.stack([z, y, x, np.ones_like(z)], axis=-1) @ (inverse @ reference).T
    nearest = np.floor(points[..., :3] + 0.5 + 1e-6).astype(int)  # a tie: the higher
    inside = ((nearest >= 0) & (nearest < np.asarray(SHAPE))).all(axis=-1)
    cache.configure(tmp_path / "cache", 1)  # as in training: what was resampled is kept in the host's cache
    try:
        for mapping in (ROIS, "Brain=1"):  # a second mapping of the same object: not the first one's kept tiles
            catalog = build_catalog(root + "/", sequences=("t1c", "flair"), roi_labels=parse_roi_labels(mapping),
                                    split_fractions=(1.0, 0.0, 0.0), layout=layout)
            assert not catalog.exclusions, catalog.exclusions
            [case] = catalog.cases
            assert isinstance(case.mask, Aligned) and case.mask.labels
            expected = np.zeros((10, 36, 36), np.float32)
            expected[inside] = _painted(structures, mapping)[tuple(nearest[inside].T)]
            assert len(np.unique(expected)) == (4 if mapping == ROIS else 2)
            np.testing.assert_array_equal(case.mask.read_volume(), expected)
    finally:
        cache.disable()


def test_non_square_pixels_are_placed_by_the_standards_pixel_spacing(bucket, tmp_path):
    root = f"s3://{bucket}/rtstruct-non-square"
    spacing = (2.5, 0.9, 0.8)  # PixelSpacing [0.9 between rows, 0.8 between columns]

    def rectangle(dataset) -> None:  # rows 5-10, columns 8-20 of plane 4, in mm by the slice's own header
        plane = pydicom.dcmread(tmp_path / "case_a" / "IM_0005.dcm")
        row_cosine, column_cosine = np.reshape(np.asarray(plane.ImageOrientationPatient, float), (2, 3))
        between_rows, between_columns = (float(v) for v in plane.PixelSpacing)
        corners = [np.asarray(plane.ImagePositionPatient, float) + column * between_columns * row_cosine
                   + row * between_rows * column_cosine for row, column in [(5, 8), (5, 20), (10, 20), (10, 8)]]
        contour = dataset.ROIContourSequence[0].ContourSequence[0]
        contour.ContourData = [float(v) for corner in corners for v in corner]
        del contour.ContourImageSequence
        dataset.ROIContourSequence[0].ContourSequence = [contour]

    _case(root, "case_a", tmp_path, rectangle, spacing)
    [case] = build_catalog(root + "/", roi_labels=parse_roi_labels("Edema=2"), split_fractions=(1.0, 0.0, 0.0)).cases
    expected = np.zeros(SHAPE, dtype=np.float32)
    expected[4, 5:11, 8:21] = 2
    np.testing.assert_array_equal(case.mask.read_volume(), expected)


def _other_series(dataset) -> None:
    item = dataset.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    item.SeriesInstanceUID = pydicom.uid.generate_uid()


def _other_frame(dataset) -> None:
    dataset.StructureSetROISequence[1].ReferencedFrameOfReferenceUID = pydicom.uid.generate_uid()


def _other_patient(dataset) -> None:
    dataset.PatientID = "PID-someone-else"


def _moved(dataset, axis: int, by: float, contour: int = 2, points: slice = slice(None)) -> None:
    item = dataset.ROIContourSequence[0].ContourSequence[contour]
    values = np.asarray([float(v) for v in item.ContourData]).reshape(-1, 3)
    values[points, axis] += by
    item.ContourData = [float(v) for v in values.ravel()]


def _beside_the_image(dataset) -> None:
    _moved(dataset, 0, 5000.0)  # +5,000 mm in x: it marks no voxel of the image


def _damaged_coordinate(dataset) -> None:
    _moved(dataset, 2, 1e30)  # a z of 1e30


def _off_plane(dataset) -> None:
    contour = dataset.ROIContourSequence[0].ContourSequence[2]
    points = [float(v) for v in contour.ContourData]
    contour.ContourData = [v + (1.0 if i % 3 == 2 else 0.0) for i, v in enumerate(points)]  # 1 mm of 2.5 aside


@pytest.mark.parametrize("change, mapping, reason", [
    (_other_series, ROIS, r"mask \(RTSTRUCT RS\.dcm\) references another series than the image series"),
    (_other_frame, ROIS, r"ROI 'Enhancing' lies in another frame of reference than the image series"),
    (_other_patient, ROIS, r"mask \(RTSTRUCT RS\.dcm\) belongs to another patient than the image series \(their "
                           r"PatientIDs differ"),
    (_off_plane, ROIS, r"a contour of ROI 'Edema' lies off the image planes \([\d.-]+ mm along the normal, 1\.00 mm "
                       r"from plane \d+; the image has 12 planes every 2\.5 mm\)"),
    (_beside_the_image, ROIS, r"a contour of ROI 'Edema' lies outside the image volume \(its centre [\d.-]+ mm along "
                              r"the normal, [\d.-]+ mm down the columns, 50\d\d\.\d\d mm along the rows from its "
                              r"first voxel; the image spans 27\.50 mm, 35\.10 mm and 31\.50 mm\)"),
    (_damaged_coordinate, ROIS, r"lies outside the image volume \(its centre 1e\+30 mm along the normal"),
    (None, "Edema=2,GTV=1", r"has no ROI named 'GTV' \(it has 'Edema', number 2, number 3, number 4; "
                           r"brainseg-inspect shows their names\); fix --roi-labels"),
], ids=["another series", "another frame of reference", "another patient", "off the planes", "beside the image",
        "a damaged coordinate", "an ROI not there"])
def test_a_structure_set_that_does_not_fit_the_images_excludes_its_case(bucket, tmp_path, change, mapping, reason):
    root = f"s3://{bucket}/rtstruct-bad-{change.__name__ if change else 'missing'}"
    _case(root, "case_a", tmp_path, change)
    catalog = build_catalog(root + "/", roi_labels=parse_roi_labels(mapping), split_fractions=(1.0, 0.0, 0.0))
    assert not catalog.cases
    [exclusion] = catalog.exclusions
    assert re.search(reason, exclusion.reason), exclusion.reason


def test_polygons_fill_by_their_centres_even_odd_and_their_outlines():
    square = np.array([[1.0, 1.0], [1.0, 6.0], [6.0, 6.0], [6.0, 1.0]])  # (row, column), through voxel centres
    hole = np.array([[2.5, 2.5], [2.5, 4.5], [4.5, 4.5], [4.5, 2.5]])  # between centres: rows/columns 3 and 4
    filled = _fill([square, hole], 8, 8)
    expected = np.zeros((8, 8), dtype=bool)
    expected[1:7, 1:7] = True
    expected[3:5, 3:5] = False
    np.testing.assert_array_equal(filled, expected)
    triangle = np.array([[0.0, 0.0], [0.0, 4.0], [4.0, 0.0]])
    assert _fill([triangle], 6, 6).sum() == 15  # centres with r + c <= 4: 5 + 4 + 3 + 2 + 1


@pytest.mark.parametrize("text, message", [("Edema", "is not ROI name=label value"), ("Edema=0", "1-255"),
                                           ("=2", "is not ROI name"), ("Edema=2,edema=3", "named twice")])
def test_roi_labels_that_cannot_be_meant_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        Hyperparameters(roi_labels=text)


def test_a_run_trains_and_scores_on_structure_set_masks(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("SM_MODEL_DIR", str(tmp_path / "model"))
    root, output = f"s3://{bucket}/rtstruct-run", f"s3://{bucket}/runs"
    for number in range(5):
        _case(root, f"case_{number}", tmp_path)
    assert train.main(["--data-uri", root + "/", "--output-uri", output, "--run-name", "contours",
                       "--roi-labels", ROIS, "--labels", "ncr=1,ed=2,et=4", "--regions", "brats", "--channels", "8,16",
                       "--patch-size", "8,16,16", "--batch-size", "2", "--num-workers", "0", "--epochs", "1",
                       "--steps-per-epoch", "2", "--res-units", "1", "--warmup-steps", "1"]) == 0
    summary = json.loads(s3.read_uri(f"{output}/contours/summary.json"))
    assert summary["test_cases"] >= 1 and summary["hyperparameters"]["roi_labels"] == ROIS
    truth_ml = float(np.prod(SPACING)) / 1000 * int(_structures()["Edema"].sum())
    rows = list(csv.DictReader(io.StringIO(s3.read_uri(f"{output}/contours/metrics/test_per_case.csv").decode())))
    assert rows and all(float(row["truth_ml_wt"]) == pytest.approx(truth_ml, rel=1e-3) for row in rows)


def test_a_structure_set_changed_since_indexing_costs_its_case_not_the_catalog(bucket, tmp_path):
    root = f"s3://{bucket}/rtstruct-changed"
    _case(root, "case_a", tmp_path)
    assert build_catalog(root + "/", roi_labels=parse_roi_labels(ROIS), split_fractions=(1.0, 0.0, 0.0)).cases
    dataset = pydicom.dcmread(io.BytesIO(s3.read_uri(f"{root}/case_a/mask/RS.dcm")))
    dataset.StructureSetLabel = "edited"
    put(f"{root}/case_a/mask/RS.dcm", dicom_bytes(dataset))
    catalog = build_catalog(root + "/", roi_labels=parse_roi_labels(ROIS), split_fractions=(1.0, 0.0, 0.0),
                            trust_index=True)  # the saved index still names the old ETag
    assert not catalog.cases
    assert re.search(r"mask \(RTSTRUCT RS\.dcm\): .*RS\.dcm changed since it was indexed", catalog.exclusions[0].reason)


def test_a_structure_set_of_no_study_in_the_export_is_left_out_and_counted(bucket, tmp_path):
    root = f"s3://{bucket}/rtstruct-stray"
    image = writer.SeriesSpec(spacing=SPACING, patient_id="PID-y", patient_name="Doe^Y", series_description="AX T1 +C",
                              contrast_agent="gadobutrol")
    elsewhere = writer.SeriesSpec(spacing=SPACING, patient_id="PID-z", patient_name="Doe^Z")  # not uploaded
    for dataset in writer.slice_datasets(np.full(SHAPE, 400, np.int16), image):
        put(f"{root}/{dataset.SOPInstanceUID}", writer.encode(dataset, "explicit-le"))
    for number, dataset in enumerate(writer.slice_datasets(np.full(SHAPE, 400, np.int16), elsewhere), 1):
        (tmp_path / f"IM_{number:04d}.dcm").write_bytes(writer.encode(dataset, "explicit-le"))
    builder = RTStructBuilder.create_new(dicom_series_path=str(tmp_path))
    builder.add_roi(mask=np.ascontiguousarray(_structures()["Edema"].transpose(1, 2, 0)), name="Edema")
    put(f"{root}/{builder.ds.SOPInstanceUID}", dicom_bytes(builder.ds))
    catalog = build_catalog(root + "/", sequences=("t1c",), require_masks=False, split_fractions=(1.0, 0.0, 0.0),
                            layout="studies")
    [case] = catalog.cases
    assert case.mask is None
    assert catalog.discovery.left_out == {"RT Structure Set referencing no series of these studies": 1}


def test_a_structure_set_drawn_on_a_sequence_sharing_the_first_ones_grid_reads_as_it_is(bucket, tmp_path):
    """Co-registered sequences (one grid, other series): a structure set drawn on the flair is read on
    its planes, which are the t1c's, voxel for voxel."""
    root = f"s3://{bucket}/rtstruct-same-grid"
    t1c = writer.SeriesSpec(spacing=SPACING, patient_id="PID-w", patient_name="Doe^W")
    flair = dataclasses.replace(t1c, series_uid=pydicom.uid.generate_uid(), series_description="FLAIR")
    structures = _drawn_on_flair(root, t1c, SHAPE, flair, tmp_path)
    catalog = build_catalog(root + "/", sequences=("t1c", "flair"), roi_labels=parse_roi_labels(ROIS),
                            split_fractions=(1.0, 0.0, 0.0))
    assert not catalog.exclusions, catalog.exclusions
    [case] = catalog.cases
    assert not isinstance(case.mask, Aligned) and not isinstance(case.images[1], Aligned)
    np.testing.assert_array_equal(case.mask.read_volume(), _painted(structures, ROIS))


def test_a_contour_reaching_far_outside_the_plane_is_clipped_at_the_cost_of_one_inside_it(bucket, tmp_path, caplog):
    root = f"s3://{bucket}/rtstruct-far"
    structures = _case(root, "case_a", tmp_path, lambda dataset: _moved(dataset, 0, 1e30, points=slice(0, 1)))
    with caplog.at_level("WARNING", logger="brainseg.data.catalog"):
        catalog = build_catalog(root + "/", roi_labels=parse_roi_labels(ROIS), split_fractions=(1.0, 0.0, 0.0))
    assert re.search(r"case case_a: mask \(RTSTRUCT RS\.dcm\): ROI 'Edema': contour\(s\) partly outside the image "
                     r"planes, clipped to them \(up to \d+% of a contour's points outside\)", caplog.text), caplog.text
    [case] = catalog.cases
    painted, expected = case.mask.read_volume(), _painted(structures, ROIS)
    assert (painted != expected).any(axis=(1, 2)).sum() == 1  # one plane differs: its contour's spike, clipped
    assert profile_catalog(catalog)["structure_sets"]["left_out"]["mapped ROIs clipped to the volume"] == 1


def _densified(dataset, points: int = 200_000) -> None:
    """The first Edema contour redrawn through ``points`` points along its own edges (4.6 MB of text)."""
    item = dataset.ROIContourSequence[0].ContourSequence[2]
    corners = np.asarray([float(v) for v in item.ContourData]).reshape(-1, 3)
    steps = -(-points // len(corners))
    fractions = np.arange(steps)[:, None] / steps
    dense = np.concatenate([start + fractions * (end - start) for start, end in zip(corners, np.roll(corners, -1, 0))])
    item.ContourData = [float(f"{v:.6f}") for v in dense.ravel()]
    item.NumberOfContourPoints = len(dense)


def test_a_structure_set_of_many_megabytes_is_read_not_refused_by_the_header_bound(bucket, tmp_path):
    """Radiotherapy structure sets of 1-20 MB are common and are read whole anyway: the header bound
    (--max-header-mb, 1 MiB) is for image headers; a structure set is told apart by its file meta."""
    root = f"s3://{bucket}/rtstruct-large"
    structures = _case(root, "case_a", tmp_path, _densified)
    [info] = [info for info in s3.list_tree(bucket, "rtstruct-large/case_a/mask/")]
    assert info.size > 4 * 2**20
    catalog = build_catalog(root + "/", roi_labels=parse_roi_labels(ROIS), split_fractions=(1.0, 0.0, 0.0))
    assert not catalog.exclusions, catalog.exclusions
    np.testing.assert_array_equal(catalog.cases[0].mask.read_volume(), _painted(structures, ROIS))


def _structure_set_bytes(tmp_path: Path) -> bytes:
    """An explicit-VR little-endian structure set rt-utils draws from :func:`_structures`."""
    for number, dataset in enumerate(writer.slice_datasets(np.full(SHAPE, 400, np.int16),
                                                           writer.SeriesSpec(spacing=SPACING)), start=1):
        (tmp_path / f"IM_{number:04d}.dcm").write_bytes(writer.encode(dataset, "explicit-le"))
    builder = RTStructBuilder.create_new(dicom_series_path=str(tmp_path))
    for name, mask in _structures().items():
        builder.add_roi(mask=np.ascontiguousarray(mask.transpose(1, 2, 0)), name=name)
    builder.ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    return dicom_bytes(builder.ds)


def test_a_damaged_structure_set_is_a_reason_never_an_escaped_error(tmp_path):
    """The two escapes found by byte mutation (a VR no dictionary knows, a number that is not one),
    then 300 seeded 1-4-byte mutations: each parses, or is refused with a HeaderError naming no value."""
    data = _structure_set_bytes(tmp_path)
    geometric_type = data.index(b"\x06\x30\x42\x00CS")  # (3006,0042) ContourGeometricType, VR CS
    unknown_vr = data[:geometric_type + 4] + b"CR" + data[geometric_type + 6:]
    roi_number = data.index(b"\x06\x30\x84\x00IS")  # (3006,0084) ReferencedROINumber, VR IS, value "1 "
    not_a_number = data[:roi_number + 8] + "1ô".encode("latin-1") + data[roi_number + 10:]
    for damaged, reason in ((unknown_vr, r"damaged \(NotImplementedError at element \(3006,0042\) ContourGeometricType\)"),
                            (not_a_number, r"damaged \(ValueError\)")):
        with pytest.raises(HeaderError, match=reason):
            parse_structure_set(damaged, b"k" * 32)
    rng = np.random.default_rng(34)
    outcomes = Counter()
    for _ in range(300):
        mutated = bytearray(data)
        for _ in range(int(rng.integers(1, 5))):
            mutated[int(rng.integers(132, len(data)))] = int(rng.integers(0, 256))
        try:
            parse_structure_set(bytes(mutated), b"k" * 32)
            outcomes["parsed"] += 1
        except HeaderError as err:
            assert "ô" not in str(err) and "Doe" not in str(err)
            outcomes["refused"] += 1
    assert outcomes["parsed"] + outcomes["refused"] == 300 and outcomes["refused"] > 0


def test_roi_names_the_user_did_not_type_stay_out_of_a_jobs_reasons_and_inspect_shows_them(bucket, tmp_path):
    """ROI names are free text typed at a workstation and may hold a patient's name: a job's reasons
    (and so its logs and artifacts) name such an ROI by its ROINumber; brainseg-inspect, run by the
    data owner, names it."""
    root = f"s3://{bucket}/rtstruct-phi"

    def rename(dataset) -> None:
        dataset.StructureSetROISequence[0].ROIName = "Doe^Jane^PHI4711 Edema"
        _off_plane(dataset)

    _case(root, "case_a", tmp_path, rename)
    for show, shown in ((False, "number 1"), (True, "'Doe^Jane^PHI4711 Edema'")):
        catalog = build_catalog(root + "/", roi_labels=(), split_fractions=(1.0, 0.0, 0.0), show_roi_names=show)
        [exclusion] = catalog.exclusions
        assert f"a contour of ROI {shown} lies off the image planes" in exclusion.reason
        assert ("Doe" in exclusion.reason) == show
    missing = build_catalog(root + "/", roi_labels=parse_roi_labels("GTV=1"), split_fractions=(1.0, 0.0, 0.0))
    assert "Doe" not in missing.exclusions[0].reason
    inspected = subprocess.run([console_script("brainseg-inspect"), root + "/", "--roi-labels", "GTV=1"],
                               capture_output=True, text=True)
    assert "'Doe^Jane^PHI4711 Edema'" in inspected.stdout + inspected.stderr


def test_contours_that_mark_rather_than_bound_are_counted_in_the_log(bucket, tmp_path, caplog):
    root = f"s3://{bucket}/rtstruct-marks"

    def marks(dataset) -> None:
        necrosis = dataset.ROIContourSequence[2].ContourSequence
        for contour in necrosis:  # every necrosis contour now a point: the ROI labels nothing
            contour.ContourGeometricType = "POINT"
            contour.ContourData = [float(v) for v in contour.ContourData[:3]]
            contour.NumberOfContourPoints = 1
        edema = dataset.ROIContourSequence[0].ContourSequence
        line = pydicom.Dataset()
        line.ContourGeometricType, line.NumberOfContourPoints = "CLOSED_PLANAR", 2
        line.ContourData = [float(v) for v in edema[0].ContourData[:6]]
        edema.append(line)

    _case(root, "case_a", tmp_path, marks)
    with caplog.at_level("WARNING", logger="brainseg.data.catalog"):
        catalog = build_catalog(root + "/", roi_labels=parse_roi_labels(ROIS), split_fractions=(1.0, 0.0, 0.0))
    assert not catalog.exclusions
    logged = caplog.text
    points = len(pydicom.dcmread(io.BytesIO(s3.get_object(bucket, "rtstruct-marks/case_a/mask/RS.dcm")))
                 .ROIContourSequence[2].ContourSequence)
    assert f"case case_a: mask (RTSTRUCT RS.dcm): ROI 'Necrosis': {points} point or open contour(s) left out (they " \
           "mark, not bound)" in logged
    assert "case case_a: mask (RTSTRUCT RS.dcm): ROI 'Necrosis' has no closed contour: it labels nothing" in logged
    assert "ROI 'Edema': 1 closed contour(s) of one or two points (a point or a line: no area)" in logged
    assert 1 not in np.unique(catalog.cases[0].mask.read_volume())
    profile = profile_catalog(catalog)
    assert profile["structure_sets"]["cases"] == 1
    assert profile["structure_sets"]["left_out"] == {
        "point or open contours": points, "closed contours of one or two points": 1,
        "mapped ROIs with no closed contour": 1, "mapped ROIs clipped to the volume": 0}
    assert len(profile["structure_sets"]["notes"]["case_a"]) == 3
    assert (f"contours    1 case(s) labelled by a structure set; left out: {points} point or open contours, 1 closed "
            "contours of one or two points, 1 mapped ROIs with no closed contour") in format_profile(profile)
