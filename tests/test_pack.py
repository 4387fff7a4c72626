"""brainseg-pack: single-frame series become one legacy-converted multi-frame object each, in S3; the
packed dataset reads the same voxels and labels as the source, in both layouts, its references
(SEG, RTSTRUCT) follow the packed frames, and a second run writes nothing."""

from __future__ import annotations

import io
import subprocess
from collections import Counter

import numpy as np
import pydicom
import pytest
import torch

from brainseg.commands import train
from brainseg.data.catalog import build_catalog
from brainseg.data.stream import read_case_region
from brainseg.dicom import writer
from brainseg.io import s3
from brainseg.labels import parse_roi_labels
from infra.data import pack
from infra.data.synth import SynthSpec, write_dataset
from tests.conftest import console_script, put, put_series
from tests.test_rtstruct import ROIS, _case, _painted
from tests.test_training import _args, _checkpoint

SEQUENCES = ("t1c", "t1", "t2", "flair")


def _volumes(catalog) -> dict:
    """Every case's sequences and mask read whole, by case ID."""
    return {case.case_id: ([series.read_volume() for series in case.images], case.mask.read_volume())
            for case in catalog.cases}


def _listing(bucket: str, prefix: str) -> dict:
    """The objects under ``prefix`` by relative key, leaving out the header index a catalog saves there."""
    return {info.key[len(prefix):]: info for info in s3.list_tree(bucket, prefix)
            if not info.key[len(prefix):].startswith(".brainseg/")}


def test_a_packed_dataset_reads_the_same_voxels_for_a_fraction_of_the_requests(bucket):
    src, dst = f"s3://{bucket}/src/", f"s3://{bucket}/packed/"
    write_dataset(2, src, SynthSpec(shape=(24, 40, 36), spacing=(2.0, 1.0, 1.0), sequences=SEQUENCES))
    put(f"{src}case_0000/t2/.DS_Store", b"finder")
    report = pack.pack(src, dst, jobs=2)
    assert report["series_packed"] == 10 and report["slices_packed"] == 240 and not report["failed"]
    assert report["objects_before"] == 240 and report["objects_after"] == 10
    assert report["left_out"] == {"case_0000/t2/.DS_Store": "hidden file (e.g. .DS_Store), not part of a series"}
    written = _listing(bucket, "packed/")
    assert len(written) == 10 and report["bytes_after"] == sum(info.size for info in written.values())
    assert Counter(key.split("/")[1] for key in written) == Counter({name: 2 for name in (*SEQUENCES, "mask")})
    one = pydicom.dcmread(io.BytesIO(s3.get_object(bucket, "packed/" + next(iter(written)))))
    assert one.SOPClassUID == pack.LEGACY_CONVERTED_MR and int(one.NumberOfFrames) == 24
    assert len(one.PerFrameFunctionalGroupsSequence[0].ConversionSourceAttributesSequence) == 1

    source, packed = (build_catalog(uri, sequences=SEQUENCES, split_fractions=(1.0, 0.0, 0.0)) for uri in (src, dst))
    assert not source.exclusions and not packed.exclusions
    expected, got = _volumes(source), _volumes(packed)
    assert sorted(got) == sorted(expected)
    for case_id, (images, mask) in expected.items():
        for mine, theirs in zip(got[case_id][0], images):
            np.testing.assert_array_equal(mine, theirs)
        np.testing.assert_array_equal(got[case_id][1], mask)
    requests = {}
    for name, catalog in (("source", source), ("packed", packed)):
        case = catalog.cases[0]
        s3.reset_stats()
        read_case_region(case, (4, 20, 4, 36, 2, 34), with_mask=True)
        requests[name] = s3.stats()["get_requests"]
    assert requests["source"] >= 16 * 5  # a GET per slice object of each series
    assert requests["packed"] <= 3 * 5, requests

    again = pack.pack(src, dst, jobs=2)
    assert again["resumed"] == 10 and again["objects_after"] == 10
    assert _listing(bucket, "packed/") == written  # same keys, sizes and ETags: nothing rewritten


def test_an_export_packs_into_studies_found_as_before_and_its_seg_follows_the_frames(bucket):
    src, dst = f"s3://{bucket}/export/", f"s3://{bucket}/export-packed/"
    spec = SynthSpec(shape=(20, 40, 40), spacing=(2.0, 1.0, 1.0), sequences=SEQUENCES, grids="own", layout="studies",
                     label_as="seg")
    write_dataset(2, src, spec)
    report = pack.pack(src, dst, jobs=2)
    assert not report["failed"] and report["references_rewritten"] == 2
    assert set(report["left_out"].values()) == {"DICOMDIR (a media directory), not part of a series"}
    before, after = (build_catalog(uri, sequences=SEQUENCES, layout="auto", split_fractions=(1.0, 0.0, 0.0))
                     for uri in (src, dst))
    assert after.layout == "studies" and not after.exclusions and len(after.cases) == 2
    roles = lambda catalog: sorted(sorted(verdict.role for verdict in verdicts)
                                   for verdicts in catalog.discovery.verdicts.values())
    assert roles(after) == roles(before)
    # case IDs hash the study's UID with each dataset's own key: the cases are paired by their T1c
    expected, got = _volumes(before).values(), list(_volumes(after).values())
    for images, mask in expected:
        [(mine, my_mask)] = [pair for pair in got if np.array_equal(pair[0][0], images[0])]
        for one, other in zip(mine, images):
            np.testing.assert_array_equal(one, other)
        np.testing.assert_array_equal(my_mask, mask)
    packed, segs = {}, []
    for info in _listing(bucket, "export-packed/").values():
        dataset = pydicom.dcmread(io.BytesIO(s3.get_object(bucket, info.key)), stop_before_pixels=True)
        if dataset.SOPClassUID == pack.LEGACY_CONVERTED_MR:
            packed[str(dataset.SOPInstanceUID)] = dataset
        elif dataset.Modality == "SEG":
            segs.append(dataset)
    assert len(segs) == 2
    position = lambda item: [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
    for seg in segs:
        for item in seg.PerFrameFunctionalGroupsSequence:  # each SEG frame names the packed frame it lies on
            [source] = [source for derivation in item.DerivationImageSequence
                        for source in derivation.SourceImageSequence]
            image = packed[str(source.ReferencedSOPInstanceUID)]
            frame = image.PerFrameFunctionalGroupsSequence[int(source.ReferencedFrameNumber) - 1]
            assert position(frame) == position(item)
        [series] = seg.ReferencedSeriesSequence
        assert {str(item.ReferencedSOPInstanceUID) for item in series.ReferencedInstanceSequence} <= set(packed)
        assert str(series.SeriesInstanceUID) in {str(image.SeriesInstanceUID) for image in packed.values()}


def test_a_structure_set_follows_its_packed_series_and_reads_the_same_labels(bucket, tmp_path):
    src, dst = f"s3://{bucket}/rt/", f"s3://{bucket}/rt-packed/"
    structures = _case(src.rstrip("/"), "case_a", tmp_path)
    report = pack.pack(src, dst, jobs=1)
    assert report["series_packed"] == 1 and report["references_rewritten"] == 1
    catalog = build_catalog(dst, roi_labels=parse_roi_labels(ROIS), split_fractions=(1.0, 0.0, 0.0))
    assert not catalog.exclusions
    np.testing.assert_array_equal(catalog.cases[0].mask.read_volume(), _painted(structures, ROIS))
    [key] = [info.key for info in s3.list_tree(bucket, "rt-packed/case_a/mask/")]
    rewritten = pydicom.dcmread(io.BytesIO(s3.get_object(bucket, key)))
    images = [image for roi in rewritten.ROIContourSequence for contour in roi.ContourSequence
              for image in contour.ContourImageSequence]
    assert {int(image.ReferencedFrameNumber) for image in images} <= set(range(1, 13))
    assert {image.ReferencedSOPClassUID for image in images} == {pack.LEGACY_CONVERTED_MR}


def test_what_cannot_be_packed_is_copied_with_the_reason_and_overlap_is_refused(bucket):
    src = f"s3://{bucket}/mixed/"
    rng = np.random.default_rng(0)
    spec = writer.SeriesSpec(spacing=(2.0, 1.0, 1.0))
    datasets = writer.slice_datasets(rng.integers(0, 100, (3, 16, 16)).astype(np.int16), spec)
    datasets += writer.slice_datasets(rng.integers(0, 100, (1, 16, 20)).astype(np.int16),
                                      writer.SeriesSpec(spacing=(2.0, 1.0, 1.0), series_uid=spec.series_uid))
    put_series(src.rstrip("/"), "case/image", datasets)
    put_series(src.rstrip("/"), "case/mask", [writer.multiframe_dataset(np.zeros((3, 16, 16), np.uint8), spec)])
    put(f"{src}case/notes.txt", b"not DICOM")
    report = pack.pack(src, f"s3://{bucket}/mixed-packed/")
    assert report["series_packed"] == 0
    assert report["left_single_frame"] == {"case/image": "its slices differ in Rows x Columns ((16, 16), (16, 20))"}
    assert report["objects_after"] == report["objects_before"] == 6
    assert sorted(_listing(bucket, "mixed-packed/")) == sorted(_listing(bucket, "mixed/"))
    with pytest.raises(pack.PackError, match="overlap"):
        pack.pack(src, f"{src}packed/")


def test_the_command_reports_before_and_after_and_a_dry_run_writes_nothing(bucket):
    src = f"s3://{bucket}/cli/"
    write_dataset(1, src, SynthSpec(shape=(8, 24, 24), spacing=(2.0, 1.0, 1.0)))
    dry = subprocess.run([console_script("brainseg-pack"), src, f"s3://{bucket}/cli-packed/", "--dry-run"],
                         capture_output=True, text=True, check=True)
    assert "would pack 2 series (16 objects): 16 objects" in dry.stdout and "would become 2" in dry.stdout
    assert not _listing(bucket, "cli-packed/")
    done = subprocess.run([console_script("brainseg-pack"), src, f"s3://{bucket}/cli-packed/", "--jobs", "1"],
                          capture_output=True, text=True, check=True)
    assert "packed 2 series" in done.stdout and "16 objects" in done.stdout and "-> 2 objects" in done.stdout
    assert "Doe" not in done.stdout + done.stderr and "SYN" not in done.stdout + done.stderr  # no patient names or IDs


@pytest.mark.parametrize("syntax", ["rle", "jpeg2000", "explicit-be"])
def test_compressed_and_big_endian_series_pack_into_the_same_voxels(bucket, syntax):
    """Compressed frames are kept as they are (one fragment each); big-endian becomes little-endian."""
    src, dst = f"s3://{bucket}/{syntax}/", f"s3://{bucket}/{syntax}-packed/"
    write_dataset(1, src, SynthSpec(shape=(8, 32, 32), spacing=(2.0, 1.0, 1.0), transfer_syntax=syntax))
    report = pack.pack(src, dst, jobs=1)
    assert report["series_packed"] == 2 and not report["failed"]
    before, after = (build_catalog(uri, split_fractions=(1.0, 0.0, 0.0)) for uri in (src, dst))
    [mine], [theirs] = after.cases, before.cases
    np.testing.assert_array_equal(mine.image.read_volume(), theirs.image.read_volume())
    np.testing.assert_array_equal(mine.mask.read_volume(), theirs.mask.read_volume())
    assert mine.image.headers[0].encapsulated == (syntax != "explicit-be") and not mine.image.headers[0].big_endian


@pytest.mark.slow  # two training runs: the slow tier
def test_a_packed_dataset_trains_to_the_same_weights_as_its_source(bucket):
    """The same pixels, the same cases and splits: six steps on each end with equal weights."""
    src, dst, output = f"s3://{bucket}/train-src/", f"s3://{bucket}/train-packed/", f"s3://{bucket}/runs"
    write_dataset(8, src, SynthSpec(shape=(32, 64, 64)))
    pack.pack(src, dst, jobs=2)
    for name, uri in (("source", src), ("packed", dst)):
        assert train.main(_args(uri, output, name, "--epochs", "1", "--steps-per-epoch", "6",
                                "--max-val-cases", "1", "--deterministic", "true")) == 0
    source, packed = _checkpoint(output, "source")["model"], _checkpoint(output, "packed")["model"]
    assert all(torch.equal(source[name], packed[name]) for name in source)
