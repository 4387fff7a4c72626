"""A SageMaker job after it was submitted: its status, logs, stop, attach, and the recent jobs.

SDK v3's ``TrainingJob`` resource describes, lists and stops jobs; the logs are read from CloudWatch
(``/aws/sagemaker/TrainingJobs``, one stream per instance, ``<job>/algo-N-…``) a page at a time, so
``attach`` prints only what is new at each poll. Every function takes the boto3 session to use.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from dataclasses import dataclass, field

import boto3
import botocore.exceptions

LOG_GROUP = "/aws/sagemaker/TrainingJobs"
TERMINAL = ("Completed", "Failed", "Stopped")


class JobNotFound(LookupError):
    """No SageMaker training job has that name (in this account and region)."""


def _not_found(err: botocore.exceptions.ClientError) -> bool:
    error = err.response.get("Error", {})
    message = str(error.get("Message", "")).lower()
    return error.get("Code") in ("ValidationException", "ResourceNotFound") and (
        "not found" in message or "could not find" in message)


def assigned(value):
    """``value``, or ``None`` where the SDK left a field ``Unassigned``."""
    from sagemaker.core.utils.utils import Unassigned
    return None if isinstance(value, Unassigned) else value


def get_job(name: str, session: boto3.Session):
    """The ``TrainingJob`` named ``name``; :class:`JobNotFound` when there is none."""
    from sagemaker.core.resources import TrainingJob
    try:
        return TrainingJob.get(training_job_name=name, session=session, region=session.region_name)
    except botocore.exceptions.ClientError as err:
        if _not_found(err):
            raise JobNotFound(f"no training job {name} in {session.region_name}") from None
        raise


def describe(job) -> dict:
    """What ``brainseg-launch status`` prints: the job's state, where it runs and writes, and its
    final metrics, as plain values."""
    resources = assigned(job.resource_config)
    hyperparameters = assigned(job.hyper_parameters) or {}
    output_uri = hyperparameters.get("output_uri", "")
    script = hyperparameters.get("sagemaker_program", "")
    info = {
        "job": job.training_job_name,
        "status": job.training_job_status,
        "secondary_status": assigned(job.secondary_status),
        "failure_reason": assigned(job.failure_reason),
        "created": _iso(assigned(job.creation_time)),
        "started": _iso(assigned(job.training_start_time)),
        "ended": _iso(assigned(job.training_end_time)),
        "billable_seconds": assigned(job.billable_time_in_seconds),
        "instance_type": assigned(resources.instance_type) if resources else None,
        "instance_count": assigned(resources.instance_count) if resources else None,
        "warm_pool": assigned(getattr(assigned(job.warm_pool_status), "status", None)),
        "run": f"{output_uri.rstrip('/')}/{job.training_job_name}/" if output_uri and script != "predict.py"
        else output_uri or None,
        "final_metrics": {m.metric_name: m.value for m in assigned(job.final_metric_data_list) or []},
    }
    return {key: value for key, value in info.items() if value not in (None, {}, "")}


def _iso(moment) -> str | None:
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z").strip() if moment else None


def status_text(info: dict) -> str:
    lines = [f"{info['job']}: {info['status']}" + (f" ({info['secondary_status']})" if info.get("secondary_status")
                                                   and info["secondary_status"] != info["status"] else "")]
    for key in ("failure_reason", "created", "started", "ended", "billable_seconds", "instance_type",
                "instance_count", "warm_pool", "run"):
        if key in info:
            lines.append(f"  {key.replace('_', ' ')}: {info[key]}")
    for name, value in info.get("final_metrics", {}).items():
        lines.append(f"  {name}: {value:.4f}")
    return "\n".join(lines)


def recent_jobs(session: boto3.Session, name_contains: str = "", limit: int = 20) -> list[dict]:
    """The newest ``limit`` training jobs (name, status, created), newest first."""
    from sagemaker.core.resources import TrainingJob
    listed = TrainingJob.get_all(session=session, region=session.region_name, sort_by="CreationTime",
                                 sort_order="Descending", **({"name_contains": name_contains} if name_contains else {}))
    jobs = sorted(itertools.islice(listed, limit), key=lambda job: assigned(job.creation_time), reverse=True)
    return [{"job": job.training_job_name, "status": job.training_job_status,
             "created": _iso(assigned(job.creation_time))} for job in jobs]


def stop(name: str, session: boto3.Session) -> str:
    """Ask SageMaker to stop the job (train.py saves a checkpoint on SIGTERM); its status before."""
    job = get_job(name, session)
    if job.training_job_status in TERMINAL:
        return job.training_job_status
    job.stop()
    return job.training_job_status


@dataclass
class LogReader:
    """A job's CloudWatch log streams, read forward from where the last call stopped."""

    name: str
    session: boto3.Session
    tokens: dict = field(default_factory=dict)  # stream -> the next forward token

    def streams(self) -> list[str]:
        client = self.session.client("logs")
        names, token = [], None
        while True:
            kwargs = {"logGroupName": LOG_GROUP, "logStreamNamePrefix": f"{self.name}/", **({"nextToken": token} if token else {})}
            try:
                page = client.describe_log_streams(**kwargs)
            except client.exceptions.ResourceNotFoundException:
                return []
            names += [stream["logStreamName"] for stream in page.get("logStreams", [])]
            token = page.get("nextToken")
            if not token:
                return sorted(names)

    def new_lines(self) -> list[str]:
        """Every line written since the last call, ``<host> | <message>``, in time order across hosts."""
        client = self.session.client("logs")
        events = []
        for stream in self.streams():
            host = stream[len(self.name) + 1:].split("-")
            host = "-".join(host[:2]) if len(host) >= 2 else stream
            while True:
                kwargs = {"logGroupName": LOG_GROUP, "logStreamName": stream, "startFromHead": True}
                if stream in self.tokens:
                    kwargs["nextToken"] = self.tokens[stream]
                page = client.get_log_events(**kwargs)
                events += [(event["timestamp"], host, event["message"]) for event in page.get("events", [])]
                token = page.get("nextForwardToken")
                if token == self.tokens.get(stream) or not page.get("events"):
                    self.tokens[stream] = token or self.tokens.get(stream)
                    break
                self.tokens[stream] = token
        events.sort(key=lambda event: event[0])
        return [f"{host} | {message.rstrip()}" for _, host, message in events]


def attach(name: str, session: boto3.Session, interval: float = 15.0, out=print) -> str:
    """Print the job's log lines and status changes until it ends; returns the final status."""
    reader = LogReader(name, session)
    last = None
    while True:
        job = get_job(name, session)
        for line in reader.new_lines():
            out(line)
        status = job.training_job_status
        secondary = assigned(job.secondary_status)
        if (status, secondary) != last:
            out(f"{name}: {status}" + (f" ({secondary})" if secondary and secondary != status else ""))
            last = (status, secondary)
        if status in TERMINAL:
            reason = assigned(job.failure_reason)
            if reason:
                out(f"{name}: {reason}")
            return status
        time.sleep(interval)


def boto_session(region: str | None) -> boto3.Session:
    """A boto3 session in ``region`` (default: the AWS configuration's); ValueError when there is none."""
    session = boto3.Session(region_name=region) if region else boto3.Session()
    if not session.region_name:
        raise ValueError("no AWS region: pass --region or set AWS_DEFAULT_REGION")
    return session


def command(args) -> int:
    """status, logs, stop, attach and jobs: 0 done (attach: the job completed), 1 the job failed or
    stopped (attach), 2 no such job or no access."""
    try:
        session = boto_session(args.region)
        if session.get_credentials() is None:
            raise ValueError("no AWS credentials found (environment, ~/.aws, SSO or instance role)")
        if args.command == "jobs":
            for job in recent_jobs(session, args.name_contains, args.max):
                print(f"{job['job']:63} {job['status']:11} {job['created']}")
            return 0
        if args.command == "status":
            info = describe(get_job(args.job, session))
            print(json.dumps(info, indent=1) if args.json else status_text(info))
        elif args.command == "logs":
            get_job(args.job, session)
            lines = LogReader(args.job, session).new_lines()
            print("\n".join(lines) if lines else f"{args.job}: no log lines yet")
        elif args.command == "stop":
            before = stop(args.job, session)
            print(f"{args.job} already ended: {before}" if before in TERMINAL
                  else f"stopping {args.job} (was {before}); it checkpoints and ends as Stopped")
        else:
            final = attach(args.job, session, args.interval, out=lambda line: print(line, flush=True))
            return 0 if final == "Completed" else 1
        return 0
    except (ValueError, JobNotFound) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except botocore.exceptions.ClientError as err:
        print(f"error: {err.response.get('Error', {}).get('Code', '')}: "
              f"{err.response.get('Error', {}).get('Message', err)}", file=sys.stderr)
        return 2
    except botocore.exceptions.BotoCoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
