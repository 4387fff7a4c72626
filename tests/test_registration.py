"""Sequences in another frame of reference, registered to the reference at catalog time, against
the moto S3 server: synthetic studies whose last sequence the generator moved by a known rigid
motion (``SynthSpec.other_frame``), written by pydicom, read by the catalog."""

from __future__ import annotations

import os
from io import BytesIO

import numpy as np
import pydicom
import pytest

from brainseg.data.catalog import Catalog, build_catalog
from brainseg.data.geometry import Aligned, InMemory, centre_of, grid_of, labels_onto, voxel_to_patient
from brainseg.data.registration import Registration, otsu_level, register, rotation_degrees
from brainseg.data.stream import read_case_region
from brainseg.io import s3
from brainseg.overlap import Overlap
from infra.data.profile import format_profile, profile_catalog
from infra.data.synth import SynthSpec, write_dataset
from tests.test_geometry import SOURCES, _put_case
from tests.test_segmentation import seg_bytes

SPEC = SynthSpec(shape=(40, 64, 64), spacing=(3.0, 2.0, 2.0), sequences=("t1c", "flair"), grids="own", other_frame=1)


def head_points(case) -> np.ndarray:
    """Patient positions (mm) of every fourth voxel of the reference's head, each axis."""
    image = case.image.read_volume()[::4, ::4, ::4]
    z, y, x = np.nonzero(image > otsu_level(image))
    voxels = np.stack([z * 4, y * 4, x * 4, np.ones_like(z)], axis=1).astype(float)
    return (voxel_to_patient(grid_of(case.image)) @ voxels.T).T[:, :3]


def moved(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:3, :3].T + matrix[:3, 3]


@pytest.fixture(scope="module")
def first_catalog() -> Catalog:
    """Two studies of SPEC (the first with its FLAIR in a frame of its own) in a bucket of their own,
    catalogued once (the fit is kept in the index). The SEG test replaces the first study's label; no
    other test reads it."""
    bucket = f"test-bucket-registration-{os.getpid()}"
    s3.client().create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/moved"
    write_dataset(2, root, SPEC)
    return build_catalog(root, sequences=SPEC.sequences, split_fractions=(1.0, 0.0, 0.0))


@pytest.fixture
def studies(first_catalog) -> str:
    return first_catalog.uri.rstrip("/")


def test_a_sequence_in_another_frame_is_registered_once_and_read_through_the_transform(first_catalog, studies):
    catalog = first_catalog
    assert not catalog.exclusions and catalog.index_stats["registrations_fitted"] == 1
    cases = {case.case_id: case for case in catalog.cases}
    flair = cases["case_0000"].resampled["flair"]
    assert flair.registration is not None and flair.registration.passed
    assert cases["case_0001"].resampled["flair"].registration is None  # one frame: no registration
    # the fit against the generator's motion, over the head: much closer than the headers alone
    truth = SPEC.motion(0)["flair"]
    points = head_points(cases["case_0000"])
    error = np.linalg.norm(moved(flair.registration.transform, points) - moved(truth, points), axis=1)
    unregistered = np.linalg.norm(moved(truth, points) - points, axis=1)
    centre = centre_of(cases["case_0000"].image)
    assert np.linalg.norm(moved(flair.registration.transform, centre[None]) - moved(truth, centre[None])) < 2.0
    assert error.mean() < 0.5 * unregistered.mean(), (error.mean(), unregistered.mean())
    # what a region read gives is the moved flair on the reference grid: it correlates with the t1c's head
    channels, _ = read_case_region(cases["case_0000"], (0, 40, 0, 64, 0, 64))
    assert np.corrcoef(channels[0].ravel() > otsu_level(channels[0]), channels[1].ravel() > otsu_level(channels[1]))[
        0, 1] > 0.8
    assert "registered from another frame (rigid: " in format_profile(profile_catalog(catalog))
    # a SEG drawn on the registered flair (predict --seg-series flair) lands where the t1c's label lies
    _, mask = read_case_region(cases["case_0000"], (0, 40, 0, 64, 0, 64))
    tumour = (mask > 0).astype(np.uint8)
    on_flair = labels_onto(tumour, cases["case_0000"].image, flair.native, flair.registration)
    back = Aligned(InMemory(on_flair, *grid_of(flair.native)), *(getattr(cases["case_0000"].image, name) for name in (
        "shape", "spacing", "origin", "orientation")), labels=True, registration=flair.registration).read_volume()
    assert on_flair.sum() > 0 and Overlap.of(back > 0, tumour > 0).dice > 0.9
    # the next job reuses the saved transform
    again = build_catalog(studies, sequences=SPEC.sequences, split_fractions=(1.0, 0.0, 0.0))
    assert again.index_stats["registrations_fitted"] == 0
    reused = {case.case_id: case for case in again.cases}["case_0000"].resampled["flair"].registration
    assert reused == flair.registration


def test_either_series_may_be_the_reference_and_the_fits_are_each_others_inverse(first_catalog):
    """The metric samples the coarser series whichever is the reference; a fit made the other way
    round is inverted, so registering the t1c to the flair gives the inverse of the flair to the t1c."""
    case = {case.case_id: case for case in first_catalog.cases}["case_0000"]
    flair = case.resampled["flair"].native
    forward, backward = register(case.image, flair), register(flair, case.image)
    truth = SPEC.motion(0)["flair"]
    centre = centre_of(case.image)[None]
    for fitted in (forward.transform, np.linalg.inv(backward.transform)):
        assert rotation_degrees(np.linalg.inv(truth) @ fitted) < 2.0
        assert np.linalg.norm(moved(fitted, centre) - moved(truth, centre)) < 2.0
    assert rotation_degrees(truth) > 4.0  # so a fit left uninverted would miss by twice that
    assert forward.passed and backward.passed


def test_a_seg_drawn_on_the_registered_sequence_is_read_through_the_registration(studies):
    """The label as a DICOM SEG on the moved FLAIR's own slices (what a reader drew there) lands on
    the reference grid where the study's label lies."""
    bucket = s3.parse_uri(studies)[0]
    catalog = build_catalog(studies, sequences=SPEC.sequences, split_fractions=(1.0, 0.0, 0.0))
    case = {case.case_id: case for case in catalog.cases}["case_0000"]
    flair = case.resampled["flair"]
    _, mask = read_case_region(case, (0, 40, 0, 64, 0, 64))
    tumour = (mask > 0).astype(np.uint8)
    datasets = [pydicom.dcmread(BytesIO(s3.read_uri(f"s3://{bucket}/{key}"))) for key in flair.native.keys]
    drawn = seg_bytes([datasets[index] for index, _ in flair.native.planes],
                      labels_onto(tumour, case.image, flair.native, flair.registration))
    for key in case.mask.keys:
        s3.delete(f"s3://{bucket}/{key}")
    s3.put_bytes(f"{studies}/case_0000/mask/seg.dcm", drawn)
    again = {case.case_id: case for case in build_catalog(studies, sequences=SPEC.sequences,
                                                          split_fractions=(1.0, 0.0, 0.0)).cases}["case_0000"]
    assert isinstance(again.mask, Aligned) and again.mask.registration == flair.registration
    _, placed = read_case_region(again, (0, 40, 0, 64, 0, 64))
    assert Overlap.of(placed > 0, tumour > 0).dice > 0.9


def test_registration_none_excludes_a_study_in_two_frames_with_the_reason(studies):
    catalog = build_catalog(studies, sequences=SPEC.sequences, split_fractions=(1.0, 0.0, 0.0), registration="none")
    assert [case.case_id for case in catalog.cases] == ["case_0001"]
    [excluded] = catalog.exclusions
    assert excluded.case_id == "case_0000" and excluded.reason.endswith(
        "and they lie in different frames of reference (another session, or the patient re-positioned); "
        "registration is off (--registration none)")
    # the saved fit outlives a job that does not register
    again = build_catalog(studies, sequences=SPEC.sequences, split_fractions=(1.0, 0.0, 0.0))
    assert again.index_stats["registrations_fitted"] == 0 and len(again.cases) == 2


def test_a_fit_that_fails_its_check_excludes_the_case_naming_the_figures(bucket):
    """Two linear ramps in different frames hold no head to match: the check refuses the fit."""
    root = f"s3://{bucket}/ramps"
    _put_case(root, "ramps", SOURCES["oblique"], other_frame="1.2.3.4.6")
    catalog = build_catalog(root, sequences=("t1c", "flair"), split_fractions=(1.0, 0.0, 0.0))
    [excluded] = catalog.exclusions
    assert excluded.reason.startswith("flair lies in another frame of reference than t1c")
    assert "registered" in excluded.reason or "heads overlap" in excluded.reason, excluded.reason


def test_a_registration_round_trips_through_its_row():
    registration = Registration(tuple(float(v) for v in np.eye(4).ravel()), -0.5, 0.97, 0.8, 1.5)
    assert Registration.from_row(registration.to_row()) == registration
    assert registration.rotation_degrees == 0.0 and registration.passed
