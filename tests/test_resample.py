"""Physical spacing: the target grid, region resampling that agrees with whole-volume resampling,
the way back to the native grid, and a run on cases of different slice thickness."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch

from brainseg.commands import train
from brainseg.config import Hyperparameters
from brainseg.data.catalog import build_catalog
from brainseg.data.resample import Grid, coarse_axis, median_spacing
from brainseg.data.stream import PatchStream, read_case_region
from brainseg.io import s3
from brainseg.run.cases import case_splits, resolve_target_spacing, select_cases
from brainseg.stream_config import StreamConfig
from infra.data.synth import SynthSpec, write_dataset

THICK = Grid((10, 24, 20), (3.0, 1.0, 1.25), (1.0, 1.0, 1.0))
SLICES = Grid((8, 24, 20), (4.0, 1.0, 1.25), (1.5, 0.8, 1.25), "separate_z")  # 4 mm slices: anisotropic


def _smooth(shape) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.linspace(0, 1, n) for n in shape), indexing="ij")
    return (np.sin(3 * z) + np.cos(2 * y) * x).astype(np.float32)


def test_the_target_grid_keeps_the_extent_in_millimetres():
    assert THICK.shape == (30, 24, 25) and not THICK.identity
    same = Grid((10, 24, 20), (3.0, 1.0, 1.25), (3.0, 1.0, 1.25))
    assert same.identity and same.shape == (10, 24, 20)
    volume = _smooth((10, 24, 20))
    assert same.volume_to_target(volume) is volume
    assert median_spacing([(1, 1, 1), (3, 1, 1), (2, 0.5, 1)]) == (2.0, 1.0, 1.0)


@pytest.mark.parametrize("grid, region", [(THICK, (0, 8, 0, 24, 0, 25)), (THICK, (11, 19, 3, 17, 0, 25)),
                                          (THICK, (22, 30, 10, 24, 5, 25)), (SLICES, (0, 8, 0, 30, 0, 20)),
                                          (SLICES, (9, 21, 4, 26, 3, 17))])
def test_a_resampled_region_equals_the_same_region_of_the_resampled_volume(grid, region):
    volume = _smooth(grid.native_shape)
    labels = (volume > 0.5).astype(np.uint8) * 4
    whole = grid.volume_to_target(volume)
    whole_labels = grid.volume_to_target(labels, labels=True)
    native = grid.native_region(region)
    window = tuple(slice(a, b) for a, b in zip(region[0::2], region[1::2]))
    cut = tuple(slice(a, b) for a, b in zip(native[0::2], native[1::2]))
    np.testing.assert_allclose(grid.to_target(volume[cut], native, region), whole[window], atol=1e-5)
    np.testing.assert_array_equal(grid.to_target(labels[cut], native, region, labels=True), whole_labels[window])
    assert set(np.unique(whole_labels)) <= {0, 4} and whole_labels.dtype == np.uint8


def test_separate_z_applies_where_nnunet_applies_it():
    assert coarse_axis((4.0, 1.0, 1.25)) == 0 and coarse_axis((1.0, 0.5, 2.0)) == 2
    assert coarse_axis((3.0, 1.0, 1.0)) is None and coarse_axis((1.0, 1.0, 1.0)) is None  # 3x is not more than 3x
    assert SLICES.nearest_axis == 0
    assert Grid((8, 24, 20), (4.0, 1.0, 1.25), (1.5, 0.8, 1.25), "linear").nearest_axis is None
    assert Grid((30, 24, 20), (1.0, 1.0, 1.0), (5.0, 1.0, 1.0), "separate_z").nearest_axis == 0  # the target's
    assert Grid((10, 24, 20), (3.0, 1.0, 1.25), (1.0, 1.0, 1.0), "separate_z").nearest_axis is None
    assert Grid((8, 24, 20), (4.0, 1.0, 1.0), (4.0, 1.0, 1.0), "separate_z").nearest_axis is None  # not resampled


def test_thick_slices_are_never_blended_and_come_back_exactly():
    grid = Grid((8, 24, 20), (4.0, 1.0, 1.0), (1.5, 1.0, 1.0), "separate_z")  # only the slices move
    volume = _smooth(grid.native_shape) + np.arange(8, dtype=np.float32)[:, None, None]
    target = grid.volume_to_target(volume)
    assert target.shape == (21, 24, 20)
    centres = (np.arange(21) + 0.5) * 8 / 21 - 0.5
    for k, centre in enumerate(centres):  # every target slice is the nearest native slice, unblended
        np.testing.assert_allclose(target[k], volume[int(np.clip(np.floor(centre + 0.5), 0, 7))], atol=1e-5)
    back = grid.volume_to_native(torch.from_numpy(target)[None])[0].numpy()
    np.testing.assert_allclose(back, volume, atol=1e-5)  # the nearest target slice is a copy of its own
    linear = Grid((8, 24, 20), (4.0, 1.0, 1.0), (1.5, 1.0, 1.0), "linear").volume_to_target(volume)
    assert not np.allclose(linear[1], volume[0], atol=1e-3) and not np.allclose(linear[1], volume[1], atol=1e-3)


def test_the_output_maps_back_onto_the_native_grid():
    volume = _smooth(THICK.native_shape)
    there = torch.from_numpy(THICK.volume_to_target(volume))[None]
    back = THICK.volume_to_native(there)[0].numpy()
    assert back.shape == THICK.native_shape
    assert np.abs(back - volume)[1:-1].max() < 0.05  # a smooth volume survives the round trip
    points = ((0, 0, 0), (9, 23, 19), (4, 10, 7))
    target = THICK.points_to_target(points)
    assert all(0 <= v < n for point in target for v, n in zip(point, THICK.shape))
    assert target[2] == (13, 10, 9)  # the target voxel that holds native voxel (4, 10, 7)


def test_cases_of_different_thickness_stream_patches_in_millimetres(bucket):
    data = f"s3://{bucket}/thick/"
    write_dataset(10, data, SynthSpec(shape=(24, 48, 48), sequences=("t1c", "flair"), thicknesses=(1, 2, 3)))
    hp = Hyperparameters(data_uri=data, sequences="t1c,flair", patch_size=(8, 16, 16), channels=(8, 16, 32))
    catalog = build_catalog(data, sequences=hp.sequence_names)
    depths = {case.image.shape[0] for case in catalog.cases}
    assert len(depths) > 1  # the thickness varies
    train_cases, val_cases, _ = select_cases(hp, catalog, case_splits(hp, catalog))
    target = resolve_target_spacing(hp, train_cases)
    spacing = target.spacing
    assert spacing == median_spacing(case.image.spacing for case in train_cases)
    case = next(c for c in train_cases if c.image.spacing[0] != spacing[0])
    stream = PatchStream([case], StreamConfig(patch_size=(8, 16, 16), augment=False, memory_budget_bytes=2**26),
                         target=target)
    for sample, _ in zip(stream, range(3)):
        assert sample["image"].shape == (2, 8, 16, 16)
    grid = target.grid_of(case)
    assert not grid.identity
    region = (0, grid.shape[0], 0, grid.shape[1], 0, grid.shape[2])
    images, mask = read_case_region(case, region, grid=grid)
    assert images[0].shape == grid.shape and set(np.unique(mask)) <= {0, 1, 2, 4}


def test_a_run_on_mixed_thickness_scores_on_the_native_grid(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("SM_MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("SM_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    data = f"s3://{bucket}/thick/"
    write_dataset(10, data, SynthSpec(shape=(24, 48, 48), sequences=("t1c", "flair"), thicknesses=(1, 2)))
    output = f"s3://{bucket}/runs"
    assert train.main(["--data-uri", data, "--output-uri", output, "--run-name", "mm", "--sequences", "t1c,flair",
                       "--channels", "8,16,32", "--patch-size", "8,32,32", "--batch-size", "2", "--num-workers", "0",
                       "--epochs", "1", "--steps-per-epoch", "3", "--res-units", "1", "--memory-budget-mb", "64",
                       "--warmup-steps", "1"]) == 0
    rows = list(csv.DictReader(io.StringIO(s3.read_uri(f"{output}/mm/metrics/test_per_case.csv").decode())))
    catalog = build_catalog(data, sequences=("t1c", "flair"))
    native = {case.case_id: "x".join(map(str, case.image.shape)) for case in catalog.cases}
    assert rows and all(row["shape"] == native[row["case_id"]] for row in rows)
    summary = json.loads(s3.read_uri(f"{output}/mm/summary.json"))
    assert summary["hyperparameters"]["target_spacing"] == "median"
