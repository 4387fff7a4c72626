"""Carry out a checked job spec: in process mode (train.py or predict.py as local processes), in
SageMaker local mode, as a real SageMaker job, or as the request a dry run prints; tuning jobs
likewise. Each ends with the report of what the job wrote. :mod:`infra.launcher.cli` parses the
command line into the spec.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from brainseg.io import s3
from brainseg.layout import TuningLayout
from infra.launcher import storage
from infra.launcher.demo import DOCKER_HOST_ADDRESS, save_demo, start_demo
from infra.launcher.jobspec import JobSpec
from infra.launcher.lifecycle import boto_session
from infra.launcher.plan import dry_run_text, forecast_text
from infra.launcher.results import latest_run, report, report_predictions, tuning_text
from infra.launcher.tuning import TuningSpec, tuning_job_name

logger = logging.getLogger("launch")


def local_endpoint_environment() -> dict:
    """For local mode: an S3 endpoint this machine uses (``AWS_ENDPOINT_URL``: MinIO, brainseg-s3server)
    as the container reaches it (the Docker host's address for 127.0.0.1 or localhost)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return {}
    parsed = urlsplit(endpoint)
    if parsed.hostname in ("127.0.0.1", "localhost"):
        endpoint = parsed._replace(netloc=f"{DOCKER_HOST_ADDRESS}:{parsed.port or 80}").geturl()
    return {"AWS_ENDPOINT_URL": endpoint}


def launch_tuning(spec: JobSpec, tuning: TuningSpec) -> int:
    """tune: 0 submitted (aws) or every job finished (process), 1 a process-mode job failed."""
    from infra.launcher import sagemaker_job
    from infra.launcher import tuning as search

    if not spec.data_uri or not spec.output_uri:
        raise ValueError("tune needs --data-uri and --output-uri")
    if spec.mode == "local":
        raise ValueError("SageMaker local mode has no tuning jobs; use --mode process (Random or Grid) or --mode aws")
    if spec.keep_alive_s:
        raise ValueError("keep_alive_s: SageMaker's tuner does not give its training jobs a warm pool")
    tuning.check(spec)
    name = tuning_job_name(spec.base_job_name())
    if spec.mode == "process":
        tuning.sample()  # refuses Bayesian and Hyperband before anything runs
        with tempfile.TemporaryDirectory(prefix=f"{name}-") as root:
            result = search.search(spec, tuning, name, Path(root))
        print(tuning_text(result.manifest))
        print(f"review: brainseg-review {spec.output_uri.rstrip('/')}/{name}/")
        return 0 if all(code == 0 for code in result.codes) else 1
    if spec.dry_run:
        print(json.dumps(sagemaker_job.dry_run_tuning_request(spec, tuning, name), indent=1, sort_keys=True,
                         default=str))
        return 0
    sagemaker_job.submit_tuning(spec, tuning, name, boto_session(spec.region or None))
    s3.put_bytes(TuningLayout.uri(spec.output_uri, name),
                 json.dumps(tuning.manifest(name, spec, "aws"), indent=1, default=str).encode())
    print(f"submitted tuning job {name}: up to {tuning.jobs} training jobs, {tuning.max_parallel_jobs} at a time; "
          f"review: brainseg-review {spec.output_uri.rstrip('/')}/{name}/")
    return 0


def launch(spec: JobSpec) -> int:
    from infra.launcher import process_job, sagemaker_job

    with contextlib.ExitStack() as stack:
        container_env = {}
        demo = not spec.data_uri
        if demo and not spec.training:
            raise ValueError("predict needs --data-uri and --output-uri")
        if demo:
            if spec.mode == "aws":
                raise ValueError("aws mode needs --data-uri")
            spec, container_env = start_demo(spec, stack)
        elif spec.mode == "local":
            container_env = local_endpoint_environment()
        if not spec.output_uri:
            raise ValueError("--output-uri is required with --data-uri (s3://bucket/prefix/ for the runs)")
        if spec.training and not demo and (spec.mode != "aws" or spec.dry_run):
            spec = storage.sized_to_data(spec)
        if spec.mode == "process":
            job_name = spec.unique_job_name()
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{job_name}-")))
            logger.info("process mode: job %s, container directories under %s (removed at the end)", job_name, root)
            code = process_job.run(spec, job_name, root)
            if not spec.training:
                report_predictions(spec.output_uri)
                return code
            report(spec.output_uri, job_name)
            if demo:
                save_demo(spec.output_uri, job_name)
            return code
        if spec.dry_run:
            request = sagemaker_job.dry_run_request(spec)
            print(dry_run_text(spec, request), file=sys.stderr)
            if spec.training:
                print(forecast_text(spec, request), file=sys.stderr)
            print(json.dumps(request, indent=1, sort_keys=True, default=str))
            return 0
        session = boto_session(spec.region or None)
        if spec.mode == "aws" and spec.training:  # a real submit: sized once the account checks pass
            sagemaker_job.check_account(session, spec.output_uri)
            spec = storage.sized_to_data(spec)
        local_root = tempfile.mkdtemp(prefix="brainseg-local-") if spec.mode == "local" else None
        job_name = sagemaker_job.submit(spec, session, container_env, local_root)
        if spec.mode == "aws":
            where = spec.output_uri if not spec.training else f"{spec.output_uri.rstrip('/')}/{job_name}/"
            print(f"submitted training job {job_name} ({spec.script}); artifacts will be under {where}")
            if spec.wait and spec.training:
                report(spec.output_uri, job_name)
            elif spec.wait:
                report_predictions(spec.output_uri)
            return 0
        if not spec.training:
            print(f"local mode job finished; container files under {local_root}")
            report_predictions(spec.output_uri)
            return 0
        job_name = latest_run(spec.output_uri, spec.base_job_name())
        if job_name is None:
            print(f"error: the local job wrote no run under {spec.output_uri}", file=sys.stderr)
            return 1
        print(f"local mode job finished; container files under {local_root}")
        report(spec.output_uri, job_name)
        if demo:
            save_demo(spec.output_uri, job_name)
        return 0
