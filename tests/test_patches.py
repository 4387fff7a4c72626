"""Patch planning and the patch stream: foreground share, determinism, sharding, padding, budget."""

import dataclasses
import json
import pickle
import tracemalloc

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from brainseg.data.catalog import build_catalog
from brainseg.data.sampling import is_foreground_slab, plan_slab
from brainseg.data.stream import PatchStream, foreground_centres
from brainseg.data.summary import CaseSummary, Points, even_shares, points_by_lesion
from brainseg.io import s3
from brainseg.stream_config import StreamConfig
from tests.conftest import put_case, small_phantom

SMALL = dict(patch_size=(16, 24, 24), slab_margin=(4, 8), memory_budget_bytes=64 * 2**20)


@pytest.fixture(scope="module")
def cases():
    s3.client().create_bucket(Bucket="patch-stream")
    for number in range(4):
        phantom = small_phantom(seed=20 + number, shape=(20, 48, 40))
        put_case("s3://patch-stream/data", f"case_{number}", phantom.image, phantom.mask)
    catalog = build_catalog("s3://patch-stream/data/", split_fractions=(1.0, 0.0, 0.0))
    return catalog.split("train")


@pytest.mark.parametrize("fraction, slabs, expected", [(1 / 3, 300, 100), (0.0, 50, 0), (1.0, 50, 50), (0.25, 40, 10)])
def test_foreground_share_is_exact(fraction, slabs, expected):
    assert sum(is_foreground_slab(t, fraction) for t in range(slabs)) == expected


def test_plans_are_deterministic_and_inside_the_volume():
    shapes = [(30, 64, 50), (10, 20, 20)]
    points = [((15, 30, 25), (16, 31, 26)), ()]
    config = StreamConfig(patch_size=(16, 32, 32), slab_margin=(4, 8), patches_per_slab=3)
    for slab_number in range(60):
        plan = plan_slab(slab_number, shapes, points, config)
        assert plan == plan_slab(slab_number, shapes, points, config)
        shape = shapes[plan.case_index]
        z0, z1, y0, y1, x0, x1 = plan.region
        assert 0 <= z0 < z1 <= shape[0] and 0 <= y0 < y1 <= shape[1] and (x0, x1) == (0, shape[2])
        assert plan.patch_extent == tuple(min(s, p) for s, p in zip(shape, config.patch_size))
        for origin in plan.origins:
            for axis in range(3):
                assert plan.region[2 * axis] <= origin[axis]
                assert origin[axis] + plan.patch_extent[axis] <= plan.region[2 * axis + 1]
        if plan.foreground:
            assert plan.case_index == 0
            assert all(any(all(o[a] <= p[a] < o[a] + plan.patch_extent[a] for a in range(3)) for p in points[0])
                       for o in plan.origins)


def _batches(stream, count, batch_size, workers):
    """The first ``count`` items a DataLoader yields (samples when ``batch_size`` is None)."""
    loader = DataLoader(stream, batch_size=batch_size, num_workers=workers)
    items = []
    for item in loader:
        items.append(item)
        if len(items) == count:
            break
    return items


def _take(stream, count, workers=0):
    return _batches(stream, count, None, workers)


def test_samples_have_the_documented_shapes(cases):
    sample = _take(PatchStream(cases, StreamConfig(**SMALL)), 1)[0]
    assert sample["image"].shape == (1, 16, 24, 24) and sample["image"].dtype == torch.float32
    assert sample["label"].shape == (1, 16, 24, 24) and sample["label"].dtype == torch.uint8
    assert set(sample["label"].unique().tolist()) <= {0, 1}
    assert sample["case_id"].startswith("case_") and sample["origin"].shape == (3,)


def test_same_seed_same_patches(cases):
    first = _take(PatchStream(cases, StreamConfig(**SMALL, seed=3)), 8)
    second = _take(PatchStream(cases, StreamConfig(**SMALL, seed=3)), 8)
    for a, b in zip(first, second):
        assert a["slab"] == b["slab"] and torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    third = _take(PatchStream(cases, StreamConfig(**SMALL, seed=4)), 8)
    assert any(not torch.equal(a["image"], c["image"]) for a, c in zip(first, third))


@pytest.mark.parametrize("workers, start", [(0, 3), (2, 3), (2, 4), (3, 5)])
def test_resume_continues_the_batch_sequence(cases, workers, start):
    # 3 samples per batch against groups of 2 slabs x 2 patches: resume points fall mid-group.
    config = StreamConfig(**SMALL, patches_per_slab=2, mix_slabs=2)
    whole = _batches(PatchStream(cases, config, batch_size=3), start + 4, 3, workers)
    resumed = _batches(PatchStream(cases, config, start_batch=start, batch_size=3), 4, 3, workers)
    for a, b in zip(whole[start:], resumed):
        assert a["slab"].tolist() == b["slab"].tolist()
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


@pytest.mark.parametrize("mix, expected", [(1, [0, 0, 0, 1, 1, 1]), (2, [0, 1, 0, 1, 0, 1]),
                                           (3, [0, 1, 2, 0, 1, 2])])
def test_patches_of_consecutive_slabs_are_interleaved(cases, mix, expected):
    samples = _take(PatchStream(cases, StreamConfig(**SMALL, patches_per_slab=3, mix_slabs=mix)), 6)
    assert [s["slab"] for s in samples] == expected


def test_workers_and_ranks_see_disjoint_shards(cases):
    config = StreamConfig(**SMALL, patches_per_slab=2)
    slabs = {}
    for rank in range(2):
        stream = PatchStream(cases, config, rank=rank, world_size=2)
        samples = _take(stream, 16, workers=2)
        slabs[rank] = [s["slab"] for s in samples]
    seen = [set(t) for t in slabs.values()]
    assert not seen[0] & seen[1]
    assert all(t % 4 in (0, 1) for t in slabs[0]) and all(t % 4 in (2, 3) for t in slabs[1])
    assert seen[0] | seen[1] == set(range(16))


@pytest.mark.parametrize("sampling", ["labels", "voxels", "lesions"])
def test_foreground_patches_hold_tumour(cases, sampling):
    config = StreamConfig(**SMALL, foreground_fraction=1.0, foreground_sampling=sampling, augment=False)
    samples = _take(PatchStream(cases, config), 12)
    assert all(s["label"].sum() > 0 for s in samples)


def test_lesion_points_are_even_over_the_lesions_then_their_label_values():
    box = np.zeros((20, 30, 30), dtype=np.int64)
    box[2:12, 2:22, 2:22] = 2  # a large lesion: 4,000 voxels of oedema ...
    box[5:8, 8:12, 8:12] = 4  # ... around 48 enhancing
    box[15:19, 25:29, 25:29] = 4  # a nodule of 64 enhancing voxels
    box[0, 29, 0] = 1  # a one-voxel speck, under the 50 mm³ floor: no lesion
    bbox = (10, 30, 100, 130, 40, 70)
    points = np.asarray(points_by_lesion(box, bbox, (1.0, 1.0, 1.0), np.random.default_rng(0)))
    assert len(points) == 256 and len({tuple(p) for p in points}) == 256
    values = box[tuple((points - [10, 100, 40]).T)]
    nodule = (points[:, 0] >= 25) & (points[:, 1] >= 125)
    assert nodule.sum() == 64  # every voxel of the nodule: it holds fewer than its 128, the large lesion takes 192
    assert (values[~nodule] == 4).sum() == 48 and (values[~nodule] == 2).sum() == 144  # its 48 enhancing voxels
    assert not (values == 1).any()
    assert points_by_lesion(box, bbox, (1.0, 1.0, 1.0), np.random.default_rng(0)) == tuple(map(tuple, points))


def test_foreground_centres_follow_the_label_values_the_tumours_voxels_or_the_lesions():
    points = tuple((z, 0, 0) for z in range(256))
    values = (1,) * 128 + (2,) * 128  # evenly over the two values, as the summary draws them
    summary = CaseSummary((), 1000, 1.0, (), points, label_counts=((1, 10), (2, 990)), foreground_values=values)
    assert foreground_centres(summary, StreamConfig(), "case_a") == points
    voxels = StreamConfig(foreground_sampling="voxels")
    drawn = foreground_centres(summary, voxels, "case_a")
    assert len(drawn) == 256 and set(drawn) <= set(points)
    assert 0.95 <= sum(point[0] >= 128 for point in drawn) / 256 <= 1.0  # value 2 holds 99% of the tumour
    assert foreground_centres(summary, voxels, "case_a") == drawn  # seeded by the run's seed and the case
    assert foreground_centres(summary, StreamConfig(foreground_sampling="voxels", seed=1), "case_a") != drawn
    older = CaseSummary((), 1000, 1.0, (), points, label_counts=((1, 10), (2, 990)))
    with pytest.raises(ValueError, match="case_a: its summary has no label value per foreground point"):
        foreground_centres(older, voxels, "case_a")
    lesions = StreamConfig(foreground_sampling="lesions")
    with pytest.raises(ValueError, match="case_a: its summary has no lesion points"):
        foreground_centres(older, lesions, "case_a")
    nodules = ((1, 2, 3), (9, 9, 9))
    assert foreground_centres(CaseSummary((), 1000, 1.0, (), points, lesion_points=nodules), lesions, "case_a") == nodules


def test_small_volumes_are_padded(cases):
    config = StreamConfig(patch_size=(32, 64, 64), slab_margin=(0, 0), augment=False,
                          memory_budget_bytes=64 * 2**20)
    sample = _take(PatchStream(cases, config), 1)[0]
    assert sample["image"].shape == (1, 32, 64, 64)
    assert torch.all(sample["image"][0, :6] == 0) and torch.all(sample["label"][0, :6] == 0)  # (32-20)/2 pad


def test_minmax_normalisation_stays_in_unit_range(cases):
    samples = _take(PatchStream(cases, StreamConfig(**SMALL, normalization="minmax")), 6)
    for sample in samples:
        assert 0.0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1.0


def test_zscore_patch_is_the_normalised_region(cases):
    config = StreamConfig(**SMALL, augment=False)
    by_id = {case.case_id: case for case in cases}
    for sample in _take(PatchStream(cases, config), 6):
        case = by_id[sample["case_id"]]
        z, y, x = sample["origin"].tolist()
        raw = case.image.read_region(z, z + 16, y, y + 24, x, x + 24)
        stats = case.summary.intensities[0]
        expected = (raw - np.float32(stats.mean)) / np.float32(stats.std)
        np.testing.assert_allclose(sample["image"][0].numpy(), expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(sample["label"][0].numpy(),
                                      case.mask.read_region(z, z + 16, y, y + 24, x, x + 24) > 0)


def test_budget_too_small_for_one_slab(cases):
    with pytest.raises(ValueError, match=r"--memory-budget-mb 16 gives each of 1 DataLoader worker\(s\) 16 MiB, but one "
                                         r"slab needs \d+ MiB; raise --memory-budget-mb to at least \d+"):
        PatchStream(cases, StreamConfig(patch_size=(96, 96, 96), memory_budget_bytes=16 * 2**20))


def test_no_cases():
    with pytest.raises(ValueError, match="no usable training cases"):
        PatchStream([], StreamConfig())


@pytest.mark.parametrize("changes, message", [
    ({"patch_size": (0, 96, 96)}, "patch_size"),
    ({"foreground_fraction": 1.5}, "foreground_fraction"),
    ({"normalization": "percentile"}, "normalization 'percentile'"),
    ({"patches_per_slab": 0}, "patches_per_slab"),
    ({"mix_slabs": 0}, "mix_slabs"),
])
def test_config_checks_itself(changes, message):
    with pytest.raises(ValueError, match=message):
        StreamConfig(**changes)


@pytest.mark.parametrize("capacities, total, expected", [
    ([100, 100], 256, [100, 100]), ([500, 64], 256, [192, 64]), ([500, 500, 500], 256, [86, 85, 85]),
    ([3, 0, 500], 10, [3, 0, 7]), ([], 256, []),
])
def test_even_shares(capacities, total, expected):
    assert even_shares(capacities, total) == expected


def test_summary_points_are_one_array_per_case_and_read_as_the_tuples_they_replace():
    """Every process of a job holds every case's summary points (512 a case): as tuples of ints
    they took about 75 KB a case, 90 MB for BraTS's 1,251 studies in each worker and rank."""
    coordinates = [(z, 2 * z, 300 + z) for z in range(256)]
    tracemalloc.start()
    points = Points(coordinates)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert held < 4096, held  # 256 x 12 bytes and the array's header
    assert len(points) == 256 and points[3] == (3, 6, 303) and points == tuple(coordinates)
    assert np.asarray(points).shape == (256, 3) and points[:2] == coordinates[:2]
    assert pickle.loads(pickle.dumps(points)) == points and not Points()
    summary = CaseSummary((), 256, 1.0, (0, 1, 0, 1, 0, 1), points, lesion_points=points[:10])
    saved = json.loads(json.dumps(dataclasses.asdict(summary), default=Points.tolist))
    assert CaseSummary.from_json(saved) == summary
