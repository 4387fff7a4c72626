"""Ingest of public formats: BraTS NIfTI cases, a Decathlon 4D dataset and LGG TIFF slice folders,
generated here (nibabel, Pillow), converted into moto and read back through the catalog voxel for
voxel, geometry included."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np
import pytest
from PIL import Image

from brainseg.data.catalog import build_catalog
from brainseg.labels import parse_scheme
from infra.data.ingest import IngestError, geometry_from_affine, ingest
from tests.conftest import console_script

SHAPE = (20, 18, 6)  # NIfTI (I, J, K): DICOM slices of 18 rows by 20 columns, 6 slices


def _affine(flipped: bool = False) -> np.ndarray:
    """RAS affine with 0.9 x 1.2 x 3.0 mm voxels, the first axis running right-to-left (as most
    scanners' NIfTI), a small rotation about z and a translation; ``flipped``: the third axis
    against the normal of the first two."""
    angle = np.deg2rad(10)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    axes = rotation @ np.diag([-0.9, 1.2, -3.0 if flipped else 3.0])
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = axes, (40.0, -20.0, 12.0)
    return affine


def _labels(rng) -> np.ndarray:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[5:14, 4:12, 1:5] = 2
    labels[7:12, 6:10, 2:4] = 1
    labels[8:10, 7:9, 2:4] = 4
    return labels


def _resampled_by_geometry(series, data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The NIfTI voxels at each DICOM voxel's patient position (by the series' own geometry and the
    inverse affine): what the series must hold, worked out without the ingest's axis logic."""
    orientation = np.asarray(series.orientation)
    row, column = orientation[:3], orientation[3:]
    depth, rows, columns = series.shape
    z, r, c = np.meshgrid(np.arange(depth), np.arange(rows), np.arange(columns), indexing="ij")
    lps = (np.asarray(series.origin) + c[..., None] * series.spacing[2] * row + r[..., None] * series.spacing[1] * column
           + z[..., None] * series.spacing[0] * np.cross(row, column))
    ras = lps * np.array([-1.0, -1.0, 1.0])
    ijk = np.linalg.solve(affine[:3, :3], (ras - affine[:3, 3]).reshape(-1, 3).T).T
    index = np.round(ijk).astype(int)
    assert np.abs(ijk - index).max() < 1e-3  # every DICOM voxel sits on a NIfTI voxel
    return data[index[:, 0], index[:, 1], index[:, 2]].reshape(series.shape)


def _brats(root: Path, case: str, flipped: bool, rng, names=("t1", "t1ce", "t2", "flair"), separator="_") -> dict:
    """A BraTS case folder; the volumes by the old names (t1, t1ce, t2, flair, seg) whatever ``names`` the files get."""
    folder = root / case
    folder.mkdir(parents=True)
    volumes = {}
    for name, file_name in zip(("t1", "t1ce", "t2", "flair"), names):
        data = rng.integers(0, 3000, SHAPE).astype(np.int16)
        nibabel.save(nibabel.Nifti1Image(data, _affine(flipped)), folder / f"{case}{separator}{file_name}.nii.gz")
        volumes[name] = data
    volumes["seg"] = _labels(rng)
    nibabel.save(nibabel.Nifti1Image(volumes["seg"], _affine(flipped)), folder / f"{case}{separator}seg.nii.gz")
    return volumes


def test_brats_2023_names_are_recognised_and_a_folder_without_either_naming_is_named(bucket, tmp_path):
    rng = np.random.default_rng(8)
    volumes = _brats(tmp_path, "BraTS-GLI-00000-000", False, rng, ("t1n", "t1c", "t2w", "t2f"), "-")
    report = ingest(tmp_path, f"s3://{bucket}/brats2023/", jobs=1)
    assert report["format"] == "brats" and report["cases"] == 1 and not report["failed"]
    assert report["sequences"] == "t1,t1c,t2,flair" and report["labels"] == "ncr=1,ed=2,et=3+4"
    [case] = build_catalog(f"s3://{bucket}/brats2023/", sequences=("t1", "t1c", "t2", "flair"),
                           split_fractions=(1.0, 0.0, 0.0), labels=parse_scheme(report["labels"])).cases
    assert case.case_id == "BraTS-GLI-00000-000"
    for series, name in zip(case.images, ("t1", "t1ce", "t2", "flair")):
        np.testing.assert_array_equal(series.read_volume(), _resampled_by_geometry(series, volumes[name], _affine()))
    _brats(tmp_path, "BraTS-GLI-00001-000", False, rng, ("t1n", "t1c", "t2w", "t2f"), "-")
    (tmp_path / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-t2w.nii.gz").unlink()
    partial = ingest(tmp_path, f"s3://{bucket}/broken/", jobs=1)  # the case is left out, not the run
    assert partial["cases"] == 1 and list(partial["failed"]) == ["BraTS-GLI-00000-000"]
    assert re.match(r"BraTS-GLI-00000-000-t2w.nii.gz missing beside BraTS-GLI-00000-000-seg.nii.gz \(expected BraTS "
                    r"2012-2021 .* or BraTS 2023\+ ", partial["failed"]["BraTS-GLI-00000-000"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(IngestError, match=r"no BraTS case found; expected BraTS 2012-2021 <case>/<case>_seg.nii.gz"):
        ingest(empty, f"s3://{bucket}/none/", kind="brats")


def test_brats_cases_round_trip_voxel_for_voxel_with_their_geometry(bucket, tmp_path):
    rng = np.random.default_rng(0)
    sources = {"BraTS_001": _brats(tmp_path, "BraTS_001", False, rng),
               "BraTS_002": _brats(tmp_path, "BraTS_002", True, rng)}
    out = f"s3://{bucket}/ingested/"
    report = ingest(tmp_path, out, jobs=2)
    assert report["format"] == "brats" and report["cases"] == 2 and not report["failed"]
    assert report["sequences"] == "t1,t1c,t2,flair" and report["labels"] == "ncr=1,ed=2,et=3+4"
    catalog = build_catalog(out, sequences=("t1", "t1c", "t2", "flair"), split_fractions=(1.0, 0.0, 0.0),
                            labels=parse_scheme(report["labels"]))
    assert [case.case_id for case in catalog.cases] == ["BraTS_001", "BraTS_002"], catalog.exclusions
    for case, flipped in zip(catalog.cases, (False, True)):
        volumes, affine = sources[case.case_id], _affine(flipped)
        assert case.image.spacing == pytest.approx((3.0, 1.2, 0.9))
        for series, name in zip(case.images, ("t1", "t1ce", "t2", "flair")):
            np.testing.assert_array_equal(series.read_volume(), _resampled_by_geometry(series, volumes[name], affine))
        np.testing.assert_array_equal(case.mask.read_volume(), _resampled_by_geometry(case.image, volumes["seg"], affine))


def test_a_sequence_on_another_grid_is_refused_or_resampled_onto_the_reference(bucket, tmp_path):
    volumes = _brats(tmp_path, "fine-t2", False, np.random.default_rng(4))
    fine = _affine()
    fine[:3, :3] /= 2  # T2 at half the voxel size; its voxel 2i lies on the T1's voxel i
    t2 = np.random.default_rng(5).integers(0, 3000, tuple(2 * n - 1 for n in SHAPE)).astype(np.int16)
    nibabel.save(nibabel.Nifti1Image(t2, fine), tmp_path / "fine-t2" / "fine-t2_t2.nii.gz")
    refused = ingest(tmp_path, f"s3://{bucket}/refused/", jobs=1)
    assert refused["cases"] == 0 and refused["failed"]["fine-t2"] == (
        "fine-t2_t2.nii.gz: its grid (shape (39, 35, 11)) differs from fine-t2_t1.nii.gz's (shape (20, 18, 6)); pass "
        "--resample-to t1 to resample it onto that grid")
    out = f"s3://{bucket}/resampled/"
    assert ingest(tmp_path, out, jobs=1, resample_to="t1")["cases"] == 1
    (case,) = build_catalog(out, sequences=("t1", "t1c", "t2", "flair"), split_fractions=(1.0, 0.0, 0.0)).cases
    on_t1_grid = t2[::2, ::2, ::2]
    np.testing.assert_array_equal(case.images[2].read_volume(), _resampled_by_geometry(case.image, on_t1_grid, _affine()))
    np.testing.assert_array_equal(case.images[0].read_volume(),
                                  _resampled_by_geometry(case.image, volumes["t1"], _affine()))
    with pytest.raises(IngestError, match="--resample-to 'pd'"):
        ingest(tmp_path, out, resample_to="pd")


def test_a_decathlon_dataset_keeps_its_modalities_and_label_names(bucket, tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    meta = {"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
            "training": [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    image = rng.normal(100.0, 30.0, (*SHAPE, 4)).astype(np.float32)
    labels = np.minimum(_labels(rng), 3)
    nibabel.save(nibabel.Nifti1Image(image, _affine()), tmp_path / "imagesTr" / "BRATS_001.nii.gz")
    nibabel.save(nibabel.Nifti1Image(labels, _affine()), tmp_path / "labelsTr" / "BRATS_001.nii.gz")
    out = f"s3://{bucket}/msd/"
    report = ingest(tmp_path, out, jobs=1)
    assert report["sequences"] == "flair,t1w,t1gd,t2w"
    assert report["labels"] == "edema=1,non_enhancing_tumor=2,enhancing_tumour=3"
    (case,) = build_catalog(out, sequences=("flair", "t1w", "t1gd", "t2w"), split_fractions=(1.0, 0.0, 0.0)).cases
    for index, series in enumerate(case.images):
        expected = _resampled_by_geometry(series, image[..., index], _affine())
        slope = (expected.max() - expected.min()) / 65535
        np.testing.assert_allclose(series.read_volume(), expected, atol=slope / 2 + 1e-3)  # float -> 16 bits
    np.testing.assert_array_equal(case.mask.read_volume(), _resampled_by_geometry(case.image, labels, _affine()))


def test_lgg_slice_folders_become_three_sequence_cases(bucket, tmp_path):
    rng = np.random.default_rng(2)
    case = tmp_path / "TCGA_XX_0001"
    case.mkdir()
    slices, masks = [], []
    for number in range(1, 13):  # numbered 1..12: sorted by number, not as text (10 before 2)
        rgb = rng.integers(0, 255, (16, 20, 3), dtype=np.uint8)
        mask = np.zeros((16, 20), dtype=np.uint8)
        mask[4:9, 5:12] = 255 if 4 <= number <= 8 else 0
        Image.fromarray(rgb).save(case / f"TCGA_XX_0001_{number}.tif")
        Image.fromarray(mask).save(case / f"TCGA_XX_0001_{number}_mask.tif")
        slices.append(rgb)
        masks.append(mask)
    out = f"s3://{bucket}/lgg/"
    report = ingest(tmp_path, out, spacing=(2.5, 0.8, 0.8), jobs=1)
    assert report["sequences"] == "t1,flair,t1c" and report["labels"] == "tumour=1"
    (ingested,) = build_catalog(out, sequences=("t1", "flair", "t1c"), split_fractions=(1.0, 0.0, 0.0)).cases
    stack = np.stack(slices)
    for index, series in enumerate(ingested.images):
        np.testing.assert_array_equal(series.read_volume(), stack[..., index])
    assert ingested.image.spacing == pytest.approx((2.5, 0.8, 0.8))
    np.testing.assert_array_equal(ingested.mask.read_volume(), (np.stack(masks) > 0).astype(np.float32))


def test_a_damaged_case_is_left_out_with_the_reason_and_the_rest_is_written(bucket, tmp_path):
    rng = np.random.default_rng(3)
    _brats(tmp_path, "good", False, rng)
    _brats(tmp_path, "bad", False, rng)
    (tmp_path / "bad" / "bad_t2.nii.gz").write_bytes(b"not a nifti file")
    out = f"s3://{bucket}/mixed/"
    result = subprocess.run([console_script("brainseg-ingest"), str(tmp_path), out], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert "left out bad: bad_t2.nii.gz: not a readable NIfTI file" in result.stderr
    assert "wrote 1 brats case(s)" in result.stdout and "--sequences t1,t1c,t2,flair" in result.stdout
    assert "1.2.826.0.1.3680043" not in result.stdout + result.stderr  # no UID of the written objects is logged
    assert [case.case_id for case in build_catalog(out, sequences=("t1", "t1c", "t2", "flair"),
                                                   split_fractions=(1.0, 0.0, 0.0)).cases] == ["good"]


def test_unknown_layouts_and_sheared_affines_are_refused(tmp_path):
    with pytest.raises(IngestError, match="holds no dataset.json"):
        ingest(tmp_path, "s3://nowhere/x/")
    sheared = _affine()
    sheared[0, 2] = 1.0
    with pytest.raises(IngestError, match="sheared"):
        geometry_from_affine(sheared, SHAPE)
    result = subprocess.run([sys.executable, "-m", "infra.data.ingest", str(tmp_path / "missing"), "s3://b-x/y/"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "is not a folder" in result.stderr
