"""Cross-validation from the launcher: one job per fold, the folds' summary, and a process-mode
cross-validation end to end (slow tier) whose folds partition the training and validation cases."""

from __future__ import annotations

import json

import pytest

from brainseg.data.fingerprint import LesionCounts
from brainseg.detection import Threshold
from brainseg.io import s3
from brainseg.layout import RunLayout
from brainseg.metrics import lesion_scores
from brainseg.model.artifact import ModelError
from brainseg.postprocess import Offer, Rule, offer, validation_record
from brainseg.prediction.predictor import pooled_choices
from infra.launcher import cli as launch
from infra.launcher.crossval import fold_specs, fold_summary, summary_text, write_summary
from infra.launcher.jobspec import build_spec, parse_overrides
from infra.review.report import fold_text, postprocessing_text
from tests.conftest import synthetic_dataset
from tests.test_postprocess import BLOB, LESION, SPECK

TINY = ["channels=[8,16,32]", "patch_size=32,32,32", "res_units=1", "epochs=1", "steps_per_epoch=2",
        "num_workers=0", "log_every=1"]


def test_each_fold_is_a_job_of_the_same_settings_named_after_its_fold():
    spec = build_spec({"mode": "aws", "job_name": "glioma", "role": "arn:aws:iam::123456789012:role/r",
                       "data_uri": "s3://b/data/", "output_uri": "s3://b/runs/"}, parse_overrides(["lr=3e-4"]))
    specs = fold_specs(spec, 3)
    assert [s.job_name for s in specs] == ["glioma-fold0", "glioma-fold1", "glioma-fold2"]
    assert [s.hyperparameters for s in specs] == [{"lr": 3e-4, "fold": k, "folds": 3} for k in range(3)]
    assert {s.role for s in specs} == {spec.role}
    with pytest.raises(ValueError, match="at least 2"):
        fold_specs(spec, 1)
    with pytest.raises(ValueError, match="fold=1: cv runs every fold"):
        fold_specs(build_spec({"job_name": "g"}, {"fold": 1}), 3)


def _run(output: str, name: str, started: float, summary: dict | None) -> None:
    s3.put_bytes(f"{output}/{name}/run.json", json.dumps({"status": "finished", "started": started}).encode())
    if summary is not None:
        s3.put_bytes(f"{output}/{name}/summary.json", json.dumps(summary).encode())


def test_the_summary_takes_each_folds_newest_run_and_gives_mean_and_spread(bucket):
    output = f"s3://{bucket}/cv"
    _run(output, "g-fold0-20261203100000", 1.0, {"best_val_dice": 0.5, "test_dice_mean": 0.4})
    _run(output, "g-fold0-20261203110000", 2.0, {"best_val_dice": 0.7, "test_dice_mean": 0.6})  # newer: taken
    _run(output, "g-fold1-20261203100000", 1.0, {"best_val_dice": 0.9, "test_dice_mean": 0.8,
                                                 "test_lesion_dice": 0.75})
    _run(output, "g-fold2-20261203100000", 1.0, None)  # not finished
    _run(output, "g-fold10-20261203100000", 1.0, {"best_val_dice": 0.0})  # another fold's run, not fold 1's
    summary = fold_summary(output, "g", 3)
    assert [run["run"] for run in summary["runs"]] == ["g-fold0-20261203110000", "g-fold1-20261203100000",
                                                       "g-fold2-20261203100000"]
    assert [run["finished"] for run in summary["runs"]] == [True, True, False]
    assert summary["figures"]["best_val_dice"] == {"mean": pytest.approx(0.8), "std": pytest.approx(0.1414, abs=1e-4),
                                                   "folds": 2}
    assert summary["figures"]["test_lesion_dice"] == {"mean": 0.75, "std": 0.0, "folds": 1}
    text = summary_text(summary, output)
    assert "best_val_dice: 0.8000 ± 0.1414 over 2 fold(s)" in text and "fold 2: g-fold2-20261203100000 (not finished)" in text
    assert f"--model {output}/g-fold0-20261203110000/ --model {output}/g-fold1-20261203100000/" in text
    assert write_summary(summary, output) == f"{output}/g-cv.json"
    assert json.loads(s3.read_uri(f"{output}/g-cv.json")) == summary
    assert summary["postprocessing_note"] == "1 of 3 folds have not finished; postprocessing is chosen once every fold has"
    assert "postprocessing" not in summary and "--hp postprocessing" not in text


def test_postprocessing_is_chosen_on_the_folds_validation_cases_pooled_and_predict_takes_it(bucket):
    output = f"s3://{bucket}/cv"
    one_mm = (1.0, 1.0, 1.0)
    several = offer(LesionCounts(cases=4, several=1, most=2, uncounted=0))
    folds = [({"case_00": (LESION | BLOB, LESION)}, Offer()),  # a 64 mm³ stray: only "largest" would remove it
             ({"case_01": (LESION | SPECK, LESION)}, several)]  # an 8 mm³ speck; this fold's labels hold two lesions
    for fold, (cases, offered) in enumerate(folds):
        name = f"p-fold{fold}-20261205100000"
        _run(output, name, 1.0, {"best_val_dice": 0.5})
        matches = {case_id: {"wt": lesion_scores(prediction, truth, one_mm)[1]}
                   for case_id, (prediction, truth) in cases.items()}
        s3.put_bytes(f"{output}/{name}/{RunLayout.VALIDATION_MATCHES}",
                     json.dumps(validation_record(matches, {"wt": offered})).encode())
    summary = fold_summary(output, "p", 2)
    chosen = summary["postprocessing"]["wt"]
    # Pooled: 0.5 and 0.5 before; removing under 10 mm³ makes the second 1.0. "Largest" is not on
    # offer, as fold 1's training labels hold several lesions.
    assert (chosen["description"], chosen["cases"], chosen["val_lesion_dice_before"],
            chosen["val_lesion_dice_after"]) == ("remove components under 10 mm³", 2, 0.5, 0.75)
    assert chosen["not_offered"] == {"keep the largest component": "1 of 4 training cases hold several lesions (up to 2)"}
    assert summary["postprocessing_rules"] == {"wt": {"min_mm3": 10, "largest_only": False}}
    text = summary_text(summary, output)
    assert "postprocessing wt (folds' validation pooled, 2 cases): remove components under 10 mm³" in text
    assert f"--hp postprocessing={output}/p-cv.json" in text
    uri = write_summary(summary, output)
    assert pooled_choices(uri)[0] == {"wt": Rule(min_mm3=10)}
    s3.put_bytes(f"{output}/not-cv.json", json.dumps({"postprocessing_note": "1 of 2 folds have not finished"}).encode())
    with pytest.raises(ModelError, match=r"not-cv.json: expected a cross-validation summary with postprocessing_rules "
                                         r"\(1 of 2 folds have not finished\)"):
        pooled_choices(f"{output}/not-cv.json")
    with pytest.raises(ModelError, match="no such object"):
        pooled_choices(f"{output}/missing-cv.json")
    s3.delete(f"{output}/p-fold1-20261205100000/{RunLayout.VALIDATION_MATCHES}")
    assert "has no metrics/validation_lesions.json" in fold_summary(output, "p", 2)["postprocessing_note"]


def test_the_detection_threshold_is_chosen_on_the_folds_validation_cases_pooled(bucket):
    output = f"s3://{bucket}/cv-detection"
    one_mm = (1.0, 1.0, 1.0)
    nothing = LESION & False
    folds = [{"case_00": (LESION, LESION, True), "case_02": (BLOB, nothing, False)},  # a 64 mm³ false alarm
             {"case_01": (LESION | SPECK, LESION, True), "case_03": (nothing, nothing, False)}]
    for fold, cases in enumerate(folds):
        name = f"d-fold{fold}-20261207100000"
        _run(output, name, 1.0, {"best_val_dice": 0.5})
        matches = {case_id: {"wt": lesion_scores(prediction, truth, one_mm)[1]}
                   for case_id, (prediction, truth, _) in cases.items()}
        tumour = {case_id: present for case_id, (_, _, present) in cases.items()}
        s3.put_bytes(f"{output}/{name}/{RunLayout.VALIDATION_MATCHES}",
                     json.dumps(validation_record(matches, {"wt": Offer()}, tumour)).encode())
    summary = fold_summary(output, "d", 2)
    # Scores (the largest component kept, ml): tumour 0.125, 0.125 (the speck is below any rule's
    # floor or not the largest); tumour-free 0.064 (the blob), 0. Youden's J is 1 above 0.064, set
    # halfway to 0.125. Fold 1 alone would have chosen 0.0625.
    assert summary["detection"] == {"ml": 0.0945, "chosen_on": "the folds' validation pooled: validation, 4 cases: "
                                                                "sensitivity 1.00, specificity 1.00"}
    assert "detection: tumour present above 0.0945 ml (the folds' validation pooled" in summary_text(summary, output)
    rules, threshold = pooled_choices(write_summary(summary, output))
    assert threshold == Threshold.from_dict(summary["detection"]) and set(rules) <= {"wt"}
    old_record = json.loads(s3.read_uri(f"{output}/d-fold1-20261207100000/{RunLayout.VALIDATION_MATCHES}"))
    del old_record["tumour"]
    s3.put_bytes(f"{output}/d-fold1-20261207100000/{RunLayout.VALIDATION_MATCHES}", json.dumps(old_record).encode())
    summary = fold_summary(output, "d", 2)
    assert "detection" not in summary and "each fold keeps its own threshold" in summary["detection_note"]
    assert pooled_choices(write_summary(summary, output))[1] is None
    s3.put_bytes(f"{output}/bad-cv.json", json.dumps({"postprocessing_rules": {}, "detection": {"ml": 1}}).encode())
    with pytest.raises(ModelError, match=r"bad-cv.json: detection threshold \{'ml': 1\}: expected"):
        pooled_choices(f"{output}/bad-cv.json")


def test_the_review_names_a_folds_run_and_ignores_what_is_not_a_fold():
    assert fold_text({"fold": 1, "folds": 5}) == "cross-validation fold 1 of 5 (0-based)"
    assert fold_text({"fold": None, "folds": None}) == fold_text({}) == ""
    assert postprocessing_text({"wt": {"description": "none"}}) == postprocessing_text("x") == ""
    several = {"description": "remove components under 10 mm³", "val_lesion_dice_before": 0.5,
               "val_lesion_dice_after": 0.75, "not_offered": {"keep the largest component": "3 of 20 training cases "
                                                                                          "hold several lesions (up to 4)"}}
    assert postprocessing_text({"wt": several}) == (
        "postprocessing (validation lesion-wise Dice): wt remove components under 10 mm³ (0.500 -> 0.750), not offered: "
        "keep the largest component (3 of 20 training cases hold several lesions (up to 4))")


def test_cv_without_data_is_refused_and_a_fixed_fold_too(capsys):
    assert launch.main(["cv", "--mode", "process"]) == 2
    assert "cv needs --data-uri and --output-uri" in capsys.readouterr().err
    assert launch.main(["cv", "--data-uri", "s3://b/d/", "--output-uri", "s3://b/o/", "--hp", "fold=1"]) == 2
    assert "cv runs every fold" in capsys.readouterr().err


@pytest.mark.slow  # two process-mode training jobs
def test_a_process_mode_cross_validation_runs_every_fold_and_summarises_them(capsys):
    dataset = synthetic_dataset("cv-data", 8)  # 8 cases: 2 test, the other 6 in 2 folds of 3
    output = f"s3://{dataset.split('/')[2]}/cv"
    code = launch.main(["cv", "--mode", "process", "--folds", "2", "--data-uri", dataset, "--output-uri", output,
                        "--job-name", "brain", *[arg for pair in TINY for arg in ("--hp", pair)]])
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
    summary = json.loads(s3.read_uri(f"{output}/brain-cv.json"))
    assert [run["finished"] for run in summary["runs"]] == [True, True]
    assert "cross-validation brain: 2 folds" in printed and "best_val_dice:" in printed
    runs = [json.loads(s3.read_uri(f"{output}/{run['run']}/summary.json")) for run in summary["runs"]]
    assert [(run["fold"], run["folds"]) for run in runs] == [(0, 2), (1, 2)]
    vals = [{case for case, split in run["splits"].items() if split == "val"} for run in runs]
    tests = [{case for case, split in run["splits"].items() if split == "test"} for run in runs]
    assert tests[0] == tests[1] and len(tests[0]) == 2  # the same held-out test cases
    assert not vals[0] & vals[1] and len(vals[0] | vals[1]) == 6  # the folds partition the other cases
    assert summary["figures"]["best_val_dice"]["folds"] == 2
    # every study holds tumour, so the pooled threshold is the default; the folds recorded their flags
    assert summary["detection"]["chosen_on"] == ("the folds' validation pooled: default (no tumour-free study among 6 "
                                                 "validation cases): any predicted component")
