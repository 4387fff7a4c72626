"""Multi-sequence cases and multi-class labels against the moto S3 server: the catalog's checks
(missing sequences, grids, label values), N-channel patches, label schemes, HD95, and a training run
of a multi-sequence, multi-region model."""

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
from brainseg.data.stream import PatchStream
from brainseg.dicom import writer
from brainseg.io import s3
from brainseg.labels import parse_scheme
from brainseg.metrics import hausdorff95
from brainseg.stream_config import StreamConfig
from brainseg.tasks import task_of
from infra.data.phantom import ET, NCR, make_study
from infra.data.synth import SynthSpec, write_dataset
from tests.conftest import put_series

SEQUENCES = ("t1c", "t1", "t2", "flair")
LABELS = "ncr=1,ed=2,et=4"


def _put_study(root: str, case_id: str, seed: int, sequences=SEQUENCES, shape=(12, 40, 36), skip=(),
               spacing=(2.0, 1.0, 1.0), shifted: str = "") -> dict:
    """Write a synthetic study as ``<case>/<sequence>/`` folders and ``<case>/mask/``; returns its volumes."""
    study = make_study(shape, np.random.default_rng(seed), sequences)
    first = writer.SeriesSpec(spacing=spacing, patient_id=f"PID-{case_id}", patient_name=f"Doe^{case_id}")
    for name, volume in {**study.images, "mask": study.labels}.items():
        if name in skip:
            continue
        origin = (0.0, 0.0, 5.0) if name == shifted else first.origin
        spec = writer.SeriesSpec(spacing=spacing, origin=origin, patient_id=first.patient_id,
                                 patient_name=first.patient_name, study_uid=first.study_uid,
                                 frame_of_reference_uid=first.frame_of_reference_uid)
        put_series(f"{root}/{case_id}", name, writer.slice_datasets(volume, spec))
    return {**study.images, "mask": study.labels}


def test_a_case_holds_every_sequence_on_the_first_ones_grid_and_is_excluded_with_the_reason_otherwise(bucket):
    root = f"s3://{bucket}/brats"
    _put_study(root, "ok", 1)
    _put_study(root, "no-t2", 2, skip=("t2",))
    volumes = _put_study(root, "shifted", 3, shifted="flair")
    _put_study(root, "second", 4)
    s3.put_bytes(f"{root}/ok/notes/readme.txt", b"not a sequence")  # an unnamed folder is ignored
    labels = parse_scheme("ncr=1,ed=2")  # no class for 4: every enhancing voxel
    catalog = build_catalog(root, sequences=SEQUENCES, split_fractions=(1.0, 0.0, 0.0), labels=parse_scheme(LABELS))
    assert [case.case_id for case in catalog.cases] == ["ok", "second", "shifted"]
    reasons = {item.case_id: item.reason for item in catalog.exclusions}
    assert reasons["no-t2"].startswith("missing sequence(s) t2: no objects under t2/ (the case has t1c, t1, flair)")
    assert "--missing-sequences zero" in reasons["no-t2"]
    # a FLAIR whose slices start 5 mm higher, in the same frame of reference, is read where the t1c's
    # slices lie (2 mm apart): t1c slice k is FLAIR slice k - 2.5, halfway between two of them
    flair = catalog.cases[2].images[3].read_volume()
    written = volumes["flair"].astype(np.float32)
    np.testing.assert_allclose(flair[3:], (written[:-3] + written[1:-2]) / 2, atol=1e-3)
    assert not flair[:2].any()  # below the FLAIR's first slice: outside its field of view

    case = catalog.cases[0]
    assert case.channels == 4 and case.missing == ()
    assert [stats.sequence for stats in case.summary.intensities] == list(SEQUENCES)
    assert {value for value, _ in case.summary.label_counts} <= {1, 2, 4}
    by_value = dict(case.summary.label_counts)
    assert case.summary.tumour_voxels == sum(by_value.values())

    strict = build_catalog(root, sequences=SEQUENCES, split_fractions=(1.0, 0.0, 0.0), labels=labels,
                           refresh_index=True)
    reasons = {item.case_id: item.reason for item in strict.exclusions}
    with_et = [case_id for case_id in ("ok", "second") if case_id in reasons]
    assert with_et and all(reasons[case_id].startswith("mask holds label value(s) 4 that no class of --labels covers "
                                                       "(ncr=1, ed=2)") for case_id in with_et)


def test_sequence_folders_read_without_naming_them_say_which_flag_to_pass(bucket):
    root = f"s3://{bucket}/brats"
    _put_study(root, "a", 7, sequences=("t1c", "flair"))
    (exclusion,) = build_catalog(root, split_fractions=(1.0, 0.0, 0.0)).exclusions
    assert exclusion.reason == ("no image/ folder, but the case holds flair/, t1c/: name its sequence folders with "
                                "--sequences (e.g. --sequences flair,t1c)")


def test_a_missing_sequence_is_zero_filled_when_asked_and_the_patch_channel_is_zero(bucket):
    root = f"s3://{bucket}/brats"
    volumes = _put_study(root, "no-t2", 5, skip=("t2",))
    catalog = build_catalog(root, sequences=SEQUENCES, split_fractions=(1.0, 0.0, 0.0), zero_fill=True)
    (case,) = catalog.cases
    assert case.missing == ("t2",) and case.images[2] is None and case.image.shape == volumes["t1c"].shape
    stream = PatchStream(catalog.cases, StreamConfig(patch_size=(8, 16, 16), augment=False, memory_budget_bytes=2**26))
    sample = next(iter(stream))
    assert sample["image"].shape == (4, 8, 16, 16)
    assert torch.all(sample["image"][2] == 0) and sample["image"][0].std() > 0


def test_each_channel_is_its_sequence_normalised_with_its_own_statistics(bucket):
    root = f"s3://{bucket}/brats"
    volumes = _put_study(root, "a", 6)
    catalog = build_catalog(root, sequences=SEQUENCES, split_fractions=(1.0, 0.0, 0.0))
    (case,) = catalog.cases
    stream = PatchStream(catalog.cases, StreamConfig(patch_size=(8, 16, 16), augment=False, foreground_fraction=1.0,
                                                     memory_budget_bytes=2**26))
    labelled = 0
    for sample, _ in zip(stream, range(6)):
        z, y, x = sample["origin"].tolist()
        window = (slice(z, z + 8), slice(y, y + 16), slice(x, x + 16))
        for channel, name in enumerate(SEQUENCES):
            stats = case.summary.intensities[channel]
            expected = (volumes[name][window].astype(np.float32) - np.float32(stats.mean)) / np.float32(stats.std)
            np.testing.assert_allclose(sample["image"][channel].numpy(), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(sample["label"][0].numpy(), volumes["mask"][window])
        labelled += int(sample["label"].max() > 0)
    assert labelled >= 3  # foreground tasks land on labels; their raw values (1, 2, 4) reach the task
    assert stream.slab_cost > PatchStream(catalog.cases, StreamConfig(
        patch_size=(8, 16, 16), memory_budget_bytes=2**26)).slab_cost / 2  # the budget counts every channel
    one = StreamConfig(patch_size=(8, 16, 16)).slab_bytes((12, 40, 36), 2, 2, channels=1)
    four = StreamConfig(patch_size=(8, 16, 16)).slab_bytes((12, 40, 36), 2, 2, channels=4)
    assert four > 3 * one * 0.8


@pytest.mark.parametrize("labels, regions, message", [
    ("ncr=1,ed=1", "", "label value 1 belongs to both ncr and ed"),
    ("ncr=1,ncr=2", "", "class ncr is named twice"),
    ("ncr=0", "", "must lie in 1..255"),
    ("tumour=*,ed=2", "", "can only be the one class"),
    ("ncr", "", "is not NAME=VALUE"),
    ("ncr=1,ed=2", "wt=ncr+et", "region wt names et, not a class of --labels (ncr, ed)"),
    ("tumour=*", "brats", "region wt names ncr, ed, et"),
])
def test_label_schemes_refuse_what_cannot_be_meant(labels, regions, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        parse_scheme(labels, regions)
    with pytest.raises(ValueError, match="labels|regions"):
        Hyperparameters(labels=labels, regions=regions)


def test_targets_follow_the_scheme_softmax_classes_or_sigmoid_regions():
    label = torch.tensor([0, 1, 2, 4, 3], dtype=torch.uint8).reshape(1, 1, 1, 1, 5)
    batch = {"image": torch.zeros(1, 4, 1, 1, 5), "label": label}
    binary = task_of(Hyperparameters())
    assert binary.inputs_and_target(batch, 0, 0)[1].flatten().tolist() == [0, 1, 1, 1, 1]
    classes = task_of(Hyperparameters(labels=LABELS))
    assert classes.out_channels == 4 and classes.inputs_and_target(batch, 0, 0)[1].flatten().tolist() == [0, 1, 2, 3, 0]
    regions = task_of(Hyperparameters(labels=LABELS, regions="brats"))
    target = regions.inputs_and_target(batch, 0, 0)[1]
    assert regions.out_channels == 3 and target.shape == (1, 3, 1, 1, 5) and target.dtype == torch.float32
    assert target[0, :, 0, 0].tolist() == [[0, 1, 1, 1, 0], [0, 1, 0, 1, 0], [0, 0, 0, 1, 0]]  # wt, tc, et
    loss = regions.loss(Hyperparameters(labels=LABELS, regions="brats"))
    assert torch.isfinite(loss(torch.zeros(1, 3, 1, 1, 5), target))


@pytest.mark.parametrize("labels, regions", [("ncr=1,ed=2,et=4", "brats"), ("ncr=1,ed=2,et=4", ""),
                                             ("tumour=*", ""), ("core=1+4,ed=2", "all=core+ed,core=core")])
def test_predicted_structures_go_back_to_the_label_values_they_were_learnt_from(labels, regions):
    scheme = parse_scheme(labels, regions)
    mask = np.array([0, 1, 2, 4, 2, 1, 4, 0, 4], dtype=np.uint8)
    back = scheme.label_map([structure.of(mask) for structure in scheme.structures])
    expected = {"tumour=*": (mask > 0).astype(np.uint8), "core=1+4,ed=2": np.where(np.isin(mask, (1, 4)), 1, mask)}
    assert back.dtype == np.uint8 and back.tolist() == expected.get(labels, mask).tolist()


def test_predicted_regions_nest_as_their_definitions_do():
    scheme = parse_scheme(LABELS, "brats")  # wt = ncr+ed+et, tc = ncr+et, et = et
    # Five voxels: only WT fires; only ET fires; only TC; TC and ET; nothing.
    logits = np.array([[5, -5, -5, -5, -5], [-5, -5, 5, 5, -5], [-5, 5, -5, 5, -5]], dtype=np.float32)
    wt, tc, et = scheme.predicted(logits)
    assert wt.tolist() == [True, True, True, True, False]  # holds what TC or ET holds
    assert tc.tolist() == [False, True, True, True, False]  # holds what ET holds
    assert et.tolist() == [False, True, False, True, False]  # holds only its own
    side_by_side = parse_scheme("a=1,b=2", "left=a,right=b,both=a+b")
    left, right, both = side_by_side.predicted(np.array([[1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]))
    assert left.tolist() == [True, False] and right.tolist() == [False, True] and both.tolist() == [True, True]


def test_regions_are_scored_each_on_their_own():
    scheme = parse_scheme(LABELS, "brats")
    mask = np.zeros((8, 8, 8), dtype=np.uint8)
    mask[2:6, 2:6, 2:6] = 2
    mask[3:5, 3:5, 3:5] = NCR
    mask[3, 3, 3] = ET
    task = task_of(Hyperparameters(labels=LABELS, regions="brats"))
    logits = torch.from_numpy(np.stack([np.where(structure.of(mask), 5.0, -5.0) for structure in scheme.regions]))
    logits[2] = -5.0  # enhancing tumour missed entirely
    scores = task.score(np.zeros((4, 8, 8, 8), np.float32), mask, logits.float(), (1.0, 1.0, 1.0))
    assert scores["overlaps"]["wt"].dice == 1.0 and scores["overlaps"]["tc"].dice == 1.0
    assert scores["overlaps"]["et"].dice == 0.0 and scores["hd95"]["et"] == pytest.approx(np.sqrt(3 * 64))
    assert scores["tumour"].truth == 64


def test_hd95_is_the_boundary_distance_in_millimetres():
    truth = np.zeros((20, 20, 20), dtype=bool)
    truth[5:15, 5:15, 5:15] = True
    shifted = np.roll(truth, 2, axis=2)
    assert hausdorff95(shifted, truth, (1.0, 1.0, 1.0)) == pytest.approx(2.0)
    assert hausdorff95(shifted, truth, (1.0, 1.0, 0.5)) == pytest.approx(1.0)
    assert hausdorff95(truth, truth, (1.0, 1.0, 1.0)) == 0.0


def test_a_multi_sequence_multi_region_model_trains_and_reports_each_region(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("SM_MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("SM_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    data = f"s3://{bucket}/brats/"
    write_dataset(10, data, SynthSpec(shape=(32, 64, 64), sequences=("t1c", "flair"), thicknesses=(1, 2)))
    output = f"s3://{bucket}/runs"
    assert train.main(["--data-uri", data, "--output-uri", output, "--run-name", "regions", "--sequences", "t1c,flair",
                       "--labels", LABELS, "--regions", "brats", "--channels", "8,16,32", "--patch-size", "16,32,32",
                       "--batch-size", "2", "--num-workers", "0", "--epochs", "1", "--steps-per-epoch", "6",
                       "--res-units", "1", "--memory-budget-mb", "64", "--warmup-steps", "2"]) == 0
    summary = json.loads(s3.read_uri(f"{output}/regions/summary.json"))
    assert summary["structures"] == ["wt", "tc", "et"]
    assert all(0.0 <= summary[f"test_dice_{name}"] <= 1.0 and summary[f"test_hd95_{name}"] >= 0.0
               for name in ("wt", "tc", "et"))
    rows = list(csv.DictReader(io.StringIO(s3.read_uri(f"{output}/regions/metrics/test_per_case.csv").decode())))
    assert rows and {"dice_wt", "dice_tc", "dice_et", "hd95_et", "truth_ml_wt"} <= set(rows[0])
    epoch = json.loads(s3.read_uri(f"{output}/regions/metrics/metrics.jsonl").splitlines()[0])
    assert {"val_dice_wt", "val_dice_tc", "val_dice_et"} <= set(epoch)
    weights = torch.load(tmp_path / "model" / "model.pt", weights_only=True)["state_dict"]
    first = next(value for name, value in weights.items() if value.dim() == 5)
    last = [value for name, value in weights.items() if value.dim() == 5][-1]
    assert first.shape[1] == 2 and 3 in (last.shape[0], last.shape[1])  # two sequences in, three regions out
