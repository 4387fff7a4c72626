"""Study- and slice-level detection: the figures checked by hand on small sets, tumour-free studies
written by the generator, kept by the catalog and split evenly, and a run on a dataset holding them
reporting detection in its summary and per-case table."""

from __future__ import annotations

import csv
import io
import json

import matplotlib.image
import numpy as np
import pytest

from brainseg.commands import train
from brainseg.data.catalog import build_catalog
from brainseg.data.splits import assign_folds, assign_splits
from brainseg.detection import (
    SliceCounts,
    Threshold,
    choose_threshold,
    detection_figures,
    largest_component_ml,
    largest_component_ml_of,
    roc_auc,
    roc_curve,
)
from brainseg.io import s3
from brainseg.overlap import LesionMatch
from brainseg.postprocess import Rule
from infra.data.synth import SynthSpec, write_dataset
from infra.review import cli as review
from tests.test_training import SMALL


def test_slices_are_counted_by_where_truth_and_prediction_hold_tumour():
    truth, prediction = np.zeros((6, 4, 4), bool), np.zeros((6, 4, 4), bool)
    truth[1:4, 1, 1] = True  # tumour on slices 1, 2, 3
    prediction[2:5, 2, 2] = True  # predicted on 2, 3, 4
    counts = SliceCounts.of(prediction, truth)
    assert counts == SliceCounts(found=2, missed=1, false_alarms=1, clean=2)
    assert (counts + counts).to_dict() == {"found": 4, "missed": 2, "false_alarms": 2, "clean": 4,
                                           "sensitivity": 4 / 6, "specificity": 4 / 6}
    assert SliceCounts().to_dict()["sensitivity"] is None  # no tumour slice: no sensitivity, not a division by 0


def test_the_score_is_the_largest_component_left_by_the_postprocessing():
    wt = LesionMatch(2.0, np.array([10, 400, 30]), np.array([False, True, False]))  # 2 mm³ voxels
    et = LesionMatch(2.0, np.array([450]), np.array([True]))
    assert largest_component_ml({"wt": wt, "et": et}) == pytest.approx(0.9)
    assert largest_component_ml({"wt": wt}, {"wt": Rule(min_mm3=100)}) == pytest.approx(0.8)
    assert largest_component_ml({"wt": LesionMatch(1.0, np.array([], dtype=np.int64), np.array([], bool))}) == 0.0
    masks = [np.zeros((8, 8, 8), bool), np.zeros((8, 8, 8), bool)]
    masks[0][0:2, 0:2, 0:2] = True  # 8 voxels
    masks[0][5:7, 5:7, 5:8] = True  # 12 voxels, apart from the first
    masks[1][0, 0, 0] = True
    assert largest_component_ml_of(masks, (2.0, 1.0, 1.0)) == pytest.approx(12 * 2.0 / 1000)


def test_the_threshold_maximises_youdens_j_on_validation():
    # scores (ml) of four studies with tumour and three without; by hand: calling "> 0.5" finds 3 of 4
    # with tumour and clears all 3 without (J = 0.75); "> 0.1" finds 4 of 4 and clears 1 of 3 (J = 0.33)
    scores, truths = [2.0, 0.9, 0.6, 0.3, 0.5, 0.1, 0.0], [True, True, True, True, False, False, False]
    threshold = choose_threshold(scores, truths)
    assert threshold.ml == pytest.approx(0.55)  # halfway between 0.5 (the best cut) and the next score, 0.6
    assert threshold.chosen_on == "validation, 7 cases: sensitivity 0.75, specificity 1.00"
    assert not threshold.present(0.55) and threshold.present(0.56)
    chance = choose_threshold([0.0, 0.4, 0.4], [True, True, False])  # nothing beats calling every study
    assert chance.ml == 0.0 and "better than chance" in chance.chosen_on
    only_tumour = choose_threshold([0.2, 3.0], [True, True])
    assert only_tumour.ml == 0.0 and "no tumour-free study among 2 validation cases" in only_tumour.chosen_on


def test_roc_and_its_area_by_hand():
    scores, truths = [0.9, 0.4, 0.4, 0.1], [True, True, False, False]
    # pairs (with tumour, without): (0.9, 0.4) 1, (0.9, 0.1) 1, (0.4, 0.4) 0.5, (0.4, 0.1) 1 -> 3.5 / 4
    assert roc_auc(scores, truths) == pytest.approx(0.875)
    assert roc_curve(scores, truths) == [(0.0, 0.0), (0.0, 0.5), (0.5, 1.0), (1.0, 1.0)]
    assert roc_auc([0.3], [True]) is None and roc_curve([0.3], [False]) is None


def test_the_confusion_table_at_the_threshold():
    figures = detection_figures([2.0, 0.0, 0.7, 0.0, 0.0], [True, True, False, False, False], Threshold(0.5, "test"),
                                SliceCounts(3, 1, 2, 10))
    assert {key: figures[key] for key in ("true_positives", "false_negatives", "false_positives", "true_negatives",
                                          "with_tumour", "tumour_free")} == {
        "true_positives": 1, "false_negatives": 1, "false_positives": 1, "true_negatives": 2, "with_tumour": 2,
        "tumour_free": 3}
    assert figures["sensitivity"] == 0.5 and figures["specificity"] == pytest.approx(2 / 3)
    assert figures["roc_auc"] == pytest.approx((3 + 0 + 0.5 + 0.5) / 6)  # 2.0 beats all three; 0.0 ties two
    assert figures["slices"]["sensitivity"] == 0.75 and figures["threshold"] == {"ml": 0.5, "chosen_on": "test"}
    assert json.loads(json.dumps(figures)) == figures  # summary.json holds it as it is


def test_strata_are_split_on_their_own_and_one_stratum_splits_as_before():
    groups = {f"c{n:02d}": "" for n in range(20)}
    strata = {case_id: "tumour-free" if n % 4 == 0 else "tumour" for n, case_id in enumerate(sorted(groups))}
    splits = assign_splits(groups, 3, strata=strata)
    free = [splits[case_id] for case_id, stratum in strata.items() if stratum == "tumour-free"]
    assert sorted(free) == ["test", "test", "train", "train", "val"]  # 5 tumour-free: 50/20/30 of them
    assert assign_splits(groups, 3, strata={case_id: "tumour" for case_id in groups}) == assign_splits(groups, 3)


def test_folds_deal_each_stratum_on_its_own_and_one_stratum_deals_as_before():
    groups = {f"c{n:02d}": f"p{n // 2}" if n < 4 else "" for n in range(23)}  # two patients with two studies
    strata = {case_id: "tumour-free" if n % 4 == 1 else "tumour" for n, case_id in enumerate(sorted(groups))}
    for seed in range(6):
        folds = assign_folds(groups, 5, seed, strata)
        free = np.bincount([folds[case_id] for case_id, stratum in strata.items() if stratum == "tumour-free"],
                           minlength=5)
        assert sorted(free) == [1, 1, 1, 1, 2], (seed, free)  # 6 tumour-free studies (one with its patient's other)
        sizes = np.bincount(list(folds.values()), minlength=5)
        assert sizes.max() - sizes.min() <= 2, (seed, sizes)
        assert len({folds["c00"], folds["c01"]}) == 1 and len({folds["c02"], folds["c03"]}) == 1
        assert assign_folds(groups, 5, seed, {case_id: "tumour" for case_id in groups}) == assign_folds(groups, 5, seed)


def test_the_generator_writes_tumour_free_studies_the_catalog_keeps(bucket):
    spec = SynthSpec(shape=(24, 48, 48), sequences=("t1c", "flair"), healthy_fraction=0.3)
    healthy = [index for index in range(10) if spec.healthy(index)]
    assert len(healthy) == 3
    images, mask, _ = spec.volumes(healthy[0])
    assert not mask.any() and set(images) == {"t1c", "flair"}
    assert spec.volumes(next(i for i in range(10) if i not in healthy))[1].any()
    uri = f"s3://{bucket}/healthy/"
    write_dataset(10, uri, spec)
    kept = build_catalog(uri, sequences=("t1c", "flair"))
    free = sorted(case.case_id for case in kept.cases if case.summary.tumour_voxels == 0)
    assert free == [f"case_{index:04d}" for index in healthy] and not kept.exclusions
    assert sorted(case.split for case in kept.cases if case.case_id in free) == ["test", "train", "val"]
    excluded = build_catalog(uri, sequences=("t1c", "flair"), exclude_empty_masks=True)
    assert sorted(item.case_id for item in excluded.exclusions) == free
    assert "--empty-masks keep" in excluded.exclusions[0].reason


def test_a_run_on_studies_with_and_without_tumour_reports_detection(bucket, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SM_MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("SM_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    data = f"s3://{bucket}/mixed/"
    write_dataset(14, data, SynthSpec(shape=(32, 64, 64), healthy_fraction=0.3))
    output = f"s3://{bucket}/runs"
    assert train.main(["--data-uri", data, "--output-uri", output, "--run-name", "detect", *SMALL,
                       "--epochs", "2", "--steps-per-epoch", "30"]) == 0
    summary = json.loads(s3.read_uri(f"{output}/detect/summary.json"))
    rows = list(csv.DictReader(io.StringIO(s3.read_uri(f"{output}/detect/metrics/test_per_case.csv").decode())))
    found = summary["detection"]
    assert found["cases"] == len(rows) == summary["test_cases"] and found["tumour_free"] >= 1 and found["with_tumour"] >= 1
    threshold = found["threshold"]["ml"]
    assert json.loads(s3.read_uri(f"{output}/detect/model/model.json"))["detection"] == found["threshold"]
    truths = [row["tumour_present"] == "1" for row in rows]
    scores = [float(row["tumour_score_ml"]) for row in rows]
    assert [row["tumour_detected"] == "1" for row in rows] == [score > threshold for score in scores]
    assert found["true_positives"] == sum(t and s > threshold for t, s in zip(truths, scores))
    assert found["true_negatives"] == sum(not t and s <= threshold for t, s in zip(truths, scores))
    pairs = [(p > n) + 0.5 * (p == n) for p, t in zip(scores, truths) if t for n, u in zip(scores, truths) if not u]
    assert found["roc_auc"] == pytest.approx(sum(pairs) / len(pairs))
    slices = found["slices"]
    assert slices["found"] == sum(int(row["slices_found"]) for row in rows)
    assert slices["found"] + slices["missed"] + slices["false_alarms"] + slices["clean"] == 32 * len(rows)
    for row, truth in zip(rows, truths):
        assert all(value not in ("nan", "") for value in row.values()), row
        if not truth:  # a tumour-free study: the truth holds nothing; Dice 1 only if nothing was predicted
            assert row["truth_voxels"] == "0" and float(row["dice"]) == (1.0 if row["predicted_voxels"] == "0" else 0.0)

    assert review.main([f"{output}/detect", "--report", str(tmp_path / "report")]) == 0
    said = capsys.readouterr().out
    line = next(line for line in said.splitlines() if "detection on" in line)
    assert (f"detection on {len(rows)} test studies ({found['with_tumour']} with tumour, {found['tumour_free']} "
            f"without)") in line and f"sensitivity {found['true_positives']}/{found['with_tumour']}" in line
    page = (tmp_path / "report" / "index.html").read_text()
    assert "detection on" in page and '<img src="roc_detect.png"' in page
    assert matplotlib.image.imread(tmp_path / "report" / "roc_detect.png").shape[0] > 100


def test_the_review_draws_studies_with_tumour_and_the_worst_false_alarm():
    from types import SimpleNamespace

    from infra.review.report import _overlay_picks

    rows = [{"case_id": "a", "dice": "1.0", "truth_voxels": "0", "predicted_voxels": "0"},  # clean: Dice 1
            {"case_id": "b", "dice": "0.0", "truth_voxels": "0", "predicted_voxels": "40"},
            {"case_id": "c", "dice": "0.0", "truth_voxels": "0", "predicted_voxels": "900"},
            {"case_id": "d", "dice": "0.4", "truth_voxels": "500", "predicted_voxels": "300"},
            {"case_id": "e", "dice": "0.8", "truth_voxels": "700", "predicted_voxels": "650"}]
    run = SimpleNamespace(cases_worst_first=lambda: sorted(rows, key=lambda row: float(row["dice"])), structures=[])
    assert [(reason, row["case_id"]) for reason, row in _overlay_picks(run)] == [
        ("worst mean Dice", "d"), ("best mean Dice", "e"), ("tumour-free, largest false alarm", "c")]
