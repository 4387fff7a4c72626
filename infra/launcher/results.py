"""What a finished job wrote, in a few lines for the terminal: a training run's headline figures or
its error, a prediction output's status, a process-mode search's jobs."""

from __future__ import annotations

import json

from brainseg.bill import comparison_text
from brainseg.io import s3
from brainseg.layout import PredictionLayout, RunLayout
from infra.launcher.tuning import TuningResult
from infra.review.predictions import is_prediction_output, load_prediction


def latest_run(output_uri: str, base: str) -> str | None:
    """The newest run under ``output_uri`` whose name starts with ``base`` (by its run.json start time)."""
    bucket, prefix = s3.parse_uri(output_uri.rstrip("/") + "/")
    folders, _ = s3.list_folders(bucket, prefix)
    best = None
    for folder in folders:
        name = folder[len(prefix):].rstrip("/")
        data = s3.read_uri(f"s3://{bucket}/{folder}{RunLayout.STATUS}") if name.startswith(base) else None
        if data is not None:
            started = json.loads(data).get("started", 0)
            if best is None or started > best[0]:
                best = (started, name)
    return best[1] if best else None




def report(output_uri: str, job_name: str) -> None:
    run = f"{output_uri.rstrip('/')}/{job_name}/"
    summary = s3.read_uri(run + RunLayout.SUMMARY)
    print(f"artifacts: {run}")
    if summary is None:
        status = json.loads(s3.read_uri(run + RunLayout.STATUS) or b"{}")
        if status.get("error"):
            print(f"  the run {status.get('status', 'failed')}: {status['error']}")
        else:
            print(f"  no summary.json (the run did not finish; its run.json says {status.get('status', 'nothing')})")
        return
    summary = json.loads(summary)
    structures = [f"test_{figure}_{name}" for name in summary.get("structures", []) if len(summary["structures"]) > 1
                  for figure in ("dice", "hd95")]
    for key in ("suggested_lr", "min_loss_lr", "best_epoch", "best_val_dice", "test_dice_mean", "test_dice_median", "test_iou_mean",
                "test_hd95_mean", "test_lesion_dice", "test_lesion_hd95", *structures, "best_val_loss", "test_loss", "test_cases", "seconds"):
        if summary.get(key) is not None:
            value = summary[key]
            print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    if summary.get("bill"):
        print(comparison_text(summary["bill"]["forecast"], summary["bill"]["actual"]))


def report_predictions(output_uri: str) -> None:
    """What a prediction job wrote: complete or not, its counts, and the cases not predicted."""
    print(f"predictions: {output_uri.rstrip('/')}/")
    if not is_prediction_output(output_uri):
        print(f"  nothing written (no {PredictionLayout.SETTINGS}: the job stopped before starting; see the log)")
        return
    prediction = load_prediction(output_uri)
    print(f"  {prediction.status_text()}")
    for row in prediction.rows:
        if row["status"] != "predicted":
            print(f"  {row['case_id']} {row['status']}: {row.get('reason', '')}")


def tuning_text(manifest: dict) -> str:
    """A finished process-mode search: each job's tuned values and objective, best first."""
    objective = manifest["objective"]
    lines = [f"tuning job {manifest['tuning_job']} ({manifest['strategy']}, {objective['type']} {objective['metric']})"]
    best = TuningResult(manifest).best
    for job in manifest["jobs"]:
        value = job.get("objective")
        shown = f"{value:.4f}" if isinstance(value, (int, float)) else "–"
        values = " ".join(f"{name}={job['hyperparameters'][name]:.4g}" if isinstance(job["hyperparameters"][name], float)
                          else f"{name}={job['hyperparameters'][name]}" for name in manifest["ranges"])
        lines.append(f"  {job['job']}: {job.get('status')} {objective['metric']}={shown} {values}"
                     + ("  <- best" if job is best else ""))
    return "\n".join(lines)
