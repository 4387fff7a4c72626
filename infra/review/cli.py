"""Review what training runs and prediction jobs wrote to S3.

    brainseg-review s3://bucket/runs/                      # list the runs under an output URI
    brainseg-review s3://bucket/runs/r1 [s3://…/r2 ...]    # summarise and compare runs
    brainseg-review s3://bucket/runs/r1 s3://…/r2 --report DIR   # + DIR/index.html with PNG figures
    brainseg-review s3://bucket/runs/r1 --report DIR --explain   # + what the model looked at (torch)
    brainseg-review s3://bucket/runs/r1 --follow                 # print epochs as a running job writes them
    brainseg-review s3://bucket/predictions/ [--report DIR]      # a prediction output: cases, volumes, SEG overlays
    brainseg-review s3://bucket/runs/<tuning job>/ [--report DIR]  # a tuning job's runs, best first, tuned values

A URI holding a run.json is a run, one holding a prediction.json a prediction output (predict.py),
one holding a tuning.json a tuning job (brainseg-launch tune); any other prefix is listed. Missing or partial artifacts (a run
still going, or cut short) are reported, not fatal. Following a run fetches only what its
metrics.jsonl gained since the last look. With AWS credentials, SageMaker is asked for each run's
job status (a run whose job failed or was stopped before it could say so shows as such; runs of
process or local mode are no SageMaker jobs and keep their own). Nothing is written to S3.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from brainseg.io import s3
from infra.review import source
from infra.review.predictions import is_prediction_output, load_prediction, write_prediction_report
from infra.review.predictions import text_summary as prediction_summary
from infra.review.runs import ReviewedRun, ask_sagemaker, list_runs, load_run
from infra.review.tuning import is_tuning_output, load_tuning
from infra.review.tuning import text_summary as tuning_summary


def epoch_text(run: ReviewedRun, line: dict) -> str:
    """One epoch line of a run, as ``--follow`` prints it."""
    parts = [f"{run.name}: epoch {line['epoch']}"]
    for key, label, form in (("step", "step", "{}"), ("train_loss", "train loss", "{:.4f}"),
                             ("val_dice", "val Dice", "{:.4f}"), ("val_loss", "val loss", "{:.4f}"),
                             ("lr", "lr", "{:.2e}"), ("patches_per_s", "patches/s", "{:.1f}"),
                             ("data_wait_fraction", "data wait", "{:.1%}"),
                             ("gets_per_patch", "GETs/patch", "{:.1f}"), ("request_cost_usd", "request fee", "${:.4f}")):
        value = line.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{label} {form.format(value)}")
    return "  ".join(parts)


def follow(runs: list[ReviewedRun], interval: float, report_dir: Path | None, ask_status: bool = True) -> None:
    """Poll the runs that are still running until none is (run.json, and SageMaker's job status
    when ``ask_status``), printing each new epoch and status change; the report, if any, is
    rewritten after every poll that found something new."""
    from infra.review.report import write_report

    for run in runs:
        for line in run.metrics:
            print(epoch_text(run, line))
    announced = None
    while active := [run for run in runs if run.running]:
        names = ", ".join(run.name for run in active)
        if names != announced:
            print(f"following {names} every {interval:g} s (Ctrl-C stops)", flush=True)
            announced = names
        time.sleep(interval)
        changed = False
        for run in active:
            rewrites = run.tail.rewrites if run.tail else 0
            added = run.refresh()
            if run.tail and run.tail.rewrites > rewrites:
                print(f"{run.name}: metrics.jsonl was rewritten (resumed from a checkpoint?); read again")
            for line in added:
                print(epoch_text(run, line), flush=True)
            if ask_status:
                ask_sagemaker([run])
            if not run.running:
                print(f"{run.name}: {run.status_text}", flush=True)
            changed = changed or bool(added) or not run.running
        if changed and report_dir and any(run.running for run in runs):
            write_report(runs, report_dir)  # the final one is written by main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("uris", nargs="+", help="an output URI to list, or one or more run URIs")
    parser.add_argument("--report", type=Path, help="write an HTML report with PNG figures to this folder")
    parser.add_argument("--explain", action="store_true",
                        help="with --report: occlusion sensitivity and gradient saliency of each run's worst and best "
                             "test case, from its model (loads torch; tens of seconds a case on a CPU)")
    parser.add_argument("--follow", action="store_true",
                        help="keep polling running runs, printing each epoch as it lands, until none is running")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between polls with --follow (30)")
    parser.add_argument("--no-job-status", action="store_true",
                        help="do not ask SageMaker for the runs' job status (asked when AWS credentials are set)")
    args = parser.parse_args(argv)
    if args.interval <= 0:
        parser.error(f"--interval must be a positive number of seconds, got {args.interval:g}")
    if args.explain and not args.report:
        parser.error("--explain draws into the report: give --report DIR too")
    logging.basicConfig(level=logging.WARNING)
    from infra.review.report import text_summary, write_report

    try:
        runs, tunings = [], []
        for uri in args.uris:
            source.check(uri)
            if is_tuning_output(uri):
                tunings.append(load_tuning(uri))
                runs.extend(tunings[-1].runs)
                continue
            if is_prediction_output(uri):
                prediction = load_prediction(uri)
                print(prediction_summary(prediction))
                if args.report:
                    print(f"report: {write_prediction_report(prediction, args.report)}")
                continue
            run = load_run(uri)
            if run.found:
                runs.append(run)
                continue
            listed = list_runs(uri)
            if not listed:
                print(f"error: no runs under {uri} (no <run>/run.json)", file=sys.stderr)
                return 2
            runs.extend(listed)
        if not args.no_job_status:
            ask_sagemaker(runs)
        for tuning in tunings:
            print(tuning_summary(tuning))
        if args.follow:
            try:
                follow(runs, args.interval, args.report, not args.no_job_status)
            except KeyboardInterrupt:
                print("stopped following")
    except (ValueError, s3.S3Error) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not runs:
        return 0
    if len(tunings) < len(args.uris):
        print(text_summary(runs))
    if args.report:
        path = write_report(runs, args.report, explain=args.explain)
        print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
