"""Sequences on their own grids, read through their geometry onto the reference grid, against the
moto S3 server: each series written by pydicom with its own orientation, spacing, origin and matrix,
filled with a linear function of patient position (which linear interpolation reproduces exactly),
read by the catalog and the region reader where the reference's voxels lie."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from brainseg.data.catalog import build_catalog
from brainseg.data.geometry import Aligned, voxel_to_patient
from brainseg.data.stream import PatchStream, read_case_region
from brainseg.dicom import writer
from brainseg.io import cache, s3
from brainseg.stream_config import StreamConfig
from infra.data.profile import format_profile, profile_catalog
from infra.data.synth import SynthSpec, write_dataset
from tests.conftest import put_series
from tests.test_segmentation import seg_bytes

REFERENCE = dict(shape=(10, 24, 20), spacing=(2.0, 1.0, 1.0), origin=(-10.0, -12.0, -9.0),
                 orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
ANGLE = np.radians(20.0)
SOURCES = {  # name: (shape, spacing, origin, orientation)
    # axial, other slice and pixel spacings, another matrix, a field of view that misses part of the reference
    "axial": ((5, 40, 30), (3.0, 0.5, 0.75), (-12.0, -8.0, -7.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)),
    # sagittal: rows along y, columns down the head (-z), slices along -x
    "sagittal": ((16, 12, 30), (1.0, 2.0, 1.0), (13.0, -14.0, 12.0), (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)),
    # tilted 20 degrees about x, as a stack tilted to the AC-PC line
    "oblique": ((16, 36, 26), (1.5, 1.0, 1.0), (-13.0, -18.0, -20.0),
                (1.0, 0.0, 0.0, 0.0, float(np.cos(ANGLE)), float(np.sin(ANGLE)))),
}


def linear(points: np.ndarray) -> np.ndarray:
    """The image every series holds: 1000 + 3x + 2y + 5z of each patient position (mm)."""
    return 1000.0 + points @ np.asarray([3.0, 2.0, 5.0])


def positions(shape, spacing, origin, orientation) -> np.ndarray:
    """Patient position of every voxel ``(D, H, W, 3)``, by the standard's formula: ImagePositionPatient of
    the slice plus column index x PixelSpacing[1] along the row cosines plus row index x PixelSpacing[0]
    along the column cosines."""
    row, column = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    slices = writer.slice_positions(writer.SeriesSpec(spacing=spacing, origin=origin, orientation=orientation),
                                    shape[0])
    y, x = np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
    return (slices[:, None, None, :] + (y[..., None] * spacing[1]) * column + (x[..., None] * spacing[2]) * row)


def _spec(case_id: str, spacing, origin, orientation, frame: str) -> writer.SeriesSpec:
    return writer.SeriesSpec(spacing=spacing, origin=origin, orientation=orientation, patient_id=f"PID-{case_id}",
                             patient_name=f"Doe^{case_id}", study_uid=f"1.2.826.0.1.3680043.10.{abs(hash(case_id)) % 10**8}",
                             frame_of_reference_uid=frame)


def _put_case(root: str, case_id: str, source: tuple, frame: str = "1.2.3.4.5", other_frame: str | None = None,
              mask_on: str = "t1c", mask_labels: np.ndarray | None = None) -> None:
    """``t1c`` on the reference grid, ``flair`` on the ``source`` grid (``(shape, spacing, origin,
    orientation)``; in ``other_frame`` when given),
    both holding :func:`linear`; the mask on the reference grid (or on the flair's with ``mask_on``)."""
    reference = _spec(case_id, REFERENCE["spacing"], REFERENCE["origin"], REFERENCE["orientation"], frame)
    volume = linear(positions(REFERENCE["shape"], REFERENCE["spacing"], REFERENCE["origin"],
                              REFERENCE["orientation"])).round().astype(np.uint16)
    put_series(f"{root}/{case_id}", "t1c", writer.slice_datasets(volume, reference))
    shape, spacing, origin, orientation = source
    flair = _spec(case_id, spacing, origin, orientation, other_frame or frame)
    flair_datasets = writer.slice_datasets(linear(positions(shape, spacing, origin, orientation)).round().astype(np.uint16),
                                           flair)
    put_series(f"{root}/{case_id}", "flair", flair_datasets)
    if mask_on == "flair-seg":  # a DICOM SEG drawn on the flair: segment n where mask_labels is n
        s3.put_bytes(f"{root}/{case_id}/mask/seg.dcm", seg_bytes(flair_datasets, mask_labels))
    elif mask_on == "t1c":
        mask = np.zeros(REFERENCE["shape"], np.uint8)
        mask[3:7, 8:16, 6:14] = 1
        put_series(f"{root}/{case_id}", "mask", writer.slice_datasets(mask, reference))
    else:
        put_series(f"{root}/{case_id}", "mask", writer.slice_datasets(mask_labels, flair))


def _expected(source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference voxels' values of :func:`linear`, which of them lie between the source's voxel
    centres (``core``: interpolated) and which within the half voxel its edge voxels reach beyond
    their centres (``reach``: the edge voxel's value)."""
    points = positions(**REFERENCE)
    shape, spacing, origin, orientation = SOURCES[source]
    inverse = np.linalg.inv(voxel_to_patient((spacing, origin, orientation)))
    index = points @ inverse[:3, :3].T + inverse[:3, 3]
    core = ((index >= 0) & (index <= np.asarray(shape) - 1)).all(axis=-1)
    reach = ((index >= -0.5) & (index <= np.asarray(shape) - 0.5)).all(axis=-1) & ~core
    return linear(points), core, reach


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_a_sequence_on_its_own_grid_reads_at_the_reference_voxels_positions(bucket, source):
    root = f"s3://{bucket}/studies"
    _put_case(root, "case", SOURCES[source])
    catalog = build_catalog(root, sequences=("t1c", "flair"), split_fractions=(1.0, 0.0, 0.0))
    assert not catalog.exclusions, catalog.exclusions
    case = catalog.cases[0]
    flair = case.images[1]
    assert isinstance(flair, Aligned) and flair.shape == REFERENCE["shape"] and flair.parallel == (source != "oblique")
    values, core, reach = _expected(source)
    assert 0.2 < core.mean() and (~core & ~reach).sum() > 100  # each source misses part of the reference

    whole = flair.read_volume()
    # between its voxel centres, the linear image exactly (up to the rounding to integers it was stored with)
    np.testing.assert_allclose(whole[core], values[core], atol=0.51)
    # within half a voxel beyond its edge voxels, their values: never zero, off the linear image by at most
    # half a voxel's step (|gradient| 6.2 per mm, voxels of at most 3 mm)
    assert (whole[reach] > 0).all() and np.abs(whole[reach] - values[reach]).max(initial=0) < 0.5 * 6.2 * 3.0
    # beyond, zero
    assert (whole[~core & ~reach] == 0).all()

    region = (2, 8, 5, 19, 3, 17)
    channels, mask = read_case_region(case, region)
    z0, z1, y0, y1, x0, x1 = region
    np.testing.assert_array_equal(channels[1], whole[z0:z1, y0:y1, x0:x1])  # a region agrees with the whole volume
    np.testing.assert_allclose(channels[0], values[z0:z1, y0:y1, x0:x1], atol=0.51)  # the reference as stored
    assert mask.sum() == 4 * 8 * 8
    # intensity statistics come from the sequence's own slices, not the zeros outside its view
    assert case.summary.intensities[1].low > 800


def test_a_mask_drawn_on_another_series_is_placed_by_position_nearest_voxel(bucket):
    root = f"s3://{bucket}/studies"
    shape, spacing, origin, orientation = SOURCES["sagittal"]
    labels = np.zeros(shape, np.uint8)
    labels[8:16, 3:7, 10:20] = 2  # 8 mm along -x, 8 mm of rows (2 mm) along -z, 10 mm along y
    labels[10:12, 4:6, 12:14] = 4
    _put_case(root, "case", SOURCES["sagittal"], mask_on="flair", mask_labels=labels)
    catalog = build_catalog(root, sequences=("t1c", "flair"), split_fractions=(1.0, 0.0, 0.0))
    case = catalog.cases[0]
    assert isinstance(case.mask, Aligned) and case.mask.labels
    placed = case.mask.read_volume()
    assert set(np.unique(placed)) == {0.0, 2.0, 4.0}
    # each labelled voxel of the reference takes the label of the flair voxel nearest its position
    points = positions(**REFERENCE)
    inverse = np.linalg.inv(voxel_to_patient((spacing, origin, orientation)))
    index = np.floor(points @ inverse[:3, :3].T + inverse[:3, 3] + 0.5 + 1e-6).astype(int)
    inside = ((index >= 0) & (index < np.asarray(shape))).all(axis=-1)
    expected = np.zeros(REFERENCE["shape"], np.float32)
    expected[inside] = labels[tuple(index[inside].T)]
    np.testing.assert_array_equal(placed, expected)
    # the summary counts the tumour on the reference grid: 10 x 8 x 8 mm of it, as 2 x 1 x 1 mm voxels
    assert case.summary.tumour_voxels == int((expected > 0).sum()) and abs(case.summary.tumour_ml - 0.64) < 0.1
    # brainseg-inspect's profile says which series were read through their geometry, and how much they see
    coverage = (positions(**REFERENCE) @ inverse[:3, :3].T + inverse[:3, 3])[..., 0] <= shape[0] - 0.5
    text = format_profile(profile_catalog(catalog))
    assert (f"  case: flair sagittal 16x12x30 at 1x2x1 mm, covers {100 * coverage.mean():.0f} %; mask sagittal "
            f"16x12x30 at 1x2x1 mm, covers {100 * coverage.mean():.0f} %") in text, text


@pytest.mark.parametrize("source", ["sagittal", "oblique"])
def test_a_seg_drawn_on_another_sequence_is_placed_by_position_nearest_voxel(bucket, source):
    """A DICOM SEG whose frames lie on the flair's planes (its own grid), not the t1c's: read through
    the flair's geometry, each reference voxel taking the segment of the flair voxel nearest it."""
    root = f"s3://{bucket}/studies"
    shape, spacing, origin, orientation = SOURCES[source]
    labels = np.zeros(shape, np.uint8)
    labels[6:14, 8:20, 8:18] = 1
    labels[8:11, 11:15, 11:14] = 2
    _put_case(root, "case", SOURCES[source], mask_on="flair-seg", mask_labels=labels)
    catalog = build_catalog(root, sequences=("t1c", "flair"), split_fractions=(1.0, 0.0, 0.0))
    assert not catalog.exclusions, catalog.exclusions
    case = catalog.cases[0]
    assert isinstance(case.mask, Aligned) and case.mask.labels and case.mask.shape == REFERENCE["shape"]
    placed = case.mask.read_volume()
    points = positions(**REFERENCE)
    inverse = np.linalg.inv(voxel_to_patient((spacing, origin, orientation)))
    nearest = np.floor(points @ inverse[:3, :3].T + inverse[:3, 3] + 0.5 + 1e-6).astype(int)  # a tie: the higher
    inside = ((nearest >= 0) & (nearest < np.asarray(shape))).all(axis=-1)
    expected = np.zeros(REFERENCE["shape"], np.float32)
    expected[inside] = labels[tuple(nearest[inside].T)]
    assert set(np.unique(expected)) == {0.0, 1.0, 2.0}
    np.testing.assert_array_equal(placed, expected)
    channels, mask = read_case_region(case, (2, 8, 5, 19, 3, 17))
    np.testing.assert_array_equal(mask, placed[2:8, 5:19, 3:17])  # a region read agrees with the whole


def test_a_seg_on_no_sequences_planes_names_the_grids_it_was_tried_on(bucket):
    root = f"s3://{bucket}/studies"
    shape, spacing, origin, orientation = SOURCES["oblique"]
    labels = np.zeros(shape, np.uint8)
    labels[6:14, 8:20, 8:18] = 1
    _put_case(root, "case", SOURCES["oblique"], mask_on="flair-seg", mask_labels=labels)
    elsewhere = _spec("case", spacing, (origin[0] + 0.4, origin[1], origin[2] + 0.3), orientation, "1.2.3.4.5")
    s3.put_bytes(f"{root}/case/mask/seg.dcm", seg_bytes(writer.slice_datasets(np.zeros(shape, np.uint16), elsewhere),
                                                        labels))
    catalog = build_catalog(root, sequences=("t1c", "flair"), split_fractions=(1.0, 0.0, 0.0))
    [excluded] = catalog.exclusions
    assert "does not lie on the t1c grid" in excluded.reason and excluded.reason.endswith(", nor on the flair grid")


def test_without_registration_a_sequence_in_another_frame_or_outside_the_view_excludes_its_case(bucket):
    root = f"s3://{bucket}/studies"
    _put_case(root, "other-frame", SOURCES["axial"], other_frame="1.2.3.4.6")
    _put_case(root, "same-frame", SOURCES["axial"])
    _put_case(root, "outside", ((5, 40, 30), (3.0, 0.5, 0.75), (200.0, -8.0, -7.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)))
    catalog = build_catalog(root, sequences=("t1c", "flair"), split_fractions=(1.0, 0.0, 0.0), registration="none")
    reasons = {item.case_id: item.reason for item in catalog.exclusions}
    assert [case.case_id for case in catalog.cases] == ["same-frame"]
    assert reasons["other-frame"] == (
        "flair geometry does not match t1c: flair shape (5, 40, 30), t1c shape (10, 24, 20) (D, H, W), and they lie "
        "in different frames of reference (another session, or the patient re-positioned); registration is off "
        "(--registration none)")
    assert reasons["outside"] == ("flair lies wholly outside t1c: they share a frame of reference but flair's field "
                                  "of view does not reach t1c's")


def test_a_series_without_frame_of_reference_on_another_grid_is_excluded(bucket):
    root = f"s3://{bucket}/studies"
    _put_case(root, "no-frame", SOURCES["axial"], frame="")
    catalog = build_catalog(root, sequences=("t1c", "flair"), split_fractions=(1.0, 0.0, 0.0))
    assert catalog.exclusions[0].reason.endswith(
        "and t1c and flair name no single FrameOfReferenceUID, so where one lies in the other is unknown")


def test_reads_stay_within_the_source_box_and_the_memory_bound():
    """The box an oblique read fetches, per reference voxel, stays under what the memory bound counts."""

    class Recorder:
        def __init__(self, shape, spacing, origin, orientation):
            self.shape, self.spacing, self.origin, self.orientation = shape, spacing, origin, orientation
            self.bytes_per_voxel, self.boxes = 2, []

        def read_region(self, z0, z1, y0, y1, x0, x1):
            self.boxes.append((z1 - z0) * (y1 - y0) * (x1 - x0))
            return np.zeros((z1 - z0, y1 - y0, x1 - x0), np.float32)

    for name, (shape, spacing, origin, orientation) in SOURCES.items():
        source = Recorder(shape, spacing, origin, orientation)
        aligned = Aligned(source, **REFERENCE)
        aligned.read_region(0, 10, 0, 24, 0, 20)
        chunk = 10 * 24 * 20 if aligned.parallel else 8 * 24 * 20  # an oblique read goes 8 slices at a time
        assert max(source.boxes) <= aligned.expansion() * chunk, name
        assert aligned.bytes_per_voxel >= 6 + 4


def test_studies_written_as_a_scanner_writes_them_read_back_onto_the_first_sequences_grid(bucket):
    """brainseg-synth --grids own: the T1 oblique, the T2 sagittal, the FLAIR in thick slices (written by
    infra/data/grids.py's own resampling), read back by the catalog onto the T1c's grid."""
    root = f"s3://{bucket}/exported"
    spec = SynthSpec(shape=(24, 48, 48), spacing=(2.0, 1.0, 1.0), sequences=("t1c", "t1", "t2", "flair"), grids="own")
    write_dataset(1, root, spec)
    catalog = build_catalog(root, sequences=spec.sequences)
    case = catalog.cases[0]
    assert {name: volume.describe().split()[0] for name, volume in case.resampled.items()} == {
        "t1": "oblique", "t2": "sagittal", "flair": "axial"}
    assert all(volume.coverage() == 1.0 for volume in case.resampled.values())
    images, labels, _ = spec.volumes(0)
    np.testing.assert_array_equal(read_case_region(case, (0, 24, 0, 48, 0, 48))[1], labels)
    for name, series in zip(spec.sequences, case.images):
        read, truth = series.read_volume(), images[name].astype(np.float32)
        head = truth > 0.1 * truth.max()
        # the phantom as written on its grid, twice interpolated (there and back) and with its noise smoothed;
        # the FLAIR's 5 mm slices (2.5 of the study's) keep less of what lies between them
        floor = {"t1c": 0.999, "t1": 0.8, "t2": 0.8, "flair": 0.5}[name]
        assert np.corrcoef(read[head], truth[head])[0, 1] > floor, name
    # the patch stream cuts every channel where the reference's patch lies, each normalised with its own
    # statistics, and its memory bound counts the source voxels a read through geometry holds
    stream = PatchStream(catalog.cases, StreamConfig(patch_size=(8, 16, 16), augment=False, foreground_fraction=1.0,
                                                     memory_budget_bytes=2**27))
    for sample, _ in zip(stream, range(3)):
        z, y, x = sample["origin"].tolist()
        window = (slice(z, z + 8), slice(y, y + 16), slice(x, x + 16))
        for channel, series in enumerate(case.images):
            stats = case.summary.intensities[channel]
            expected = (series.read_volume()[window] - np.float32(stats.mean)) / np.float32(stats.std)
            np.testing.assert_allclose(sample["image"][channel].numpy(), expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(sample["label"][0].numpy(), labels[window])
    write_dataset(1, f"s3://{bucket}/shared", replace(spec, grids="shared"))
    shared = build_catalog(f"s3://{bucket}/shared", sequences=spec.sequences)
    assert stream.slab_cost > PatchStream(shared.cases, StreamConfig(
        patch_size=(8, 16, 16), augment=False, memory_budget_bytes=2**27)).slab_cost


def test_what_was_resampled_is_kept_in_the_hosts_cache_and_read_from_there(tmp_path):
    """With the host's cache on, a second read of any region costs no read of the source."""

    class Source:
        shape, spacing, origin, orientation = SOURCES["oblique"]
        bucket, keys, etags, bytes_per_voxel = "b", ("k1", "k2"), ("e1", "e2"), 2

        def __init__(self):
            self.reads = 0
            self.volume = linear(positions(*SOURCES["oblique"])).astype(np.float32)

        def read_region(self, z0, z1, y0, y1, x0, x1):
            self.reads += 1
            return self.volume[z0:z1, y0:y1, x0:x1].copy()

    source = Source()
    aligned = Aligned(source, **REFERENCE)
    expected = aligned.resample((0, 10, 0, 24, 0, 20))
    reads = source.reads
    cache.configure(tmp_path, 1)
    try:
        first = aligned.read_region(3, 9, 2, 20, 1, 19)
        assert source.reads > reads
        reads = source.reads
        np.testing.assert_array_equal(first, expected[3:9, 2:20, 1:19])
        np.testing.assert_array_equal(aligned.read_volume(), expected)  # tiles 0 and 1 were kept whole
        assert source.reads == reads
        again = Aligned(source, **REFERENCE)  # another worker: the same tiles, by name
        np.testing.assert_array_equal(again.read_region(0, 1, 0, 24, 0, 20), expected[:1])
        assert source.reads == reads
        moved = Aligned(source, **{**REFERENCE, "origin": (-10.0, -12.0, -8.0)})  # another grid: other tiles
        assert moved.name != aligned.name
    finally:
        cache.disable()
