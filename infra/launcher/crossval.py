"""Cross-validation: one training job per fold, then the folds side by side.

Fold K's job runs train.py with ``--fold K --folds N`` and is named ``<base>-fold<K>`` (its run
folder ``<base>-fold<K>-<timestamp>`` under the output prefix); every fold holds out the same test
cases. Once the folds have finished (process and local mode: at once; aws: ``cv --summary-only``
later), each fold's figures and their mean and standard deviation are printed and written to
``<output>/<base>-cv.json``, with the postprocessing chosen on the folds' validation cases pooled
(every training and validation case once, predicted by the fold that held it out: what nnU-Net
chooses its postprocessing on), and the tumour-present threshold chosen on them under that
postprocessing; ``python infra/launch.py predict --model <fold run> --model ...
--hp postprocessing=<output>/<base>-cv.json`` predicts with the folds as an ensemble and those choices.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable

from brainseg.detection import Threshold, threshold_of
from brainseg.io import s3
from brainseg.layout import RunLayout
from brainseg.postprocess import choose_pooled, record_matches
from infra.launcher.jobspec import JobSpec
from infra.launcher.results import latest_run

FIGURES = ("best_val_dice", "test_dice_mean", "test_lesion_dice", "test_hd95_mean", "test_lesion_hd95")


def fold_specs(spec: JobSpec, folds: int) -> list[JobSpec]:
    """One job per fold: the same settings, ``fold`` and ``folds`` set, named ``<base>-fold<K>``.

    Raises:
        ValueError: fewer than 2 folds, or a ``fold`` already among the hyperparameters.
    """
    if folds < 2:
        raise ValueError(f"--folds {folds}: expected at least 2")
    if "fold" in spec.hyperparameters:
        raise ValueError(f"fold={spec.hyperparameters['fold']}: cv runs every fold; drop the fold hyperparameter")
    return [dataclasses.replace(spec, job_name=f"{spec.base_job_name()}-fold{fold}",
                                hyperparameters={**spec.hyperparameters, "fold": fold, "folds": folds})
            for fold in range(folds)]


def fold_summary(output_uri: str, base: str, folds: int) -> dict:
    """Each fold's newest run (``None`` where none finished) with its headline figures, per figure
    the mean and standard deviation over the finished folds, and the pooled postprocessing
    (:func:`pooled_postprocessing`)."""
    runs = []
    for fold in range(folds):
        name = latest_run(output_uri, f"{base}-fold{fold}-")  # jobs are named <base>-fold<K>-<timestamp>
        data = s3.read_uri(f"{output_uri.rstrip('/')}/{name}/{RunLayout.SUMMARY}") if name else None
        summary = json.loads(data) if data else {}
        runs.append({"fold": fold, "run": name, "finished": bool(summary),
                     **{figure: summary.get(figure) for figure in FIGURES}})
    return {"base": base, "folds": folds, "runs": runs, "figures": _spread(runs),
            **pooled_postprocessing(output_uri, [run["run"] for run in runs if run["finished"]], folds)}


def pooled_postprocessing(output_uri: str, names: list[str], folds: int) -> dict:
    """``postprocessing`` (per structure, the choice on the finished folds' validation cases pooled)
    and ``postprocessing_rules`` (the rules that change something, what ``predict --postprocessing``
    applies) and the pooled ``detection`` threshold (:func:`pooled_detection`), or a
    ``postprocessing_note`` saying why there are none: not every fold finished, or a fold's run has
    no validation record."""
    if len(names) < folds:
        return {"postprocessing_note": f"{folds - len(names)} of {folds} folds have not finished; postprocessing is "
                                       "chosen once every fold has"}
    records = []
    try:
        for name in names:
            data = s3.read_uri(f"{output_uri.rstrip('/')}/{name}/{RunLayout.VALIDATION_MATCHES}")
            if data is None:
                return {"postprocessing_note": f"run {name} has no {RunLayout.VALIDATION_MATCHES} (trained before "
                                               "runs wrote it); postprocessing is not pooled"}
            records.append(json.loads(data))
        choices = choose_pooled(records)
    except ValueError as err:
        return {"postprocessing_note": f"the folds' validation records cannot be pooled: {err}"}
    return {"postprocessing": {name: choice.to_dict() for name, choice in choices.items()},
            "postprocessing_rules": {name: choice.rule.to_dict() for name, choice in choices.items()
                                     if not choice.rule.changes_nothing},
            **pooled_detection(records, {name: choice.rule for name, choice in choices.items()})}


def pooled_detection(records: list[dict], rules: dict) -> dict:
    """``detection``: the tumour-present threshold (:func:`brainseg.detection.threshold_of`) on the
    folds' validation cases pooled (each validated by the fold that held it out) under the pooled
    ``rules``, or a ``detection_note``."""
    if not all("tumour" in record for record in records):
        return {"detection_note": "a fold's validation record does not say which cases hold tumour (trained before "
                                  "runs recorded it); each fold keeps its own threshold"}
    matches, truths = {}, {}
    try:
        for record in records:
            matches.update(record_matches(record))
            truths.update(record["tumour"])
        threshold = threshold_of(matches, truths, rules)
    except (KeyError, TypeError, AttributeError) as err:
        return {"detection_note": "the folds' validation records cannot be pooled: validation record: expected cases "
                                  f"and their tumour flags ({err!r})"}
    return {"detection": Threshold(threshold.ml, f"the folds' validation pooled: {threshold.chosen_on}").to_dict()}


def _spread(runs: list[dict]) -> dict:
    """Per figure, the mean and standard deviation over the finished folds."""
    spread = {}
    for figure in FIGURES:
        values = [run[figure] for run in runs if isinstance(run[figure], (int, float)) and math.isfinite(run[figure])]
        if values:
            mean = sum(values) / len(values)
            deviation = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            spread[figure] = {"mean": mean, "std": deviation, "folds": len(values)}
    return spread


def summary_text(summary: dict, output_uri: str) -> str:
    """The folds as lines for the terminal: one per fold, then mean ± standard deviation."""
    lines = [f"cross-validation {summary['base']}: {summary['folds']} folds"]
    for run in summary["runs"]:
        shown = " ".join(f"{figure}={run[figure]:.4f}" for figure in FIGURES if isinstance(run[figure], (int, float)))
        lines.append(f"  fold {run['fold']}: {run['run'] or 'no run'} "
                     f"{shown if run['finished'] else '(not finished)'}")
    lines += [f"  {figure}: {value['mean']:.4f} ± {value['std']:.4f} over {value['folds']} fold(s)"
              for figure, value in summary["figures"].items()]
    for name, choice in summary.get("postprocessing", {}).items():
        lines.append(f"  postprocessing {name} (folds' validation pooled, {choice['cases']} cases): "
                     f"{choice['description']} (lesion-wise Dice {choice['val_lesion_dice_before']:.4f} -> "
                     f"{choice['val_lesion_dice_after']:.4f})")
    if summary.get("postprocessing_note"):
        lines.append(f"  postprocessing: {summary['postprocessing_note']}")
    if summary.get("detection"):
        lines.append(f"  detection: tumour present above {summary['detection']['ml']:.4g} ml "
                     f"({summary['detection']['chosen_on']})")
    elif summary.get("detection_note"):
        lines.append(f"  detection: {summary['detection_note']}")
    models = " ".join(f"--model {output_uri.rstrip('/')}/{run['run']}/" for run in summary["runs"] if run["finished"])
    if models:
        pooled = (f" --hp postprocessing={output_uri.rstrip('/')}/{summary['base']}-cv.json"
                  if "postprocessing" in summary else "")
        lines.append(f"ensemble: python infra/launch.py predict {models}{pooled} --data-uri … --output-uri …")
    return "\n".join(lines)


def write_summary(summary: dict, output_uri: str) -> str:
    """``<output>/<base>-cv.json``; its URI."""
    uri = f"{output_uri.rstrip('/')}/{summary['base']}-cv.json"
    s3.put_bytes(uri, json.dumps(summary, indent=1).encode())
    return uri


def cross_validate(spec: JobSpec, folds: int, summary_only: bool, launch: Callable[[JobSpec], int]) -> int:
    """``cv``: ``launch`` each fold's job (unless ``summary_only``), then summarise the folds that
    finished (aws: only with ``summary_only``, once the jobs are done). The worst job's exit code."""
    if not spec.data_uri or not spec.output_uri:
        raise ValueError("cv needs --data-uri and --output-uri")
    specs = fold_specs(spec, folds)
    codes = [] if summary_only else [launch(fold) for fold in specs]
    base = spec.base_job_name()
    if spec.mode == "aws" and not summary_only:
        if not spec.dry_run:
            print(f"when the {folds} jobs have finished: python infra/launch.py cv --summary-only --folds {folds} "
                  f"--job-name {base} --data-uri {spec.data_uri} --output-uri {spec.output_uri}")
        return max(codes, default=0)
    summary = fold_summary(spec.output_uri, base, folds)
    print(summary_text(summary, spec.output_uri))
    print(f"written: {write_summary(summary, spec.output_uri)}")
    return max(codes, default=0)
